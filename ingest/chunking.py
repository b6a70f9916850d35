"""Token-aware chunking that respects the document's structure.

Text is cut at headings first, then paragraphs, then sentences, and only a sentence
longer than a whole chunk is cut at token boundaries. Consecutive chunks share up to
`overlap` tokens of whole trailing sentences so an answer that straddles a boundary is
still retrievable. Pure: no I/O, deterministic.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

# Bump when the chunking output changes, so unchanged documents are re-chunked on re-ingest.
CHUNKER_VERSION = 1

_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+\S")
# A sentence ends at . ! ? (optionally followed by a closing quote or bracket) and whitespace,
# or at an ideographic full stop, which needs no space after it. Lookbehinds keep the punctuation.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"')\]])\s+|(?<=[。！？])\s*")
_FENCE = re.compile(r"^\s{0,3}(```|~~~)")
_BLANK_LINES = re.compile(r"\n\s*\n")


class Encoding(Protocol):
    def encode_ordinary(self, text: str) -> list[int]: ...

    def decode_bytes(self, tokens: list[int]) -> bytes: ...


@dataclass(frozen=True)
class Chunk:
    ordinal: int
    text: str
    token_count: int


@dataclass(frozen=True)
class _Unit:
    """A sentence (or a token slice of an over-long one) and what separates it from the previous unit."""

    text: str
    tokens: int
    new_paragraph: bool
    heading: bool
    glued: bool = False  # a continuation of a hard-cut sentence: joined with no separator


def chunk_text(text: str, *, max_tokens: int, overlap: int, encoding: Encoding) -> list[Chunk]:
    if max_tokens < 1:
        raise ValueError("max_tokens must be positive")
    if not 0 <= overlap < max_tokens:
        raise ValueError("overlap must be in [0, max_tokens)")
    text = text.strip()
    if not text:
        return []
    whole = len(encoding.encode_ordinary(text))
    if whole <= max_tokens:  # the common case for short documents and passages
        return [Chunk(0, text, whole)]
    units = _units(text, max_tokens, encoding)
    return _pack(units, max_tokens, overlap, encoding)


def _paragraphs(text: str) -> list[tuple[str, bool]]:
    """Paragraphs with a flag for headings; a heading line is its own paragraph."""
    out: list[tuple[str, bool]] = []
    in_fence = False  # "# comment" inside a code block is not a heading
    for block in _BLANK_LINES.split(text):
        lines: list[str] = []
        for line in block.splitlines():
            if _FENCE.match(line):
                in_fence = not in_fence
            if not in_fence and _HEADING.match(line):
                if lines:
                    out.append(("\n".join(lines).strip(), False))
                    lines = []
                out.append((line.strip(), True))
            else:
                lines.append(line)
        if lines and "\n".join(lines).strip():
            out.append(("\n".join(lines).strip(), False))
    return out


def _units(text: str, max_tokens: int, encoding: Encoding) -> list[_Unit]:
    units: list[_Unit] = []
    for paragraph, heading in _paragraphs(text):
        first = True
        for sentence in _SENTENCE_END.split(paragraph) if not heading else [paragraph]:
            sentence = sentence.strip()
            if not sentence:
                continue
            tokens = encoding.encode_ordinary(sentence)
            if len(tokens) <= max_tokens:
                units.append(_Unit(sentence, len(tokens), first, heading))
            else:  # a "sentence" longer than a chunk (tables, code, run-on text): hard token cuts
                for i, piece in enumerate(_hard_cut(tokens, max_tokens, encoding)):
                    units.append(_Unit(piece, len(encoding.encode_ordinary(piece)), first, heading, glued=i > 0))
                    first = False
            first = False
    return units


def _hard_cut(tokens: list[int], max_tokens: int, encoding: Encoding) -> list[str]:
    """Cut at token boundaries that are also character boundaries, keeping whitespace as is.

    The text is not stripped: " handbook" is one token but "handbook" two, so stripping
    could push a piece over the limit. Pieces concatenate back to the original exactly.
    """
    pieces: list[str] = []
    start = 0
    while start < len(tokens):
        limit = min(start + max_tokens, len(tokens))
        # Prefer the longest piece that ends on a character boundary; if a single character
        # spans more tokens than allowed, take the shortest piece that completes it.
        ends = [*range(limit, start, -1), *range(limit + 1, len(tokens) + 1)]
        for end in ends:
            try:
                pieces.append(encoding.decode_bytes(tokens[start:end]).decode("utf-8"))
                break
            except UnicodeDecodeError:
                continue
        else:  # not valid UTF-8 at all (cannot happen for text we encoded); keep what there is
            pieces.append(encoding.decode_bytes(tokens[start:]).decode("utf-8", "replace"))
            end = len(tokens)
        start = end
    return pieces


def _join(units: list[_Unit]) -> str:
    parts: list[str] = []
    for i, unit in enumerate(units):
        if i and not unit.glued:
            parts.append("\n\n" if unit.new_paragraph else " ")
        parts.append(unit.text)
    return "".join(parts)


def _pack(units: list[_Unit], max_tokens: int, overlap: int, encoding: Encoding) -> list[Chunk]:
    chunks: list[Chunk] = []
    current: list[_Unit] = []
    fresh = 0  # units in `current` not carried over from the previous chunk

    def emit() -> None:
        body = _join(current)
        tokens = len(encoding.encode_ordinary(body))
        stripped = body.strip()
        if not stripped:
            return
        if stripped != body and (n := len(encoding.encode_ordinary(stripped))) <= max_tokens:
            body, tokens = stripped, n
        chunks.append(Chunk(len(chunks), body, tokens))

    for unit in units:
        # A heading starts a new chunk once the current one is reasonably full.
        heading_break = unit.heading and _size(current) >= max_tokens // 2
        if fresh and (heading_break or not _fits([*current, unit], max_tokens, encoding)):
            emit()
            current = _tail(current, overlap) if not unit.heading else []
            if not _fits([*current, unit], max_tokens, encoding):
                current = []
            fresh = 0
        current.append(unit)
        fresh += 1
    if fresh:
        emit()
    return chunks


def _size(units: list[_Unit]) -> int:
    # Joining adds at most one separator token per boundary.
    return sum(u.tokens for u in units) + max(len(units) - 1, 0)


def _fits(units: list[_Unit], max_tokens: int, encoding: Encoding) -> bool:
    estimate = _size(units)
    if estimate <= max_tokens - len(units):  # clearly fits even if BPE merges differ
        return True
    if sum(u.tokens for u in units) > max_tokens:
        return False
    return len(encoding.encode_ordinary(_join(units))) <= max_tokens


def _tail(units: list[_Unit], overlap: int) -> list[_Unit]:
    """The longest run of whole trailing sentences within `overlap` tokens."""
    tail: list[_Unit] = []
    total = 0
    for unit in reversed(units):
        if total + unit.tokens > overlap:
            break
        tail.insert(0, unit)
        total += unit.tokens
    return tail
