"""The offline generator answers with statements: never a question, never a heading, and in FAQ-shaped
text the answer that follows the matching question."""

from __future__ import annotations

from service.postgres.retrieval import Source
from service.providers.extractive import build_answer, parse_sentences, split_sentences

FAQ = """Q: How do I flush the cache?
A: Run rag-admin cache flush. It deletes every cached answer at once.

Q: What happens if Redis goes down?
A: Every question is answered as a miss, and /ready reports degraded.
"""

HANDBOOK = """# Caching

## When Redis goes down

When the server is unreachable, requests are served as misses until it returns.

## Flushing the cache

Use the admin command for that; it empties the store in one go.
"""


def source(n: int, text: str) -> Source:
    return Source(
        n=n, chunk_id=n, document_id=n, document=f"doc{n}", source="handbook", uri=f"mem://{n}", text=text, score=1 / n
    )


def test_questions_and_headings_are_cues_not_statements() -> None:
    parsed = parse_sentences(FAQ + HANDBOOK)
    kinds = {p.text: p.kind for p in parsed}
    assert kinds["How do I flush the cache?"] == "question"
    assert kinds["When Redis goes down"] == "heading"
    assert kinds["Run rag-admin cache flush."] == "statement"  # the "A:" prefix is gone
    assert not any(s.endswith("?") or s.startswith(("Q:", "A:")) for s in split_sentences(FAQ + HANDBOOK))


def test_a_statement_points_at_the_question_or_heading_it_answers() -> None:
    parsed = parse_sentences(FAQ)
    flush = next(p for p in parsed if p.text.startswith("It deletes"))
    assert flush.cue is not None and parsed[flush.cue].text == "How do I flush the cache?"
    redis = next(p for p in parsed if p.text.startswith("Every question"))
    assert redis.cue is not None and parsed[redis.cue].text == "What happens if Redis goes down?"


def test_an_faq_answer_is_quoted_not_its_question() -> None:
    answer = build_answer("What happens if Redis goes down?", [source(1, FAQ)], 512)
    assert "answered as a miss" in answer
    assert "?" not in answer.split("\n\n", 1)[1]
    assert "rag-admin cache flush" not in answer  # the neighbouring answer is not quoted


def test_the_section_under_a_matching_heading_wins_over_word_overlap_elsewhere() -> None:
    """ "When Redis goes down" cues its paragraph, which shares no word with the question but "down"."""
    answer = build_answer("What if Redis goes down?", [source(1, HANDBOOK)], 512)
    assert "served as misses" in answer
    assert "When Redis goes down" not in answer
    assert "admin command" not in answer  # the other section shares no cue with the question
