"""Turning paths into documents: discovery (files, folders, globs) and one loader per format.

A loader never raises for bad input: it yields a `LoadFailure` naming the file (and line)
and the reason, so one bad file costs only itself.
"""

from __future__ import annotations

import glob
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Format = Literal["auto", "beir", "jsonl"]

TEXT_SUFFIXES = {".txt", ".text", ".md", ".markdown", ".rst"}
HTML_SUFFIXES = {".html", ".htm"}
SUPPORTED = TEXT_SUFFIXES | HTML_SUFFIXES | {".pdf", ".jsonl"}


@dataclass(frozen=True)
class SourceDocument:
    source: str
    external_id: str
    uri: str
    title: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LoadFailure:
    path: str
    reason: str


@dataclass(frozen=True)
class FileEntry:
    """A file to load, with the source it belongs to and its id inside that source."""

    path: Path
    source: str
    external_id: str


def discover(paths: Sequence[str], *, source: str | None = None) -> tuple[list[FileEntry], list[LoadFailure]]:
    """Expand files, folders (recursively) and globs.

    The source defaults to the folder's name (or a file's parent folder's name); the id is
    the path relative to the folder given, so the same tree always maps to the same ids.
    """
    entries: list[FileEntry] = []
    failures: list[LoadFailure] = []
    seen: set[Path] = set()

    def add(path: Path, root: Path, explicit: bool) -> None:
        resolved = path.resolve()
        if resolved in seen:
            return
        seen.add(resolved)
        if path.suffix.lower() not in SUPPORTED:
            if explicit:
                failures.append(LoadFailure(str(path), f"unsupported file type {path.suffix or '(none)'!r}"))
            return
        rel = path.relative_to(root).as_posix() if root != path else path.name
        entries.append(FileEntry(path, source or _source_name(root if root != path else path.parent), rel))

    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                hidden = any(part.startswith(".") for part in child.relative_to(path).parts)
                if child.is_file() and not hidden:
                    add(child, path, explicit=False)
        elif path.is_file():
            add(path, path, explicit=True)
        elif glob.has_magic(raw):
            matches = sorted(Path(m) for m in glob.glob(raw, recursive=True))  # noqa: PTH207 absolute patterns too
            files = [m for m in matches if m.is_file()]
            if not files:
                failures.append(LoadFailure(raw, "no files match this pattern"))
            for match in files:
                add(match, match, explicit=True)
        else:
            failures.append(LoadFailure(raw, "no such file or directory"))
    return entries, failures


def _source_name(folder: Path) -> str:
    return folder.resolve().name or "default"


def load(entry: FileEntry, fmt: Format = "auto") -> Iterator[SourceDocument | LoadFailure]:
    suffix = entry.path.suffix.lower()
    try:
        if suffix == ".jsonl" or fmt in ("beir", "jsonl"):
            yield from _load_jsonl(entry, beir=fmt == "beir")
            return
        if suffix == ".pdf":
            title, text = _read_pdf(entry.path)
        elif suffix in HTML_SUFFIXES:
            title, text = _read_html(_read_text(entry.path))
        else:
            text = _read_text(entry.path)
            title = _markdown_title(text) or entry.path.stem
    except _BadFile as exc:
        yield LoadFailure(str(entry.path), str(exc))
        return
    except OSError as exc:
        yield LoadFailure(str(entry.path), f"cannot read: {exc.strerror or exc}")
        return
    if not text.strip():
        yield LoadFailure(str(entry.path), "no text in file" if entry.path.stat().st_size else "empty file")
        return
    yield SourceDocument(entry.source, entry.external_id, str(entry.path), title, text)


class _BadFile(Exception):
    pass


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        raise _BadFile("binary file (NUL bytes), not text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _BadFile(f"not valid UTF-8 text (byte {exc.start})") from None


def _markdown_title(text: str) -> str | None:
    match = re.search(r"^\s{0,3}#\s+(.+?)\s*#*\s*$", text, re.MULTILINE)
    return match[1] if match else None


def _read_html(html: str) -> tuple[str, str]:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(html, "html.parser")
    for tag in soup(["script", "style", "noscript", "template", "nav", "footer"]):
        tag.decompose()
    title_tag = soup.find("title") or soup.find("h1")
    title = title_tag.get_text(" ", strip=True) if title_tag is not None else ""
    # Keep headings recognisable to the chunker, which splits on markdown headings.
    for level in range(1, 7):
        for heading in soup.find_all(f"h{level}"):
            heading.replace_with(f"\n\n{'#' * level} {heading.get_text(' ', strip=True)}\n\n")
    for br in soup.find_all("br"):
        br.replace_with("\n")
    for cell in soup.find_all(["td", "th"]):
        cell.insert_after(" ")
    for block in soup.find_all(["p", "li", "dt", "dd", "tr", "pre", "blockquote", "div"]):
        block.insert_after("\n\n")
    body = soup.body or soup
    text = body.get_text("")
    lines = [re.sub(r"[ \t\r\f\v]+", " ", line).strip() for line in text.splitlines()]
    return title, re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _read_pdf(path: Path) -> tuple[str, str]:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(path)
        if reader.is_encrypted:
            raise _BadFile("encrypted PDF")
        pages = [page.extract_text() or "" for page in reader.pages]
        title = (reader.metadata.title if reader.metadata else None) or path.stem
    except NotImplementedError:  # pypdf: certificate (public-key) encryption
        raise _BadFile("encrypted PDF (unsupported encryption)") from None
    except (PdfReadError, ValueError, KeyError) as exc:
        raise _BadFile(f"unreadable PDF: {exc}") from None
    text = "\n\n".join(p.strip() for p in pages if p.strip())
    if not text:
        raise _BadFile("PDF has no extractable text (scanned images?)")
    return str(title), text


def _load_jsonl(entry: FileEntry, *, beir: bool) -> Iterator[SourceDocument | LoadFailure]:
    """`{"id","title","text"}` per line, or BEIR `{"_id","title","text","metadata"}`."""
    id_field = "_id" if beir else "id"
    seen: set[str] = set()
    raw = entry.path.read_bytes()
    if b"\x00" in raw[:8192]:
        yield LoadFailure(str(entry.path), "binary file (NUL bytes), not JSON lines")
        return
    if not raw.strip():
        yield LoadFailure(str(entry.path), "empty file")
        return
    for number, line in enumerate(raw.splitlines(), start=1):
        where = f"{entry.path}:{number}"
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            yield LoadFailure(where, f"invalid JSON: {exc}")
            continue
        if not isinstance(record, dict):
            yield LoadFailure(where, "expected a JSON object")
            continue
        doc_id = record.get(id_field, record.get("id") if beir else None)
        text = record.get("text")
        if not isinstance(doc_id, str | int) or str(doc_id) == "":
            yield LoadFailure(where, f"missing {id_field!r}")
            continue
        if not isinstance(text, str) or not text.strip():
            yield LoadFailure(where, "missing or empty 'text'")
            continue
        doc_id = str(doc_id)
        if doc_id in seen:
            yield LoadFailure(where, f"duplicate id {doc_id!r} in this file")
            continue
        seen.add(doc_id)
        metadata = record.get("metadata")
        yield SourceDocument(
            source=entry.source,
            external_id=doc_id,
            uri=f"{entry.path}#{doc_id}",
            title=str(record.get("title") or ""),
            text=text,
            metadata=metadata if isinstance(metadata, dict) else {},
        )
