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

How the guard reads a question (`question_analysis.py`; no vocabulary of entities, so it works on any corpus):

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
measured by ``python -m bench.semantic_judge`` (docs/benchmarks.md, "today's guard").  Its blind spots are by design:
modal verbs (can/should/how do I), tense, pronouns, and prepositions other than the direction
markers are ignored.  Non-English text has no stopwords here, so the guard is stricter there.

This module is pure (no I/O, no settings) so the policy can be unit-tested and benchmarked exactly
as the service runs it.  Inputs are expected to be ``guardrails.normalize_for_key`` output
(casefolded); the guard re-applies casefolding so that raw text also works.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from service.policy.question_analysis import MAX_ORDER_CHECK, SYMMETRIC, Analysis, analyse, canon

# Chosen by the former `bench.semantic` (in git history) on bench/semantic_pairs.jsonl: the lowest swept threshold
# (0.70..0.99) at which cosine + guard reaches precision >= 0.99 on the dev half of the set.  The
# target holds at every swept value, so this is the floor of the sweep: precision comes from the
# guard, and the cosine only has to say "these are about the same thing" (docs/benchmarks.md).
# Specific to all-MiniLM-L6-v2; other embedding models need their own run.
DEFAULT_THRESHOLD: Final = 0.70


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
            joined[canon(left + right)] = (canon(left), canon(right))
    return joined


def _unexplained(a: Analysis, b: Analysis) -> tuple[set[str], set[str]]:
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


def _direction_conflict(a: Analysis, b: Analysis) -> bool:
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


def _roles_swapped(a: Analysis, b: Analysis) -> bool:
    """Two words exchange places around a third: "can a landlord sue a tenant" / "can a tenant sue a landlord".

    Only checked between sentences of the same voice (a passive paraphrase legitimately puts the
    object first) and never around a symmetric relation ("x vs y").  Plain reordering without a
    word in between ("rn and bsn" / "bsn and rn") is allowed.
    """
    if a.passive != b.passive:
        return False
    common = [word for word in a.order if word in b.content]
    if len(common) > MAX_ORDER_CHECK:
        return False
    position_b = {word: index for index, word in enumerate(word for word in b.order if word in a.content)}
    for i, first in enumerate(common):
        for k in range(i + 2, len(common)):
            last = common[k]
            if position_b[last] >= position_b[first]:
                continue
            for middle in common[i + 1 : k]:
                if middle not in SYMMETRIC and position_b[last] < position_b[middle] < position_b[first]:
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
    left, right = analyse(a), analyse(b)
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
    return analyse(text).content


@dataclass(frozen=True)
class MatchJudgement:
    """Outcome of one semantic look-up: whether to serve the cached answer, and why."""

    hit: bool
    similarity: float
    reason: str  # "semantic_hit", "below_threshold", "invalid_similarity" or "guard:<incompatibility>"


def judge_match(similarity: float, a: str, b: str, *, threshold: float) -> MatchJudgement:
    """Serve the cached answer of question `b` for question `a`?

    `similarity` is the cosine of their embeddings (1 - pgvector's cosine distance).  A hit needs
    similarity >= threshold *and* a compatible pair; the threshold is inclusive so that a
    configured value of 1.0 still serves byte-identical embeddings.  Non-finite similarities
    (a NaN from a zero vector) are never hits.
    """
    if not 0.0 < threshold <= 1.0:  # also refuses NaN
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    if not math.isfinite(similarity):
        return MatchJudgement(hit=False, similarity=similarity, reason="invalid_similarity")
    if similarity < threshold:
        return MatchJudgement(hit=False, similarity=similarity, reason="below_threshold")
    if a != b:
        why = incompatibility(a, b)
        if why is not None:
            return MatchJudgement(hit=False, similarity=similarity, reason=f"guard:{why}")
    return MatchJudgement(hit=True, similarity=similarity, reason="semantic_hit")


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
    left, right = analyse(a), analyse(b)
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
