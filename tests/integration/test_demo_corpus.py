"""The demo corpus answers a newcomer's first questions correctly, offline, with the right citation."""

from __future__ import annotations

import re

import pytest

from service.embeddings.encoders import LocalEmbedder
from service.settings import Settings
from tests.support.answers import running
from tests.support.demo import EXAMPLES, QUESTIONS, DemoOutcome, DemoQuestion, ingest_examples, outcome


async def ask_all(settings: Settings, embedder: LocalEmbedder) -> list[DemoOutcome]:
    await ingest_examples(settings, embedder)
    outcomes = []
    async with running(settings, embedder) as http:
        for q in QUESTIONS:
            response = await http.post("/rag/answer", json={"question": q.question})
            assert response.status_code == 200, response.text
            outcomes.append(await outcome(settings, q, response.json()))
    return outcomes


@pytest.mark.timeout(600)
async def test_every_newcomer_question_gets_its_fact_with_a_correct_citation(
    settings: Settings, local_embedder: LocalEmbedder
) -> None:
    outcomes = await ask_all(settings, local_embedder)
    wrong = [
        f"{o.question.question!r}: fact={o.states_fact} cited={sorted(o.cited_documents)}\n    {o.answer}"
        for o in outcomes
        if not o.ok
    ]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("q", QUESTIONS, ids=[q.question for q in QUESTIONS])
def test_each_question_names_a_valid_fact_and_documents_that_exist(q: DemoQuestion) -> None:
    """The set itself is sound: the fact compiles, and every document it may cite is in examples/."""
    re.compile(q.fact)
    names = {path.name for path in EXAMPLES.rglob("*") if path.is_file()}
    assert q.documents and q.documents <= names, q.documents - names
