"""The offline generator: an answer quoted from the retrieved sentences that best match the question.

It is the default when no API key is configured, so the service answers (with `[n]` citations) without
network or model weights. Everything here is deterministic: the same request always yields the same text,
which keeps the answer cacheable and the tests exact. The answer is labelled as extractive so nobody
mistakes quoted sentences for a generated answer.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Literal

from service.policy.tokens import count_tokens
from service.postgres.retrieval import Source
from service.providers.base import GenerationRequest, Usage

NAME = "extractive"
LABEL = "Extractive answer (offline; no language model was used):\n\n"
NO_ANSWER = "The indexed documents do not contain an answer to this question."

MAX_SENTENCES = 3  # short answers: the best few sentences, not a summary of every source
MIN_SENTENCE_WORDS = 4  # shorter pieces are headings, labels or list fragments, not statements
MAX_SENTENCE_WORDS = 60  # run-on text (e.g. PDF extraction without punctuation) is clipped to stay readable
MIN_RELATIVE_SCORE = 0.3  # a sentence must score at least this share of the best one to be quoted
DUPLICATE_JACCARD = 0.8  # term-set overlap above which two sentences say the same thing
COVERAGE_WEIGHT = 0.5  # bonus for matching many of the question's distinct terms
RANK_WEIGHT = 0.2  # bonus for sentences from better-ranked sources (lower n)
# A statement under a question or heading that matches the query gains this share of the cue's score:
# in FAQ-shaped text the answer follows its question and may share few words with the query itself.
QUESTION_CUE_WEIGHT = 1.0
HEADING_CUE_WEIGHT = 0.5
BM25_K1 = 1.2
BM25_B = 0.75

_STOPWORDS = """
    a about above after again against all also am an and any are as at be because been before being below
    between both but by can could did do does doing don down during each either else ever few for from further
    get gets got had has have having he her here hers herself him himself his how i if in into is it its itself
    just me might more most must my myself no nor not now of off on once only or other our ours ourselves out
    over own please same shall she should so some such tell than that the their theirs them themselves then
    there these they this those through to too under until up upon very was we were what when where which
    while who whom whose why will with would you your yours yourself yourselves
"""
STOPWORDS = frozenset(_STOPWORDS.split())  # small on purpose: question words and glue, never content

ABBREVIATIONS = frozenset(
    {"e.g", "i.e", "etc", "vs", "cf", "mr", "mrs", "ms", "dr", "st", "fig", "no", "approx", "inc"}
)

_WORD = re.compile(r"[a-z0-9]+")
_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^\s{0,3}#{1,6}(?:\s+|$)")
_BULLET = re.compile(r"^\s*(?:[-*+•]|\d{1,3}[.)])\s+")
_QUOTE = re.compile(r"^\s*>\s?")
_RULE = re.compile(r"^\s*(?:[-*_=]\s*){3,}$")
_TABLE_SEPARATOR = re.compile(r"^\s*\|?[\s:|-]+\|[\s:|-]*$")
_IMAGE = re.compile(r"!\[([^\]]*)\]\([^)]*\)")
_LINK = re.compile(r"\[([^\]]+)\]\([^)]*\)")
_CITATION = re.compile(r"\s*\[\d+(?:[,–-]\s*\d+)*\]")  # a source's own bracketed numbers would read as our citations
_EMPHASIS = re.compile(r"\*\*|__")
_BOUNDARY = re.compile(r"[.!?…]+[\"'”’)\]]*\s+(?=[\"'“‘(\[`*]?[A-Z0-9])")
_ENDS_SENTENCE = re.compile(r"[.!?…][\"'”’)\]`]*$")
_PIECE = re.compile(r"\s*\S+\s*|\s+")
_QA_PREFIX = re.compile(r"^(Q|A)\s*[:.]\s+", re.IGNORECASE)
_HEADING_MARK = "\x00"  # prefixes heading blocks inside `_blocks`; never present in _inline() output

Kind = Literal["statement", "question", "heading"]


@dataclass(frozen=True)
class Sentence:
    """One candidate sentence, with where it came from (for citation and natural ordering).

    Only statements are quoted. Questions and headings are cues: they are scored against the query
    and lend part of their score to the statements that follow them (`cue`, a position in the source).
    """

    source_n: int
    rank: int  # 0 for the best-ranked source
    position: int  # index of the sentence within its source
    text: str
    terms: tuple[str, ...]
    kind: Kind = "statement"
    cue: int | None = None


@dataclass(frozen=True)
class Parsed:
    """A sentence of one chunk as `parse_sentences` reads it."""

    text: str
    kind: Kind
    cue: int | None  # index (in the same list) of the question or heading this statement answers


@dataclass(frozen=True)
class Scored:
    sentence: Sentence
    score: float


def stem(word: str) -> str:
    """Fold common English inflections together (caches/cached/caching → cach) without a stemmer library."""
    if len(word) <= 3 or word.isdigit():
        return word
    if word.endswith("ies") and len(word) > 4:
        word = word[:-3] + "y"
    elif word.endswith("s") and not word.endswith(("ss", "us", "is")):
        word = word[:-1]
    for suffix, keep in (("ing", 3), ("ed", 4)):  # "ed" needs a longer stem: embed, need, shed are not past tenses
        if word.endswith(suffix) and len(word) - len(suffix) >= keep and not word.endswith("eed"):
            word = word[: -len(suffix)]
            if len(word) >= 4 and word[-1] == word[-2] and word[-1] not in "lsz":
                word = word[:-1]  # running → run, embedded → embed
            break
    if len(word) >= 4 and word.endswith("e"):
        word = word[:-1]
    return word


def terms(text: str) -> list[str]:
    """Content words of `text`, lowercased and stemmed, in order (stopwords and 1-letter tokens dropped)."""
    return [stem(w) for w in _WORD.findall(text.lower()) if w not in STOPWORDS and (len(w) > 1 or w.isdigit())]


def _inline(text: str) -> str:
    """Strip inline markdown that would read badly in a quoted sentence."""
    text = _IMAGE.sub(r"\1", text)
    text = _LINK.sub(r"\1", text)
    text = _CITATION.sub("", text)
    text = _EMPHASIS.sub("", text)
    return " ".join(text.split())


def markdown_blocks(text: str) -> list[str]:
    """Split markdown (or plain) text into prose blocks: paragraphs, headings, list items, table rows.

    Fenced code is not prose and is dropped, except a short snippet right after a line ending in ':'
    ("To flush the cache, run:"), which is kept inline because it is usually the answer.
    """
    return [block.removeprefix(_HEADING_MARK) for block in _blocks(text)]


def _blocks(text: str) -> list[str]:
    """`markdown_blocks`, with headings marked by a leading `_HEADING_MARK`."""
    blocks: list[str] = []
    current: list[str] = []
    code: list[str] | None = None

    def end_block() -> None:
        if current:
            block = _inline(" ".join(current))
            if block:
                blocks.append(block)
            current.clear()

    for line in text.splitlines():
        if _FENCE.match(line):
            if code is None:
                end_block()
                code = []
                continue
            snippet = "; ".join(c.strip() for c in code if c.strip())
            if blocks and blocks[-1].endswith(":") and snippet and len(code) <= 3 and len(snippet) <= 100:
                blocks[-1] = f"{blocks[-1]} `{snippet}`."
            code = None
            continue
        if code is not None:
            code.append(line)
            continue
        if not line.strip() or _RULE.match(line) or _TABLE_SEPARATOR.match(line):
            end_block()
        elif _HEADING.match(line):
            end_block()
            heading = _inline(_HEADING.sub("", line).rstrip("# "))
            if heading:
                blocks.append(_HEADING_MARK + heading)
        elif _BULLET.match(line):
            end_block()
            current.append(_BULLET.sub("", line))
        elif line.lstrip().startswith("|"):
            end_block()
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            current.append(", ".join(c for c in cells if c))
            end_block()
        else:
            current.append(_QUOTE.sub("", line))
    end_block()  # an unterminated fence (a chunk cut mid-block) is dropped with the rest of the code
    return blocks


def _split_block(block: str) -> list[str]:
    """Sentence boundaries: terminal punctuation, whitespace, then a capital/digit; abbreviations don't count."""
    pieces: list[str] = []
    start = 0
    for match in _BOUNDARY.finditer(block):
        before = block[start : match.start()].rsplit(" ", 1)[-1].lower().strip("([\"'“‘.")
        if before in ABBREVIATIONS or (len(before) == 1 and before.isalpha()):
            continue  # "e.g. Redis", "J. Smith"
        pieces.append(block[start : match.end()].strip())
        start = match.end()
    pieces.append(block[start:].strip())
    return [p for p in pieces if p]


def _readable(sentence: str) -> str | None:
    """The sentence as quoted: None for a fragment, clipped when run-on, with a final full stop."""
    words = sentence.split()
    if len(words) < MIN_SENTENCE_WORDS:
        return None
    if len(words) > MAX_SENTENCE_WORDS:
        return " ".join(words[:MAX_SENTENCE_WORDS]).rstrip(",;:") + "…"
    if not _ENDS_SENTENCE.search(sentence):
        return sentence.rstrip(",;:") + "."
    return sentence


def parse_sentences(text: str) -> list[Parsed]:
    """A chunk's sentences, each marked as a statement, a question or a heading, with the cue it answers.

    A heading cues the statements up to the next heading; a question ("…?", or "Q: …" in FAQ text)
    cues the statements up to the next question or heading. "A: " prefixes are dropped.
    """
    parsed: list[Parsed] = []
    heading: int | None = None
    question: int | None = None
    for block in _blocks(text):
        if block.startswith(_HEADING_MARK):
            title = block.removeprefix(_HEADING_MARK)
            heading, question = len(parsed), None
            parsed.append(Parsed(title, "question" if title.endswith("?") else "heading", None))
            continue
        for raw in _split_block(block):
            prefix = _QA_PREFIX.match(raw)
            sentence = raw[prefix.end() :] if prefix else raw
            if (prefix and prefix.group(1).upper() == "Q") or sentence.rstrip("\"')”’").endswith("?"):
                question = len(parsed)
                parsed.append(Parsed(sentence, "question", None))
                continue
            readable = _readable(sentence)
            if readable is not None:
                parsed.append(Parsed(readable, "statement", question if question is not None else heading))
    return parsed


def split_sentences(text: str) -> list[str]:
    """Quotable sentences of a chunk: markdown removed, no questions or headings, fragments dropped, run-ons clipped."""
    return [p.text for p in parse_sentences(text) if p.kind == "statement"]


def collect_sentences(sources: Sequence[Source]) -> list[Sentence]:
    """All candidate sentences of the retrieved sources, in (source n, position) order."""
    ranks = {n: i for i, n in enumerate(sorted({s.n for s in sources}))}
    out: list[Sentence] = []
    for source in sorted(sources, key=lambda s: s.n):
        for position, p in enumerate(parse_sentences(source.text)):
            out.append(Sentence(source.n, ranks[source.n], position, p.text, tuple(terms(p.text)), p.kind, p.cue))
    return out


def score_sentences(question: str, sentences: Sequence[Sentence]) -> list[Scored]:
    """BM25 over the candidate sentences, times bonuses for query-term coverage and source rank.

    Bonuses multiply, so a sentence sharing no term with the question always scores exactly zero.
    """
    query = sorted(set(terms(question)))  # sorted: float sums in a fixed order, so ties break identically
    if not query or not sentences:
        return [Scored(s, 0.0) for s in sentences]
    n_docs = len(sentences)
    avg_len = sum(len(s.terms) for s in sentences) / n_docs or 1.0
    df = Counter(t for s in sentences for t in set(s.terms))
    idf = {t: math.log(1 + (n_docs - df[t] + 0.5) / (df[t] + 0.5)) for t in query}
    scored: list[Scored] = []
    for s in sentences:
        tf = Counter(s.terms)
        norm = BM25_K1 * (1 - BM25_B + BM25_B * len(s.terms) / avg_len)
        bm25 = sum(idf[t] * tf[t] * (BM25_K1 + 1) / (tf[t] + norm) for t in query if tf[t])
        coverage = sum(1 for t in query if tf[t]) / len(query)
        score = bm25 * (1 + COVERAGE_WEIGHT * coverage) * (1 + RANK_WEIGHT / (1 + s.rank))
        scored.append(Scored(s, score))
    return _with_cues(scored)


def _with_cues(scored: list[Scored]) -> list[Scored]:
    """Add to each statement a share of the score of the question or heading it answers."""
    by_place = {(s.sentence.source_n, s.sentence.position): s for s in scored}
    out: list[Scored] = []
    for s in scored:
        cue = by_place.get((s.sentence.source_n, s.sentence.cue)) if s.sentence.cue is not None else None
        if cue is None:
            out.append(s)
            continue
        weight = QUESTION_CUE_WEIGHT if cue.sentence.kind == "question" else HEADING_CUE_WEIGHT
        out.append(Scored(s.sentence, s.score + weight * cue.score))
    return out


def jaccard(a: Sequence[str], b: Sequence[str]) -> float:
    sa, sb = set(a), set(b)
    union = sa | sb
    return len(sa & sb) / len(union) if union else 1.0


def _citation_cost(s: Sentence) -> int:
    return count_tokens(f" {s.text} [{s.source_n}]")


def select_sentences(
    scored: Sequence[Scored], *, max_sentences: int = MAX_SENTENCES, token_budget: int | None = None
) -> list[Scored]:
    """Best sentences first, skipping near-duplicates and weak matches, returned in reading order.

    Stops at `max_sentences` or when the next sentence would not fit `token_budget` (the best one is
    always kept; the final answer is truncated to the budget anyway).
    """
    ranked = sorted(
        (s for s in scored if s.score > 0 and s.sentence.kind == "statement"),
        key=lambda s: (-s.score, s.sentence.source_n, s.sentence.position),
    )
    if not ranked:
        return []
    floor = ranked[0].score * MIN_RELATIVE_SCORE
    chosen: list[Scored] = []
    used = 0
    for candidate in ranked:
        if len(chosen) >= max_sentences or candidate.score < floor:
            break
        if any(jaccard(candidate.sentence.terms, c.sentence.terms) > DUPLICATE_JACCARD for c in chosen):
            continue
        cost = _citation_cost(candidate.sentence)
        if token_budget is not None and chosen and used + cost > token_budget:
            break
        chosen.append(candidate)
        used += cost
    return sorted(chosen, key=lambda s: (s.sentence.source_n, s.sentence.position))


def render(selected: Sequence[Scored]) -> str:
    """Sentences in order; a run of sentences from one source shares a single `[n]` at its end."""
    groups: list[tuple[int, list[str]]] = []
    for s in selected:
        if groups and groups[-1][0] == s.sentence.source_n:
            groups[-1][1].append(s.sentence.text)
        else:
            groups.append((s.sentence.source_n, [s.sentence.text]))
    return " ".join(f"{' '.join(texts)} [{n}]" for n, texts in groups)


def truncate_to_tokens(text: str, max_tokens: int) -> str:
    """The longest word-boundary prefix of `text` that fits in `max_tokens`."""
    if max_tokens <= 0:
        return ""
    if count_tokens(text) <= max_tokens:
        return text
    pieces = stream_pieces(text)
    lo, hi = 0, len(pieces)  # invariant: prefix of `lo` pieces fits, prefix of `hi` pieces does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count_tokens("".join(pieces[:mid]).rstrip()) <= max_tokens:
            lo = mid
        else:
            hi = mid
    return "".join(pieces[:lo]).rstrip()


def build_answer(
    question: str, sources: Sequence[Source], max_tokens: int, *, max_sentences: int = MAX_SENTENCES
) -> str:
    """The complete labelled answer for a question over retrieved sources, within `max_tokens`."""
    budget = max_tokens - count_tokens(LABEL)
    scored = score_sentences(question, collect_sentences(sources))
    selected = select_sentences(scored, max_sentences=max_sentences, token_budget=max(budget, 0))
    body = render(selected) if selected else NO_ANSWER
    return truncate_to_tokens(LABEL + body, max_tokens)


def stream_pieces(text: str) -> list[str]:
    """Word-sized pieces, each with its trailing whitespace, so that ``"".join(pieces) == text``."""
    return _PIECE.findall(text)


class ExtractiveProvider:
    """`Provider` that needs no key, network or model: quotes the retrieved sentences most relevant to the question."""

    name: str = NAME
    model: str = NAME

    def __init__(self, *, max_sentences: int = MAX_SENTENCES) -> None:
        self.max_sentences = max_sentences

    def answer(self, request: GenerationRequest) -> str:
        return build_answer(request.question, request.sources, request.max_tokens, max_sentences=self.max_sentences)

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[str | Usage, None]:
        """Yield the answer word by word, then one estimated `Usage` (counted with tiktoken)."""
        answer = self.answer(request)
        for piece in stream_pieces(answer):
            yield piece
        yield Usage(
            input_tokens=count_tokens(request.system + request.prompt),
            output_tokens=count_tokens(answer),
            estimated=True,
        )
