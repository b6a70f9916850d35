"""Properties of `ingest.chunking.chunk_text`, checked against the real tiktoken encoding."""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass

import pytest

from ingest.chunking import Chunk, chunk_text
from service.policy.tokens import encoding

ENC = encoding()

WORDS = [
    "harbor",
    "quiet",
    "lantern",
    "river",
    "copper",
    "meadow",
    "signal",
    "orbit",
    "velvet",
    "granite",
    "cache",
    "vector",
    "token",
    "window",
    "ledger",
    "thunder",
    "maple",
    "silver",
    "bridge",
    "engine",
    "crystal",
    "falcon",
    "garden",
    "marble",
    "pilot",
    "rocket",
    "saddle",
    "timber",
    "violet",
    "whisper",
    "anchor",
    "beacon",
    "canyon",
    "desert",
    "ember",
    "forest",
]


def ntok(text: str) -> int:
    return len(ENC.encode_ordinary(text))


def chunk(text: str, max_tokens: int, overlap: int) -> list[Chunk]:
    return chunk_text(text, max_tokens=max_tokens, overlap=overlap, encoding=ENC)


def no_ws(text: str) -> str:
    return re.sub(r"\s+", "", text)


def assert_covers(original: str, chunks: list[Chunk]) -> None:
    """Chunks, whitespace ignored, are in-order windows of the original that together cover all of it."""
    orig = no_ws(original)
    pos = 0  # how far the original is covered
    last = 0
    for c in chunks:
        piece = no_ws(c.text)
        idx = orig.find(piece, last)
        assert idx != -1, f"chunk {c.ordinal} is not a piece of the input: {c.text[:80]!r}"
        assert idx <= pos, f"text lost before chunk {c.ordinal}: {orig[pos:idx][:80]!r}"
        pos = max(pos, idx + len(piece))
        last = idx
    assert pos == len(orig), f"text lost at the end: {orig[pos:][:80]!r}"


# --- generated documents ---------------------------------------------------------------------


@dataclass
class SentenceDoc:
    """Text made of numbered sentences grouped into paragraphs, so chunks can be parsed back."""

    sentences: list[str]
    paragraph_of: list[int]

    @property
    def text(self) -> str:
        paragraphs: dict[int, list[str]] = {}
        for sentence, para in zip(self.sentences, self.paragraph_of, strict=True):
            paragraphs.setdefault(para, []).append(sentence)
        return "\n\n".join(" ".join(p) for p in paragraphs.values())

    def join(self, indices: list[int]) -> str:
        """Consecutive sentences as the chunker joins them: a space within a paragraph, a blank line between."""
        out = self.sentences[indices[0]]
        for prev, i in itertools.pairwise(indices):
            out += (" " if self.paragraph_of[i] == self.paragraph_of[prev] else "\n\n") + self.sentences[i]
        return out

    def parse(self, text: str) -> list[int]:
        """The sentence indices a chunk consists of; fails if it starts/ends mid-sentence or skips one."""
        out: list[int] = []
        pos = 0
        while True:
            m = re.compile(r"Item (\d{3}) ").match(text, pos)
            assert m, f"chunk does not start a sentence at {pos}: {text[pos : pos + 60]!r} in {text!r}"
            i = int(m[1])
            if out:
                assert i == out[-1] + 1, f"sentence {out[-1] + 1} skipped inside a chunk: {text!r}"
            assert text.startswith(self.sentences[i], pos), f"sentence {i} cut: {text[pos:][:80]!r}"
            out.append(i)
            pos += len(self.sentences[i])
            if pos == len(text):
                return out
            same_para = i + 1 < len(self.sentences) and self.paragraph_of[i + 1] == self.paragraph_of[i]
            sep = " " if same_para else "\n\n"
            assert text.startswith(sep, pos), f"chunk ends mid-sentence / bad separator after {i}: {text!r}"
            pos += len(sep)


def sentence_doc(
    n: int, *, seed: int, min_words: int = 3, max_words: int = 25, per_paragraph: tuple[int, int] = (3, 9)
) -> SentenceDoc:
    rng = random.Random(seed)
    sentences: list[str] = []
    paragraph_of: list[int] = []
    para = 0
    left = rng.randint(*per_paragraph)
    for i in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words)))
        sentences.append(f"Item {i:03d} {words}{rng.choice('.!?')}")
        paragraph_of.append(para)
        left -= 1
        if left == 0:
            para += 1
            left = rng.randint(*per_paragraph)
    return SentenceDoc(sentences, paragraph_of)


def words_sentence(rng: random.Random, lo: int, hi: int) -> str:
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))
    return text[0].upper() + text[1:] + "."


def markdown_doc() -> str:
    rng = random.Random(7)
    parts = ["# The Handbook", ""]
    for s in range(8):
        parts.append(f"## Section {s}")
        parts.append("")
        for _ in range(rng.randint(1, 4)):
            parts.append(" ".join(words_sentence(rng, 4, 30) for _ in range(rng.randint(2, 8))))
            parts.append("")
        if s % 3 == 0:
            parts.append(f"### Subsection {s}.1")
            parts.append(" ".join(words_sentence(rng, 4, 20) for _ in range(5)))
            parts.append("")
    return "\n".join(parts)


def long_paragraphs_doc() -> str:
    rng = random.Random(11)
    return "\n\n".join(" ".join(words_sentence(rng, 5, 40) for _ in range(40)) for _ in range(5))


def run_on_doc() -> str:
    rng = random.Random(13)
    return " ".join(rng.choice(WORDS) for _ in range(3000))


def cjk_doc() -> str:
    rng = random.Random(17)
    chars = [chr(c) for c in range(0x4E00, 0x4E00 + 2000)]
    paragraphs = []
    for _ in range(6):
        paragraphs.append(
            "".join("".join(rng.choice(chars) for _ in range(rng.randint(5, 30))) + "。" for _ in range(20))
        )
    return "\n\n".join(paragraphs)


def code_doc() -> str:
    rng = random.Random(19)
    blocks = []
    for b in range(6):
        lines = ["```python", f"def function_{b}(x, y):", "    # add things up", "    total = 0"]
        for i in range(rng.randint(10, 40)):
            lines.append(f"    total += x * {i} + y ** {i % 5}  # step {i} {rng.choice(WORDS)}")
        lines += ["    return total", "```"]
        blocks.append(f"Some prose about block {b}. It explains the code below.\n\n" + "\n".join(lines))
    return "\n\n".join(blocks)


def emoji_doc() -> str:
    rng = random.Random(23)
    return "".join(rng.choice("😀🚀🌍🎉🧪🦀🐍🔥✨🍕") for _ in range(1500))


DOCS = {
    "markdown": markdown_doc(),
    "long_paragraphs": long_paragraphs_doc(),
    "run_on": run_on_doc(),
    "cjk": cjk_doc(),
    "code": code_doc(),
    "emoji": emoji_doc(),
    "sentences": sentence_doc(150, seed=3).text,
}
COMBOS = [(8, 0), (16, 4), (64, 8), (100, 20), (400, 50), (128, 127)]


# --- trivial inputs --------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", " ", "\n\n\t  \n", "\u3000 \r\n"])
def test_empty_or_whitespace_gives_no_chunks(text: str) -> None:
    assert chunk(text, 400, 50) == []


@pytest.mark.parametrize(
    "text",
    ["Hello world.", "  Hello world.  \n", "# Title\n\nA short body. Two sentences.\n", "短い日本語の文。"],
)
def test_short_text_is_one_chunk(text: str) -> None:
    stripped = text.strip()
    assert chunk(text, 400, 50) == [Chunk(0, stripped, ntok(stripped))]


def test_text_of_exactly_max_tokens_is_one_chunk_and_one_more_splits() -> None:
    doc = sentence_doc(40, seed=5)
    text = doc.text
    n = ntok(text)
    assert chunk(text, n, 0) == [Chunk(0, text, n)]
    assert len(chunk(text, n - 1, 0)) >= 2


# --- invariants over many documents and settings ----------------------------------------------


@pytest.mark.parametrize(("max_tokens", "overlap"), COMBOS)
@pytest.mark.parametrize("name", list(DOCS))
def test_token_counts_are_exact_and_bounded(name: str, max_tokens: int, overlap: int) -> None:
    chunks = chunk(DOCS[name], max_tokens, overlap)
    assert len(chunks) >= 2
    for c in chunks:
        assert c.text, f"empty chunk {c.ordinal}"
        # Stripped, unless stripping would itself break the bound (" word" is 1 token, "word" may be 2).
        assert c.text == c.text.strip() or ntok(c.text.strip()) > max_tokens
        assert c.token_count == ntok(c.text), f"chunk {c.ordinal} reports {c.token_count}"
        assert c.token_count <= max_tokens, f"chunk {c.ordinal} has {c.token_count} > {max_tokens}"


@pytest.mark.parametrize(("max_tokens", "overlap"), [(16, 4), (100, 20), (400, 50)])
@pytest.mark.parametrize("name", list(DOCS))
def test_ordinals_and_determinism(name: str, max_tokens: int, overlap: int) -> None:
    first = chunk(DOCS[name], max_tokens, overlap)
    second = chunk(DOCS[name], max_tokens, overlap)
    assert [c.ordinal for c in first] == list(range(len(first)))
    assert first == second


@pytest.mark.parametrize("name", ["markdown", "long_paragraphs", "sentences"])
@pytest.mark.parametrize(("max_tokens", "overlap"), [(64, 0), (100, 20), (400, 50)])
def test_prose_is_fully_covered(name: str, max_tokens: int, overlap: int) -> None:
    assert_covers(DOCS[name], chunk(DOCS[name], max_tokens, overlap))


# --- structure: sentences, headings ----------------------------------------------------------


@pytest.mark.parametrize(("max_tokens", "overlap"), [(40, 0), (64, 8), (100, 20), (100, 0), (250, 60), (400, 50)])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_chunks_are_runs_of_whole_sentences_and_nothing_is_lost(seed: int, max_tokens: int, overlap: int) -> None:
    doc = sentence_doc(120, seed=seed)
    assert max(ntok(s) for s in doc.sentences) < max_tokens
    chunks = chunk(doc.text, max_tokens, overlap)
    assert len(chunks) >= 2
    parsed = [doc.parse(c.text) for c in chunks]  # fails on a chunk that starts or ends mid-sentence
    seen = sorted({i for p in parsed for i in p})
    assert seen == list(range(len(doc.sentences))), "some sentence is in no chunk"
    for sentence in doc.sentences:
        assert any(sentence in c.text for c in chunks)
    # chunks advance through the text in order
    assert [p[0] for p in parsed] == sorted(p[0] for p in parsed)
    assert all(a[-1] < b[-1] for a, b in itertools.pairwise(parsed))


@pytest.mark.parametrize(
    "sentence_template",
    [
        "Item {i:03d} the harbor was quiet at dawn and the lantern glowed.",  # plain (control)
        'Item {i:03d} she said "the harbor was quiet at dawn."',  # closing quote after the period
        "Item {i:03d} the lantern glowed (as it always did at dawn.)",  # closing parenthesis
        "Item {i:03d} 'the river ran cold and fast all night!'",  # closing single quote
    ],
)
def test_every_sentence_survives_intact(sentence_template: str) -> None:
    sentences = [sentence_template.format(i=i) for i in range(80)]
    text = " ".join(sentences)
    chunks = chunk(text, 60, 10)
    assert len(chunks) >= 2
    missing = [s for s in sentences if not any(s in c.text for c in chunks)]
    assert not missing, f"{len(missing)} sentences mangled, e.g. {missing[0]!r}; chunk 0 = {chunks[0].text!r}"


def test_cjk_sentences_are_split_at_the_ideographic_full_stop() -> None:
    rng = random.Random(29)
    chars = [chr(c) for c in range(0x4E00, 0x4E00 + 2000)]
    sentences = ["".join(rng.choice(chars) for _ in range(rng.randint(8, 20))) + "。" for _ in range(120)]
    text = "".join(sentences)  # Chinese/Japanese put no space after 。
    assert max(ntok(s) for s in sentences) < 60
    chunks = chunk(text, 100, 20)
    assert len(chunks) >= 2
    cut = [s for s in sentences if not any(s in c.text for c in chunks)]
    assert not cut, f"{len(cut)} of {len(sentences)} sentences were cut mid-sentence, e.g. {cut[0]!r}"


def _paragraph_of_tokens(rng: random.Random, target: int, tag: str) -> str:
    sentences: list[str] = []
    while ntok(" ".join(sentences)) < target:
        sentences.append(f"{tag} {len(sentences)} " + words_sentence(rng, 4, 8))
    return " ".join(sentences)


def test_heading_starts_a_new_chunk_when_previous_is_at_least_half_full() -> None:
    rng = random.Random(31)
    first = _paragraph_of_tokens(rng, 60, "Alpha")
    second = _paragraph_of_tokens(rng, 60, "Beta")
    assert 55 <= ntok(first) <= 75
    text = f"{first}\n\n## Second section\n\n{second}"
    chunks = chunk(text, 100, 20)
    assert chunks[0].text == first
    assert chunks[1].text.startswith("## Second section\n\n")
    assert "Alpha" not in chunks[1].text  # no overlap carried across a heading
    assert all("Second section" not in c.text for c in chunks[2:])


def test_heading_does_not_break_a_chunk_that_is_less_than_half_full() -> None:
    rng = random.Random(37)
    first = _paragraph_of_tokens(rng, 15, "Alpha")
    second = _paragraph_of_tokens(rng, 200, "Beta")
    assert ntok(first) < 40
    text = f"{first}\n\n## Second section\n\n{second}"
    chunks = chunk(text, 100, 20)
    assert chunks[0].text.startswith(first + "\n\n## Second section\n\nBeta 0 ")


def test_heading_break_in_a_long_markdown_document() -> None:
    rng = random.Random(41)
    sections = [(f"## Topic {k}", _paragraph_of_tokens(rng, 70, f"T{k}x")) for k in range(6)]
    text = "# Guide\n\n" + "\n\n".join(f"{h}\n\n{body}" for h, body in sections)
    chunks = chunk(text, 100, 20)
    for heading, body in sections[1:]:
        owner = [c for c in chunks if heading in c.text]
        assert len(owner) == 1, heading
        assert owner[0].text.startswith(heading + "\n\n"), owner[0].text[:80]
        assert owner[0].text == f"{heading}\n\n{body}"


# --- overlap ---------------------------------------------------------------------------------


def _shared(a: list[int], b: list[int]) -> list[int]:
    shared = sorted(set(a) & set(b))
    assert shared == a[len(a) - len(shared) :], f"shared sentences are not the tail of the previous chunk: {a} {b}"
    assert shared == b[: len(shared)], f"shared sentences are not the head of the next chunk: {a} {b}"
    return shared


@pytest.mark.parametrize(("max_tokens", "overlap"), [(60, 0), (100, 0), (100, 10), (100, 30), (200, 50), (64, 63)])
@pytest.mark.parametrize("seed", [4, 5])
def test_overlap_is_whole_trailing_sentences_within_budget(seed: int, max_tokens: int, overlap: int) -> None:
    doc = sentence_doc(120, seed=seed)
    parsed = [doc.parse(c.text) for c in chunk(doc.text, max_tokens, overlap)]
    assert len(parsed) >= 3
    for a, b in itertools.pairwise(parsed):
        shared = _shared(a, b)
        assert sum(ntok(doc.sentences[i]) for i in shared) <= overlap
        assert len(shared) < len(b), "a chunk must bring new text"
        if overlap == 0:
            assert shared == []


@pytest.mark.parametrize(("max_tokens", "overlap"), [(100, 30), (200, 50), (400, 50)])
def test_overlap_is_present_when_sentences_are_shorter_than_overlap(max_tokens: int, overlap: int) -> None:
    doc = sentence_doc(200, seed=9, min_words=2, max_words=8, per_paragraph=(4, 12))
    assert max(ntok(s) for s in doc.sentences) < overlap
    chunks = chunk(doc.text, max_tokens, overlap)
    parsed = [doc.parse(c.text) for c in chunks]
    assert len(parsed) >= 3
    for (a, b), (ca, cb) in zip(itertools.pairwise(parsed), itertools.pairwise(chunks), strict=True):
        shared = _shared(a, b)
        assert shared, f"no overlap between chunks {ca.ordinal} and {cb.ordinal}"
        tail = doc.join(shared)
        assert ca.text.endswith(tail)
        assert cb.text.startswith(tail)


def test_no_overlap_text_with_overlap_zero_on_generic_prose() -> None:
    text = long_paragraphs_doc()
    chunks = chunk(text, 64, 0)
    # with no overlap, the chunks tile the text: concatenated they are the input (whitespace aside)
    assert no_ws("".join(c.text for c in chunks)) == no_ws(text)


# --- arguments -------------------------------------------------------------------------------


@pytest.mark.parametrize(("max_tokens", "overlap"), [(0, 0), (-5, 0), (10, -1), (10, 10), (10, 11), (1, 1)])
@pytest.mark.parametrize("text", ["Some text. More text.", ""])
def test_invalid_arguments_raise(text: str, max_tokens: int, overlap: int) -> None:
    with pytest.raises(ValueError):
        chunk(text, max_tokens, overlap)


@pytest.mark.parametrize(("text", "max_tokens", "overlap"), [("Hello", 1, 0), ("Hello.", 2, 1), ("Hello.", 10, 9)])
def test_boundary_arguments_are_accepted(text: str, max_tokens: int, overlap: int) -> None:
    assert chunk(text, max_tokens, overlap) == [Chunk(0, text, ntok(text))]


# --- hard cuts -------------------------------------------------------------------------------


def _run_on_sentence(tokens: int, seed: int) -> str:
    rng = random.Random(seed)
    words: list[str] = []
    while len(words) < tokens * 2 and ntok(" ".join(words)) < tokens:
        words.extend(rng.choice(WORDS) for _ in range(50))
    return " ".join(words)


@pytest.mark.parametrize("overlap", [0, 10])
def test_hard_cuts_of_a_2000_token_sentence(overlap: int) -> None:
    text = _run_on_sentence(2000, seed=43)
    assert ntok(text) >= 2000
    chunks = chunk(text, 100, overlap)
    assert len(chunks) >= 20
    assert_covers(text, chunks)
    if overlap == 0:
        assert no_ws("".join(c.text for c in chunks)) == no_ws(text)
    assert all(c.token_count == ntok(c.text) for c in chunks)
    too_long = [(c.ordinal, c.token_count) for c in chunks if c.token_count > 100]
    assert not too_long, f"chunks over max_tokens=100: {too_long}"


def test_hard_cut_sentence_inside_prose_keeps_the_surrounding_sentences_whole() -> None:
    before = "Item 000 the story begins here. Item 001 it continues."
    after = "Item 002 a clean ending. Item 003 and an epilogue."
    text = f"{before} {_run_on_sentence(500, seed=1)}. {after}"
    chunks = chunk(text, 80, 0)
    assert chunks[0].text.startswith(before)
    assert chunks[-1].text.endswith(after)
    assert_covers(text, chunks)
    assert all(c.token_count <= 80 for c in chunks)


@pytest.mark.parametrize(
    "text",
    [
        # a long run of ideographs with no punctuation at all: a single over-long "sentence"
        "".join(chr(0x4E00 + (i * 7919) % 20000) for i in range(3000)),
        # emoji take several tokens each
        emoji_doc(),
    ],
    ids=["cjk_run", "emoji_run"],
)
@pytest.mark.parametrize("max_tokens", [7, 100])
def test_hard_cuts_never_split_a_character(text: str, max_tokens: int) -> None:
    chunks = chunk(text, max_tokens, 0)
    assert all(c.token_count <= max_tokens for c in chunks)
    broken = [c.ordinal for c in chunks if "\ufffd" in c.text]
    assert not broken, f"{len(broken)} of {len(chunks)} chunks contain U+FFFD (a character cut between tokens)"
    assert "".join(c.text for c in chunks) == text


@pytest.mark.parametrize("word", ["handbook", "retrieval", "embeddings"])
@pytest.mark.parametrize("max_tokens", [10, 100, 400])
def test_hard_cut_pieces_stay_within_max_tokens(word: str, max_tokens: int) -> None:
    # " handbook" is one token but "handbook" is two: a cut piece must not grow when trimmed
    assert ntok(" " + word) == 1 < ntok(word)
    text = " ".join([word] * (3 * max_tokens))
    chunks = chunk(text, max_tokens, 0)
    assert [w for c in chunks for w in c.text.split()] == text.split()  # no word lost, cut or repeated
    too_long = [(c.ordinal, c.token_count) for c in chunks if c.token_count > max_tokens]
    assert not too_long, f"chunks over max_tokens={max_tokens}: {too_long}"


@pytest.mark.parametrize("text", ["🙂🙃🙂🙃🙂🙃", "缓存命中率很高缓存命中率很高", "plain words here"])
def test_degenerate_budget_keeps_characters_whole_and_chunks_non_empty(text: str) -> None:
    """Below one character's worth of tokens the bound yields to whole characters (settings forbid < 32)."""
    chunks = chunk(text, 1, 0)
    assert all(c.text.strip() for c in chunks)
    assert not any("\ufffd" in c.text for c in chunks)
    assert "".join(c.text for c in chunks).replace(" ", "") == text.replace(" ", "")
    assert all(c.token_count <= 1 or len(c.text.strip()) == 1 for c in chunks)
