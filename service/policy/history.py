"""Conversation history: what earlier turns a request may carry, validated and bounded.

Why it is pure: the history is untrusted input that decides the standalone question (and with
it the cache key) and part of the prompt, so its checks must be cheap, deterministic and run
before any I/O. The HTTP layers turn their own shapes (`history` on `/rag/*`, the message list
of `/v1/chat/completions`) into `(role, content)` pairs; `parse_history` checks them and raises
domain errors: `HistoryViolation` (400, `invalid_history`) for a bad shape and
`HistoryTooLarge` (413, `history_too_long` / `history_too_many_tokens`) past the bounds.

Roles: `user` and `assistant` are the dialogue; `system` (and OpenAI's `developer`) messages
are the client's instructions to the generator, kept apart (see service/policy/prompt.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from service.errors import HistoryTooLarge, HistoryViolation

__all__ = [
    "HISTORY_TOO_LONG",
    "HISTORY_TOO_MANY_TOKENS",
    "INVALID_HISTORY",
    "History",
    "HistoryLimits",
    "Turn",
    "parse_history",
]

HISTORY_TOO_LONG: Final = "history_too_long"
HISTORY_TOO_MANY_TOKENS: Final = "history_too_many_tokens"
INVALID_HISTORY: Final = "invalid_history"

Role = Literal["user", "assistant", "system"]
_ROLES: Final[dict[str, Role]] = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}


@dataclass(frozen=True)
class Turn:
    role: Role
    content: str


@dataclass(frozen=True)
class HistoryLimits:
    max_turns: int = 20  # messages before the question, system messages included
    max_tokens: int = 4000  # tokens of their contents together

    def __post_init__(self) -> None:
        if self.max_turns < 0 or self.max_tokens < 0:
            raise ValueError("history limits must not be negative")


@dataclass(frozen=True)
class History:
    """The turns before the question, oldest first."""

    turns: tuple[Turn, ...] = ()

    @property
    def dialogue(self) -> tuple[Turn, ...]:
        """The user and assistant turns, in order."""
        return tuple(t for t in self.turns if t.role != "system")

    @property
    def user_turns(self) -> tuple[str, ...]:
        return tuple(t.content for t in self.turns if t.role == "user")

    @property
    def instructions(self) -> tuple[str, ...]:
        """The client's system messages, in order."""
        return tuple(t.content for t in self.turns if t.role == "system")

    def __bool__(self) -> bool:
        return bool(self.turns)


def parse_history(
    items: Sequence[tuple[str, str | None]], limits: HistoryLimits, count_tokens: Callable[[str], int]
) -> History:
    """Check `(role, content)` pairs, oldest first, against the shape rules and the bounds.

    Messages are never echoed in an error. An assistant message with no content (an OpenAI
    tool call) is skipped; a user or system message must have text.
    """
    turns: list[Turn] = []
    for index, (raw_role, content) in enumerate(items):
        role = _ROLES.get(raw_role)
        if role is None:
            raise HistoryViolation(
                INVALID_HISTORY, f"history message {index}: role must be one of user, assistant, system"
            )
        text = (content or "").strip()
        if not text:
            if role == "assistant":
                continue
            raise HistoryViolation(INVALID_HISTORY, f"history message {index}: content must not be empty")
        turns.append(Turn(role, text))
    if len(turns) > limits.max_turns:
        raise HistoryTooLarge(
            HISTORY_TOO_LONG, f"the history has {len(turns)} messages; the limit is {limits.max_turns}"
        )
    tokens = 0
    for turn in turns:  # stop counting once over: a huge history costs no more than the limit
        tokens += count_tokens(turn.content)
        if tokens > limits.max_tokens:
            raise HistoryTooLarge(
                HISTORY_TOO_MANY_TOKENS, f"the history is over {limits.max_tokens} tokens long, the limit"
            )
    return History(tuple(turns))
