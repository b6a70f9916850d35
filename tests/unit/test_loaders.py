"""Discovery of files/folders/globs and the per-format loaders in `ingest.loaders`."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from ingest.loaders import FileEntry, Format, LoadFailure, SourceDocument, discover, load

# --- helpers ---------------------------------------------------------------------------------


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def entry(path: Path, source: str = "src", external_id: str | None = None) -> FileEntry:
    return FileEntry(path, source, external_id or path.name)


def load_all(e: FileEntry, fmt: Format = "auto") -> list[SourceDocument | LoadFailure]:
    return list(load(e, fmt))


def docs_of(results: list[SourceDocument | LoadFailure]) -> list[SourceDocument]:
    return [r for r in results if isinstance(r, SourceDocument)]


def failures_of(results: list[SourceDocument | LoadFailure]) -> list[LoadFailure]:
    return [r for r in results if isinstance(r, LoadFailure)]


def only_failure(results: list[SourceDocument | LoadFailure]) -> LoadFailure:
    assert len(results) == 1, results
    assert isinstance(results[0], LoadFailure), results
    return results[0]


def file_failure(path: Path) -> LoadFailure:
    """The one failure loading `path` gives, which names that file."""
    failure = only_failure(load_all(entry(path)))
    assert failure.path == str(path)
    return failure


def make_pdf(text: str = "Hello ragcache PDF", *, title: str | None = None, extra_trailer: str = "") -> bytes:
    """A minimal valid one-page PDF (Helvetica, one text line) with a correct xref table."""
    content = f"BT /F1 12 Tf 72 712 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
        b"/Resources << /Font << /F1 4 0 R >> >> /Contents 5 0 R >>",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        b"<< /Length " + str(len(content)).encode() + b" >>\nstream\n" + content + b"\nendstream",
    ]
    if title is not None:
        objects.append(f"<< /Title ({title}) >>".encode())
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n".encode() + b"0000000000 65535 f \n"
    out += b"".join(f"{offset:010d} 00000 n \n".encode() for offset in offsets)
    info = f" /Info {len(objects)} 0 R" if title is not None else ""
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R{info}{extra_trailer} >>\n".encode()
    out += f"startxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def jsonl(*records: object) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """docs/ with nested folders, hidden files/dirs and unsupported files."""
    docs = tmp_path / "docs"
    write(docs / "a.txt", "Alpha text.")
    write(docs / "b.md", "# Bee\n\nBee text.")
    write(docs / "notes.TXT", "Upper-case suffix.")
    write(docs / "sub" / "c.html", "<html><body><p>See text.</p></body></html>")
    write(docs / "sub" / "deeper" / "d.jsonl", jsonl({"id": "d1", "title": "D", "text": "Dee."}))
    write(docs / "sub" / "deeper" / "f.md", "Eff text.")
    write(docs / "sub" / "e.pdf", make_pdf())
    # skipped: hidden files and anything under hidden folders
    write(docs / ".hidden.txt", "hidden")
    write(docs / ".git" / "config.txt", "hidden too")
    write(docs / "sub" / ".cache" / "x.md", "hidden as well")
    # ignored without complaint inside a folder: unsupported types
    write(docs / "image.png", b"\x89PNG\r\n\x1a\n\x00\x00")
    write(docs / "Makefile", "all:\n\ttrue\n")
    write(docs / "sub" / "data.csv", "a,b\n1,2\n")
    return docs


# --- discover --------------------------------------------------------------------------------

TREE_IDS = ["a.txt", "b.md", "notes.TXT", "sub/c.html", "sub/deeper/d.jsonl", "sub/deeper/f.md", "sub/e.pdf"]


def test_discover_folder_recursively(tree: Path) -> None:
    entries, failures = discover([str(tree)])
    assert failures == []
    assert sorted(e.external_id for e in entries) == TREE_IDS
    assert len(entries) == len(TREE_IDS)
    for e in entries:
        assert e.source == "docs"
        assert e.path.is_file()
        assert e.path.resolve() == (tree / e.external_id).resolve()


def test_discover_folder_order_is_stable(tree: Path) -> None:
    first, _ = discover([str(tree)])
    second, _ = discover([str(tree) + "/"])
    assert first == second
    assert [e.external_id for e in first] == sorted(e.external_id for e in first)


def test_discover_folder_given_relative_to_cwd(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tree)
    entries, failures = discover(["sub"])
    assert failures == []
    assert sorted((e.source, e.external_id) for e in entries) == [
        ("sub", "c.html"),
        ("sub", "deeper/d.jsonl"),
        ("sub", "deeper/f.md"),
        ("sub", "e.pdf"),
    ]
    entries, _ = discover(["."])
    assert {e.source for e in entries} == {"docs"}  # "." is named after the real folder
    assert "a.txt" in {e.external_id for e in entries}


def test_discover_explicit_file(tree: Path) -> None:
    entries, failures = discover([str(tree / "sub" / "c.html")])
    assert failures == []
    assert entries == [FileEntry(tree / "sub" / "c.html", "sub", "c.html")]


def test_discover_explicit_hidden_file_is_taken(tree: Path) -> None:
    entries, failures = discover([str(tree / ".hidden.txt")])
    assert failures == []
    assert [(e.source, e.external_id) for e in entries] == [("docs", ".hidden.txt")]


def test_discover_source_override(tree: Path) -> None:
    entries, failures = discover([str(tree), str(tree.parent / "docs" / "sub" / "e.pdf")], source="kb")
    assert failures == []
    assert {e.source for e in entries} == {"kb"}
    assert sorted(e.external_id for e in entries) == TREE_IDS  # e.pdf already came with the folder


def test_discover_glob(tree: Path) -> None:
    entries, failures = discover([str(tree / "*.txt")])
    assert failures == []
    assert [(e.path, e.source, e.external_id) for e in entries] == [(tree / "a.txt", "docs", "a.txt")]


def test_discover_recursive_glob(tree: Path) -> None:
    entries, failures = discover([str(tree / "**" / "*.md")])
    assert failures == []
    assert sorted((e.path.relative_to(tree).as_posix(), e.source, e.external_id) for e in entries) == [
        ("b.md", "docs", "b.md"),
        ("sub/deeper/f.md", "deeper", "f.md"),
    ]  # .cache/x.md is hidden


def test_discover_relative_glob(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tree.parent)
    entries, failures = discover(["docs/sub/*.*"], source="s")
    assert failures == [LoadFailure("docs/sub/data.csv", "unsupported file type '.csv'")]
    assert sorted(e.external_id for e in entries) == ["c.html", "e.pdf"]


def test_discover_missing_path(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope" / "file.txt")
    assert discover([missing]) == ([], [LoadFailure(missing, "no such file or directory")])


@pytest.mark.parametrize("pattern", ["*.nothing", "**/*.zzz", "sub?/*.txt", "[xyz]*.md"])
def test_discover_glob_without_matches(tree: Path, pattern: str) -> None:
    raw = str(tree / pattern)
    entries, failures = discover([raw])
    assert entries == []
    assert len(failures) == 1
    assert failures[0].path == raw
    assert "no files match" in failures[0].reason


def test_discover_glob_matching_only_folders_is_a_failure(tree: Path) -> None:
    raw = str(tree / "su*")
    entries, failures = discover([raw])
    assert entries == []
    assert [f.path for f in failures] == [raw]


@pytest.mark.parametrize(
    ("name", "suffix"), [("report.docx", "'.docx'"), ("Makefile", "'(none)'"), ("x.png", "'.png'")]
)
def test_discover_explicit_unsupported_file(tmp_path: Path, name: str, suffix: str) -> None:
    path = write(tmp_path / name, "content")
    entries, failures = discover([str(path)])
    assert entries == []
    assert len(failures) == 1
    assert failures[0].path == str(path)
    assert "unsupported" in failures[0].reason
    assert suffix in failures[0].reason


def test_discover_same_file_twice_is_loaded_once(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tree)
    a = tree / "a.txt"
    entries, failures = discover([str(a), str(a), "a.txt", "./a.txt", str(tree / "sub" / ".." / "a.txt")])
    assert failures == []
    assert len(entries) == 1
    entries, _ = discover([str(tree), str(a), str(tree / "*.txt")])
    assert sorted(e.external_id for e in entries) == TREE_IDS


def test_discover_continues_after_bad_paths(tree: Path, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.txt")
    entries, failures = discover([missing, str(tree / "a.txt"), str(tree / "*.none"), str(tree / "b.md")])
    assert [e.external_id for e in entries] == ["a.txt", "b.md"]
    assert [f.path for f in failures] == [missing, str(tree / "*.none")]


# --- formats ---------------------------------------------------------------------------------


def test_load_txt(tmp_path: Path) -> None:
    path = write(tmp_path / "kb" / "plain.txt", "First line.\nSecond line.\n")
    (e,), _ = discover([str(path)])
    assert load_all(e) == [
        SourceDocument("kb", "plain.txt", str(path), "plain", "First line.\nSecond line.\n", {}),
    ]


def test_load_txt_with_utf8_bom_and_unicode(tmp_path: Path) -> None:
    path = write(tmp_path / "bom.txt", "\ufeffCafé — naïve 日本語.".encode())
    (doc,) = docs_of(load_all(entry(path)))
    assert doc.text == "Café — naïve 日本語."


@pytest.mark.parametrize(
    ("content", "title"),
    [
        ("# The Title\n\nBody text.", "The Title"),
        ("Intro paragraph.\n\n## Only a subheading\n\nBody.", "guide"),
        ("## Sub first\n\n# Real Title #\n\nBody.", "Real Title"),
        ("   # Indented Title\nBody.", "Indented Title"),
        ("#hashtag is not a heading\n\nBody.", "guide"),
        ("No heading at all.", "guide"),
    ],
)
def test_load_markdown_title(tmp_path: Path, content: str, title: str) -> None:
    path = write(tmp_path / "guide.md", content)
    (doc,) = docs_of(load_all(entry(path, "s", "guide.md")))
    assert doc.title == title
    assert doc.text == content
    assert (doc.source, doc.external_id, doc.uri) == ("s", "guide.md", str(path))


HTML = """<!doctype html>
<html><head><title>The Page Title</title>
<style>.secret-style { color: red }</style>
<script>var secretScript = 1;</script></head>
<body>
<nav>Navigation menu</nav>
<h1>Main Heading</h1>
<p>First paragraph with <b>bold</b> and <a href="#">a link</a>.</p>
<h2>Second Heading</h2>
<ul><li>item one</li><li>item two</li></ul>
<noscript>enable javascript</noscript>
<footer>Footer text</footer>
</body></html>
"""


def test_load_html(tmp_path: Path) -> None:
    path = write(tmp_path / "site" / "page.html", HTML)
    (e,), _ = discover([str(path)])
    (doc,) = docs_of(load_all(e))
    assert (doc.source, doc.external_id, doc.uri) == ("site", "page.html", str(path))
    assert doc.title == "The Page Title"
    lines = doc.text.splitlines()
    assert "# Main Heading" in lines
    assert "## Second Heading" in lines
    assert lines.index("# Main Heading") < lines.index("## Second Heading")
    assert "First paragraph with bold and a link." in lines
    assert "item one" in lines
    assert "item two" in lines
    for absent in ("secret-style", "secretScript", "color: red", "enable javascript"):
        assert absent not in doc.text


def test_load_html_title_falls_back_to_h1(tmp_path: Path) -> None:
    path = write(tmp_path / "page.htm", "<html><body><h1>Only <em>H1</em></h1><p>Text body.</p></body></html>")
    (doc,) = docs_of(load_all(entry(path)))
    assert doc.title == "Only H1"
    assert doc.text.splitlines()[0] == "# Only H1"


def test_load_html_without_title_or_h1(tmp_path: Path) -> None:
    path = write(tmp_path / "frag.html", "<p>Just a fragment.</p>")
    (doc,) = docs_of(load_all(entry(path)))
    assert doc.text == "Just a fragment."
    assert doc.title in ("", "frag")


def test_load_html_pretty_printed_heading_stays_a_heading_line(tmp_path: Path) -> None:
    path = write(
        tmp_path / "pretty.html", "<html><body>\n<h2>\n    Setup guide\n</h2>\n<p>Install it.</p>\n</body></html>"
    )
    (doc,) = docs_of(load_all(entry(path)))
    assert "## Setup guide" in doc.text.splitlines(), doc.text


def test_load_html_keeps_words_apart_across_breaks_and_cells(tmp_path: Path) -> None:
    html = "<html><body><p>Line one<br>Line two</p><table><tr><td>alpha</td><td>beta</td></tr></table></body></html>"
    path = write(tmp_path / "br.html", html)
    (doc,) = docs_of(load_all(entry(path)))
    words = doc.text.split()
    assert "one" in words, doc.text
    assert "alpha" in words, doc.text
    assert "beta" in words, doc.text


def test_load_pdf(tmp_path: Path) -> None:
    path = write(tmp_path / "papers" / "hello.pdf", make_pdf())
    (e,), _ = discover([str(path)])
    assert load_all(e) == [SourceDocument("papers", "hello.pdf", str(path), "hello", "Hello ragcache PDF", {})]


def test_load_pdf_title_from_metadata(tmp_path: Path) -> None:
    path = write(tmp_path / "t.pdf", make_pdf("Body words here", title="Document Title"))
    (doc,) = docs_of(load_all(entry(path)))
    assert doc.title == "Document Title"
    assert doc.text == "Body words here"


def test_load_jsonl(tmp_path: Path) -> None:
    path = write(
        tmp_path / "data" / "docs.jsonl",
        jsonl(
            {"id": "a", "title": "Title A", "text": "Text A."},
            "",
            {"id": 7, "text": "Seven.", "metadata": {"lang": "en", "tags": ["x"]}},
            {"id": "c", "title": None, "text": "C.", "metadata": "not a dict"},
        ),
    )
    (e,), _ = discover([str(path)])
    assert load_all(e) == [
        SourceDocument("data", "a", f"{path}#a", "Title A", "Text A.", {}),
        SourceDocument("data", "7", f"{path}#7", "", "Seven.", {"lang": "en", "tags": ["x"]}),
        SourceDocument("data", "c", f"{path}#c", "", "C.", {}),
    ]


def test_load_beir_corpus(tmp_path: Path) -> None:
    path = write(
        tmp_path / "scifact" / "corpus.jsonl",
        jsonl(
            {
                "_id": "4983",
                "title": "Microstructural development",
                "text": "Alterations of the architecture.",
                "metadata": {},
            },
            {"_id": "5836", "title": "", "text": "Second abstract.", "metadata": {"year": 2001}},
        ),
    )
    (e,), _ = discover([str(path)])
    docs = load_all(e, "beir")
    assert docs == [
        SourceDocument(
            "scifact", "4983", f"{path}#4983", "Microstructural development", "Alterations of the architecture.", {}
        ),
        SourceDocument("scifact", "5836", f"{path}#5836", "", "Second abstract.", {"year": 2001}),
    ]


def test_beir_corpus_without_beir_format_reports_missing_id(tmp_path: Path) -> None:
    path = write(tmp_path / "corpus.jsonl", jsonl({"_id": "1", "text": "x"}))
    failure = only_failure(load_all(entry(path)))
    assert failure.path == f"{path}:1"
    assert "'id'" in failure.reason


def test_jsonl_format_forced_on_other_suffix(tmp_path: Path) -> None:
    path = write(tmp_path / "export.txt", jsonl({"id": "z", "text": "Zed."}))
    assert load_all(entry(path), "jsonl") == [SourceDocument("src", "z", f"{path}#z", "", "Zed.", {})]


# --- bad input: reported with path and reason, never raised ----------------------------------


@pytest.mark.parametrize("name", ["bin.txt", "bin.md", "bin.html", "bin.jsonl"])
def test_binary_file(tmp_path: Path, name: str) -> None:
    path = write(tmp_path / name, b"GIF89a\x00\x01\x02\x03 some bytes \x00\x00\xff")
    failure = file_failure(path)
    assert "binary" in failure.reason


@pytest.mark.parametrize("name", ["latin1.txt", "latin1.html"])
def test_invalid_utf8(tmp_path: Path, name: str) -> None:
    path = write(tmp_path / name, "Caf\u00e9 cr\u00e8me".encode("latin-1"))
    failure = file_failure(path)
    assert "UTF-8" in failure.reason


@pytest.mark.parametrize("name", ["empty.txt", "empty.md", "empty.html", "empty.jsonl", "empty.pdf"])
def test_empty_file(tmp_path: Path, name: str) -> None:
    path = write(tmp_path / name, b"")
    failure = file_failure(path)
    assert "empty" in failure.reason.lower()


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("blank.txt", " \n\t\n  \r\n"),
        ("blank.md", "\n\n\n"),
        ("blank.html", "<html><head><title>T</title><script>x()</script></head><body>  </body></html>"),
        ("blank.jsonl", "\n  \n\n"),
    ],
)
def test_whitespace_only_file(tmp_path: Path, name: str, content: str) -> None:
    path = write(tmp_path / name, content)
    failure = file_failure(path)
    assert failure.reason in ("no text in file", "empty file")


def test_malformed_json_line_among_good_ones(tmp_path: Path) -> None:
    path = write(
        tmp_path / "mixed.jsonl",
        jsonl({"id": "1", "text": "one"}, '{"id": "2", "text": "two"', {"id": "3", "text": "three"}),
    )
    results = load_all(entry(path))
    assert [d.external_id for d in docs_of(results)] == ["1", "3"]
    (failure,) = failures_of(results)
    assert failure.path == f"{path}:2"
    assert "invalid JSON" in failure.reason


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ('["id", "text"]', "expected a JSON object"),
        ("42", "expected a JSON object"),
        ('"just a string"', "expected a JSON object"),
        ('{"title": "no id", "text": "t"}', "missing 'id'"),
        ('{"id": "", "text": "t"}', "missing 'id'"),
        ('{"id": null, "text": "t"}', "missing 'id'"),
        ('{"id": ["x"], "text": "t"}', "missing 'id'"),
        ('{"id": "x"}', "missing or empty 'text'"),
        ('{"id": "x", "text": ""}', "missing or empty 'text'"),
        ('{"id": "x", "text": "   \\n "}', "missing or empty 'text'"),
        ('{"id": "x", "text": 12}', "missing or empty 'text'"),
        ("{not json}", "invalid JSON"),
        ("\xff\xfe garbage", "invalid JSON"),
    ],
)
def test_bad_json_line(tmp_path: Path, line: str, reason: str) -> None:
    content = jsonl({"id": "ok", "text": "fine"}).encode() + line.encode("latin-1") + b"\n"
    path = write(tmp_path / "bad.jsonl", content)
    results = load_all(entry(path))
    assert [d.external_id for d in docs_of(results)] == ["ok"]
    (failure,) = failures_of(results)
    assert failure.path == f"{path}:2"
    assert failure.reason.startswith(reason), failure.reason


def test_beir_missing_id(tmp_path: Path) -> None:
    path = write(tmp_path / "corpus.jsonl", jsonl({"title": "t", "text": "no id"}, {"_id": "d2", "text": "ok"}))
    results = load_all(entry(path), "beir")
    assert [d.external_id for d in docs_of(results)] == ["d2"]
    assert failures_of(results) == [LoadFailure(f"{path}:1", "missing '_id'")]


def test_duplicate_id_within_one_file(tmp_path: Path) -> None:
    path = write(
        tmp_path / "dup.jsonl",
        jsonl(
            {"id": "a", "text": "first"},
            {"id": "b", "text": "bee"},
            {"id": "a", "text": "second"},
            {"id": 5, "text": "n"},
            {"id": "5", "text": "s"},
        ),
    )
    results = load_all(entry(path))
    assert [(d.external_id, d.text) for d in docs_of(results)] == [("a", "first"), ("b", "bee"), ("5", "n")]
    assert failures_of(results) == [
        LoadFailure(f"{path}:3", "duplicate id 'a' in this file"),
        LoadFailure(f"{path}:5", "duplicate id '5' in this file"),
    ]


def test_same_id_in_two_files_is_not_a_duplicate(tmp_path: Path) -> None:
    one = write(tmp_path / "one.jsonl", jsonl({"id": "a", "text": "1"}))
    two = write(tmp_path / "two.jsonl", jsonl({"id": "a", "text": "2"}))
    assert len(docs_of(load_all(entry(one)))) == len(docs_of(load_all(entry(two)))) == 1


@pytest.mark.parametrize(
    "content",
    [
        random.Random(0).randbytes(4096),
        b"%PDF-1.4\n" + b"garbage " * 100 + b"\n%%EOF\n",
        make_pdf()[:300],
        make_pdf().replace(b"/Kids [3 0 R]", b"/Kids 3"),
        b"not a pdf at all, just text",
    ],
    ids=["random_bytes", "header_and_garbage", "truncated", "bad_page_tree", "text"],
)
def test_broken_pdf(tmp_path: Path, content: bytes) -> None:
    path = write(tmp_path / "broken.pdf", content)
    failure = file_failure(path)
    assert "PDF" in failure.reason


def test_pdf_without_text(tmp_path: Path) -> None:
    path = write(tmp_path / "blank.pdf", make_pdf().replace(b"/Contents 5 0 R", b""))
    failure = file_failure(path)
    assert "no extractable text" in failure.reason


def test_encrypted_pdf_with_standard_handler(tmp_path: Path) -> None:
    encrypt = " /Encrypt << /Filter /Standard /V 1 /R 2 /O <00> /U <00> /P -1 >>"
    path = write(tmp_path / "locked.pdf", make_pdf(extra_trailer=encrypt))
    failure = file_failure(path)
    assert "encrypted" in failure.reason


def test_encrypted_pdf_with_public_key_handler_is_reported_not_raised(tmp_path: Path) -> None:
    # certificate-encrypted PDFs (Adobe.PubSec) exist in the wild; pypdf cannot open them
    encrypt = " /Encrypt << /Filter /Adobe.PubSec /SubFilter /adbe.pkcs7.s5 /V 4 /R 4 >>"
    path = write(tmp_path / "pubsec.pdf", make_pdf(extra_trailer=encrypt))
    failure = file_failure(path)
    assert "encrypt" in failure.reason.lower()


def _make_unreadable(path: Path, how: str) -> None:
    if how == "no_permission":
        write(path, "secret text")
        path.chmod(0)
        if os.access(path, os.R_OK):  # root reads anything: cover the same OSError path with a directory instead
            path.chmod(0o644)
            path.unlink()
            path.mkdir()
    elif how == "directory":
        path.mkdir()
    elif how == "dangling_symlink":
        path.symlink_to(path.parent / "target-that-does-not-exist")
    elif how == "vanished":  # discovered, then deleted before loading
        write(path, "soon gone")
        path.unlink()
    else:  # pragma: no cover
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["no_permission", "directory", "dangling_symlink", "vanished"])
@pytest.mark.parametrize("name", ["doc.txt", "doc.md", "doc.html", "doc.pdf", "doc.jsonl"])
def test_unreadable_file(tmp_path: Path, name: str, how: str) -> None:
    path = tmp_path / name
    _make_unreadable(path, how)
    try:
        failure = only_failure(load_all(entry(path)))
    finally:
        if path.is_file() and not path.is_symlink():
            path.chmod(0o644)
    assert failure.path == str(path)
    assert failure.reason.startswith("cannot read: ")
    assert len(failure.reason) > len("cannot read: ")


def test_one_bad_file_costs_only_itself(tmp_path: Path) -> None:
    kb = tmp_path / "kb"
    write(kb / "good.txt", "Good text.")
    write(kb / "bin.txt", b"\x00\x01\x02")
    write(kb / "empty.md", "")
    write(kb / "latin.txt", "caf\xe9".encode("latin-1"))
    write(kb / "broken.pdf", b"%PDF-1.4 broken")
    write(kb / "good.pdf", make_pdf())
    write(kb / "lines.jsonl", jsonl({"id": "1", "text": "x"}, "{bad", [1, 2], {"id": "2", "text": "y"}))
    write(kb / "page.html", "<h1>Page</h1><p>Some page text.</p>")
    entries, failures = discover([str(kb)])
    assert failures == []
    results = [r for e in entries for r in load_all(e)]
    assert sorted(d.external_id for d in docs_of(results)) == ["1", "2", "good.pdf", "good.txt", "page.html"]
    bad = failures_of(results)
    assert sorted(Path(f.path.split(":")[0]).name for f in bad) == [
        "bin.txt",
        "broken.pdf",
        "empty.md",
        "latin.txt",
        "lines.jsonl",
        "lines.jsonl",
    ]
    assert all(f.reason for f in bad)
    assert sorted(f.path for f in bad if f.path.startswith(str(kb / "lines.jsonl"))) == [
        f"{kb / 'lines.jsonl'}:2",
        f"{kb / 'lines.jsonl'}:3",
    ]
