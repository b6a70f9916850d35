"""Input guardrails: the first step of every request, before any I/O.

Why it is pure: it runs ahead of the cache, the database and the model, so it
must be cheap, deterministic and testable without a running stack. The service
builds a :class:`GuardrailPolicy` from its settings, passes a token counter in,
and maps :class:`GuardrailViolation` to an HTTP 400 error.

Order of checks (part of the contract):
NFC normalise -> empty -> control chars -> length (chars) -> PII -> injection
-> tokens. PII is redacted before any later step sees the text, and the token
count is taken on the final text that goes downstream.
"""

from __future__ import annotations

import base64
import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Final, Literal

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


class GuardrailViolation(Exception):
    """A rejected question. ``message`` never echoes the user's text or PII."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


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
# PII
# --------------------------------------------------------------------------
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
_PII_NAMES: Final[Mapping[str, str]] = MappingProxyType(
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


def _redact_pii(text: str) -> tuple[str, dict[str, int]]:
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
    return _redact_pii(text)[0]


# --------------------------------------------------------------------------
# Prompt injection
# --------------------------------------------------------------------------

# Letters spelled out with single separators ("i g n o r e") are joined in the
# detection view; a double space still separates words.
_SPACED_LETTERS: Final = re.compile(r"(?<!\w)(?:\w[ ._*\-]){2,}\w(?!\w)")
_SPACER: Final = re.compile(r"[ ._*\-]")
_HSPACE: Final = re.compile(r"[^\S\n]+")
_QUOTES: Final = re.compile("[\u2018\u2019\u201b\u2032`]")

# Start of an imperative: text/sentence start, punctuation, or a politeness
# word. Used where the phrase alone is also a normal question ("how do I print
# the system prompt in LangChain?").
_IMP: Final = r"(?:^|[.!?;:,>\"'(\[\n]\s*|\b(?:please|now|just|first|kindly|ok|okay)\s*,?\s+)"
_LEAK_VERB: Final = (
    r"(?:reveal|print|show|display|output|repeat|leak|dump|expose|disclose|"
    r"recite|echo|paste|share|tell|give|list|write\s+out|spell\s+out)"
)
_PROMPT_TARGET: Final = (
    r"(?:(?:full|exact|complete|entire|whole|actual|real)\s+)?"
    r"(?:system[\s\-]*prompt|pre-?prompt|"
    r"(?:system|initial|original|hidden|secret|internal|confidential|developer)"
    r"[\s\-]+(?:prompts?|instructions|messages?|rules|directives))"
)
_UNRESTRICTED_WORDS: Final = (
    r"restrictions|limitations|filters?|filtering|censorship|guardrails|"
    r"guidelines|ethics|morals|morality|safeguards|content\s+polic(?:y|ies)"
)
_UNRESTRICTED: Final = r"(?:" + _UNRESTRICTED_WORDS + r")"


def _ignore_previous(verbs: str, qualifiers: str, nouns: str) -> str:
    """The verb, then previous/all/your and the instructions (either order), in one sentence."""
    near = r"[^.!?\n]{0,30}?"
    return (
        rf"\b(?:{verbs})\b[^.!?\n]{{0,40}}?"
        rf"(?:\b(?:{qualifiers})\b{near}\b(?:{nouns})\b|\b(?:{nouns})\b{near}\b(?:{qualifiers})\b)"
    )


# The two commonest attacks in other languages: "ignore the previous instructions" and
# "show me your system prompt". As in English, "instructions" alone is not enough: they must
# be the previous / all / your ones, and the prompt must be the assistant's ("your").
_OTHER_LANGUAGES: Final = (
    _ignore_previous(  # es
        "ignora|ignore|ignoren|ignorar|olvida|olvide|olviden|olvidar|omite|omita|descarta|descarte",
        "anteriores|previas|precedentes|todas|tus|sus",
        "instrucciones|indicaciones|directrices",
    ),
    _ignore_previous(  # pt
        "ignore|ignora|ignorem|ignorar|esqueça|esqueca|esquece|esqueçam|desconsidere|desconsidera",
        "anteriores|prévias|previas|todas|suas|tuas",
        "instruções|instrucoes|orientações|orientacoes|diretrizes",
    ),
    _ignore_previous(  # fr
        "ignore|ignorez|ignorer|oublie|oubliez|oublier",
        "précédentes|precedentes|antérieures|anterieures|toutes|tes|vos",
        "instructions|consignes|directives",
    ),
    _ignore_previous(  # de (casefolded: ß is ss)
        "ignoriere|ignorier|ignoriert|ignorieren|vergiss|vergesst|vergessen|missachte|missachtet|missachten",
        "vorherigen|vorigen|bisherigen|obigen|früheren|fruheren|alle|allen|deine|ihre|eure",
        "anweisungen|anweisung|instruktionen|vorgaben|befehle",
    ),
    _ignore_previous(  # it
        "ignora|ignori|ignorate|ignorare|dimentica|dimentichi|dimenticate|dimenticare",
        "precedenti|tutte|tue|sue|vostre",
        "istruzioni|indicazioni|direttive",
    ),
    _ignore_previous(  # nl
        "negeer|negeert|negeren|vergeet|vergeten|verwaarloos|sla",
        "vorige|eerdere|voorgaande|bovenstaande|alle|je|jouw|uw",
        "instructies|instructie|aanwijzingen|opdrachten|richtlijnen|regels",
    ),
    _ignore_previous(  # pl (marks stripped: pomiń is pomin)
        r"zignoruj\w*|ignoruj\w*|zapomnij\w*|pomin\w*|odrzuc\w*",
        r"poprzedni\w*|wczesniejsz\w*|wszystki\w*|swoje|twoje|powyzsz\w*|dotychczasow\w*",
        r"instrukcj\w*|polece\w*|wskazowk\w*|zasad\w*|regul\w*",
    ),
    _ignore_previous(  # ru
        r"игнорир\w*|проигнорир\w*|забудь\w*|забыть|забудьте",
        r"предыдущ\w*|прежн\w*|вс[её]\w*|сво[иё]\w*|тво[иё]\w*|ваш\w*|выше",
        r"инструкци\w*|указани\w*|команд\w*",
    ),
    # zh: 忽略之前的所有指令 / 無視以上指示
    r"(?:忽略|忽视|忽視|无视|無視|忘记|忘記|不要理会|不要理會)[^。！？\n]{0,20}?"
    r"(?:之前|以前|先前|上面|上述|以上|前面|所有|全部|你的)[^。！？\n]{0,20}?(?:指令|指示|说明|說明|提示)",
    # ja: 以前の指示をすべて無視して
    r"(?:以前|前|上記|これまで|すべて|全て|あなた)の?[^。！？\n]{0,20}?(?:指示|命令|指令|プロンプト)"
    r"[^。！？\n]{0,20}?(?:無視|忘れ)",
    # ko: 이전의 모든 지시를 무시하세요
    r"(?:이전|앞의|위의|모든)[^.!?\n]{0,20}?(?:지시|지침|명령)[^.!?\n]{0,20}?(?:무시|잊어)",
    # show me your system prompt: es, pt, fr, de, it, ru, zh, ja
    r"\b(?:muestra|muéstrame|muestrame|revela|revélame|revelame|dime|imprime|repite|enséñame|ensename|"
    r"mostra|mostre|mostrar|revele|diga|mostrami|rivela|rivelami|dimmi|stampa|ripeti)\b[^.!?\n]{0,30}?"
    r"\b(?:tu|tus|teu|seu|tuo|tuoi|il\s+tuo)\s+(?:prompt|instrucciones|instruções|istruzioni)\s+"
    r"(?:del?\s+|do\s+|di\s+)?(?:sistema|system)\b",
    r"\b(?:montre|montrez|affiche|affichez|révèle|révélez|revele|donne|donnez|répète|répétez|repete)"
    r"(?:-moi)?\b[^.!?\n]{0,30}?\b(?:ton|votre|tes|vos)\s+(?:prompt|invite|instructions?|consignes)\s+"
    r"(?:système|systeme|cachées?|cachees?|initiales?)",
    r"\b(?:toon|laat|geef|herhaal|print|onthul)\b[^.!?\n]{0,30}?\b(?:je|jouw|uw)\s+"
    r"(?:systeemprompt|systeem-prompt|systeeminstructies|prompt|verborgen\s+instructies)\b",
    r"\b(?:pokaz|wyswietl|ujawnij|powtorz|podaj|wypisz|zdradz)\b[^.!?\n]{0,30}?\b(?:swoj|twoj|swoje|twoje|swoja|twoja)\s+"
    r"(?:prompt\s+systemowy|systemowy\s+prompt|instrukcje\s+systemowe|ukryte\s+instrukcje|prompt)\b",
    r"\b(?:zeig|zeige|zeigen|verrate|verraten|gib|nenne|nennen|wiederhole|wiederholen|drucke)\b[^.!?\n]{0,30}?"
    r"\b(?:dein|deinen|deine|ihren|ihre|ihr)\s+(?:system-?prompt|systemanweisungen|system-anweisungen|prompt)\b",
    r"\b(?:покажи|покажите|выведи|выведите|раскрой|раскройте|повтори|повторите|напечатай|скажи|назови)\b"
    r"[^.!?\n]{0,30}?(?:сво\w*\s+|тво\w*\s+|ваш\w*\s+)?системн\w*\s+(?:промпт|подсказк|инструкци|сообщени)\w*",
    r"(?:告诉|告訴|显示|顯示|输出|輸出|打印|泄露|洩露|透露|重复|重複|给我看|給我看)[^。！？\n]{0,10}?"
    r"你的(?:系统|系統)?(?:提示词|提示詞|提示|指令)",
    r"あなたの(?:システムプロンプト|システム指示|指示|プロンプト)[^。！？\n]{0,10}?(?:表示|教え|見せ|出力|開示)",
)

_INJECTION_PATTERNS: Final[tuple[re.Pattern[str], ...]] = tuple(
    re.compile(p)
    for p in (
        # ignore/disregard/forget (all) previous/prior/above ... instructions
        r"\b(?:ignore|disregard|forget)\s+(?:\w+\s+){0,3}?"
        r"(?:previous|prior|above|preceding|earlier|foregoing|former|original|"
        r"initial|all|any|every|your)\s+(?:\w+\s+){0,2}?"
        r"(?:instructions?|prompts?|directions|directives|programming)\b",
        # ... the system prompt / developer message
        r"\b(?:ignore|disregard|forget)\s+(?:\w+\s+){0,2}?"
        r"(?:system|developer|hidden|initial|original)\s*(?:prompt|message|instructions?)\b",
        _IMP + r"(?:override|bypass|overrule)\s+(?:\w+\s+){0,2}?"
        r"(?:system|developer|safety)\s*(?:prompt|message|instructions?|rules|guardrails)\b",
        # ... your rules / everything above / the above
        r"\b(?:ignore|disregard|forget)\s+(?:all\s+)?(?:of\s+)?your\s+(?:\w+\s+){0,2}?"
        r"(?:rules|guidelines|training|restrictions|guardrails|filters)\b",
        r"\b(?:ignore|disregard|forget)\s+(?:all|everything|anything)\s+"
        r"(?:(?:that\s+)?(?:was\s+|you\s+were\s+|i\s+)?(?:said|told|written|given|wrote)\s+)?"
        r"(?:above|before|previously|prior|so\s+far|earlier)\b",
        r"\b(?:ignore|disregard|forget)\s+(?:all\s+)?(?:of\s+)?the\s+(?:above|foregoing)"
        r"\s*(?:[.,;:!]|$|and\b)",
        # skip / discard / set aside ... all (earlier) instructions: these verbs are also used
        # for install steps, so the instructions must be all / every / your ones or the ones above
        r"\b(?:skip|drop|discard|dismiss|abandon|neglect|overlook|scrap|set\s+aside|throw\s+(?:out|away))\s+"
        r"(?:(?:all|any|every|each|your|these|those)\s+(?:of\s+)?(?:your\s+|the\s+|my\s+)?(?:\w+\s+){0,2}?"
        r"(?:instructions?|prompts?|directives?|directions|rules|guidelines|programming)\b"
        r"|(?:\w+\s+){0,2}?(?:instructions?|prompts?|directives?|rules)\s+(?:above|so\s+far|"
        r"(?:you\s+(?:were|have\s+been)\s+)?given\s+(?:before|earlier|above)))",
        # pay no attention to / do not follow / stop following ... the previous instructions
        r"\b(?:pay\s+no\s+(?:attention|heed|mind)|take\s+no\s+notice|stop\s+(?:following|obeying|listening\s+to)|"
        r"(?:do\s+not|don't|dont|never)\s+(?:follow|obey|listen\s+to|heed|pay\s+(?:any\s+)?attention))\s+"
        r"(?:to\s+)?(?:(?:any|all|each|every)\s+(?:of\s+)?)?(?:the\s+|your\s+|these\s+|those\s+|my\s+)?"
        r"(?:(?:(?:previous|prior|earlier|above|preceding|foregoing|original|initial|system|developer|hidden)\s+)+"
        r"(?:instructions?|prompts?|directions|directives|rules|messages?)\b"
        r"|(?:instructions?|prompts?|directions|directives|rules)\s+(?:above|before\s+this|so\s+far))",
        # repeat the text before "Numbered sources" (the start of our prompt's user part)
        r"\b(?:repeat|print|output|copy|recite|reproduce|return|write\s+out|echo)\b[^.!?\n]{0,80}?"
        r"\b(?:before|above|preceding|prior\s+to|up\s+to|until)\b[^.!?\n]{0,40}?['\"\u201c]?numbered\b",
        r"\b(?:repeat|print|output|copy|recite|reproduce)\b[^.!?\n]{0,60}?\b(?:text|words|everything|content|all)\b"
        r"[^.!?\n]{0,60}?\b(?:before|preceding|prior\s+to)\s+(?:the\s+)?(?:word|phrase|line|heading)\b"
        r"[^.!?\n]{0,60}?\b(?:verbatim|exactly|word\s+for\s+word)\b",
        # reveal/print/show your system prompt / hidden instructions
        r"\b" + _LEAK_VERB + r"\s+(?:me\s+|us\s+)?(?:\w+\s+){0,2}?your\s+"
        r"(?:" + _PROMPT_TARGET + r"|prompt|instructions\s+verbatim)\b",
        r"\bwhat(?:\s+(?:is|are|was|were)|'s|'re)\s+your\s+(?:" + _PROMPT_TARGET + r"|prompt)\b",
        _IMP + _LEAK_VERB + r"\s+(?:me\s+|us\s+)?(?:\w+\s+){0,2}?"
        r"(?:the\s+|any\s+|all\s+)?" + _PROMPT_TARGET + r"\b",
        _IMP + r"(?:repeat|print|output|reveal)\s+(?:me\s+)?"
        r"(?:all\s+|everything\s+|the\s+(?:text|words|content|instructions|prompt)\s+)"
        # "... above." ends the request; "print the text above the table" is a question.
        r"(?:(?:above|before\s+this|so\s+far)(?:\s+verbatim)?\s*(?:[.,;:!?]|$|and\b)|verbatim\b)",
        # personas: DAN, developer mode, unrestricted
        r"\byou\s+are\s+now\s+(?:in\s+|a\s+|an\s+|the\s+)?"
        r"(?:dan|stan|developer\s+mode|dev\s+mode|god\s+mode|jailbreak\s+mode|jailbroken|"
        r"unrestricted|uncensored|unfiltered|unbound|unchained|evil)\b",
        r"\byou\s+are\s+(?:a\s+|an\s+)?(?:dan|jailbroken|unrestricted\s+ai|uncensored\s+ai)\b",
        r"\byou\s+are\s+(?:now\s+)?no\s+longer\s+(?:bound|restricted|limited|constrained)\b",
        r"\b(?:you|chatgpt|assistant|ai|model|claude|gpt|llm|bot)\s+(?:are\s+now\s+|is\s+now\s+)?"
        r"(?:in\s+|with\s+)(?:developer|dev)\s+mode\b",
        r"\b(?:dan|jailbreak)\s+mode\b",
        r"\bdan\b.{0,40}\bdo\s+anything\s+now\b|\bdo\s+anything\s+now\b.{0,40}\bdan\b",
        r"\b(?:act|pretend|roleplay|behave)\s+(?:to\s+be\s+|as\s+|like\s+)(?:a\s+|an\s+)?(?:dan|stan)\b",
        # act as ... without restrictions
        r"(?:" + _IMP + r"|\byou\s+(?:will\s+|to\s+|should\s+|must\s+|shall\s+|now\s+|"
        r"are\s+going\s+to\s+)?)(?:act|behave|roleplay|role-play|respond|answer|reply)"
        r"\b(?:\s+\S+){0,8}?\s+(?:without|with\s+no|free\s+(?:of|from)|ignoring|"
        r"not\s+bound\s+by|unbound\s+by)\s+(?:any\s+|all\s+|your\s+|the\s+|its\s+|"
        r"(?:moral|ethical|content|safety)\s+)*" + _UNRESTRICTED + r"\b",
        r"\bpretend\s+(?:that\s+)?(?:you\s+(?:are|have)|to\s+be)\b(?:\s+\S+){0,6}?\s+"
        r"(?:no|without)\s+(?:any\s+)?(?:rules|" + _UNRESTRICTED_WORDS + r")\b",
        # chat-template role tags and prompt delimiters
        r"<\s*/?\s*(?:system|assistant|developer|sys|system_prompt|instructions)\s*>",
        r"<\|\s*(?:im_start|im_end|system|assistant|user|endoftext|start_header_id|"
        r"end_header_id|eot_id|begin_of_text)\s*\|>",
        r"\[\s*/?\s*(?:inst|sys)\s*\]|<<\s*/?\s*sys\s*>>",
        r"\[\s*system\s+(?:message|prompt|override)\s*\]",
        r"\b(?:begin|end)\s+(?:new\s+)?system\s+(?:prompt|message|instructions?)\b",
        r"\bnew\s+system\s+(?:prompt|instructions?)\s*:",
    )
)
_OTHER_LANGUAGE_PATTERNS: Final[tuple[re.Pattern[str], ...]] = tuple(re.compile(p) for p in _OTHER_LANGUAGES)
# Each _OTHER_LANGUAGES pattern needs one of these words: most questions have none and skip them all.
_OTHER_LANGUAGE_NOUNS: Final = re.compile(
    r"instru|indicacion|indicazion|directric|directiv|direttiv|diretriz|orienta|consigne|invite|anweisung|"
    r"vorgabe|befehl|istruzion|prompt|aanwijzing|opdracht|richtlijn|regels|polece|wskazow|zasad|regul|промпт|подсказк|инструкци|указани|команд|сообщени|"
    r"指令|指示|说明|說明|提示|命令|プロンプト|지시|지침|명령"
)


# Cyrillic, Greek and Armenian letters that look like Latin ones ("ignоre" with a Cyrillic о,
# "ignօre" with an Armenian օ). They are folded only in words that also hold Latin letters:
# Russian, Greek or Armenian words stay as they are.
_LOOKALIKES: Final = "аеорсухіјѕһԁԛԝӏкαοικνρτυχεϲγօսոհցքզ"
_CONFUSABLES: Final = str.maketrans(_LOOKALIKES, "aeopcyxijshdqwlkaoikvptuxecyounhgpq")
_CONFUSABLE: Final = re.compile(f"[{_LOOKALIKES}]")
# Small capitals and other Latin letter forms NFKC leaves alone ("ɪɢɴᴏʀᴇ"): always folded, as
# they are Latin letters and no language writes words with them.
_SMALL_CAPS: Final = str.maketrans("ᴀʙᴄᴅᴇꜰɢʜɪᴊᴋʟᴍɴᴏᴘꞯʀꜱᴛᴜᴠᴡʏᴢıɑɡ", "abcdefghijklmnopqrstuvwyziag")
_WORD: Final = re.compile(r"[^\W\d_]+")
_LATIN: Final = re.compile(r"[a-z]")
# Leetspeak inside words that mix letters and these characters ("1gn0r3"); numbers alone stay.
_LEET_WORD: Final = re.compile(r"(?=[\w@$]*[a-z])(?=[\w@$]*[0-9@$])[\w@$]+")
_LEET: Final = str.maketrans("01345789@$", "oieasttgas")
# Base64 long enough to carry an instruction; decoded and checked once.
_BASE64: Final = re.compile(r"(?<![\w+/=])[A-Za-z0-9+/\-_]{16,}={0,2}(?![\w+/=])")


def _fold_confusables(match: re.Match[str]) -> str:
    word = match.group(0)
    return word.translate(_CONFUSABLES) if _LATIN.search(word) else word


def _strip_latin_marks(text: str) -> str:
    """Drop combining marks on Latin letters: a stroke or accents over "ignore", or "précédentes".

    Only after a Latin letter: Cyrillic й, Japanese dakuten or Hangul are left whole.
    """
    decomposed = unicodedata.normalize("NFKD", text)
    kept: list[str] = []
    base_is_latin = False
    for ch in decomposed:
        if unicodedata.combining(ch) or unicodedata.category(ch) == "Me":
            if base_is_latin:
                continue
        else:
            base_is_latin = "a" <= ch <= "z" or "A" <= ch <= "Z"
        kept.append(ch)
    return unicodedata.normalize("NFKC", "".join(kept))


def _injection_view(text: str) -> str:
    """Fold the text so simple obfuscation does not dodge the patterns.

    NFKC maps full-width and styled letters to ASCII, format characters
    (zero-width joiners etc.) are dropped, combining marks on Latin letters go,
    small capitals become letters, case is folded, Cyrillic, Greek and Armenian
    look-alikes in Latin words become Latin, leetspeak in words is read as
    letters, spelled-out letters are joined, and runs of spaces collapse.
    Only used for matching.
    """
    if text.isascii():  # most questions: nothing to fold but case
        view = text.casefold()
    else:
        view = _strip_latin_marks(text)
        view = "".join(ch for ch in view if unicodedata.category(ch) != "Cf").translate(_SMALL_CAPS).casefold()
        if _CONFUSABLE.search(view):
            view = _WORD.sub(_fold_confusables, view)
    view = _LEET_WORD.sub(lambda m: m.group(0).translate(_LEET), view)
    view = _QUOTES.sub("'", view)
    view = _SPACED_LETTERS.sub(lambda m: _SPACER.sub("", m.group(0)), view)
    return _HSPACE.sub(" ", view)


def _decoded_base64(text: str) -> list[str]:
    """Texts hidden as base64 in the question (the printable ones)."""
    found = []
    for match in _BASE64.finditer(text):
        token = match.group(0).replace("-", "+").replace("_", "/")
        try:
            raw = base64.b64decode(token + "=" * (-len(token) % 4), validate=True)
            decoded = raw.decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            continue
        if decoded and sum(ch.isprintable() or ch.isspace() for ch in decoded) >= 0.9 * len(decoded):
            found.append(decoded)
    return found


def _looks_like_injection(text: str, *, decode: bool = True) -> bool:
    view = _injection_view(text)
    if any(p.search(view) for p in _INJECTION_PATTERNS):
        return True
    if _OTHER_LANGUAGE_NOUNS.search(view) is not None and any(p.search(view) for p in _OTHER_LANGUAGE_PATTERNS):
        return True
    # One level of base64: an instruction sent encoded, for the model to decode and follow.
    return decode and any(_looks_like_injection(hidden, decode=False) for hidden in _decoded_base64(text))


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
        redacted, found = _redact_pii(text)
        if found:
            if policy.pii == "block":
                kinds = ", ".join(_PII_NAMES[k] for k in sorted(found))
                raise GuardrailViolation(
                    PII_DETECTED,
                    f"The question appears to contain personal data ({kinds}); remove it and try again.",
                )
            text, redactions = redacted, dict(sorted(found.items()))
            flags.append(PII_REDACTED)

    if _looks_like_injection(text):
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
