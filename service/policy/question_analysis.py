"""How the semantic-match guard reads a question: tokens, numbers, negations, content words,
direction markers ("to", "from"...), word order and voice.

The vocabularies (stopwords, negations, number words, synonyms, contractions) and a light
stemmer live here; `semantic_match` compares two analyses. Pure, no I/O.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

__all__ = [
    "DIRECTION_MARKERS",
    "MAX_ORDER_CHECK",
    "NEGATIONS",
    "STOPWORDS",
    "SYMMETRIC",
    "Analysis",
    "analyse",
    "canon",
]

# --------------------------------------------------------------------------- normalisation

_APOSTROPHES: Final = str.maketrans({"\u2019": "'", "\u2018": "'", "`": "'", "\u00b4": "'"})

# Contractions are expanded before tokenising so that "can't" carries an explicit "not" and
# "what's" does not leave a stray "s".  Order matters: the irregular forms come first.
_CONTRACTIONS: Final[tuple[tuple[re.Pattern[str], str], ...]] = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        (r"\bcan't\b", "can not"),
        (r"\bcannot\b", "can not"),
        (r"\bwon't\b", "will not"),
        (r"\bshan't\b", "shall not"),
        (r"\bain't\b", "is not"),
        (r"n't\b", " not"),
        (r"\blet's\b", "let us"),
        (r"\b(what|that|it|there|here|where|who|how|why|when|which|she|he)'s\b", r"\1 is"),
        (r"'re\b", " are"),
        (r"'ve\b", " have"),
        (r"'ll\b", " will"),
        (r"'d\b", " would"),
        (r"\bi'm\b", "i am"),
        (r"'s\b", ""),  # possessive: "france's capital" -> "france capital"
        (r"s'(?=\s|$)", "s"),  # plural possessive: "users' keys"
    )
)

# Fixed question frames that mean the same thing.  Kept short and generic: these are ways of
# *asking*, not domain synonyms.
_FRAMES: Final[tuple[tuple[re.Pattern[str], str], ...]] = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        (r"\b(?:what|which) (?:year|date|day|time)\b", "when"),
        (r"\bin (?:what|which) year\b", "when"),
        (r"\bhow come\b", "why"),
        (r"\bfor what reason\b", "why"),
        (r"\bwhat is the reason\b", "why"),
        (r"\b(?:turn|switch) on\b", "enable"),
        (r"\b(?:turn|switch) off\b", "disable"),
        (r"\bhow tall\b", "height"),
        (r"\bhow far\b", "distance"),
        (r"\bhow much does (.+?) cost\b", r"\1 cost"),
    )
)

_TOKEN: Final = re.compile(r"\d+(?:\.\d+)+|\w+")

# --------------------------------------------------------------------------- vocabularies


def _words(*lines: str) -> tuple[str, ...]:
    """Whitespace-separated word lists, kept compact on the page."""
    return tuple(word for line in lines for word in line.split())


# Words that carry no content for the cache decision: function words, auxiliaries and modals,
# "what/how/which" (the question form), politeness and filler.  Deliberately NOT here:
# negations, quantifiers (all, every, only...), direction words that change meaning on their own
# (before/after, above/below, over/under), and who/when/where/why, which ask for different facts.
STOPWORDS: Final = frozenset(
    _words(
        "a an the this that these those it its they them their there here",
        "i me my mine myself you your yours we our ours he him his she her",
        "is are was were be been being am do does did doing done have has had having",
        "can could should would will shall may might must",
        "what which how whats",
        "of in on at for by with about as into onto to from than and or if so then",
        "up out off per via between among within through",
        "any some",
        "like get gets got getting just also too very really actually exactly basically simply",
        "please kindly tell know want need wondering wonder help hi hello hey thanks thank",
        "quick question way possible able explain describe define definition meaning mean means",
        "kind kinds type types sort sorts someone anyone somebody anybody guys",
        "offer offers provide provides available exist exists",
        "let",
    )
)

NEGATIONS: Final = frozenset(_words("not no never without none nothing nobody nowhere neither nor"))

# Markers whose object gives a direction, by class: "convert X to Y", "from A to B", "X before Y",
# "X bigger than Y", "A around B".  The same object under different classes ("flights to paris" /
# "flights from paris"), or the same class with exchanged objects ("celsius to fahrenheit" /
# "fahrenheit to celsius"), is a reversal even though every content word matches.
DIRECTION_MARKERS: Final = {
    **dict.fromkeys(_words("to into onto toward towards"), "to"),
    **{marker: marker for marker in _words("from than before after over under above below around")},
}

# Voice: "is halfvec supported by ragcache" reorders subject and object legitimately, so the
# word-order check below is skipped when one side is passive and the other is not.
_BE_FORMS: Final = frozenset(_words("is are was were be been being am get gets got gotten"))
_IRREGULAR_PARTICIPLES: Final = frozenset(
    _words(
        "made built done known written taken given seen sent held paid sold found run kept put set read told",
        "brought bought caught taught thought shown chosen driven eaten spent left lost won",
    )
)
# Relations that are symmetric, so their arguments may be exchanged ("rn vs bsn" / "bsn vs rn").
SYMMETRIC: Final = frozenset({"vs"})
# The word-order check is cubic in the number of content words; longer questions skip it.
MAX_ORDER_CHECK: Final = 40

_UNITS: Final = {
    **{
        word: value
        for value, word in enumerate(
            _words(
                "zero one two three four five six seven eight nine ten",
                "eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen",
            )
        )
    },
    "single": 1,
    "dozen": 12,
}
_TENS: Final = {
    word: 10 * (value + 2) for value, word in enumerate(_words("twenty thirty forty fifty sixty seventy eighty ninety"))
}
_SCALES: Final = {"hundred": 100, "thousand": 1_000, "million": 1_000_000, "billion": 1_000_000_000}
# "second" is left out on purpose: it is far more often a unit of time than an ordinal, and as a
# content word it still separates "first trimester" from "second trimester".
_ORDINALS: Final = {
    **{
        word: value
        for value, word in enumerate(
            _words(
                "zeroth first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth",
                "thirteenth fourteenth fifteenth sixteenth seventeenth eighteenth nineteenth twentieth",
            )
        )
        if word not in ("zeroth", "second")
    },
    "hundredth": 100,
    "thousandth": 1_000,
}
_ORDINAL_SUFFIX: Final = re.compile(r"^(\d+)(?:st|nd|rd|th)$")
_DIGITS: Final = re.compile(r"\d+(?:\.\d+)*")

# Small, generic synonym groups: verbs and nouns users swap freely when asking the same thing
# (support, operations, units and spelling variants).  Each group maps to its first member.
# It is not tuned to entities: two different products, places or models are never synonyms.
_SYNONYM_GROUPS: Final[tuple[tuple[str, ...], ...]] = (
    ("delete", "remove", "erase"),
    ("create", "generate", "make"),
    ("clear", "flush", "purge", "wipe"),
    ("change", "update", "modify", "edit", "alter"),
    ("set", "configure", "config", "specify"),
    ("show", "see", "view", "display", "check", "list", "look"),
    ("start", "begin", "launch"),
    ("stop", "halt"),
    ("fix", "repair", "resolve", "solve"),
    ("contact", "reach"),
    ("skip", "bypass", "ignore"),
    ("cost", "price", "pricing"),
    ("ship", "shipping", "delivery", "deliver"),
    ("package", "parcel"),
    ("folder", "directory", "dir"),
    ("statistic", "stats", "stat"),
    ("store", "shop"),
    ("big", "large"),
    ("small", "little"),
    ("maximum", "max"),
    ("found", "establish"),
    ("issue", "problem"),
    ("buy", "purchase"),
    ("documentation", "docs"),
    ("vs", "versus", "difference", "differ", "compare", "comparison"),
    ("kilometer", "kilometre", "km"),
    ("meter", "metre"),
    ("centimeter", "centimetre", "cm"),
    ("millimeter", "millimetre", "mm"),
    ("kilogram", "kilo", "kg"),
    ("all", "every"),
    ("whole", "entire"),
    ("pound", "lb", "lbs"),
    ("ounce", "oz"),
    ("liter", "litre"),
    ("milliliter", "millilitre", "ml"),
    ("millisecond", "ms", "msec"),
    ("second", "sec", "secs"),
    ("hour", "hr", "hrs"),
    ("megabyte", "mb"),
    ("gigabyte", "gb"),
    ("dollar", "usd"),
    ("euro", "eur"),
    ("color", "colour"),
    ("favorite", "favourite"),
    ("center", "centre"),
)


def _stem(word: str) -> str:
    """A light suffix stripper: enough to equate plurals and verb forms, never language-specific rules.

    "documents"/"document", "deleted"/"deleting"/"delete", "policies"/"policy", "running"/"run",
    "used"/"use", "internationally"/"international".  Over-stemming is harmless here because both
    sides go through the same function; the guard only ever compares stems with stems.
    """
    if len(word) <= 2 or not word.isalpha():
        return word
    if word.endswith(("ies", "ied")) and len(word) > 4:
        word = word[:-3] + "y"
    elif word.endswith("sses"):
        word = word[:-2]
    elif word.endswith("s") and not word.endswith(("ss", "us", "is")) and len(word) > 3:
        word = word[:-1]
    elif word.endswith("ly") and len(word) > 6:
        word = word[:-2]
    for suffix in ("ing", "ed"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 2:
            word = word[: -len(suffix)]
            if len(word) > 3 and word[-1] == word[-2] and word[-1] not in "lsz":
                word = word[:-1]  # running -> runn -> run
            break
    if word.endswith("e") and len(word) > 2:
        word = word[:-1]
    return word


_SYNONYMS: Final = {_stem(word): _stem(group[0]) for group in _SYNONYM_GROUPS for word in group}


def canon(word: str) -> str:
    """Stem, then map onto the synonym group's representative."""
    stemmed = _stem(word)
    return _SYNONYMS.get(stemmed, stemmed)


# --------------------------------------------------------------------------- analysis


@dataclass(frozen=True)
class Analysis:
    tokens: tuple[str, ...]  # every token after contraction/frame rewriting
    numbers: Counter[str]
    negations: int
    content: frozenset[str]  # canonical content words (no stopwords, numbers or negations)
    stems: dict[str, frozenset[str]]  # canonical word -> the words and stems it came from (for typos)
    directions: dict[str, frozenset[str]]  # marker class -> canonical objects following it
    order: tuple[str, ...]  # canonical content words, first occurrences, in order
    passive: bool


def _prepare(text: str) -> str:
    text = unicodedata.normalize("NFC", text).casefold().translate(_APOSTROPHES)
    for pattern, replacement in _CONTRACTIONS:
        text = pattern.sub(replacement, text)
    for pattern, replacement in _FRAMES:
        text = pattern.sub(replacement, text)
    return text


def _number_value(tokens: Sequence[str], i: int) -> tuple[str, int] | None:
    """Parse a written number starting at tokens[i] ("twenty five", "two hundred"): (value, width)."""
    word = tokens[i]
    if word in _ORDINALS:
        return str(_ORDINALS[word]), 1
    if word not in _UNITS and word not in _TENS:
        return None
    value = _UNITS.get(word, 0) + _TENS.get(word, 0)
    width = 1
    if word in _TENS and i + 1 < len(tokens) and tokens[i + 1] in _UNITS and _UNITS[tokens[i + 1]] < 10:
        value += _UNITS[tokens[i + 1]]
        width = 2
    while i + width < len(tokens) and tokens[i + width] in _SCALES:
        value *= _SCALES[tokens[i + width]]
        width += 1
    return str(value), width


def _canonical_number(raw: str) -> str:
    """'08' -> '8', '3.10' stays '3.10' (versions are strings, not floats: 3.1 != 3.10)."""
    head, _, tail = raw.partition(".")
    head = head.lstrip("0") or "0"
    return f"{head}.{tail}" if tail else head


def analyse(text: str) -> Analysis:
    tokens = tuple(_TOKEN.findall(_prepare(text)))
    numbers: Counter[str] = Counter()
    negations = 0
    content: set[str] = set()
    stems: dict[str, set[str]] = {}
    canon_seq: list[str | None] = []  # canonical content word per token, None for non-content
    i = 0
    while i < len(tokens):
        token = tokens[i]
        parsed = _number_value(tokens, i)
        if parsed is not None:
            numbers[parsed[0]] += 1
            canon_seq.extend([None] * parsed[1])
            i += parsed[1]
            continue
        i += 1
        if token in NEGATIONS:
            negations += 1
            canon_seq.append(None)
            continue
        if any(ch.isdigit() for ch in token):
            ordinal = _ORDINAL_SUFFIX.match(token)
            if ordinal:
                numbers[_canonical_number(ordinal.group(1))] += 1
                canon_seq.append(None)
                continue
            for raw in _DIGITS.findall(token):
                numbers[_canonical_number(raw)] += 1
            letters = _DIGITS.sub(" ", token).split()  # "401k" -> k, "ww1" -> ww, "p95" -> p
            for part in letters:
                content.add(canon(part))
                stems.setdefault(canon(part), set()).update((part, _stem(part)))
            canon_seq.append(None)
            continue
        if token in STOPWORDS:
            canon_seq.append(None)
            continue
        word = canon(token)
        content.add(word)
        stems.setdefault(word, set()).update((token, _stem(token)))
        canon_seq.append(word)
    directions: dict[str, set[str]] = {}
    for index, token in enumerate(tokens):
        if token in DIRECTION_MARKERS:
            following = next((w for w in canon_seq[index + 1 :] if w is not None), None)
            if following is not None:
                directions.setdefault(DIRECTION_MARKERS[token], set()).add(following)
    order = tuple(dict.fromkeys(w for w in canon_seq if w is not None))
    return Analysis(
        tokens=tokens,
        numbers=numbers,
        negations=negations,
        content=frozenset(content),
        stems={word: frozenset(forms) for word, forms in stems.items()},
        directions={marker: frozenset(objects) for marker, objects in directions.items()},
        order=order,
        passive=_is_passive(tokens),
    )


def _is_passive(tokens: Sequence[str]) -> bool:
    """A be/get auxiliary followed by a participle ("are answers stored", "did my card get declined")."""
    seen_auxiliary = False
    for token in tokens:
        if token in _BE_FORMS:
            seen_auxiliary = True
        elif seen_auxiliary and (
            token in _IRREGULAR_PARTICIPLES or (len(token) > 4 and token.isalpha() and token.endswith(("ed", "en")))
        ):
            return True
    return False
