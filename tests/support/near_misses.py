"""Near-miss question pairs a semantic cache must refuse, with the reason each policy gives.

One table for both policies: today's lexical guard (`semantic_match.judge_match`) and the judge
(`semantic_judge.judge`). `judge` is None where only the guard vetoes the pair (the judge's score decides).
"""

from __future__ import annotations

# (question, cached question, the guard's reason, the judge's veto or None)
NEAR_MISSES: list[tuple[str, str, str, str | None]] = [
    ("why is the api on port 8000", "why is the api on port 8080", "guard:number", "veto:number"),
    ("python 3.11 release date", "python 3.12 release date", "guard:number", "veto:number"),
    ("can i use ragcache with docker", "can i use ragcache without docker", "guard:negation", "veto:negation"),
    ("how do i connect ragcache to postgres", "how do i connect ragcache to mysql", "guard:content", None),
    ("convert celsius to fahrenheit", "convert fahrenheit to celsius", "guard:direction", "veto:direction"),
    ("can a landlord sue a tenant", "can a tenant sue a landlord", "guard:direction", "veto:direction"),
    ("what is it", "how is it", "guard:empty", "veto:empty"),
]
GUARD_VETOES = [(a, b, guard) for a, b, guard, _ in NEAR_MISSES]
JUDGE_VETOES = [(a, b, judge) for a, b, _, judge in NEAR_MISSES if judge is not None]
