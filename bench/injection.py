"""Injection check: block rate on attacks vs false blocks on ordinary questions, and its cost.

    .venv/bin/python -m bench.injection

Tables: tests/test_guardrails.py (INJECTIONS, NOT_INJECTIONS) and
tests/unit/test_injection_paraphrases.py (ATTACKS, BENIGN); public questions: the 50
msmarco queries and the 8,000 quora questions in shared/data. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import time

from service.policy.guardrails import PROMPT_INJECTION, GuardrailPolicy, GuardrailViolation, check_question
from service.policy.tokens import count_tokens
from tests.support.injections import ATTACKS, BENIGN, INJECTIONS, NOT_INJECTIONS, public_questions

POLICY = GuardrailPolicy(pii="allow")  # the injection check alone


def blocked(question: str) -> bool:
    try:
        check_question(question, POLICY, count_tokens)
    except GuardrailViolation as exc:
        return exc.code == PROMPT_INJECTION
    return False


def main() -> None:
    attacks = [*INJECTIONS, *ATTACKS]
    benign = [*NOT_INJECTIONS, *BENIGN]
    public = public_questions()
    caught = sum(blocked(q) for q in attacks)
    false_benign = [q for q in benign if blocked(q)]
    started = time.perf_counter()
    false_public = [q for q in public if blocked(q)]
    per_question_us = (time.perf_counter() - started) / len(public) * 1e6
    print(f"attacks blocked:          {caught}/{len(attacks)} ({caught / len(attacks):.0%})")
    print(f"benign (same languages):  {len(false_benign)}/{len(benign)} blocked {false_benign}")
    print(f"msmarco + quora:          {len(false_public)}/{len(public)} blocked {false_public}")
    print(f"check_question, no PII:   {per_question_us:.0f} µs per public question (tokenizer included)")


if __name__ == "__main__":
    main()
