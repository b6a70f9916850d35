"""A BEIR-layout folder: `corpus.jsonl`, `queries.jsonl`, `qrels/*.tsv` (with or without a header).

Bad input raises `BeirError` with the file and the reason in one line; `rag-eval` prints it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


class BeirError(Exception):
    """A file of the folder is missing or malformed; the message names the file, line and reason."""


@dataclass(frozen=True)
class Query:
    id: str
    text: str
    judgments: dict[str, int]  # corpus id -> grade


@dataclass(frozen=True)
class Dataset:
    path: Path
    queries: list[Query]  # the queries with at least one relevant judgment
    unjudged: int  # queries in queries.jsonl without one
    qrels_header: bool

    @property
    def judgments(self) -> int:
        return sum(len(q.judgments) for q in self.queries)


def read_qrels(path: Path) -> tuple[dict[str, dict[str, int]], bool]:
    """`query-id TAB corpus-id TAB grade` (or TREC's 4 columns); a first line that is not one is a header."""
    qrels: dict[str, dict[str, int]] = {}
    header = False
    for number, line in enumerate(_text(path).split("\n"), start=1):  # not splitlines: text may hold U+2028
        if not line.strip():
            continue
        parts = line.rstrip("\r").split("\t")
        if len(parts) == 4:  # TREC: query-id, iteration, corpus-id, grade
            parts = [parts[0], parts[2], parts[3]]
        if len(parts) != 3:
            raise BeirError(f"{path}:{number}: expected 3 tab-separated columns, got {len(parts)}")
        query_id, corpus_id, grade = parts
        try:
            value = int(grade)
        except ValueError:
            if number == 1:  # "query-id corpus-id score"
                header = True
                continue
            raise BeirError(f"{path}:{number}: grade {grade[:40]!r} is not an integer") from None
        qrels.setdefault(query_id, {})[corpus_id] = value
    if not qrels:
        raise BeirError(f"{path}: no judgments")
    return qrels, header


def read_jsonl(path: Path, fields: tuple[str, ...]) -> list[dict[str, str]]:
    """The records of a JSON Lines file, each with the `fields` given as strings."""
    rows = []
    for number, line in enumerate(_text(path).split("\n"), start=1):  # not splitlines: text may hold U+2028
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BeirError(f"{path}:{number}: not JSON ({exc.msg})") from None
        if not isinstance(record, dict) or any(not isinstance(record.get(f), str | int) for f in fields):
            raise BeirError(f"{path}:{number}: expected an object with {', '.join(fields)}")
        rows.append({f: str(record[f]) for f in fields})
    return rows


def load(folder: Path) -> Dataset:
    """The judged queries of a BEIR folder, judged by one split: qrels/test.tsv, else the first .tsv by name."""
    if not folder.is_dir():
        raise BeirError(f"{folder}: not a folder")
    for name in ("corpus.jsonl", "queries.jsonl"):
        if not (folder / name).is_file():
            raise BeirError(f"{folder / name}: missing (a BEIR folder holds corpus.jsonl, queries.jsonl, qrels/*.tsv)")
    files = sorted((folder / "qrels").glob("*.tsv"), key=lambda p: (p.name != "test.tsv", p.name))
    if not files:
        raise BeirError(f"{folder / 'qrels'}: no .tsv file")
    qrels, header = read_qrels(files[0])
    queries, unjudged = [], 0
    for row in read_jsonl(folder / "queries.jsonl", ("_id", "text")):
        judgments = qrels.get(row["_id"], {})
        if any(g > 0 for g in judgments.values()):
            queries.append(Query(row["_id"], row["text"], judgments))
        else:
            unjudged += 1
    if not queries:
        raise BeirError(f"{files[0]}: no query of queries.jsonl has a relevant judgment")
    return Dataset(folder, queries, unjudged, header)


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BeirError(f"{path}: missing") from None
    except UnicodeDecodeError:
        raise BeirError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise BeirError(f"{path}: cannot be read ({exc.strerror})") from None
