"""`rag-eval` end to end on a tiny BEIR folder: the live corpus, a scratch one, and bad input."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from service.settings import Settings
from tests.support.servers import BIN, cli_env

PASSAGES = {
    "boil": "Water boils at a lower temperature at high altitude because the air pressure is lower.",
    "vaccine": "Vaccines train the immune system to recognise a pathogen without causing the disease.",
    "bread": "Sourdough bread rises because wild yeast and bacteria ferment the flour.",
    "tide": "Tides are caused by the gravitational pull of the moon on the oceans.",
}
QUERIES = {"q1": "why does water boil faster in the mountains", "q2": "how do vaccines protect against disease"}


def write_beir(folder: Path, *, header: bool) -> Path:
    (folder / "qrels").mkdir(parents=True)
    corpus = (json.dumps({"_id": i, "title": "", "text": t}) for i, t in PASSAGES.items())
    (folder / "corpus.jsonl").write_text("\n".join(corpus) + "\n")
    queries = (json.dumps({"_id": i, "text": t}) for i, t in QUERIES.items())
    (folder / "queries.jsonl").write_text("\n".join(queries) + "\n")
    rows = ["query-id\tcorpus-id\tscore"] if header else []
    (folder / "qrels" / "test.tsv").write_text("\n".join([*rows, "q1\tboil\t1", "q2\tvaccine\t1"]) + "\n")
    return folder


def rag_eval(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BIN / "rag-eval", *args], env=env, capture_output=True, text=True, timeout=300)


def test_live_corpus_every_mode_and_a_json_summary(settings: Settings, tmp_path: Path) -> None:
    data = write_beir(tmp_path / "set", header=True)
    env = cli_env(settings)
    missing = rag_eval(env, str(data))  # nothing ingested yet: a clear refusal
    assert missing.returncode == 2 and "corpus.jsonl: none of the judged documents" in missing.stderr
    ingest = [str(BIN / "rag-ingest"), "add", str(data / "corpus.jsonl"), "--format", "beir"]
    subprocess.run(ingest, env=env, check=True, capture_output=True, timeout=300)

    run = rag_eval(env, str(data), "--json")
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["queries"] == 2 and summary["qrels_header"] and summary["documents"] == 4
    assert set(summary["modes"]) == {"dense", "full-text", "fused"}
    assert summary["modes"]["dense"]["ndcg@10"] == 1.0 and summary["modes"]["dense"]["mrr@10"] == 1.0
    assert "ndcg_vs_dense" in summary["modes"]["fused"] and "ndcg_vs_dense" not in summary["modes"]["dense"]

    table = rag_eval(env, str(data), "--mode", "dense", "--top-k", "3")
    assert table.returncode == 0 and "| dense | 1.000 | 1.000 | 1.000 |" in table.stdout


def test_scratch_corpus_without_a_qrels_header(settings: Settings, tmp_path: Path) -> None:
    data = write_beir(tmp_path / "set", header=False)
    run = rag_eval(cli_env(settings), str(data), "--scratch", "--mode", "dense", "--json")
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["documents"] == 4 and not summary["qrels_header"]
    assert summary["modes"]["dense"]["recall@10"] == 1.0


def test_bad_input_is_one_line_naming_the_file_and_exit_2(settings: Settings, tmp_path: Path) -> None:
    data = write_beir(tmp_path / "set", header=True)
    (data / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\tboil\tyes\n")
    run = rag_eval(cli_env(settings), str(data))
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        f"rag-eval: {data / 'qrels' / 'test.tsv'}:2: grade 'yes' is not an integer"
    ]
    keep = rag_eval(cli_env(settings), str(data), "--keep", str(tmp_path / "db"))
    assert keep.returncode == 2 and keep.stderr == "rag-eval: --keep and --limit-corpus go with --scratch\n"
    gone = rag_eval(cli_env(settings), str(tmp_path / "nowhere"))
    assert gone.returncode == 2 and "not a folder" in gone.stderr and "Traceback" not in gone.stderr


def test_a_database_it_cannot_use_is_one_line_and_exit_2(settings: Settings, tmp_path: Path) -> None:
    """A mistyped DATABASE_URL parameter is an asyncpg.InterfaceError: rag-eval printed a traceback for it."""
    data = write_beir(tmp_path / "set", header=True)
    dsn = str(settings.database_url)
    env = cli_env(settings, DATABASE_URL=f"{dsn}{'&' if '?' in dsn else '?'}sslmode=sometimes")
    run = rag_eval(env, str(data), "--mode", "dense")
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines() == [
        "rag-eval: cannot use the database: ClientConfigurationError: `sslmode` parameter must be one of: "
        "disable, allow, prefer, require, verify-ca, verify-full"
    ]
