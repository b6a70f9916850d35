"""Caps under load (issue 11, scenario 1): does a busy worker still enforce a key's rate limit and
coalesce identical misses? The same run against a base revision (default: main) and this checkout.

With `--rss`, the API worker's memory (at rest, after one answer, after a burst) instead.

Per variant, one `rag-serve` process (one worker, default pools) over the msmarco subset and the
loopback model stand-in (first token after 2 s). An unlimited key sends 15 distinct slow misses and
70 copies of one question at once; while they are in flight, a key limited to 10 requests/min
sends 25 requests at once (for an answer already cached). Reported: the limited key's answered
requests (goal: 10), generations for the 70 identical questions (goal: 1), and the server's
"fail open" and "not caching" log lines (goal: 0). The base revision runs from a `git archive` of
its `service/` on PYTHONPATH; the client, servers and keys are this checkout's.
"""

from __future__ import annotations

import asyncio
import subprocess
import tarfile
import tempfile
from collections import Counter
from collections.abc import Sequence
from io import BytesIO
from pathlib import Path
from typing import Any

from bench import _kit as kit
from tests.support.servers import make_key, wait_until

SECTION = "Caps under load"
RSS_SECTION = "API worker memory"
SAME = "what is the boiling point of water at high altitude"
CACHED = "how do vaccines train the immune system"


def export_service(revision: str, into: Path) -> None:
    """`service/` of `revision`, unpacked under `into` (to put first on a server's PYTHONPATH)."""
    archive = subprocess.run(
        ["git", "-C", str(kit.ROOT), "archive", "--format=tar", revision, "service"], capture_output=True, check=True
    )
    with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")


async def scenario(stack: kit.ReplayStack, variant: str, db: int, env: dict[str, str], args: Any) -> dict[str, Any]:
    """The key limited to 10/min and the 70 identical questions, sent while 16 generations are in flight."""
    redis_url = await stack.fresh(db)
    limited = await make_key(kit.make_settings(stack.dsn, redis_url, args.out), "query", rpm=10)
    log = args.out / f"{variant.replace(' ', '-')}.log"
    async with stack.serve(redis_url, log, env | {"RAG_LOG_LEVEL": "info"}) as srv:  # "not caching" is info
        await kit.ask(srv.url, stack.token, {"question": CACHED})  # the limited key's answer, cached
        await stack.provider.reset()
        questions = [f"tell me about topic {i}" for i in range(15)] + [SAME] * 70
        asked = [asyncio.create_task(kit.ask(srv.url, stack.token, {"question": q})) for q in questions]

        async def generating() -> bool:  # the slow misses and the first of the 70
            return len(await stack.provider.calls()) >= 16

        await wait_until(generating, within=120, interval=0.1)
        limited_replies = await asyncio.gather(*(kit.ask(srv.url, limited, {"question": CACHED}) for _ in range(25)))
        same_replies = (await asyncio.gather(*asked))[15:]
    lines = log.read_text(errors="replace").splitlines()
    return {
        "variant": variant,
        "limited_answered": sum(r.status == 200 for r in limited_replies),
        "limited_outcomes": dict(Counter(r.outcome for r in limited_replies)),
        "same_generations": sum(r.outcome in ("miss", "bypass") for r in same_replies),
        "same_outcomes": dict(Counter(r.outcome for r in same_replies)),
        "fail_open_lines": sum("fail open" in line for line in lines),
        "not_caching_lines": sum("not caching" in line for line in lines),
    }


def memory(pid: int) -> dict[str, float]:
    """The process's resident MB: all, anonymous (heap), file-backed (libraries, mapped weights), peak."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    roll = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
    mb = {k: int(v.split()[0]) / 1024 for k, v in (*status.items(), *roll.items()) if v.strip().endswith("kB")}
    return {"rss": mb["VmRSS"], "anon": mb["Anonymous"], "file": mb["VmRSS"] - mb["Anonymous"], "peak": mb["VmHWM"]}


async def rss_scenario(stack: kit.ReplayStack, variant: str, db: int, env: dict[str, str], args: Any) -> list[str]:
    """`rag-serve` at rest (started, no request yet), after one answer, then after `--burst` distinct misses at once."""
    async with stack.serve(await stack.fresh(db), args.out / f"{variant.replace(' ', '-')}.log", env) as srv:
        steps = {"at rest": memory(srv.pid)}
        await kit.ask(srv.url, stack.token, {"question": "what is the boiling point of water"})
        steps["after one answer"] = memory(srv.pid)
        questions = kit.passage_questions(args.burst, prefix="tell me about")
        replies = await asyncio.gather(*(kit.ask(srv.url, stack.token, {"question": q}) for q in questions))
        answered = sum(r.status == 200 for r in replies)
        steps[f"after {args.burst} misses at once ({answered} answered)"] = memory(srv.pid)
    return [
        f"{variant} | {step} | " + " | ".join(f"{m[k]:.0f}" for k in ("rss", "anon", "file", "peak"))
        for step, m in steps.items()
    ]


async def run(args: Any) -> None:
    """The scenario (or, with --rss, the memory steps) against the base revision's `service/`, then this one's."""
    args.out = kit.run_dir("rss" if args.rss else "caps")
    measure = rss_scenario if args.rss else scenario
    results: list[Any] = []
    with tempfile.TemporaryDirectory(prefix="ragcache-base-") as base_dir:
        export_service(args.base, Path(base_dir))
        async with kit.replay_stack(args) as stack:
            for variant, db, env in ((args.base, 10, {"PYTHONPATH": base_dir}), ("this branch", 11, {})):
                kit.say(f"{variant} …")
                results.append(await measure(stack, variant, db, env, args))
            setup = f"{kit.model_line(args, stack.documents)} Base `{args.base}`: {args.base_rev}."
    if args.rss:
        text = (
            f"{setup} One worker (`rag-serve --workers 1`), its ONNX encoder, the Anthropic provider configured "
            "(the stand-in). MB from /proc/PID/status and smaps_rollup; file = RSS − anonymous (libraries, "
            "memory-mapped model weights; shared between workers)."
        )
        rows = [row for variant_rows in results for row in variant_rows]
        header = "code | when | RSS MB | anonymous | file-backed | peak RSS"
        kit.publish(RSS_SECTION, kit.section(args, text, kit.table(header, rows, align="ll")), args)
        return
    rows = [
        f"{r['variant']} | {r['limited_answered']}/25 | {r['same_generations']} | {r['fail_open_lines']} | "
        f"{r['not_caching_lines']} | {', '.join(f'{k} {v}' for k, v in sorted(r['same_outcomes'].items()))}"
        for r in results
    ]
    header = (
        'code | limited key (10/min) answered | generations for 70 identical | "fail open" lines | "not caching" lines'
    )
    body = kit.section(
        args,
        f"{setup} One worker, default pools (`RAG_REDIS_MAX_CONNECTIONS=64`).",
        kit.table(f"{header} | the 70's outcomes", rows, align="lrrrrl"),
    )
    kit.publish(SECTION, body, args, results, args.out)


def main(argv: Sequence[str] | None = None) -> None:
    parser = kit.arguments("caps", __doc__)
    kit.replay_arguments(parser, first_token_delay=2.0, answer_tokens=40, limit_corpus=500)
    parser.add_argument("--base", default="main", help="the revision to compare with (default: main)")
    parser.add_argument("--rss", action="store_true", help="measure the API worker's memory instead")
    parser.add_argument("--burst", type=int, default=64, help="--rss: distinct misses sent at once")
    args = kit.parse(parser, argv, limit_corpus=200, burst=8)
    args.base_rev = subprocess.run(
        ["git", "-C", str(kit.ROOT), "rev-parse", "--short", args.base], capture_output=True, text=True, check=True
    ).stdout.strip()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
