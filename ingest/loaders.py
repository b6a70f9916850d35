"""Turning paths into documents: discovery (files, folders, globs) and one loader per format.

A loader never raises for bad input: it yields a `LoadFailure` naming the file (and line)
and the reason, so one bad file costs only itself.

What a hostile tree cannot do (docs/operations.md, "Security model"):
- make ingest read outside it: symbolic links are skipped (reported, not followed) unless
  `follow_symlinks`, and then only links resolving inside the folder given are followed;
  nothing under the data directory (RAG_DATA_DIR: keys, cache, database) is ever read;
  only regular files are opened (a FIFO would block the run);
- stall the run: a file over `FileLimits.max_bytes` is refused before it is read, and
  parsing one file stops at `FileLimits.timeout_s` (HTML text is extracted in one linear
  pass, fed in slices with a deadline check between them; PDF pages and JSON lines are
  checked one by one).
"""

from __future__ import annotations

import errno
import glob
import io
import json
import os
import re
import stat
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Literal

Format = Literal["auto", "beir", "jsonl"]

TEXT_SUFFIXES = {".txt", ".text", ".md", ".markdown", ".rst"}
HTML_SUFFIXES = {".html", ".htm"}
SUPPORTED = TEXT_SUFFIXES | HTML_SUFFIXES | {".pdf", ".jsonl"}

SYMLINK_SKIPPED = "symbolic link, not followed (--follow-symlinks follows links that stay inside the folder given)"
DATA_DIR_REFUSED = "inside the data directory (RAG_DATA_DIR), which is never ingested"


@dataclass(frozen=True)
class SourceDocument:
    source: str
    external_id: str
    uri: str
    title: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)
    collection: str = "default"  # who may read it (service/policy/collections.py); `source` is a free tag


@dataclass(frozen=True)
class LoadFailure:
    """A file (or line) that was not ingested. `skipped`: left out on purpose (a symbolic link
    met while walking a folder), reported but not an error; otherwise a failure (exit code 1)."""

    path: str
    reason: str
    skipped: bool = False


@dataclass(frozen=True)
class FileLimits:
    """Per-file bounds (RAG_INGEST_MAX_FILE_BYTES, RAG_INGEST_FILE_TIMEOUT_S)."""

    max_bytes: int = 50_000_000
    timeout_s: float = 30.0


@dataclass(frozen=True)
class FileEntry:
    """A file to load, with the source it belongs to and its id inside that source.

    `inside`: the resolved folder the file must still resolve into when it is opened (None:
    the file itself must not be a symbolic link); `forbidden`: the resolved data directory.
    Both are checked again at load time, so a file swapped for a link after discovery is refused.
    """

    path: Path
    source: str
    external_id: str
    inside: Path | None = None
    forbidden: Path | None = None


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def discover(
    paths: Sequence[str],
    *,
    source: str | None = None,
    follow_symlinks: bool = False,
    data_dir: Path | None = None,
) -> tuple[list[FileEntry], list[LoadFailure]]:
    """Expand files, folders (recursively) and globs.

    The source defaults to the folder's name (or a file's parent folder's name); the id is
    the path relative to the folder given, so the same tree always maps to the same ids.
    Symbolic links met in a folder are reported as skipped; a link given explicitly (or by a
    glob) is a failure unless `follow_symlinks` and it resolves inside its folder. Anything
    resolving into `data_dir` is refused.
    """
    entries: list[FileEntry] = []
    failures: list[LoadFailure] = []
    seen: set[Path] = set()
    forbidden = data_dir.resolve() if data_dir is not None else None

    def add(path: Path, root: Path, explicit: bool) -> None:
        def refuse(reason: str) -> None:
            failures.append(LoadFailure(str(path), reason, skipped=not explicit))

        if explicit and forbidden is not None and _within(path.resolve(), forbidden):
            return refuse(DATA_DIR_REFUSED)
        if path.suffix.lower() not in SUPPORTED:
            if explicit:
                refuse(f"unsupported file type {path.suffix or '(none)'!r}")
            return
        folder = (root if root != path else path.parent).resolve()
        if path.is_symlink():
            if not follow_symlinks:
                return refuse(SYMLINK_SKIPPED)
            if not _within(path.resolve(), folder):
                return refuse(f"symbolic link to {path.resolve()}, outside {folder}; not followed")
        resolved = path.resolve()
        if forbidden is not None and _within(resolved, forbidden):
            return refuse(DATA_DIR_REFUSED)
        if resolved in seen:
            return
        seen.add(resolved)
        rel = path.relative_to(root).as_posix() if root != path else path.name
        inside = folder if follow_symlinks else None
        name = source or _source_name(root if root != path else path.parent)
        entries.append(FileEntry(path, name, rel, inside=inside, forbidden=forbidden))

    for raw in paths:
        path = Path(raw)
        if path.is_dir() and forbidden is not None and _within(path.resolve(), forbidden):
            failures.append(LoadFailure(raw, DATA_DIR_REFUSED))
        elif path.is_dir():
            for child, skip_reason in _walk(path, follow_symlinks, forbidden):
                if skip_reason:
                    failures.append(LoadFailure(str(child), skip_reason, skipped=True))
                else:
                    add(child, path, explicit=False)
        elif path.is_file() or path.is_symlink():
            add(path, path, explicit=True)
        elif glob.has_magic(raw):
            matches = sorted(Path(m) for m in glob.glob(raw, recursive=True))  # noqa: PTH207 absolute patterns too
            files = [m for m in matches if m.is_file() or m.is_symlink()]
            if not files:
                failures.append(LoadFailure(raw, "no files match this pattern"))
            for match in files:
                add(match, match, explicit=True)
        else:
            failures.append(LoadFailure(raw, "no such file or directory"))
    return entries, failures


def _walk(root: Path, follow_symlinks: bool, forbidden: Path | None) -> list[tuple[Path, str]]:
    """Every non-hidden file under `root`, sorted, plus the folders not entered, with the reason:
    symbolic links (with `follow_symlinks`, links to folders inside `root` are entered, once
    each) and the data directory."""
    top = root.resolve()
    found: list[tuple[Path, str]] = []
    visited: set[Path] = {top}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=follow_symlinks):
        here = Path(dirpath)
        keep = []
        for name in sorted(dirnames):
            if name.startswith("."):
                continue
            child = here / name
            if forbidden is not None and child.resolve() == forbidden and not child.is_symlink():
                found.append((child, DATA_DIR_REFUSED))
                continue
            if child.is_symlink():
                target = child.resolve()
                if not follow_symlinks:
                    found.append((child, SYMLINK_SKIPPED))
                    continue
                if not _within(target, top) or target in visited:
                    found.append((child, f"symbolic link to {target}, outside {top} or already walked; not followed"))
                    continue
                visited.add(target)
            keep.append(name)
        dirnames[:] = keep
        found.extend((here / name, "") for name in filenames if not name.startswith("."))
    found.sort()
    return found


def _source_name(folder: Path) -> str:
    return folder.resolve().name or "default"


def load(
    entry: FileEntry, fmt: Format = "auto", limits: FileLimits | None = None
) -> Iterator[SourceDocument | LoadFailure]:
    limits = limits or FileLimits()
    deadline = _Deadline(limits.timeout_s)
    suffix = entry.path.suffix.lower()
    try:
        data = _read_checked(entry, limits.max_bytes)
        if suffix == ".jsonl" or fmt in ("beir", "jsonl"):
            yield from _load_jsonl(entry, data, beir=fmt == "beir", deadline=deadline)
            return
        if suffix == ".pdf":
            title, text = _read_pdf(entry.path, data, deadline)
        elif suffix in HTML_SUFFIXES:
            title, text = _read_html(_decode(data), deadline)
        else:
            text = _decode(data)
            title = _markdown_title(text) or entry.path.stem
    except _BadFile as exc:
        yield LoadFailure(str(entry.path), str(exc))
        return
    except OSError as exc:
        yield LoadFailure(str(entry.path), f"cannot read: {exc.strerror or exc}")
        return
    if not text.strip():
        yield LoadFailure(str(entry.path), "no text in file" if data else "empty file")
        return
    yield SourceDocument(entry.source, entry.external_id, str(entry.path), title, text)


class _BadFile(Exception):
    pass


class _Deadline:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    def check(self) -> None:
        if time.monotonic() > self.at:
            raise _BadFile(f"took longer than {self.seconds:g} s to parse (RAG_INGEST_FILE_TIMEOUT_S); skipped")


def _read_checked(entry: FileEntry, max_bytes: int) -> bytes:
    """The file's bytes, after the containment checks, from a regular file of at most `max_bytes`."""
    path = entry.path
    if entry.inside is None:
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
    else:
        flags = os.O_RDONLY
        if not _within(path.resolve(), entry.inside):
            raise _BadFile(f"resolves to {path.resolve()}, outside {entry.inside}; not followed")
    if entry.forbidden is not None and _within(path.resolve(), entry.forbidden):
        raise _BadFile(DATA_DIR_REFUSED)
    try:
        fd = os.open(path, flags | getattr(os, "O_NONBLOCK", 0))  # a FIFO must not block the open
    except OSError as exc:
        if exc.errno == errno.ELOOP and entry.inside is None and path.is_symlink():
            raise _BadFile(f"cannot read: {SYMLINK_SKIPPED}") from None
        raise
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
        if not stat.S_ISREG(info.st_mode):
            raise _BadFile("cannot read: not a regular file")
        if info.st_size > max_bytes:
            raise _BadFile(_too_large(info.st_size, max_bytes))
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew while being read
        raise _BadFile(_too_large(len(data), max_bytes))
    return data


def _too_large(size: int, max_bytes: int) -> str:
    return f"file is {size} bytes, over the {max_bytes} byte limit (RAG_INGEST_MAX_FILE_BYTES); skipped"


def _decode(data: bytes) -> str:
    if b"\x00" in data[:8192]:
        raise _BadFile("binary file (NUL bytes), not text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _BadFile(f"not valid UTF-8 text (byte {exc.start})") from None


def _markdown_title(text: str) -> str | None:
    match = re.search(r"^\s{0,3}#\s+(.+?)\s*#*\s*$", text, re.MULTILINE)
    return match[1] if match else None


_SKIPPED_TAGS = frozenset({"script", "style", "noscript", "template", "nav", "footer"})
_BLOCK_TAGS = frozenset({"p", "li", "dt", "dd", "tr", "pre", "blockquote", "div"})
_HEADINGS = {f"h{level}": level for level in range(1, 7)}
_HTML_SLICE = 64 * 1024  # characters fed to the parser between deadline checks


class _TextExtractor(HTMLParser):
    """Visible text of an HTML page in one pass over its events, without building a tree.

    Headings become markdown headings (the chunker splits on them), block ends become blank
    lines, `<br>` a newline and table cells a space; script, style, noscript, template, nav
    and footer are dropped with everything inside them, and so is the `<head>`. Each event
    costs O(1) whatever the nesting, so the work is linear in the size of the page.
    """

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip_depth = 0
        self.in_head = False
        self.title: str | None = None
        self.first_h1: str | None = None
        self._title_parts: list[str] | None = None
        self._heading: tuple[str, list[str]] | None = None
        self.events = 0  # handler calls, for tests of linear work

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.events += 1
        if tag in _SKIPPED_TAGS:
            self.skip_depth += 1
        elif self.skip_depth:
            return
        elif tag == "title" and self.title is None and self._title_parts is None:
            self._title_parts = []
        elif tag == "head":
            self.in_head = True
        elif tag == "body":
            self.in_head = False
        elif tag in _HEADINGS and self._heading is None:
            self._heading = (tag, [])
        elif tag == "br":
            self._text("\n")

    def handle_endtag(self, tag: str) -> None:
        self.events += 1
        if tag in _SKIPPED_TAGS:
            self.skip_depth = max(0, self.skip_depth - 1)
        elif self.skip_depth:
            return
        elif tag == "title" and self._title_parts is not None:
            self.title = _joined(self._title_parts)
            self._title_parts = None
        elif tag == "head":
            self.in_head = False
        elif self._heading is not None and tag == self._heading[0]:
            self._end_heading()
        elif tag in ("td", "th"):
            self._text(" ")
        elif tag in _BLOCK_TAGS:
            self._text("\n\n")

    def handle_data(self, data: str) -> None:
        self.events += 1
        if self.skip_depth:
            return
        if self._title_parts is not None:
            self._title_parts.append(data)
        elif not self.in_head:
            self._text(data)

    def _text(self, text: str) -> None:
        if self._heading is not None:
            self._heading[1].append(text)
        else:
            self.parts.append(text)

    def _end_heading(self) -> None:
        assert self._heading is not None
        tag, parts = self._heading
        self._heading = None
        text = _joined(parts)
        if tag == "h1" and self.first_h1 is None:
            self.first_h1 = text
        self.parts.append(f"\n\n{'#' * _HEADINGS[tag]} {text}\n\n")

    def finish(self) -> None:
        self.close()
        if self._heading is not None:
            self._end_heading()
        if self._title_parts is not None:
            self.title = _joined(self._title_parts)


def _joined(parts: list[str]) -> str:
    return " ".join(word for part in parts for word in [part.strip()] if word)


def _read_html(html: str, deadline: _Deadline | None = None) -> tuple[str, str]:
    extractor = _TextExtractor()
    for start in range(0, len(html), _HTML_SLICE):
        extractor.feed(html[start : start + _HTML_SLICE])
        if deadline is not None and start + _HTML_SLICE < len(html):
            deadline.check()
    extractor.finish()
    title = extractor.title if extractor.title is not None else extractor.first_h1 or ""
    text = "".join(extractor.parts)
    lines = [re.sub(r"[ \t\r\f\v]+", " ", line).strip() for line in text.splitlines()]
    return title, re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _read_pdf(path: Path, data: bytes, deadline: _Deadline) -> tuple[str, str]:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise _BadFile("encrypted PDF")
        pages = []
        for page in reader.pages:
            pages.append(page.extract_text() or "")
            deadline.check()
        title = (reader.metadata.title if reader.metadata else None) or path.stem
    except NotImplementedError:  # pypdf: certificate (public-key) encryption
        raise _BadFile("encrypted PDF (unsupported encryption)") from None
    except (PdfReadError, ValueError, KeyError) as exc:
        raise _BadFile(f"unreadable PDF: {exc}") from None
    text = "\n\n".join(p.strip() for p in pages if p.strip())
    if not text:
        raise _BadFile("PDF has no extractable text (scanned images?)")
    return str(title), text


def _load_jsonl(
    entry: FileEntry, raw: bytes, *, beir: bool, deadline: _Deadline
) -> Iterator[SourceDocument | LoadFailure]:
    """`{"id","title","text"}` per line, or BEIR `{"_id","title","text","metadata"}`."""
    id_field = "_id" if beir else "id"
    seen: set[str] = set()
    if b"\x00" in raw[:8192]:
        yield LoadFailure(str(entry.path), "binary file (NUL bytes), not JSON lines")
        return
    if not raw.strip():
        yield LoadFailure(str(entry.path), "empty file")
        return
    for number, line in enumerate(raw.splitlines(), start=1):
        where = f"{entry.path}:{number}"
        try:
            deadline.check()
        except _BadFile as exc:
            yield LoadFailure(where, f"{exc} (this line and the rest of the file)")
            return
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
