"""`rag-ingest add` on a hostile tree (issue 12, findings 1 and 2), as a user runs it: a link
to the admin key, an oversized page and a page that takes too long are each reported on a
line naming the file and the reason, the rest is ingested, exit code 1, no traceback."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from service.settings import Settings
from tests.support.servers import BIN, cli_env


def test_cli_skips_links_and_reports_oversized_and_slow_files(settings: Settings, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    key = data_dir / "local-api-key"
    key.parent.mkdir()
    key.write_text("rk_the_admin_key\n", encoding="utf-8")
    tree = tmp_path / "corpus"
    tree.mkdir()
    (tree / "good.txt").write_text("How to flush the cache: run rag-admin cache flush.", encoding="utf-8")
    (tree / "key.txt").symlink_to(key)
    (tree / "big.html").write_text("<p>x</p>" * 200, encoding="utf-8")  # 1600 bytes
    env = cli_env(settings, RAG_DATA_DIR=str(data_dir), COLUMNS="1000")

    run = subprocess.run(
        [BIN / "rag-ingest", "add", str(tree)],
        env={**env, "RAG_INGEST_MAX_FILE_BYTES": "1000"},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr
    lines = run.stderr.splitlines()
    assert any(line.startswith(f"skipped {tree / 'key.txt'}: symbolic link") for line in lines), run.stderr
    assert any(
        line.startswith(f"failed {tree / 'big.html'}: file is 1600 bytes") and "RAG_INGEST_MAX_FILE_BYTES" in line
        for line in lines
    ), run.stderr
    status = subprocess.run([BIN / "rag-ingest", "status", "--json"], env=env, capture_output=True, text=True)
    assert json.loads(status.stdout)["documents"] == 1  # good.txt only

    # A page with many parse steps and a deadline a nanosecond away: past at the first check.
    slow = tree / "slow.html"
    slow.write_text("<div>" * 30_000 + "deep" + "</div>" * 30_000, encoding="utf-8")
    timed = subprocess.run(
        [BIN / "rag-ingest", "add", str(slow), "--json"],
        env={**env, "RAG_INGEST_FILE_TIMEOUT_S": "0.000000001"},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert timed.returncode == 1, timed.stderr
    summary = json.loads(timed.stdout)
    assert [f["path"] for f in summary["failures"]] == [str(slow)]
    assert "RAG_INGEST_FILE_TIMEOUT_S" in summary["failures"][0]["reason"]
    assert "Traceback" not in timed.stderr
