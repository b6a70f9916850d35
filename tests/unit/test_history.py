"""Conversation history validation and bounds (service/policy/history.py)."""

from __future__ import annotations

import pytest

from service.errors import HistoryTooLarge, HistoryViolation
from service.policy.history import HistoryLimits, parse_history
from service.policy.tokens import count_tokens

LIMITS = HistoryLimits(max_turns=4, max_tokens=50)


def test_roles_are_kept_in_order_and_system_messages_are_instructions() -> None:
    history = parse_history(
        [
            ("system", "Answer in French."),
            ("user", "What is RRF?"),
            ("assistant", "A fusion [1]."),
            ("developer", "Be brief."),
        ],
        LIMITS,
        count_tokens,
    )
    assert history.user_turns == ("What is RRF?",)
    assert history.instructions == ("Answer in French.", "Be brief.")
    assert [t.role for t in history.dialogue] == ["user", "assistant"]


def test_an_empty_history_is_falsy() -> None:
    assert not parse_history([], LIMITS, count_tokens)


def test_an_assistant_message_without_text_is_skipped() -> None:
    history = parse_history([("user", "hi"), ("assistant", None)], LIMITS, count_tokens)
    assert [t.role for t in history.turns] == ["user"]


@pytest.mark.parametrize("item", [("tool", "x"), ("robot", "x"), ("user", "  "), ("system", None)])
def test_bad_shapes_are_a_history_violation(item: tuple[str, str | None]) -> None:
    with pytest.raises(HistoryViolation) as raised:
        parse_history([item], LIMITS, count_tokens)
    assert raised.value.code == "invalid_history"
    assert not isinstance(raised.value, HistoryTooLarge)
    assert "x" not in raised.value.message.split()  # never echoes the message


def test_too_many_turns() -> None:
    with pytest.raises(HistoryTooLarge) as raised:
        parse_history([("user", "q")] * 5, LIMITS, count_tokens)
    assert raised.value.code == "history_too_long"


def test_too_many_tokens() -> None:
    with pytest.raises(HistoryTooLarge) as raised:
        parse_history([("user", "word " * 60)], LIMITS, count_tokens)
    assert raised.value.code == "history_too_many_tokens"


def test_at_the_limits_passes() -> None:
    history = parse_history([("user", "q")] * 4, LIMITS, count_tokens)
    assert len(history.turns) == 4
