"""The offline extractive generator: sentence splitting, scoring, selection, and the streamed answer."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest

from service.policy.tokens import count_tokens
from service.postgres.retrieval import Source
from service.providers.base import GenerationRequest, Provider, Usage
from service.providers.extractive import (
    LABEL,
    MAX_SENTENCES,
    NO_ANSWER,
    ExtractiveProvider,
    Scored,
    Sentence,
    build_answer,
    collect_sentences,
    jaccard,
    render,
    score_sentences,
    select_sentences,
    split_sentences,
    stem,
    stream_pieces,
    terms,
    truncate_to_tokens,
)
from tests.support.servers import ROOT

CITATION = re.compile(r"\[(\d+)\]")

CACHING = """# Caching

The exact cache stores complete answers in Redis, keyed by a hash of the normalized prompt.
Entries expire after `RAG_CACHE_TTL_S` seconds, which defaults to one day (e.g. 86400 seconds).
To flush the cache, run `rag-admin cache flush`; it deletes every cached answer at once.
Partial or failed answers are never written to the cache.
"""

PDF_INGEST = """## Ingesting PDF files

Use `rag-ingest add report.pdf` to load a PDF file into the corpus. Each page's text is extracted with pypdf and
split into overlapping chunks of about 400 tokens. Scanned PDFs without a text layer produce no chunks and are
reported as skipped. Re-running the ingest on an unchanged file is a no-op because documents are keyed by content hash.
"""

SECURITY = """### Security

- API keys are created with `rag-admin keys create` and stored only as SHA-256 hashes.
- Revoked keys are rejected with status 401 on the very next request.
- Input guardrails reject prompt-injection patterns before any database or cache access.

```python
headers = {"Authorization": "Bearer <key>"}
```
"""

FLUSH_SENTENCE = "To flush the cache, run `rag-admin cache flush`; it deletes every cached answer at once."


def src(n: int, text: str, document: str = "doc") -> Source:
    return Source(
        n=n,
        chunk_id=100 + n,
        document_id=10 + n,
        document=document,
        source="handbook",
        uri=f"file:///{document}.md",
        text=text,
        score=1.0 / n,
    )


SOURCES = [src(1, CACHING, "caching"), src(2, PDF_INGEST, "ingest"), src(3, SECURITY, "security")]


def request(question: str, sources: list[Source] | None = None, max_tokens: int = 512) -> GenerationRequest:
    return GenerationRequest(
        model="extractive",
        system="Answer from the sources and cite them as [n].",
        prompt=f"Sources: …\n\nQuestion: {question}",
        max_tokens=max_tokens,
        temperature=0.2,
        question=question,
        sources=SOURCES if sources is None else sources,
    )


async def collect(provider: Provider, req: GenerationRequest) -> tuple[list[str], list[Usage]]:
    pieces: list[str] = []
    usages: list[Usage] = []
    async for item in provider.stream(req):
        if isinstance(item, Usage):
            usages.append(item)
        else:
            assert not usages, "text arrived after the Usage"
            pieces.append(item)
    return pieces, usages


def citations(answer: str) -> list[int]:
    return [int(m) for m in CITATION.findall(answer)]


# --- pure helpers ---------------------------------------------------------------------------------------------


def test_stem_folds_inflections_together() -> None:
    assert {stem(w) for w in ("cache", "caches", "cached", "caching")} == {"cach"}
    assert stem("flushing") == stem("flushed") == stem("flushes") == stem("flush")
    assert stem("queries") == stem("query")
    assert stem("embeddings") == stem("embedded") == stem("embed")
    assert stem("class") == "class"  # no -s stripping from -ss words
    assert stem("pdf") == "pdf"


def test_terms_drop_stopwords_and_punctuation() -> None:
    assert terms("How do I flush the cache?") == ["flush", "cach"]
    assert terms("What is it, and why?") == []
    assert terms("Run `rag-admin cache flush`!") == ["run", "rag", "admin", "cach", "flush"]


def test_split_sentences_handles_markdown() -> None:
    sentences = split_sentences(SECURITY)
    assert sentences == [
        "API keys are created with `rag-admin keys create` and stored only as SHA-256 hashes.",
        "Revoked keys are rejected with status 401 on the very next request.",
        "Input guardrails reject prompt-injection patterns before any database or cache access.",
    ]
    assert not any(s.startswith(("#", "-", "*")) for s in split_sentences(CACHING + SECURITY))
    assert not any("Authorization" in s or "```" in s for s in sentences)  # code blocks are not prose


def test_split_sentences_joins_wrapped_lines_and_keeps_abbreviations() -> None:
    sentences = split_sentences(CACHING)
    assert "Caching." not in sentences  # a one-word heading is a fragment, not a sentence
    assert sentences[1] == (
        "Entries expire after `RAG_CACHE_TTL_S` seconds, which defaults to one day (e.g. 86400 seconds)."
    )
    assert FLUSH_SENTENCE in sentences
    assert len(sentences) == 4
    wrapped = split_sentences(PDF_INGEST)
    assert wrapped[1] == (
        "Each page's text is extracted with pypdf and split into overlapping chunks of about 400 tokens."
    )


def test_split_sentences_drops_fragments_and_cleans_inline_markup() -> None:
    text = (
        "Too short. See the [operations guide](ops.md) for **more** details [3].\n\n"
        "- a bullet\n"
        "- Bullets without a full stop\n"
    )
    assert split_sentences(text) == ["See the operations guide for more details.", "Bullets without a full stop."]


def test_short_code_snippet_after_colon_is_kept_inline() -> None:
    text = "To flush the cache, run:\n\n```bash\nrag-admin cache flush\n```\n"
    assert split_sentences(text) == ["To flush the cache, run: `rag-admin cache flush`."]


def test_run_on_sentences_are_clipped() -> None:
    text = " ".join(f"word{i}" for i in range(200))
    (sentence,) = split_sentences(text)
    assert sentence.endswith("…")
    assert len(sentence.split()) == 60


def test_scoring_prefers_the_flush_sentence_and_zero_without_overlap() -> None:
    scored = score_sentences("How do I flush the cache?", collect_sentences(SOURCES))
    best = max(scored, key=lambda s: s.score)
    assert best.sentence.text == FLUSH_SENTENCE
    assert best.sentence.source_n == 1
    for s in scored:
        if not {"flush", "cach"} & set(s.sentence.terms):
            assert s.score == 0.0
    assert all(s.score == 0.0 for s in score_sentences("weather in Paris tomorrow", collect_sentences(SOURCES)))


def test_scoring_rewards_better_ranked_sources_and_term_coverage() -> None:
    same = "Revoked keys are rejected with status 401 on the very next request."
    scored = score_sentences("revoked keys", collect_sentences([src(1, same), src(2, same)]))
    assert scored[0].sentence.source_n == 1
    assert scored[0].score > scored[1].score > 0
    sentences = collect_sentences(
        [src(1, "Keys are rotated every ninety days by operators.\n\nKeys are revoked by admins.")]
    )
    one_term, two_terms = score_sentences("revoked keys", sentences)
    assert two_terms.score > one_term.score


def _sentence(n: int, position: int, text: str) -> Sentence:
    return Sentence(source_n=n, rank=n - 1, position=position, text=text, terms=tuple(terms(text)))


def test_select_orders_by_source_then_position() -> None:
    scored = [
        Scored(_sentence(3, 0, "Gamma sentence about caching layers."), 3.0),
        Scored(_sentence(1, 4, "Alpha later sentence about eviction policy."), 5.0),
        Scored(_sentence(1, 1, "Alpha early sentence about redis hashing."), 2.0),
        Scored(_sentence(2, 0, "Beta sentence about pdf ingest pipeline."), 4.0),
    ]
    chosen = select_sentences(scored, max_sentences=4)
    assert [(s.sentence.source_n, s.sentence.position) for s in chosen] == [(1, 1), (1, 4), (2, 0), (3, 0)]


def test_select_limits_count_drops_weak_and_zero_scores() -> None:
    scored = [Scored(_sentence(1, i, f"Distinct sentence number {i} about topic{i}."), 10.0 - i) for i in range(6)]
    scored.append(Scored(_sentence(2, 0, "A sentence that scored nothing at all."), 0.0))
    assert len(select_sentences(scored)) == MAX_SENTENCES == 3  # answers stay short
    assert len(select_sentences(scored, max_sentences=2)) == 2
    weak = [Scored(_sentence(1, 0, "Strong match about the cache flush."), 10.0), Scored(_sentence(2, 0, "Weak"), 1.0)]
    assert [s.sentence.source_n for s in select_sentences(weak)] == [1]
    assert select_sentences([Scored(_sentence(1, 0, "Nothing matched in this one."), 0.0)]) == []


def test_select_drops_near_duplicates() -> None:
    a = _sentence(1, 0, "Revoked keys are rejected with status 401 on the next request.")
    b = _sentence(2, 3, "Revoked keys are rejected with status 401 on the very next request.")
    c = _sentence(2, 5, "Input guardrails reject prompt injection before any database access.")
    assert jaccard(a.terms, b.terms) > 0.8
    chosen = select_sentences([Scored(b, 5.0), Scored(a, 4.0), Scored(c, 3.0)])
    assert [s.sentence for s in chosen] == [b, c]


def test_select_respects_token_budget_but_keeps_the_best() -> None:
    scored = [
        Scored(_sentence(1, i, f"Sentence {i} says something reasonably long about caching."), 5.0 - i)
        for i in range(4)
    ]
    assert len(select_sentences(scored, token_budget=25)) == 1
    assert len(select_sentences(scored, token_budget=0)) == 1


def test_render_groups_consecutive_sentences_under_one_citation() -> None:
    chosen = [
        Scored(_sentence(1, 0, "First fact."), 1.0),
        Scored(_sentence(1, 2, "Second fact."), 1.0),
        Scored(_sentence(2, 1, "Third fact."), 1.0),
    ]
    assert render(chosen) == "First fact. Second fact. [1] Third fact. [2]"


def test_truncate_to_tokens_cuts_at_a_word_boundary() -> None:
    text = "alpha beta gamma delta epsilon zeta eta theta iota kappa"
    assert truncate_to_tokens(text, 1000) == text
    cut = truncate_to_tokens(text, 4)
    assert count_tokens(cut) <= 4
    assert text.startswith(cut)
    assert text[len(cut)] == " "
    assert truncate_to_tokens(text, 0) == ""


def test_stream_pieces_rejoin_exactly() -> None:
    text = LABEL + "Two  spaces.\nNew line [1]  "
    pieces = stream_pieces(text)
    assert "".join(pieces) == text
    assert len(pieces) > 5
    assert all(p.strip() for p in pieces)


# --- the whole answer -----------------------------------------------------------------------------------------


def test_flush_question_quotes_and_cites_the_cache_source() -> None:
    answer = build_answer("How do I flush the cache?", SOURCES, 512)
    assert answer.startswith(LABEL)
    assert FLUSH_SENTENCE in answer
    after = answer[answer.index(FLUSH_SENTENCE) + len(FLUSH_SENTENCE) :]
    cited = CITATION.search(after)
    assert cited is not None and cited.group(1) == "1"
    assert NO_ANSWER not in answer


@pytest.mark.parametrize(
    "question",
    [
        "How do I flush the cache?",
        "How are PDF files ingested and chunked?",
        "How are API keys stored and revoked?",
        "What happens to scanned PDFs and revoked keys?",
        "cache keys pdf prompt",
    ],
)
def test_every_citation_is_a_source(question: str) -> None:
    answer = build_answer(question, SOURCES, 512)
    cited = citations(answer)
    assert cited, answer
    assert set(cited) <= {s.n for s in SOURCES}
    assert answer.rstrip().endswith("]")  # the last sentence is cited too


def test_multi_source_answer_reads_in_source_order() -> None:
    answer = build_answer("What happens to scanned PDFs and revoked keys?", SOURCES, 512)
    cited = citations(answer)
    assert cited == sorted(cited)
    assert len(set(cited)) >= 2
    assert "Scanned PDFs without a text layer" in answer
    assert "Revoked keys are rejected" in answer
    assert answer.index("Scanned PDFs") < answer.index("Revoked keys")


def test_sentences_from_one_source_keep_their_order() -> None:
    answer = build_answer("How are PDF files ingested, extracted and keyed?", SOURCES, 512)
    sentences = split_sentences(PDF_INGEST)
    positions = [sentences.index(s) for s in sentences if s in answer]
    assert len(positions) >= 2
    assert positions == sorted(positions)
    assert citations(answer) == [2]  # one group, one citation


def test_overlapping_chunks_do_not_repeat_sentences() -> None:
    overlap = src(4, FLUSH_SENTENCE + " Partial or failed answers are never written to the cache.", "caching")
    answer = build_answer("How do I flush the cache?", [*SOURCES, overlap], 512)
    assert answer.count(FLUSH_SENTENCE) == 1


def test_no_overlap_gives_the_labelled_no_answer() -> None:
    answer = build_answer("What will the weather be in Paris tomorrow?", SOURCES, 512)
    assert answer == LABEL + NO_ANSWER
    assert citations(answer) == []


def test_no_sources_gives_the_labelled_no_answer() -> None:
    assert build_answer("How do I flush the cache?", [], 512) == LABEL + NO_ANSWER
    assert build_answer("What is it?", SOURCES, 512) == LABEL + NO_ANSWER  # only stopwords


@pytest.mark.parametrize("max_tokens", [1, 5, 14, 30, 45, 60])
def test_max_tokens_is_respected(max_tokens: int) -> None:
    question = "What happens to scanned PDFs and revoked keys?"
    full = build_answer(question, SOURCES, 10_000)
    answer = build_answer(question, SOURCES, max_tokens)
    assert count_tokens(answer) <= max_tokens
    assert bool(answer) == (max_tokens >= 5)  # 1 token cannot hold the label's first word, "Extractive"
    assert count_tokens(full) > max_tokens  # otherwise this case tests nothing
    if max_tokens <= count_tokens(LABEL):
        assert LABEL.startswith(answer)


def test_a_tight_budget_quotes_fewer_sentences() -> None:
    question = "What happens to scanned PDFs and revoked keys?"
    full = build_answer(question, SOURCES, 10_000)
    tight = build_answer(question, SOURCES, 45)
    assert len(citations(tight)) < len(citations(full))
    assert count_tokens(tight) <= 45


async def test_stream_yields_words_then_one_usage() -> None:
    provider = ExtractiveProvider()
    assert provider.name == "extractive"
    assert provider.model == "extractive"
    req = request("How do I flush the cache?")
    pieces, usages = await collect(provider, req)
    answer = build_answer(req.question, req.sources, req.max_tokens)
    assert "".join(pieces) == answer
    assert len(pieces) > 10  # streamed in small pieces, not one blob
    assert all(isinstance(p, str) and p for p in pieces)
    assert len(usages) == 1
    usage = usages[0]
    assert usage.output_tokens == count_tokens(answer)
    assert usage.input_tokens == count_tokens(req.system + req.prompt)
    assert usage.estimated is True


async def test_stream_respects_max_tokens() -> None:
    pieces, usages = await collect(
        ExtractiveProvider(), request("What happens to scanned PDFs and revoked keys?", max_tokens=20)
    )
    answer = "".join(pieces)
    assert count_tokens(answer) <= 20
    assert usages[0].output_tokens == count_tokens(answer)


async def test_stream_no_sources_is_labelled_no_answer() -> None:
    pieces, usages = await collect(ExtractiveProvider(), request("How do I flush the cache?", sources=[]))
    assert "".join(pieces) == LABEL + NO_ANSWER
    assert len(usages) == 1


async def test_deterministic_across_runs_and_source_order() -> None:
    provider = ExtractiveProvider()
    req = request("What happens to scanned PDFs and revoked keys?")
    first, _ = await collect(provider, req)
    second, _ = await collect(ExtractiveProvider(), req)
    assert first == second
    shuffled, _ = await collect(provider, request(req.question, sources=list(reversed(SOURCES))))
    assert shuffled == first


def test_deterministic_across_processes_and_hash_seeds() -> None:
    """Sets and dicts iterate differently under other hash seeds; the answer must not."""
    code = (
        "import json, sys\n"
        "from service.postgres.retrieval import Source\n"
        "from service.providers.extractive import build_answer\n"
        "qs, sources = json.loads(sys.argv[1]), [Source(**s) for s in json.loads(sys.argv[2])]\n"
        "print(json.dumps([build_answer(q, sources, 512) for q in qs]))\n"
    )
    sources = json.dumps([dataclasses.asdict(s) for s in SOURCES])
    questions = ["How do I flush the cache?", "What happens to scanned PDFs and revoked keys?", "cache keys pdf prompt"]
    outputs = []
    for seed in ("1", "2", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        result = subprocess.run(
            [sys.executable, "-c", code, json.dumps(questions), sources],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        outputs.append(json.loads(result.stdout))
    assert outputs[0] == outputs[1] == outputs[2]
    assert outputs[0] == [build_answer(q, SOURCES, 512) for q in questions]
