"""Semantic-cache matching policy on a labelled paraphrase / near-miss set; picks the default threshold.

    python -m bench.semantic [--pairs bench/semantic_pairs.jsonl] [--seed 20240611] [--no-write]

Every question of bench/semantic_pairs.jsonl is normalised exactly as the cache key is
(`guardrails.normalize_for_key`) and embedded with the local all-MiniLM-L6-v2 model; the pair's
similarity is the cosine of the two unit vectors (what pgvector's `<=>` gives as 1 - distance).

For each threshold 0.70..0.99 (step 0.01) and two policies -- (a) cosine only, (b) cosine +
`service.policy.semantic_match.compatible` -- it reports precision (true hits / all hits), hit rate (share of
the true paraphrases served from cache) and the false-hit rate per near-miss kind.

Hold-out: the guard was designed while looking at this set, so the pairs are also split 50/50 into
dev and test (stratified by kind, fixed seed).  The threshold is chosen on dev only -- the lowest
one at which (b) reaches precision >= 0.99 -- and precision / hit rate are reported on test at
that threshold.  That choice is `service.policy.semantic_match.DEFAULT_THRESHOLD`; a mismatch is reported.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.common import ROOT, machine_line, markdown_table, say, today, update_section
from service.policy.guardrails import normalize_for_key
from service.policy.semantic_match import DEFAULT_THRESHOLD, incompatibility

SECTION = "Semantic cache"
PAIRS = ROOT / "bench" / "semantic_pairs.jsonl"
KINDS = ("entity", "negation", "number", "date", "unit", "scope", "other")
THRESHOLDS = tuple(round(0.70 + 0.01 * i, 2) for i in range(30))
TARGET_PRECISION = 0.99
DEFAULT_SEED = 20240611
MAX_LISTED = 60  # unlabelled passes listed in docs
# Hand review of the unlabelled stress test (see cross_pairs) at DEFAULT_THRESHOLD, last run.
# Passes that are not listed here show up as "not reviewed".
_PARAPHRASE = "paraphrase"
_CLOSE = "close: can I / how do I (the how-to answer also answers whether)"
REVIEWED: dict[frozenset[str], str] = {
    frozenset(("how do i convert a pdf to word", "how do i convert pdf to word")): _PARAPHRASE,
    frozenset(("how do i reset my password", "how to reset my password")): _PARAPHRASE,
    frozenset(("how can i reset my password?", "how to reset my password")): _PARAPHRASE,
    frozenset(("could you tell me how to revoke an api key please", "how can i revoke an api key?")): _PARAPHRASE,
    frozenset(
        ("does legionella pneumophila cause pneumonia", "is pneumonia caused by legionella pneumophila")
    ): _PARAPHRASE,
    frozenset(("how do i learn python", "how should i learn python")): _PARAPHRASE,
    frozenset(
        ("can legionella pneumophila cause pneumonia", "is pneumonia caused by legionella pneumophila")
    ): _PARAPHRASE,
    frozenset(
        ("does legionella pneumophila cause pneumonia", "does legionella pneumophila cause pneumonia?")
    ): _PARAPHRASE,
    frozenset(("how do i configure the anthropic api key", "how do i set the anthropic api key")): _PARAPHRASE,
    frozenset(("is the store open on sunday", "is the store open on sundays")): _PARAPHRASE,
    frozenset(("can i revoke an api key", "how can i revoke an api key?")): _CLOSE,
    frozenset(("can i revoke an api key", "how do i revoke an api key")): _CLOSE,
    frozenset(
        ("can legionella pneumophila cause pneumonia", "does legionella pneumophila cause pneumonia?")
    ): _PARAPHRASE,
    frozenset(("symptoms of flu", "what are flu symptoms")): _PARAPHRASE,
    frozenset(("how do i create an api key", "how do i create api keys")): _PARAPHRASE,
    frozenset(("how do i see cache stats", "show cache stats")): _PARAPHRASE,
    frozenset(("how do i create api keys", "what's the way to create an api key?")): _PARAPHRASE,
    frozenset(("how do i reset my password", "please tell me how to reset my password")): _PARAPHRASE,
    frozenset(("can i revoke an api key", "could you tell me how to revoke an api key please")): _CLOSE,
    frozenset(("symptoms of flu", "what are the symptoms of the flu")): _PARAPHRASE,
    frozenset(("how can i reset my password?", "please tell me how to reset my password")): _PARAPHRASE,
    frozenset(("how do i view cache statistics", "show cache stats")): _PARAPHRASE,
    frozenset(("is the shop open on sunday", "is the store open on sunday")): _PARAPHRASE,
    frozenset(("can i pay with paypal", "how do i pay with paypal")): _CLOSE,
    frozenset(
        ("should i set redis_url", "what is the redis_url setting")
    ): "different question (should I … / what is …); “setting” stems to “set”",
}


@dataclass(frozen=True)
class Pair:
    a: str  # normalised
    b: str
    match: bool
    kind: str
    similarity: float
    guard: str | None  # incompatibility reason, None when the guard lets the pair through


@dataclass(frozen=True)
class Score:
    hits: int
    true_hits: int
    positives: int
    false_by_kind: dict[str, tuple[int, int]]  # kind -> (false hits, near-misses of that kind)

    @property
    def false_hits(self) -> int:
        return self.hits - self.true_hits

    @property
    def precision(self) -> float:
        return self.true_hits / self.hits if self.hits else math.nan

    @property
    def hit_rate(self) -> float:
        return self.true_hits / self.positives if self.positives else math.nan

    @property
    def negatives(self) -> int:
        return sum(total for _, total in self.false_by_kind.values())


Policy = Callable[[Pair, float], bool]


def cosine_only(pair: Pair, threshold: float) -> bool:
    return pair.similarity >= threshold


def cosine_and_guard(pair: Pair, threshold: float) -> bool:
    # Same decision as service.policy.semantic_match.judge_match, without re-running the guard per threshold.
    return pair.similarity >= threshold and (pair.a == pair.b or pair.guard is None)


POLICIES: dict[str, Policy] = {"cosine": cosine_only, "cosine+guard": cosine_and_guard}


def score(pairs: Sequence[Pair], policy: Policy, threshold: float) -> Score:
    hits = true_hits = 0
    false_by_kind: dict[str, list[int]] = {kind: [0, 0] for kind in KINDS}
    for pair in pairs:
        hit = policy(pair, threshold)
        hits += hit
        if pair.match:
            true_hits += hit
        else:
            counts = false_by_kind.setdefault(pair.kind, [0, 0])
            counts[0] += hit
            counts[1] += 1
    return Score(
        hits=hits,
        true_hits=true_hits,
        positives=sum(pair.match for pair in pairs),
        false_by_kind={kind: (c[0], c[1]) for kind, c in false_by_kind.items()},
    )


def choose_threshold(pairs: Sequence[Pair], policy: Policy) -> float | None:
    """Lowest swept threshold whose precision is >= the target (a threshold with no hits does not count)."""
    for threshold in THRESHOLDS:
        result = score(pairs, policy, threshold)
        if result.hits and result.precision >= TARGET_PRECISION:
            return threshold
    return None


def load_pairs(path: Path) -> list[dict[str, object]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for row in rows:
        if (
            not isinstance(row.get("a"), str)
            or not isinstance(row.get("b"), str)
            or row.get("match") not in (True, False)
        ):
            raise SystemExit(f"{path}: malformed row {row!r}")
    return rows


def embed_pairs(rows: Sequence[dict[str, object]]) -> tuple[list[Pair], object, dict[str, int]]:
    import numpy as np

    from service.embeddings.encoders import LocalEmbedder

    texts = sorted({normalize_for_key(str(row[side])) for row in rows for side in ("a", "b")})
    say(f"embedding {len(texts)} distinct questions with all-MiniLM-L6-v2 …")
    started = time.perf_counter()
    vectors = LocalEmbedder().encode(texts)
    say(f"  {time.perf_counter() - started:.1f} s")
    index = {text: i for i, text in enumerate(texts)}
    pairs = []
    for row in rows:
        a, b = normalize_for_key(str(row["a"])), normalize_for_key(str(row["b"]))
        similarity = float(np.dot(vectors[index[a]], vectors[index[b]]))
        pairs.append(Pair(a, b, bool(row["match"]), str(row["kind"]), similarity, incompatibility(a, b)))
    return pairs, vectors, index


def split(pairs: Sequence[Pair], seed: int) -> tuple[list[Pair], list[Pair]]:
    """50/50 dev/test, stratified by kind so every kind is on both sides; deterministic for a seed."""
    by_kind: dict[str, list[Pair]] = defaultdict(list)
    for pair in pairs:
        by_kind[pair.kind].append(pair)
    rng = random.Random(seed)
    dev: list[Pair] = []
    test: list[Pair] = []
    for kind in sorted(by_kind):
        group = by_kind[kind][:]
        rng.shuffle(group)
        half = (len(group) + rng.randint(0, 1)) // 2  # odd groups: the extra pair goes to either side
        dev.extend(group[:half])
        test.extend(group[half:])
    return dev, test


# --------------------------------------------------------------------------- formatting


@dataclass(frozen=True)
class CrossPass:
    similarity: float
    a: str
    b: str
    linked: bool  # both questions are connected through labelled paraphrase pairs


def cross_pairs(
    pairs: Sequence[Pair], vectors: object, index: dict[str, int], threshold: float
) -> tuple[int, list[CrossPass]]:
    """Unlabelled stress test: every pair of distinct questions of the set that is *not* a labelled pair.

    Returns the number of such pairs and those that cosine >= threshold + guard would serve.  A pass
    between two questions linked by labelled paraphrases (a~b, b~c => a~c) is expected; the others
    are listed in the report for a human to judge.
    """
    import numpy as np

    matrix = np.asarray(vectors)
    texts = sorted(index, key=index.__getitem__)
    parent = list(range(len(texts)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for pair in pairs:
        if pair.match:
            parent[find(index[pair.a])] = find(index[pair.b])
    labelled = {frozenset((pair.a, pair.b)) for pair in pairs}
    similarities = matrix @ matrix.T
    passes = []
    total = len(texts) * (len(texts) - 1) // 2 - len(labelled)
    rows_i, cols_i = np.nonzero(np.triu(similarities >= threshold, k=1))
    for i, j in zip(rows_i.tolist(), cols_i.tolist(), strict=True):
        a, b = texts[i], texts[j]
        if frozenset((a, b)) in labelled or incompatibility(a, b) is not None:
            continue
        passes.append(CrossPass(float(similarities[i, j]), a, b, find(i) == find(j)))
    passes.sort(key=lambda p: -p.similarity)
    return total, passes


def verdict_class(cross_pass: CrossPass) -> str:
    verdict = REVIEWED.get(frozenset((cross_pass.a, cross_pass.b)))
    if verdict is None:
        return "not reviewed"
    return {_PARAPHRASE: "paraphrase", _CLOSE: "close (can I / how do I)"}.get(verdict, "different question")


def pct(value: float) -> str:
    return "–" if math.isnan(value) else f"{100 * value:.1f}%"


def prec(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.3f}"


def kind_cell(false_hits: int, total: int) -> str:
    return f"{false_hits}/{total}" if total else "–"


def sweep_table(pairs: Sequence[Pair], policy: Policy) -> str:
    header = ["threshold", "precision", "hit rate", "false hits", *KINDS]
    rows = []
    for threshold in THRESHOLDS:
        s = score(pairs, policy, threshold)
        kinds = [kind_cell(*s.false_by_kind.get(kind, (0, 0))) for kind in KINDS]
        rows.append([f"{threshold:.2f}", prec(s.precision), pct(s.hit_rate), str(s.false_hits), *kinds])
    return markdown_table(header, rows)


def summary_rows(named: Sequence[tuple[str, Sequence[Pair]]], threshold: float) -> list[list[str]]:
    rows = []
    for name, pairs in named:
        for policy_name, policy in POLICIES.items():
            s = score(pairs, policy, threshold)
            kinds = [kind_cell(*s.false_by_kind.get(kind, (0, 0))) for kind in KINDS]
            rows.append(
                [
                    name,
                    policy_name,
                    prec(s.precision),
                    f"{pct(s.hit_rate)} ({s.true_hits}/{s.positives})",
                    f"{s.false_hits}/{s.negatives}",
                    *kinds,
                ]
            )
    return rows


def guard_losses(pairs: Sequence[Pair], threshold: float) -> tuple[Counter[str], int, int]:
    """Where hit rate is lost at `threshold`: paraphrases under the threshold vs vetoed by the guard."""
    reasons: Counter[str] = Counter()
    below = 0
    for pair in pairs:
        if not pair.match:
            continue
        if pair.similarity < threshold:
            below += 1
        elif pair.guard is not None and pair.a != pair.b:
            reasons[pair.guard] += 1
    vetoed = sum(reasons.values())
    return reasons, below, vetoed


def report(
    pairs: Sequence[Pair],
    dev: Sequence[Pair],
    test: Sequence[Pair],
    cross: tuple[int, list[CrossPass]],
    seed: int,
    command: str,
) -> str:
    chosen_dev = choose_threshold(dev, cosine_and_guard)
    chosen_all = choose_threshold(pairs, cosine_and_guard)
    cosine_dev = choose_threshold(dev, cosine_only)
    threshold = chosen_dev if chosen_dev is not None else THRESHOLDS[-1]
    floor = THRESHOLDS[0]
    kinds = Counter(pair.kind for pair in pairs)
    positives = kinds.pop("paraphrase", 0)
    near = sum(kinds.values())
    reasons, below, vetoed = guard_losses(pairs, threshold)
    guard_all = Counter(pair.guard for pair in pairs if not pair.match)
    top_near = sorted((p for p in pairs if not p.match), key=lambda p: -p.similarity)
    top_examples = "; ".join(f"“{p.a}” / “{p.b}” {p.similarity:.3f}" for p in top_near[:3])
    near_above_median = sum(
        p.similarity >= sorted(q.similarity for q in pairs if q.match)[positives // 2] for p in top_near
    )
    cosine_best = max(
        (score(dev, cosine_only, t).precision for t in THRESHOLDS if score(dev, cosine_only, t).hits), default=math.nan
    )
    at_99 = score(pairs, cosine_only, THRESHOLDS[-1])
    guard_test = score(test, cosine_and_guard, threshold)
    cross_total, cross_passes = cross
    unlinked = [p for p in cross_passes if not p.linked]
    verdicts = Counter(verdict_class(p) for p in cross_passes)
    mismatch = (
        ""
        if math.isclose(threshold, DEFAULT_THRESHOLD)
        else f"\n**Note:** `semantic_match.DEFAULT_THRESHOLD` is {DEFAULT_THRESHOLD:.2f}, not {threshold:.2f}.\n"
    )
    binding = (
        f"The precision target is met at every swept threshold, so the rule returns the floor of the sweep "
        f"({floor:.2f}): on this set the threshold is not what keeps precision — the guard is."
        if math.isclose(threshold, floor)
        else ""
    )
    header = ["split", "policy", "precision", "hit rate", "false hits", *KINDS]
    lines = [
        f"Command: `{command}` — {today()} — {machine_line()}.",
        "",
        f"Set: `bench/semantic_pairs.jsonl`, {len(pairs)} pairs: {positives} paraphrases that must match and "
        f"{near} near-misses that must not ("
        + ", ".join(f"{kind} {kinds.get(kind, 0)}" for kind in KINDS)
        + "), about a third each MS MARCO-style, operating ragcache, and general/product/support questions. "
        "Questions normalised with `normalize_for_key`, embedded with all-MiniLM-L6-v2; similarity = cosine. "
        "Policies: (a) `cosine` ≥ threshold; (b) `cosine+guard` = (a) and `service.policy.semantic_match.compatible` "
        "(what `judge_match()` does). Precision = true hits / all hits; hit rate = paraphrases served / paraphrases. "
        f"Split 50/50 into dev/test, stratified by kind, seed {seed} (dev {len(dev)} pairs, test {len(test)}).",
        "",
        f"Threshold rule: the lowest of {floor:.2f}…{THRESHOLDS[-1]:.2f} at which cosine+guard reaches precision "
        f"≥ {TARGET_PRECISION} on **dev**: **{threshold:.2f}** = `DEFAULT_THRESHOLD` "
        f"(`RAG_SEMANTIC_CACHE_THRESHOLD` overrides it). On the whole set the rule gives "
        f"{f'{chosen_all:.2f}' if chosen_all is not None else 'no threshold'}; cosine alone reaches the target "
        f"on dev at {f'{cosine_dev:.2f}' if cosine_dev is not None else 'no threshold ≤ 0.99'}. {binding}",
        mismatch,
        f"At {threshold:.2f} (false hits per near-miss kind as hits/pairs of that kind):",
        "",
        markdown_table(
            header, summary_rows((("dev", dev), ("test", test), ("all", pairs)), threshold), "ll" + "r" * 10
        ),
        "",
        "Interpretation:",
        "",
        f"- Cosine alone cannot be made safe with this model. The closest near-misses are reversals: "
        f"{top_examples}. {near_above_median}/{near} near-misses score above the median paraphrase. "
        f"The best precision cosine alone reaches on dev is {prec(cosine_best)}; at 0.99 it still serves "
        f"{at_99.false_hits} near-misses while keeping {pct(at_99.hit_rate)} of the paraphrases.",
        f"- The guard alone rejects {sum(v for k, v in guard_all.items() if k)}/{near} near-misses "
        "(by first failed check: "
        + ", ".join(f"{reason} {count}" for reason, count in guard_all.most_common() if reason)
        + "). Numbers cover "
        "digits, written numbers, ordinals, versions and years; content words catch the different entity, unit, "
        "month or weekday, an added qualifier (scope) and antonyms (enable/disable, upload/download); the "
        "direction check catches swapped to/from/than/around objects and subject/object swaps (landlord/tenant).",
        f"- Held-out: on the test half, cosine+guard at {threshold:.2f} has precision {prec(guard_test.precision)} "
        f"and hit rate {pct(guard_test.hit_rate)}; dev and test agree because the guard, not the threshold, "
        "decides almost every pair. A more cautious threshold buys no measured precision and costs hits: on test, "
        + ", ".join(f"{t:.2f} keeps {pct(score(test, cosine_and_guard, t).hit_rate)}" for t in (0.80, 0.85, 0.90))
        + ".",
        f"- Hit rate is lost on {below + vetoed}/{positives} paraphrases: {below} below the threshold, "
        f"{vetoed} vetoed by the guard ("
        + ", ".join(f"{k} {v}" for k, v in reasons.most_common())
        + "). The vetoes are paraphrases that use different words for the same thing (wrote/author, how many "
        "people live/population, refund/money back, response/status code, an extra “files” or “suite”, "
        "“what is X for”/“why is X prescribed”). The guard accepts only equal stems, a small generic synonym "
        "table (delete/remove, clear/flush, km/kilometre …), typos of words of six letters or more, and "
        "split/joined compounds (re-index/reindex). A lost paraphrase costs one retrieval + generation; a false "
        "hit would serve a confidently wrong answer.",
        f"- Unlabelled stress test: of the {cross_total:,} pairs of distinct questions in the set that are not "
        f"labelled pairs, {len(cross_passes)} would be served at {threshold:.2f} "
        f"({len(cross_passes) - len(unlinked)} between questions already linked through labelled paraphrases); "
        "all are listed below. Hand review: "
        + ", ".join(f"{count} {verdict}" for verdict, count in verdicts.most_common())
        + ". The guard ignores by design modal verbs (can/should/how do I), "
        "tense, pronouns and prepositions other than to/from, so pairs differing only there pass.",
        f"- Caveats: 0 false hits in {near} near-misses bounds the near-miss false-hit rate at ≈ {300 / near:.1f}% "
        "(95%, rule of three), not at zero. The guard was written looking at the whole set; the dev/test split only "
        "keeps the threshold choice honest. The threshold is specific to all-MiniLM-L6-v2: other embedding models "
        "have other cosine scales, so re-run this benchmark before changing `RAG_EMBEDDING_MODEL`.",
        "",
        "<details><summary>Full sweep on all pairs</summary>",
        "",
        "(a) cosine only",
        "",
        sweep_table(pairs, cosine_only),
        "",
        "(b) cosine + guard",
        "",
        sweep_table(pairs, cosine_and_guard),
        "",
        "</details>",
        "",
        f"<details><summary>Unlabelled pairs served at {threshold:.2f} (stress test)</summary>",
        "",
        markdown_table(
            ["cosine", "question", "cached question", "linked", "hand review"],
            [
                [
                    f"{p.similarity:.3f}",
                    p.a,
                    p.b,
                    "yes" if p.linked else "",
                    REVIEWED.get(frozenset((p.a, p.b)), "not reviewed"),
                ]
                for p in cross_passes[:MAX_LISTED]
            ],
            "rllll",
        ),
        "" if len(cross_passes) <= MAX_LISTED else f"\n… and {len(cross_passes) - MAX_LISTED} more.",
        "</details>",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.semantic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=Path, default=PAIRS)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="dev/test split seed")
    parser.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rows = load_pairs(args.pairs)
    pairs, vectors, index = embed_pairs(rows)
    dev, test = split(pairs, args.seed)
    chosen = choose_threshold(dev, cosine_and_guard)
    cross = cross_pairs(pairs, vectors, index, chosen if chosen is not None else THRESHOLDS[-1])
    command = "python -m bench.semantic" + ("" if args.seed == DEFAULT_SEED else f" --seed {args.seed}")
    text = report(pairs, dev, test, cross, args.seed, command)
    print(text)
    for name, policy in POLICIES.items():
        say(f"\n({name}) sweep on dev:\n{sweep_table(dev, policy)}")
    if not args.no_write:
        update_section(SECTION, text)
        say(f"updated docs/benchmarks.md § {SECTION}")
    return 0 if chosen is not None and math.isclose(chosen, DEFAULT_THRESHOLD) else 1


if __name__ == "__main__":
    sys.exit(main())
