"""The offline rewrite of a follow-up question into a standalone one, by deterministic rules.

Why it is pure: it runs on every request that carries history, before the cache, so it must
cost microseconds, give the same answer every time (the standalone question is the cache key)
and work without a model. It is also the fallback when the model rewrite fails
(service/answer/standalone.py).

Two rules, from the previous user turns (each resolved in turn, so a chain of follow-ups works):

- Ellipsis: "what about X?", "how about X?", "and X?", "and for X?" repeat the previous question
  with X in place of its subject ("What happens when Redis goes down?" + "What about Postgres?"
  -> "What happens when Postgres goes down?").
- Pronouns: the first "it", "they", "them", "that" or "this" used as a pronoun becomes the
  previous question's subject ("What is coalescing?" + "How many calls does it make?" ->
  "How many calls does coalescing make?").

A question that triggers neither rule is returned as it is, without looking at the history:
`needs_rewrite` is a couple of regular expressions, so a standalone question costs nothing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final

__all__ = ["needs_rewrite", "rewrite", "subject_of"]

_PRONOUNS: Final = frozenset({"it", "they", "them", "that", "this", "there"})
# Words after which "that" / "this" is an object pronoun ("change that?", "does this mean"),
# rather than a relative pronoun or a determiner ("a body that is", "this key").
_BEFORE_DEMONSTRATIVE: Final = frozenset(
    {
        "about",
        "change",
        "configure",
        "disable",
        "do",
        "does",
        "enable",
        "for",
        "is",
        "of",
        "set",
        "use",
        "with",
        "did",
        "was",
        "turn",
        "mean",
    }
)
_AFTER_DEMONSTRATIVE: Final = frozenset({"is", "was", "does", "do", "mean", "means", "work", "works", "happen", "cost"})

_WORD: Final = re.compile(r"[\w'-]+")
_END: Final = re.compile(r"[\s?.!]+$")
# "what about X", "how about X", "and what about X", "and for X", "and X" (X short, no question of its own)
_ELLIPSIS: Final = re.compile(
    r"^(?:and\s+)?(?:what|how)\s+about\s+(?P<a>.+)$|^and\s+(?:for\s+|with\s+|in\s+)?(?P<b>.+)$",
    re.IGNORECASE,
)
_QUESTION_WORDS: Final = frozenset(
    {
        "what",
        "how",
        "why",
        "when",
        "where",
        "which",
        "who",
        "can",
        "could",
        "do",
        "does",
        "did",
        "is",
        "are",
        "was",
        "were",
        "should",
        "will",
        "would",
        "i",
        "you",
        "we",
    }
)
_MAX_ELLIPSIS_WORDS: Final = 6

# Subjects of common question shapes; otherwise the trailing noun phrase (see _trailing_phrase).
_SUBJECT_PATTERNS: Final = (
    re.compile(r"^what\s+happens\s+(?:when|if)\s+(?P<s>.+?)\s+(?:goes|go|is|are|gets|fails?|runs?)\b", re.IGNORECASE),
    re.compile(r"^what\s+(?:does|do)\s+(?P<s>.+?)\s+(?:do|mean|report|return|cost|contain)$", re.IGNORECASE),
    re.compile(r"^what\s+(?:is|are)\s+(?P<s>.+?)(?:\s+made\s+of|\s+for)?$", re.IGNORECASE),
    re.compile(r"^how\s+(?:big|long|large|many|much|fast|slow)\s+(?:is|are)\s+(?P<s>.+?)$", re.IGNORECASE),
    re.compile(r"^(?:how|why)\s+(?:does|do|is|are)\s+(?P<s>(?:the\s+|an?\s+)?\w+)\s+\w+ed\b", re.IGNORECASE),
    re.compile(
        r"^(?:how|why)\s+(?:does|do|is|are)\s+(?P<s>(?:the\s+|an?\s+)?[\w-]+(?:\s+[\w-]+)?)\s+\w+$", re.IGNORECASE
    ),
    # "Can I use the OpenAI SDK with ragcache": the object of the verb, not the phrase after "with"
    re.compile(
        r"^(?:can|could|should|do)\s+(?:i|we|you)\s+\w+\s+(?P<s>(?:the\s+|an?\s+|my\s+)?[\w-]+(?:\s+[\w-]+){0,2}?)"
        r"\s+(?:with|in|for|to|from|on|at|into)\s",
        re.IGNORECASE,
    ),
)
# Words a trailing noun phrase never crosses: prepositions, verbs that come up in questions, auxiliaries.
_PHRASE_STOPS: Final = frozenset(
    {
        *_QUESTION_WORDS,
        "a",
        "an",
        "the",
        "at",
        "for",
        "to",
        "of",
        "in",
        "on",
        "with",
        "from",
        "by",
        "per",
        "into",
        "about",
        "after",
        "before",
        "than",
        "and",
        "or",
        "it",
        "they",
        "them",
        "that",
        "this",
        "my",
        "me",
        "there",
        "also",
        "still",
        "not",
        "be",
        "been",
        "get",
        "see",
        "use",
        "set",
        "make",
        "have",
        "has",
        "need",
    }
)
_TRAILING_PARTICIPLE: Final = re.compile(r"\s+\w+ed$")
_DETERMINERS: Final = frozenset({"a", "an", "the", "my", "our", "your", "its", "their", "each", "every"})


def _words(text: str) -> list[str]:
    return _WORD.findall(text)


def _body(question: str) -> str:
    """The question without its final punctuation and outer spaces."""
    return _END.sub("", question.strip())


def _pronoun_at(words: Sequence[str]) -> int | None:
    """The index of the first pronoun the rules resolve, or None."""
    lowered = [w.lower() for w in words]
    for i, word in enumerate(lowered):
        if word not in _PRONOUNS:
            continue
        if word == "there" and i != len(lowered) - 1:
            continue  # "is there a limit": only a closing "there" points back ("what does it mean there?")
        if word in ("that", "this"):  # a pronoun at the end, or before a verb ("does that work")
            last = i == len(lowered) - 1
            before = lowered[i - 1] if i else ""
            after = "" if last else lowered[i + 1]
            if not last and not ((i == 0 or before in _BEFORE_DEMONSTRATIVE) and after in _AFTER_DEMONSTRATIVE):
                continue
        return i
    return None


def _ellipsis(question: str) -> str | None:
    """X of "what about X?" / "and for X?", when the rest is a bare phrase, not a question of its own."""
    match = _ELLIPSIS.match(_body(question))
    if match is None:
        return None
    phrase = (match.group("a") or match.group("b") or "").strip()
    words = _words(phrase)
    if not words or len(words) > _MAX_ELLIPSIS_WORDS or words[0].lower() in _QUESTION_WORDS:
        return None
    return phrase


def needs_rewrite(question: str) -> bool:
    """Whether the question refers back (a pronoun or an ellipsis); False costs no history lookup."""
    return _ellipsis(question) is not None or _pronoun_at(_words(question)) is not None


def _trailing_phrase(body: str) -> str:
    """The noun phrase that ends the question: "How do I ingest a PDF" -> "a PDF"."""
    words = body.split()
    taken: list[str] = []
    stop = ""
    for word in reversed(words):
        bare = word.strip(",;:\"'()").lower()
        if not taken and (bare.endswith("ed") or bare in ("down", "up", "off", "on", "out")):
            continue  # "answers cached", "goes down": not part of the phrase
        if bare in _DETERMINERS:
            taken.append(word)
            break
        if bare in _PHRASE_STOPS:
            stop = bare
            break
        taken.append(word)
    if stop in ("i", "we", "you") and taken:
        taken.pop()  # "how do I run several worker processes": the verb is not part of the phrase
    return " ".join(reversed(taken)).strip(",;:\"'()")


def subject_of(question: str) -> str:
    """What a question is about, as a phrase that can stand in for "it" ("" when none is found)."""
    body = _body(question)
    for pattern in _SUBJECT_PATTERNS:
        match = pattern.match(body)
        if match is not None:
            subject = _TRAILING_PARTICIPLE.sub("", match.group("s").strip())
            first = subject.split()[0].lower() if subject else ""
            if first and first not in _PHRASE_STOPS - _DETERMINERS and not first.endswith("ed"):
                return subject
    phrase = _trailing_phrase(body)
    words = phrase.split()
    return phrase if words and not (len(words) == 1 and words[0].lower() in _DETERMINERS) else ""


def _resolve_pronoun(question: str, subject: str) -> str:
    words = list(_WORD.finditer(question))
    index = _pronoun_at([m.group(0) for m in words])
    if index is None:
        return question
    match = words[index]
    replacement = subject
    if match.group(0).lower() == "there":
        replacement = "in " + subject
    if match.start() == 0 or not question[: match.start()].strip():
        replacement = replacement[:1].upper() + replacement[1:]
    elif replacement.split()[0].lower() in _DETERMINERS:
        replacement = replacement[:1].lower() + replacement[1:]
    return question[: match.start()] + replacement + question[match.end() :]


def _resolve_ellipsis(previous: str, phrase: str) -> str:
    """The previous question with its subject replaced by `phrase` (without one, `phrase` appended)."""
    body = _body(previous)
    # The trailing phrase first: "How do I point ragcache at a local Ollama server" + "and for vLLM"
    # swaps the server, not "ragcache at a local Ollama server".
    for subject in (_pattern_subject(body), _trailing_phrase(body)):
        if subject and subject in body:
            start = body.rfind(subject)
            return body[:start] + phrase + body[start + len(subject) :] + "?"
    return f"{body}: {phrase}?"


def _pattern_subject(body: str) -> str:
    for pattern in _SUBJECT_PATTERNS[:2]:  # the shapes whose subject is not at the end
        match = pattern.match(body)
        if match is not None:
            return match.group("s").strip()
    return ""


def _rewrite_one(question: str, resolved: Sequence[str]) -> str:
    """`question` against the earlier turns, already resolved (oldest first)."""
    if not resolved:
        return question
    phrase = _ellipsis(question)
    if phrase is not None:
        return _resolve_ellipsis(resolved[-1], phrase)
    if _pronoun_at(_words(question)) is None:
        return question
    # The nearest earlier turn with a subject: "how many calls does it make for 100 of them?" has none.
    subject = next((found for turn in reversed(resolved) if (found := subject_of(turn))), "")
    return _resolve_pronoun(question, subject) if subject else question


def rewrite(question: str, previous_user_turns: Sequence[str]) -> str:
    """The standalone form of `question` given the earlier user turns (oldest first).

    Returns `question` itself (the same object) when no rule applies.
    """
    if not previous_user_turns or not needs_rewrite(question):
        return question
    resolved: list[str] = []
    for turn in previous_user_turns:  # each earlier turn resolved against the ones before it
        resolved.append(_rewrite_one(turn.strip(), resolved))
    return _rewrite_one(question.strip(), resolved)
