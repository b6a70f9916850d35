"""Hostile trees and files at ingest (issue 12, findings 1 and 2): symbolic links out of the
tree, the data directory, FIFOs, quadratic HTML, oversized files and files that take too long."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from ingest.loaders import (
    DATA_DIR_REFUSED,
    FileLimits,
    LoadFailure,
    SourceDocument,
    _read_html,
    discover,
    load,
)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def ingest(paths: list[Path], **kwargs: Any) -> tuple[list[SourceDocument], list[LoadFailure]]:
    limits = kwargs.pop("limits", None)
    entries, failures = discover([str(p) for p in paths], **kwargs)
    docs: list[SourceDocument] = []
    for entry in entries:
        for item in load(entry, "auto", limits):
            (docs if isinstance(item, SourceDocument) else failures).append(item)  # type: ignore[arg-type]
    return docs, failures


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    write(data / "local-api-key", "rk_secret_admin_key\n")
    return data


# --- finding 1: symbolic links and the data directory ---------------------------------------


def test_symlink_out_of_the_tree_is_skipped_and_reported(tmp_path: Path, data_dir: Path) -> None:
    docs_dir = tmp_path / "docs"
    write(docs_dir / "real.txt", "A real document.")
    (docs_dir / "key.txt").symlink_to(data_dir / "local-api-key")
    (docs_dir / "etc").symlink_to(data_dir, target_is_directory=True)

    docs, failures = ingest([docs_dir])

    assert [d.external_id for d in docs] == ["real.txt"]
    assert all("rk_secret" not in d.text for d in docs)
    reported = {Path(f.path).name: f for f in failures}
    assert set(reported) == {"key.txt", "etc"}
    assert all(f.skipped and "symbolic link" in f.reason for f in reported.values())


def test_explicit_symlink_is_a_failure_not_a_read(tmp_path: Path, data_dir: Path) -> None:
    link = tmp_path / "key.txt"
    link.symlink_to(data_dir / "local-api-key")
    docs, failures = ingest([link])
    assert docs == []
    (failure,) = failures
    assert failure.path == str(link) and not failure.skipped and "symbolic link" in failure.reason


def test_follow_symlinks_follows_only_links_inside_the_root(tmp_path: Path, data_dir: Path) -> None:
    docs_dir = tmp_path / "docs"
    write(docs_dir / "guide" / "install.md", "# Install\n\nRun it.")
    (docs_dir / "alias.md").symlink_to(docs_dir / "guide" / "install.md")
    (docs_dir / "loop").symlink_to(docs_dir, target_is_directory=True)
    (docs_dir / "key.txt").symlink_to(data_dir / "local-api-key")
    (docs_dir / "outside").symlink_to(data_dir, target_is_directory=True)

    docs, failures = ingest([docs_dir], follow_symlinks=True)

    # alias.md resolves to the file already taken (loaded once); nothing outside docs/ is read.
    assert [d.external_id for d in docs] == ["alias.md"] or [d.external_id for d in docs] == ["guide/install.md"]
    assert all("rk_secret" not in d.text for d in docs)
    names = {Path(f.path).name for f in failures}
    assert {"key.txt", "outside", "loop"} <= names


def test_nothing_under_the_data_directory_is_read(tmp_path: Path, data_dir: Path) -> None:
    # Explicitly, through a folder that contains it, and through a link followed inside the root.
    root = tmp_path
    write(root / "notes.txt", "Plain notes.")
    write(data_dir / "export.jsonl", '{"id": "1", "text": "cached answer"}\n')
    (root / "link-to-key.txt").symlink_to(data_dir / "local-api-key")

    for path in (data_dir / "local-api-key", data_dir / "export.jsonl", data_dir):
        explicit, explicit_failures = ingest([path], data_dir=data_dir)
        assert explicit == [], path
        assert [f.reason for f in explicit_failures] == [DATA_DIR_REFUSED], path

    docs, failures = ingest([root], data_dir=data_dir, follow_symlinks=True)
    assert [d.external_id for d in docs] == ["notes.txt"]
    refused = {Path(f.path).name: f.skipped for f in failures if f.reason == DATA_DIR_REFUSED}
    assert refused == {"data": True, "link-to-key.txt": True}


def test_file_swapped_for_a_link_after_discovery_is_refused(tmp_path: Path, data_dir: Path) -> None:
    docs_dir = tmp_path / "docs"
    target = write(docs_dir / "a.txt", "Innocent.")
    (entry,), _ = discover([str(docs_dir)])
    target.unlink()
    target.symlink_to(data_dir / "local-api-key")
    (result,) = load(entry)
    assert isinstance(result, LoadFailure) and "symbolic link" in result.reason


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_is_reported_not_waited_on(tmp_path: Path) -> None:
    docs_dir = tmp_path / "docs"
    write(docs_dir / "a.txt", "Text.")
    os.mkfifo(docs_dir / "pipe.txt")
    docs, failures = ingest([docs_dir])
    assert [d.external_id for d in docs] == ["a.txt"]
    (failure,) = failures
    assert failure.path.endswith("pipe.txt") and "not a regular file" in failure.reason


# --- finding 2: HTML extraction in linear work, size and time limits ------------------------


def count_python_lines(work: Callable[[], object]) -> int:
    """Python lines executed by `work` (a deterministic measure of work, unlike a clock)."""
    lines = 0

    def tracer(frame: FrameType, event: str, arg: object) -> Any:
        nonlocal lines
        if event == "line":
            lines += 1
        return tracer

    sys.settrace(tracer)
    try:
        work()
    finally:
        sys.settrace(None)
    return lines


@pytest.mark.parametrize(
    "page",
    [
        pytest.param(lambda n: "<p>x</p>" * n, id="flat-paragraphs"),
        pytest.param(lambda n: "<div>" * n + "x" + "</div>" * n, id="nested-divs"),
        pytest.param(lambda n: "<div><p>x<br>y</p><table><tr><td>c</td></tr></table>" * n, id="mixed"),
    ],
)
def test_html_extraction_work_grows_linearly(page: Callable[[int], str]) -> None:
    small = count_python_lines(lambda: _read_html(page(400)))
    large = count_python_lines(lambda: _read_html(page(1600)))
    # Four times the input, four times the work (measured 3.9-4.0; BeautifulSoup with its tree
    # edits: 8.0 on nested divs), and a bounded amount of work per byte (measured 10-16 lines;
    # BeautifulSoup: 216 on nested divs, 510 on flat paragraphs, which took 19 s at 10,000).
    assert large < 4.4 * small, (small, large)
    assert large / len(page(1600)) < 40, large / len(page(1600))


def test_file_over_the_size_limit_is_reported_and_skipped(tmp_path: Path) -> None:
    docs_dir = tmp_path / "docs"
    write(docs_dir / "small.html", "<p>small</p>")
    big = write(docs_dir / "big.html", "<p>x</p>" * 200)
    docs, failures = ingest([docs_dir], limits=FileLimits(max_bytes=1000))
    assert [d.external_id for d in docs] == ["small.html"]
    (failure,) = failures
    assert failure.path == str(big) and not failure.skipped
    assert "1600 bytes" in failure.reason and "RAG_INGEST_MAX_FILE_BYTES" in failure.reason


@pytest.mark.parametrize("name", ["slow.html", "slow.jsonl"])
def test_file_over_the_time_limit_is_reported_and_skipped(tmp_path: Path, name: str) -> None:
    docs_dir = tmp_path / "docs"
    write(docs_dir / "quick.txt", "Quick.")
    # Several parse steps (HTML slices / JSON lines): the deadline, a nanosecond away, has passed
    # by the first check, whatever the machine's speed.
    if name.endswith(".html"):
        content = "<div>" * 40_000 + "x" + "</div>" * 40_000
    else:
        content = "".join(f'{{"id": "{i}", "text": "t"}}\n' for i in range(3))
    slow = write(docs_dir / name, content)
    docs, failures = ingest([docs_dir], limits=FileLimits(timeout_s=1e-9))
    assert [d.external_id for d in docs] == ["quick.txt"]
    (failure,) = failures
    assert failure.path.startswith(str(slow))
    assert "RAG_INGEST_FILE_TIMEOUT_S" in failure.reason
