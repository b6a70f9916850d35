"""Lexical analysis of question pairs for the semantic cache, and the previous rule-only guard.

The service's decision is now :mod:`service.policy.semantic_judge`: it keeps this module's number,
negation, direction and "no content word" findings as hard vetoes (via :func:`compare`) and replaces
the rule "no content word may differ" with a learned score.  :func:`decide` below is the previous
policy, kept as the baseline that ``bench.semantic_judge`` reports side by side with the judge.
The rest of this docstring describes that guard.

When may a cached answer serve a *different* question?

The semantic cache is a second look-up after an exact miss: the question's embedding is compared
with the embeddings of cached questions in the same scope (filters, tier, corpus state).  A cosine
threshold alone is not safe.  Sentence embeddings such as all-MiniLM-L6-v2 put "convert celsius to
fahrenheit" and "convert fahrenheit to celsius" at cosine 0.99, "can I use it with docker" and
"... without docker" at 0.97 and "python 3.11" / "python 3.12" at 0.96 -- closer than many honest
paraphrases ("track my package" / "track my parcel" is 0.72).  A false hit serves a confidently
wrong answer, which is much worse than the cost of a miss (one retrieval and one generation), so
the policy is two-staged:

1. cosine similarity >= threshold (cheap, already computed by the vector index), then
2. :func:`compatible`, a lexical guard that vetoes pairs whose *meaning-bearing tokens* differ.

How the guard reads a question (no vocabulary of entities, so it works on any corpus):

- rewrite: contractions expanded ("can't" -> "can not", "what's" -> "what is", possessive "'s"
  dropped) and a few fixed question frames unified ("what year" -> "when", "turn on" -> "enable");
- numbers: digits, decimals/versions ("3.11" != "3.1"), written numbers ("twenty five"), ordinals
  ("14th" = "fourteenth") and digits inside tokens ("ww1", "401k", "q2") form a multiset that must
  be equal on both sides -- this covers counts, ports, versions, years and days of the month;
- negation: the number of not/no/never/without/none/... must be equal;
- content words: everything that is not a stopword (function words, auxiliaries, modals,
  what/how/which, politeness and filler), lightly stemmed and mapped through a small generic
  synonym table (delete/remove, clear/flush, km/kilometre ...).  The two *sets* must be equal,
  except for typos (words of >= 6 letters, same first letter, 1 edit, 2 from 9 letters) and
  compounds written apart ("re-index"/"reindex", "set up"/"setup").  Because the input is
  casefolded, entities cannot be spotted by capitals; instead *every* content word counts, so a
  different entity, unit, month, weekday, an added qualifier (scope) or an antonym is a difference;
- direction: the objects of to/from/than/before/around/... must not be exchanged or moved to an
  opposite marker ("to paris" / "from paris"), and two words must not swap places around a third
  between sentences of the same voice ("landlord sue tenant" / "tenant sue landlord");
- nothing to compare: two different questions without any content word are never matched.

The guard is deliberately conservative: paraphrases that use genuinely different words ("how do I
get a refund" / "how can I get my money back") are lost -- that is the price of precision,
measured by ``python -m bench.semantic`` (docs/benchmarks.md).  Its blind spots are by design:
modal verbs (can/should/how do I), tense, pronouns, and prepositions other than the direction
markers are ignored.  Non-English text has no stopwords here, so the guard is stricter there.

This module is pure (no I/O, no settings) so the policy can be unit-tested and benchmarked exactly
as the service runs it.  Inputs are expected to be ``guardrails.normalize_for_key`` output
(casefolded); the guard re-applies casefolding so that raw text also works.
"""

from __future__ import annotations

import itertools
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

# Chosen by `python -m bench.semantic` on bench/semantic_pairs.jsonl: the lowest swept threshold
# (0.70..0.99) at which cosine + guard reaches precision >= 0.99 on the dev half of the set.  The
# target holds at every swept value, so this is the floor of the sweep: precision comes from the
# guard, and the cosine only has to say "these are about the same thing" (docs/benchmarks.md).
# Specific to all-MiniLM-L6-v2; other embedding models need their own run.
DEFAULT_THRESHOLD: Final = 0.70

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
_SYMMETRIC: Final = frozenset({"vs"})
# The word-order check is cubic in the number of content words; longer questions skip it.
_MAX_ORDER_CHECK: Final = 40

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


def _canon(word: str) -> str:
    """Stem, then map onto the synonym group's representative."""
    stemmed = _stem(word)
    return _SYNONYMS.get(stemmed, stemmed)


# --------------------------------------------------------------------------- analysis


@dataclass(frozen=True)
class _Analysis:
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


def _analyse(text: str) -> _Analysis:
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
                content.add(_canon(part))
                stems.setdefault(_canon(part), set()).update((part, _stem(part)))
            canon_seq.append(None)
            continue
        if token in STOPWORDS:
            canon_seq.append(None)
            continue
        word = _canon(token)
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
    return _Analysis(
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


def _edit_distance(a: str, b: str, limit: int) -> int:
    """Optimal-string-alignment distance (adjacent transpositions cost 1), cut off above `limit`."""
    if abs(len(a) - len(b)) > limit:
        return limit + 1
    previous2: list[int] = []
    previous = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        current = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                current[j] = min(current[j], previous2[j - 2] + 1)
        previous2, previous = previous, current
    return previous[len(b)]


def _is_typo(a: str, b: str) -> bool:
    """Two unmatched words are one word mistyped: same first letter, long enough, 1-2 edits apart.

    Short words are excluded because short entities differ by one letter all the time
    (mysql/mssql, java/lava); the length floor keeps "configre"/"configure" and
    "recieve"/"receive" while refusing those.
    """
    shortest = min(len(a), len(b))
    if shortest < 6 or a[0] != b[0]:
        return False
    limit = 2 if shortest >= 9 else 1
    return _edit_distance(a, b, limit) <= limit


def _compounds(tokens: Sequence[str]) -> dict[str, tuple[str, str]]:
    """Adjacent token pairs joined ("re index" -> "reindex", "set up" -> "setup", "any time")."""
    joined: dict[str, tuple[str, str]] = {}
    for left, right in itertools.pairwise(tokens):
        if left.isalpha() and right.isalpha():
            joined[_canon(left + right)] = (_canon(left), _canon(right))
    return joined


def _unexplained(a: _Analysis, b: _Analysis) -> tuple[set[str], set[str]]:
    """Content words of each side that the other side does not account for."""
    only_a = set(a.content - b.content)
    only_b = set(b.content - a.content)
    for mine, theirs, mine_analysis in ((only_a, only_b, a), (only_b, only_a, b)):
        for compound, parts in _compounds(mine_analysis.tokens).items():
            if compound in theirs:
                theirs.discard(compound)
                mine.difference_update(parts)
    for word in sorted(only_a):
        forms = a.stems.get(word, frozenset({word}))
        match = next(
            (
                other
                for other in sorted(only_b)
                if any(_is_typo(x, y) for x in forms for y in b.stems.get(other, frozenset({other})))
            ),
            None,
        )
        if match is not None:
            only_a.discard(word)
            only_b.discard(match)
    return only_a, only_b


def _direction_conflict(a: _Analysis, b: _Analysis) -> bool:
    """Reversed direction: "X to Y" vs "Y to X", "to paris" vs "from paris", "A than B" vs "B than A"."""
    for marker in a.directions.keys() & b.directions.keys():
        objects_a = a.directions[marker] - b.directions[marker]
        objects_b = b.directions[marker] - a.directions[marker]
        if any(word in b.content for word in objects_a) and any(word in a.content for word in objects_b):
            return True
    for word in a.content & b.content:
        classes_a = {marker for marker, objects in a.directions.items() if word in objects}
        classes_b = {marker for marker, objects in b.directions.items() if word in objects}
        if classes_a and classes_b and not classes_a & classes_b:
            return True
    return False


def _roles_swapped(a: _Analysis, b: _Analysis) -> bool:
    """Two words exchange places around a third: "can a landlord sue a tenant" / "can a tenant sue a landlord".

    Only checked between sentences of the same voice (a passive paraphrase legitimately puts the
    object first) and never around a symmetric relation ("x vs y").  Plain reordering without a
    word in between ("rn and bsn" / "bsn and rn") is allowed.
    """
    if a.passive != b.passive:
        return False
    common = [word for word in a.order if word in b.content]
    if len(common) > _MAX_ORDER_CHECK:
        return False
    position_b = {word: index for index, word in enumerate(word for word in b.order if word in a.content)}
    for i, first in enumerate(common):
        for k in range(i + 2, len(common)):
            last = common[k]
            if position_b[last] >= position_b[first]:
                continue
            for middle in common[i + 1 : k]:
                if middle not in _SYMMETRIC and position_b[last] < position_b[middle] < position_b[first]:
                    return True
    return False


def incompatibility(a: str, b: str) -> str | None:
    """Why two questions must not share an answer, or None when the guard finds no difference.

    Reasons, checked from the most to the least specific: ``number`` (different numbers, written
    numbers and ordinals included, so years and versions too), ``negation`` (a not/no/never/without
    on one side only), ``direction`` (same words, swapped objects of to/from/than/before/..., or
    subject and object exchanged around a verb), ``content`` (a content word on one side that the
    other lacks -- different entity, unit, month, broader or narrower scope, antonym), ``empty``
    (neither side has a content word, so there is no evidence that they ask the same thing).
    """
    left, right = _analyse(a), _analyse(b)
    if left.numbers != right.numbers:
        return "number"
    if left.negations != right.negations:
        return "negation"
    if not left.content and not right.content:
        return "empty"
    only_left, only_right = _unexplained(left, right)
    if only_left or only_right:
        return "content"
    if _direction_conflict(left, right) or _roles_swapped(left, right):
        return "direction"
    return None


def compatible(a: str, b: str) -> bool:
    """True when nothing meaning-bearing differs between two (normalised) questions.

    Symmetric; identical inputs are always compatible.  Applied *after* the cosine check, so it
    only has to separate near neighbours, never unrelated questions.
    """
    return a == b or incompatibility(a, b) is None


def content_words(text: str) -> frozenset[str]:
    """The canonical content words the guard compares (for debugging and the benchmark report)."""
    return _analyse(text).content


@dataclass(frozen=True)
class SemanticDecision:
    """Outcome of one semantic look-up: whether to serve the cached answer, and why."""

    hit: bool
    similarity: float
    reason: str  # "semantic_hit", "below_threshold", "invalid_similarity" or "guard:<incompatibility>"


def decide(similarity: float, a: str, b: str, *, threshold: float) -> SemanticDecision:
    """Serve the cached answer of question `b` for question `a`?

    `similarity` is the cosine of their embeddings (1 - pgvector's cosine distance).  A hit needs
    similarity >= threshold *and* a compatible pair; the threshold is inclusive so that a
    configured value of 1.0 still serves byte-identical embeddings.  Non-finite similarities
    (a NaN from a zero vector) are never hits.
    """
    if not 0.0 < threshold <= 1.0:  # also refuses NaN
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    if not math.isfinite(similarity):
        return SemanticDecision(hit=False, similarity=similarity, reason="invalid_similarity")
    if similarity < threshold:
        return SemanticDecision(hit=False, similarity=similarity, reason="below_threshold")
    if a != b:
        why = incompatibility(a, b)
        if why is not None:
            return SemanticDecision(hit=False, similarity=similarity, reason=f"guard:{why}")
    return SemanticDecision(hit=True, similarity=similarity, reason="semantic_hit")


@dataclass(frozen=True)
class Comparison:
    """What the guard finds between two questions, as counts a learned judge can weigh.

    ``numbers``, ``negation``, ``direction`` and ``empty`` are the hard constraints (see
    :func:`incompatibility`); ``substituted`` and ``extra`` count the content words the other side
    does not account for (fewer and more of the two one-sided counts), ``content_a``/``content_b``
    the content words of each side.
    """

    numbers: bool
    negation: bool
    direction: bool
    empty: bool
    substituted: int
    extra: int
    content_a: int
    content_b: int


def compare(a: str, b: str) -> Comparison:
    """The guard's findings for a pair, without turning them into a verdict."""
    left, right = _analyse(a), _analyse(b)
    only_left, only_right = _unexplained(left, right)
    fewer, more = sorted((len(only_left), len(only_right)))
    return Comparison(
        numbers=left.numbers != right.numbers,
        negation=left.negations != right.negations,
        direction=_direction_conflict(left, right) or _roles_swapped(left, right),
        empty=not left.content and not right.content,
        substituted=fewer,
        extra=more,
        content_a=len(left.content),
        content_b=len(right.content),
    )
