"""Input guardrails: the first step of every request, before any I/O.

Why it is pure: it runs ahead of the cache, the database and the model, so it
must be cheap, deterministic and testable without a running stack. The service
builds a :class:`GuardrailPolicy` from its settings, passes a token counter in,
and lets :class:`GuardrailViolation` (a domain error, service/errors.py) reach the
HTTP layer, which answers it with a 400.

Order of checks (part of the contract):
NFC normalise -> empty -> control chars -> length (chars) -> PII -> injection
-> tokens. PII is redacted before any later step sees the text, and the token
count is taken on the final text that goes downstream.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Final, Literal

from service.errors import GuardrailViolation  # a rejected question; its message never echoes the text
from service.policy.injection import looks_like_injection
from service.policy.pii import PII_NAMES, iban_valid, luhn_valid, redact, redact_pii

__all__ = [
    "CONTROL_CHARACTERS",
    "EMPTY_QUESTION",
    "PII_DETECTED",
    "PII_REDACTED",
    "PROMPT_INJECTION",
    "QUESTION_TOO_LONG",
    "TOO_MANY_TOKENS",
    "Action",
    "GuardrailPolicy",
    "GuardrailResult",
    "GuardrailViolation",
    "PiiMode",
    "check_question",
    "iban_valid",
    "luhn_valid",
    "normalize_for_key",
    "redact_pii",
]

# Stable codes: clients, logs and metrics rely on these strings.
EMPTY_QUESTION: Final = "empty_question"
QUESTION_TOO_LONG: Final = "question_too_long"
TOO_MANY_TOKENS: Final = "too_many_tokens"
CONTROL_CHARACTERS: Final = "control_characters"
PROMPT_INJECTION: Final = "prompt_injection"
PII_DETECTED: Final = "pii_detected"
PII_REDACTED: Final = "pii_redacted"


class Action(StrEnum):
    """What a check does on a hit: reject the request, or let it pass and record it."""

    BLOCK = "block"
    FLAG = "flag"


PiiMode = Literal["redact", "block", "allow"]
_PII_MODES: Final = frozenset({"redact", "block", "allow"})


@dataclass(frozen=True)
class GuardrailPolicy:
    """Operator-tunable limits; built by the service from its settings.

    ``pii="allow"`` switches PII scanning off entirely (no redaction, no flag).
    """

    max_chars: int = 4000
    max_tokens: int = 1000
    injection: Action = Action.BLOCK
    pii: PiiMode = "redact"
    control_chars: Action = Action.BLOCK

    def __post_init__(self) -> None:
        """Fail fast on bad settings and accept plain strings for the actions."""
        if self.max_chars < 1 or self.max_tokens < 1:
            raise ValueError("max_chars and max_tokens must be positive")
        if self.pii not in _PII_MODES:
            raise ValueError(f"pii must be one of {sorted(_PII_MODES)}, got {self.pii!r}")
        object.__setattr__(self, "injection", Action(self.injection))
        object.__setattr__(self, "control_chars", Action(self.control_chars))


@dataclass(frozen=True)
class GuardrailResult:
    """The question as it may be used downstream, plus what the checks recorded.

    ``flags`` holds codes that were detected but allowed by policy, in check
    order; ``redactions`` counts replaced PII per kind (``email``, ``iban``,
    ``card``, ``ssn``, ``phone``); ``token_count`` is measured on ``text``.
    """

    text: str
    flags: tuple[str, ...] = ()
    redactions: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    token_count: int = 0

    def __post_init__(self) -> None:
        """Freeze the containers so a result can be shared safely."""
        object.__setattr__(self, "flags", tuple(self.flags))
        object.__setattr__(self, "redactions", MappingProxyType(dict(self.redactions)))


# --------------------------------------------------------------------------
# Normalisation helpers
# --------------------------------------------------------------------------

# Zero-width characters that carry no content at the edges of a question.
_ZERO_WIDTH: Final = "\u200b\u200c\u200d\u2060\ufeff"
_EDGES: Final = re.compile(rf"^[\s{_ZERO_WIDTH}]+|[\s{_ZERO_WIDTH}]+$")
_WHITESPACE_RUN: Final = re.compile(r"\s+")

# C0/C1 controls except \t \n \r, DEL, and the bidi embedding/override/isolate
# characters used in "Trojan Source" attacks (U+202A-E, U+2066-9).
_CONTROL: Final = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _nfc_strip(text: str) -> str:
    """NFC first so that equal-looking questions are equal strings."""
    return _EDGES.sub("", unicodedata.normalize("NFC", text))


def _is_blank(text: str) -> bool:
    """Blank means nothing but whitespace and invisible format (Cf) characters."""
    return all(ch.isspace() or unicodedata.category(ch) == "Cf" for ch in text)


def normalize_for_key(text: str) -> str:
    """Canonical form for cache keys: NFC, casefolded, single-spaced, stripped.

    NFC is applied again after casefolding because casefolding can emit
    decomposed sequences; this keeps the function idempotent.
    """
    folded = unicodedata.normalize("NFC", unicodedata.normalize("NFC", text).casefold())
    return _WHITESPACE_RUN.sub(" ", folded).strip()


# --------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------


def check_question(
    question: str,
    policy: GuardrailPolicy,
    count_tokens: Callable[[str], int],
) -> GuardrailResult:
    """Validate and clean a question; raise :class:`GuardrailViolation` to reject.

    ``count_tokens`` is injected so this module stays free of tokenizer set-up;
    it is called once, on the final text, and only if every other check passed.
    """
    flags: list[str] = []
    text = _nfc_strip(question)

    if _is_blank(text):
        raise GuardrailViolation(EMPTY_QUESTION, "The question is empty.")

    if _CONTROL.search(text):
        if policy.control_chars is Action.BLOCK:
            raise GuardrailViolation(
                CONTROL_CHARACTERS,
                "The question contains control or bidirectional-override characters.",
            )
        # Let it through, but never pass NULs or bidi overrides downstream.
        flags.append(CONTROL_CHARACTERS)
        text = _EDGES.sub("", _CONTROL.sub("", text))
        if _is_blank(text):
            raise GuardrailViolation(EMPTY_QUESTION, "The question is empty.")

    if len(text) > policy.max_chars:
        raise GuardrailViolation(
            QUESTION_TOO_LONG,
            f"The question is {len(text)} characters long; the limit is {policy.max_chars}.",
        )

    redactions: dict[str, int] = {}
    if policy.pii != "allow":
        redacted, found = redact(text)
        if found:
            if policy.pii == "block":
                kinds = ", ".join(PII_NAMES[k] for k in sorted(found))
                raise GuardrailViolation(
                    PII_DETECTED,
                    f"The question appears to contain personal data ({kinds}); remove it and try again.",
                )
            text, redactions = redacted, dict(sorted(found.items()))
            flags.append(PII_REDACTED)

    if looks_like_injection(text):
        if policy.injection is Action.BLOCK:
            raise GuardrailViolation(
                PROMPT_INJECTION,
                "The question looks like an attempt to override the assistant's instructions.",
            )
        flags.append(PROMPT_INJECTION)

    tokens = count_tokens(text)
    if tokens > policy.max_tokens:
        raise GuardrailViolation(
            TOO_MANY_TOKENS,
            f"The question is {tokens} tokens long; the limit is {policy.max_tokens}.",
        )

    return GuardrailResult(text=text, flags=tuple(flags), redactions=redactions, token_count=tokens)
