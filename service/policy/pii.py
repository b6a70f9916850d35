"""Personal data in questions: e-mail addresses, payment card numbers, phone numbers.

`redact_pii` replaces each with a placeholder (`[EMAIL]`, `[CARD]`, `[PHONE]`) and counts them;
the guardrails decide whether that redacts or blocks. Patterns are tuned to leave timestamps,
IDs and asset names ("icon@2x.png") alone; cards must also pass the Luhn checksum.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

__all__ = ["PII_NAMES", "luhn_valid", "redact_pii"]


def luhn_valid(digits: str) -> bool:
    """Luhn checksum, so that arbitrary 16-digit numbers are not taken for cards."""
    if not digits or not all("0" <= ch <= "9" for ch in digits):
        return False
    total = 0
    for i, ch in enumerate(reversed(digits)):
        n = ord(ch) - 48
        if i % 2 == 1:
            n *= 2
            if n > 9:
                n -= 9
        total += n
    return total % 10 == 0


_EMAIL: Final = re.compile(
    r"(?<![\w.%+\-])[\w.%+\-]+@"
    r"(?:[^\W_](?:[\w\-]*[^\W_])?\.)+"
    # "icon@2x.png" is an asset name, not an address.
    r"(?!(?:png|jpe?g|gif|svg|webp|ico|bmp)\b)[^\W\d_]{2,}\b"
)

# 13-19 digits, either contiguous or in the printed groupings (4-4-4-4[-1..3],
# Amex 4-6-5, Diners 4-6-4) with one consistent separator.
_CARD: Final = re.compile(
    r"(?<![\w.\-])(?:"
    r"[0-9]{13,19}"
    r"|[0-9]{4}(?P<s1>[ \-])[0-9]{4}(?P=s1)[0-9]{4}(?P=s1)[0-9]{4}"
    r"(?:(?P=s1)(?P<tail>[0-9]{1,3}))?"
    r"|[0-9]{4}(?P<s2>[ \-])[0-9]{6}(?P=s2)[0-9]{4,5}"
    r")(?!\w|[.\-][0-9])"
)

# +CC forms: a country code, optional "(0)"/"(555)" part, digit groups joined
# by single separators. The digit count (10-15, E.164) is checked afterwards.
_INTL_PHONE: Final = re.compile(
    r"(?<![\w+])\+[0-9]{1,3}"
    r"(?:[ .\-]|[ .\-]?\([0-9]{1,5}\)[ .\-]?)?"
    r"[0-9]+(?:[ .\-][0-9]+)*(?![0-9])"
)

# North American forms: (555) 123-4567, 555-123-4567, 555.123.4567, 1-800-...
# Separators are required so that timestamps and IDs are left alone.
_NA_PHONE: Final = re.compile(
    r"(?<![\w.+\-/])(?:1[ .\-]?)?"
    r"(?:\([0-9]{3}\)[ .\-]?|[0-9]{3}[ .\-])"
    r"[0-9]{3}[ .\-][0-9]{4}"
    r"(?!\w|[.\-/][0-9])"
)

_PLACEHOLDERS: Final[Mapping[str, str]] = MappingProxyType({"email": "[EMAIL]", "card": "[CARD]", "phone": "[PHONE]"})
PII_NAMES: Final[Mapping[str, str]] = MappingProxyType(
    {"email": "email address", "card": "payment card number", "phone": "phone number"}
)


def _digits(text: str) -> str:
    return "".join(ch for ch in text if "0" <= ch <= "9")


def _is_card(digits: str) -> bool:
    """Card = 13-19 digits, a major-network leading digit (2-6), Luhn-valid.

    The leading-digit rule keeps all-zero strings and 13-digit millisecond
    timestamps (which start with 1) from being redacted.
    """
    return 13 <= len(digits) <= 19 and digits[0] in "23456" and luhn_valid(digits)


def redact_pii(text: str) -> tuple[str, dict[str, int]]:
    """Replace PII with placeholders; emails first (they may contain digits)."""
    counts: dict[str, int] = {}

    def hit(kind: str) -> str:
        counts[kind] = counts.get(kind, 0) + 1
        return _PLACEHOLDERS[kind]

    def email(m: re.Match[str]) -> str:
        return hit("email")

    def card(m: re.Match[str]) -> str:
        raw = m.group(0)
        if _is_card(_digits(raw)):
            return hit("card")
        tail = m.group("tail")
        if tail is not None:
            # "4111 1111 1111 1111 200 items": the card is the 16-digit head.
            head_len = m.start("tail") - m.start() - 1
            if _is_card(_digits(raw[:head_len])):
                return hit("card") + raw[head_len:]
        return raw

    def intl_phone(m: re.Match[str]) -> str:
        return hit("phone") if 10 <= len(_digits(m.group(0))) <= 15 else m.group(0)

    def na_phone(m: re.Match[str]) -> str:
        return hit("phone")

    text = _EMAIL.sub(email, text)
    text = _CARD.sub(card, text)
    text = _INTL_PHONE.sub(intl_phone, text)
    text = _NA_PHONE.sub(na_phone, text)
    return text, counts
