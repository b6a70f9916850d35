"""Paraphrased and disguised injections the review got past the check (issue 12, finding 6),
against ordinary questions in the same languages. bench/injection.py prints the rates."""

from __future__ import annotations

import pytest

from service.policy.guardrails import PROMPT_INJECTION, GuardrailPolicy, GuardrailViolation, check_question
from service.policy.tokens import count_tokens
from tests.support.injections import ATTACKS, BENIGN, public_questions
from tests.support.servers import SHARED_DATA


def _blocked(question: str) -> bool:
    try:
        check_question(question, GuardrailPolicy(), count_tokens)
    except GuardrailViolation as exc:
        return exc.code == PROMPT_INJECTION
    return False


@pytest.mark.parametrize("question", ATTACKS)
def test_paraphrased_and_disguised_injections_are_blocked(question: str) -> None:
    assert _blocked(question)


@pytest.mark.parametrize("question", BENIGN)
def test_ordinary_questions_in_the_same_languages_pass(question: str) -> None:
    assert not _blocked(question)


def test_public_questions_are_not_blocked() -> None:
    if not SHARED_DATA.exists():
        pytest.skip("the public question sets (../shared/data) are not beside this checkout")
    blocked = [q for q in public_questions() if _blocked(q)]
    assert len(blocked) <= 2, blocked  # each one read: see docs/benchmarks.md
