"""Personal data in questions: e-mail addresses, phone numbers, payment cards, US SSNs, IBANs.

`redact` replaces each with a placeholder (`[EMAIL]`, `[PHONE]`, …) and counts them; the
guardrails decide whether that redacts or blocks. Cards must pass the Luhn checksum and IBANs
their mod-97 check, so ordinary numbers, timestamps and ids are left alone.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final, Literal

__all__ = ["PII_NAMES", "PiiKind", "iban_valid", "luhn_valid", "redact", "redact_pii"]

#
# The patterns run on a *scan view* of the question: every character folded by NFKC
# (full-width digits and `＠`, non-breaking spaces), any decimal digit as its ASCII digit,
# any dash as "-", and invisible format characters (zero-width spaces and joiners, soft
# hyphens) dropped. Each view character remembers the question character it came from, so
# a hit replaces exactly the original span and the rest of the question is left as typed.
#
# Microsoft Presidio was considered: its analyzer loads a spaCy pipeline (hundreds of MB,
# milliseconds per short text on CPU) for names and places, where this check must cost
# microseconds ahead of a ~1 ms cache hit, and its pattern recognisers for these kinds are
# regexes plus the same checksums as here. The numbers are in docs/benchmarks.md.


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


def iban_valid(iban: str) -> bool:
    """ISO 13616: 15-34 letters and digits whose mod-97 check (ISO 7064) gives 1."""
    compact = iban.upper()
    if not 15 <= len(compact) <= 34 or not compact[:2].isalpha() or not compact[2:4].isdigit():
        return False
    if not all(ch.isascii() and ch.isalnum() for ch in compact):
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1


def _scan_view(text: str) -> tuple[str, list[int]]:
    """The folded text the PII patterns see, and for each of its characters the index it came from."""
    chars: list[str] = []
    origin: list[int] = []
    for index, ch in enumerate(text):
        if ch.isascii():
            chars.append(ch)
            origin.append(index)
            continue
        category = unicodedata.category(ch)
        if category == "Cf":
            continue
        if category == "Nd":
            folded = str(unicodedata.digit(ch))
        elif category == "Pd":
            folded = "-"
        else:
            folded = unicodedata.normalize("NFKC", ch)
        chars.extend(folded)
        origin.extend([index] * len(folded))
    return "".join(chars), origin


_EMAIL: Final = re.compile(
    r"(?<![\w.%+\-])[\w.%+\-]+@"
    r"(?:[^\W_](?:[\w\-]*[^\W_])?\.)+"
    # "icon@2x.png" is an asset name, not an address.
    r"(?!(?:png|jpe?g|gif|svg|webp|ico|bmp)\b)[^\W\d_]{2,}\b"
)

# Two letters, two check digits, then 11-30 letters and digits, in groups of four or not.
_IBAN: Final = re.compile(r"(?<![^\W_])[A-Za-z]{2}[0-9]{2}(?:[ \-]?[A-Za-z0-9]){11,30}(?![^\W_])")

# Digits in groups joined by single spaces, dots or dashes (mixed ones too): card candidates.
_DIGIT_RUN: Final = re.compile(r"(?<![\w.\-])[0-9]+(?:[ .\-][0-9]+)*(?![^\W_])")
_DIGITS: Final = re.compile(r"[0-9]+")
# How cards are printed: 4-4-4-4(-1..3), Amex 4-6-5, Diners 4-6-4, or contiguous.
_CARD_GROUPS: Final = re.compile(r"4,4,4,4(?:,[123])?|4,6,[45]|(?:1[3-9])")

# US social security numbers: AAA-GG-SSSS with the never-issued ranges left out, or nine
# digits right after the words.
_SSN: Final = re.compile(
    r"(?<![\w.\-/])(?!000|666|9)[0-9]{3}(?P<sep>[ \-])(?!00)[0-9]{2}(?P=sep)(?!0000)[0-9]{4}(?![^\W_]|[.\-/][0-9])"
)
_SSN_WORDS: Final = re.compile(
    r"(?i)\b(?:ssn|social\s+security(?:\s+(?:number|no|#))?)\b[^0-9\n]{0,20}?(?P<number>[0-9]{9})(?![0-9])"
)

# +CC and 00CC forms: a country code, optional "(0)"/"(555)" part, digit groups joined
# by single separators. The digit count (E.164: 10-15 after the prefix) is checked afterwards.
_INTL_PHONE: Final = re.compile(
    r"(?<![\w+])(?:\+|(?<![0-9])00)[1-9][0-9]{0,2}"
    r"(?:[ .\-]|[ .\-]?\([0-9]{1,5}\)[ .\-]?)?"
    r"[0-9]+(?:[ .\-][0-9]+)*(?![0-9])"
)

# North American forms: (555) 123-4567, 555-123-4567, 555.123.4567, 1-800-...
_NA_PHONE: Final = re.compile(
    r"(?<![\w.+\-/])(?:1[ .\-]?)?"
    r"(?:\([0-9]{3}\)[ .\-]?|[0-9]{3}[ .\-])"
    r"[0-9]{3}[ .\-][0-9]{4}"
    r"(?![^\W_]|[.\-/][0-9])"
)
# ... and written without separators: ten digits with a valid area code (not 0 or 1), or
# eleven starting with 1. Unix times (1…) and 13-digit millisecond times stay out.
_NA_CONTIGUOUS: Final = re.compile(r"(?<![\w.+\-/])1?[2-9][0-9]{9}(?![^\W_]|[.\-/][0-9])")

# National numbers with a trunk 0 (UK, Germany, France, …): 020 7946 0958, (030) 1234567,
# 06 12 34 56 78, 02079460958. Ten or eleven digits in all, checked afterwards.
_NATIONAL_PHONE: Final = re.compile(
    r"(?<![\w.+\-/])(?:"
    r"(?:\(0[1-9][0-9]{0,4}\)[ .\-]?|0[1-9][0-9]{0,4}[ .\-])[0-9]{2,8}(?:[ .\-][0-9]{2,4}){0,3}"
    r"|0[1-9][0-9]{8,9}"
    r")(?![^\W_]|[.\-/][0-9])"
)

PiiKind = Literal["email", "iban", "card", "ssn", "phone"]
_PLACEHOLDERS: Final[Mapping[str, str]] = MappingProxyType(
    {"email": "[EMAIL]", "iban": "[IBAN]", "card": "[CARD]", "ssn": "[SSN]", "phone": "[PHONE]"}
)
PII_NAMES: Final[Mapping[str, str]] = MappingProxyType(
    {
        "email": "email address",
        "iban": "bank account number (IBAN)",
        "card": "payment card number",
        "ssn": "social security number",
        "phone": "phone number",
    }
)


def _digits(text: str) -> str:
    return "".join(ch for ch in text if "0" <= ch <= "9")


def _is_card(digits: str) -> bool:
    """Card = 13-19 digits, a major-network leading digit (2-6), Luhn-valid.

    The leading-digit rule keeps all-zero strings and 13-digit millisecond
    timestamps (which start with 1) from being redacted.
    """
    return 13 <= len(digits) <= 19 and digits[0] in "23456" and luhn_valid(digits)


def _card_span(match: re.Match[str]) -> tuple[int, int] | None:
    """The longest run of leading groups printed like a card and valid as one.

    "4111 1111 1111 1111 200 items": the card is the 16-digit head.
    """
    if match.end() - match.start() < 13:
        return None  # fewer than 13 digits: no card
    groups = [(m.start(), m.end()) for m in _DIGITS.finditer(match.group(0))]
    for n in range(len(groups), 0, -1):
        shape = ",".join(str(end - start) for start, end in groups[:n])
        if _CARD_GROUPS.fullmatch(shape) is None:
            continue
        head = match.group(0)[: groups[n - 1][1]]
        if _is_card(_digits(head)):
            return match.start(), match.start() + len(head)
    return None


def _iban_span(match: re.Match[str]) -> tuple[int, int] | None:
    """The longest prefix ending at a character that makes a valid IBAN (a word may follow one)."""
    text = match.group(0)
    for end in range(len(text), 14, -1):
        if text[end - 1] in " -":
            continue
        if iban_valid(re.sub(r"[ \-]", "", text[:end])):
            return match.start(), match.start() + end
    return None


def _pii_spans(view: str) -> list[tuple[int, int, PiiKind]]:
    """Non-overlapping PII hits in the scan view; a kind listed earlier wins an overlap."""
    found: list[tuple[int, int, PiiKind]] = []

    def claim(span: tuple[int, int] | None, kind: PiiKind) -> None:
        if span is not None and not any(span[0] < end and start < span[1] for start, end, _ in found):
            found.append((span[0], span[1], kind))

    for m in _EMAIL.finditer(view) if "@" in view else ():
        claim(m.span(), "email")
    for m in _IBAN.finditer(view):
        claim(_iban_span(m), "iban")
    for m in _DIGIT_RUN.finditer(view):
        claim(_card_span(m), "card")
    for m in _SSN.finditer(view):
        claim(m.span(), "ssn")
    for m in _SSN_WORDS.finditer(view):
        claim(m.span("number"), "ssn")
    for m in _INTL_PHONE.finditer(view):
        digits = _digits(m.group(0))
        if 10 <= len(digits) - (2 if m.group(0).startswith("00") else 0) <= 15:
            claim(m.span(), "phone")
    for m in _NA_PHONE.finditer(view):
        claim(m.span(), "phone")
    for m in _NA_CONTIGUOUS.finditer(view):
        if len(set(m.group(0))) > 2:  # 5555555555 or 2000000000 is a placeholder, not a number
            claim(m.span(), "phone")
    for m in _NATIONAL_PHONE.finditer(view):
        if 10 <= len(_digits(m.group(0))) <= 11:
            claim(m.span(), "phone")
    return sorted(found)


def redact(text: str) -> tuple[str, dict[str, int]]:
    """Replace PII with placeholders, found on the scan view, replaced in the original text."""
    view, origin = (text, None) if text.isascii() else _scan_view(text)
    if "@" not in view and not any("0" <= ch <= "9" for ch in view):
        return text, {}  # most questions: no address, no number
    spans = _pii_spans(view)
    if not spans:
        return text, {}
    counts: dict[str, int] = {}
    pieces: list[str] = []
    position = 0
    for start, end, kind in spans:
        first, last = (start, end) if origin is None else (origin[start], origin[end - 1] + 1)
        pieces.append(text[position:first])
        pieces.append(_PLACEHOLDERS[kind])
        counts[kind] = counts.get(kind, 0) + 1
        position = last
    pieces.append(text[position:])
    return "".join(pieces), counts


def redact_pii(text: str) -> str:
    """`text` with every PII hit replaced by its placeholder: what may be kept at rest."""
    return redact(text)[0]
