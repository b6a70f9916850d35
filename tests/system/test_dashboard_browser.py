"""The dashboard in a real headless Chromium (Debian's `chromium`, driven by Playwright).

Traffic is recorded through `Metrics` into the real Valkey: an hour of per-minute history,
a day and a week of lighter history (written by a second `Metrics` with its own clock, as
another worker would), plus a few answers of a moment ago. The page asks for an admin key
(refusing a query key), then must load without console errors, show exactly the numbers
`/dashboard/api/summary` reports, refetch when the range changes and on its own every 10 s.

Set UPDATE_SCREENSHOTS=1 to refresh docs/dashboard.png (the README's picture); otherwise
the screenshot goes to the test's temporary directory, so a test run leaves the work
tree clean.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from service.embeddings.encoders import LocalEmbedder
from service.http.app import create_app
from service.observability.metrics import Metrics
from service.settings import Settings
from tests.support.browser import CHROMIUM, CHROMIUM_ARGS
from tests.support.servers import ROOT, bearer, make_key, serve_app

PRICING = {"claude-haiku-4-5": (1.0, 5.0), "claude-sonnet-4-6": (3.0, 15.0)}
QUESTIONS = [hashlib.sha256(f"question {i}".encode()).hexdigest()[:16] for i in range(40)]


class Clock:
    def __init__(self) -> None:
        self.at = time.time()

    def __call__(self) -> float:
        return self.at


class Traffic:
    """Plausible, seeded traffic: a cache warming up, milliseconds for hits, seconds for misses."""

    def __init__(self, seed: int = 7) -> None:
        self.rng = random.Random(seed)

    def question(self) -> str:
        # Zipf-like: a few questions are asked (and hit) far more often than the rest.
        return QUESTIONS[min(int(self.rng.paretovariate(1.1)) - 1, len(QUESTIONS) - 1)]

    async def one(self, m: Metrics, warmth: float) -> None:
        r = self.rng.random()
        if r < 0.012:
            code = self.rng.choice(["prompt_injection", "prompt_injection", "pii_detected", "question_too_long"])
            await m.failed(code=code, stage="guardrail")
            return
        large = self.rng.random() < 0.25
        model = "claude-sonnet-4-6" if large else "claude-haiku-4-5"
        tokens_in, tokens_out = self.rng.randint(900, 2200), self.rng.randint(120, 380)
        per_in, per_out = PRICING[model]
        cost = round((tokens_in * per_in + tokens_out * per_out) / 1_000_000, 8)
        hit_share = 0.25 + 0.5 * warmth
        outcome = (
            "hit"
            if r < hit_share
            else "semantic_hit"
            if r < hit_share + 0.12
            else "coalesced"
            if r < hit_share + 0.16
            else "bypass"
            if r < hit_share + 0.18
            else "miss"
        )
        served_from_cache = outcome in ("hit", "semantic_hit", "coalesced")
        ttft = {
            "hit": self.rng.lognormvariate(math.log(0.9), 0.35),
            "semantic_hit": self.rng.lognormvariate(math.log(14), 0.3),
            "coalesced": self.rng.lognormvariate(math.log(380), 0.5),
        }.get(outcome, self.rng.lognormvariate(math.log(1400 if large else 650), 0.35))
        if not served_from_cache:
            if self.rng.random() < 0.04:
                m.provider_attempt(provider="anthropic", model=model, outcome="retry", status=529)
            if self.rng.random() < 0.02:
                m.provider_attempt(provider="anthropic", model=model, outcome="error", status=529)
            m.provider_attempt(provider="anthropic", model=model, outcome="ok")
        await m.answered(
            outcome=outcome,
            tier="large" if large else "small",
            provider="anthropic",
            model=model,
            ttft_ms=ttft,
            latency_ms=ttft + (2 if served_from_cache and outcome != "coalesced" else tokens_out * 9),
            input_tokens=0 if served_from_cache else tokens_in,
            output_tokens=0 if served_from_cache else tokens_out,
            cost_usd=0.0 if served_from_cache else cost,
            saved_input_tokens=tokens_in if served_from_cache else 0,
            saved_output_tokens=tokens_out if served_from_cache else 0,
            saved_cost_usd=cost if served_from_cache else 0.0,
            question_hash=self.question(),
        )

    async def history(self, m: Metrics, clock: Clock, now: float) -> None:
        """Minutes 1..50 ago at full rate, the rest of the day every 5 min, days 1-6 a few per hour."""
        for back in range(50, 0, -1):
            clock.at = now - back * 60
            for _ in range(self.rng.randint(4, 13)):
                await self.one(m, warmth=1 - back / 50)
        for back in range(65, 23 * 60, 5):
            clock.at = now - back * 60
            for _ in range(self.rng.randint(0, 4)):
                await self.one(m, warmth=0.3)
        for back in range(26, 6 * 24, 2):
            clock.at = now - back * 3600
            for _ in range(self.rng.randint(0, 6)):
                await self.one(m, warmth=0.2)


@dataclass
class Dashboard:
    url: str
    admin_key: str
    query_key: str


@pytest.fixture
async def dashboard(settings: Settings, local_embedder: LocalEmbedder) -> AsyncIterator[Dashboard]:
    """The real app (create_app) on uvicorn, with history written to its Valkey by two other workers."""
    client = aioredis.from_url(str(settings.redis_url))
    clock = Clock()
    traffic = Traffic()
    history = Metrics(client, clock=clock)
    await traffic.history(history, clock, time.time())
    recent = Metrics(client)
    for _ in range(6):
        await traffic.one(recent, warmth=1.0)
    await history.flush()  # what each worker's 1 s background flush would have written
    await recent.flush()
    admin_key, query_key = await make_key(settings, "admin"), await make_key(settings, "query")
    try:
        async with serve_app(create_app(settings, embedder=local_embedder)) as url:
            yield Dashboard(url, admin_key, query_key)
    finally:
        await client.aclose()


async def ready(page: Any, range_: str, *, after: int | None = None, within_ms: float = 30_000) -> None:
    """Wait until the page's script has rendered `range_` (after load number `after`, if given).

    A selector, not wait_for_function: the page's CSP forbids eval, which that would need.
    """
    selector = f"body[data-state='ready'][data-range='{range_}']"
    if after is not None:
        selector += f":not([data-loads='{after}'])"
    await page.wait_for_selector(selector, state="attached", timeout=within_ms)


async def attr(page: Any, selector: str, name: str = "data-value") -> str:
    value = await page.get_attribute(selector, name)
    assert value is not None, f"{selector} has no {name}"
    return str(value)


async def series_total(page: Any, chart: str, series: str) -> int:
    values = await page.eval_on_selector_all(
        f"#{chart} rect[data-series='{series}']", "nodes => nodes.map(n => Number(n.dataset.value))"
    )
    return int(sum(values))


def close_pct(text: str, ratio: float) -> bool:
    """'71.4%' for 0.714285: JS toFixed and Python round an exact tie differently, so allow half a digit."""
    return text.endswith("%") and abs(float(text[:-1]) - ratio * 100) <= 0.05 + 1e-9


async def check_page_matches_api(page: Any, summary: dict[str, Any]) -> None:
    req = summary["requests"]
    assert await attr(page, "#kpi-requests") == str(req["total"])
    assert await page.inner_text("#kpi-requests") == f"{req['total']:,}"
    assert await attr(page, "#kpi-answered") == str(req["answered"])
    assert await attr(page, "#kpi-failed") == str(req["failed"])
    ratio = summary["hit_ratio"]
    for element, kind in (
        ("kpi-hit-ratio", "overall"),
        ("kpi-ratio-exact", "exact"),
        ("kpi-ratio-semantic", "semantic"),
        ("kpi-ratio-coalesced", "coalesced"),
    ):
        assert float(await attr(page, f"#{element}")) == ratio[kind]
        assert close_pct(await page.inner_text(f"#{element}"), ratio[kind])
    assert await attr(page, "#kpi-avoided") == str(summary["provider_calls"]["avoided"])
    assert await attr(page, "#kpi-made") == str(summary["provider_calls"]["made"])
    assert await attr(page, "#kpi-tokens-saved") == str(summary["saved"]["tokens"])
    assert float(await attr(page, "#kpi-cost-saved")) == summary["saved"]["cost_usd"]
    assert float(await attr(page, "#kpi-ttft-hit")) == summary["ttft_ms"]["hit"]["p50"]
    assert float(await attr(page, "#kpi-ttft-miss")) == summary["ttft_ms"]["miss"]["p50"]

    # The stacked bars add up, outcome by outcome, to the API's totals.
    for outcome, count in req["by_outcome"].items():
        assert await series_total(page, "chart-traffic", outcome) == count, outcome
    assert await series_total(page, "chart-traffic", "failed") == req["failed"]
    for q in ("p50", "p95"):
        for cls in ("hit", "miss"):
            assert float(await attr(page, f"#chart-ttft rect[data-series='{cls}-{q}']")) == summary["ttft_ms"][cls][q]
    for tier, count in summary["routes"]["tiers"].items():
        assert await attr(page, f"#chart-routes [data-key='tier:{tier}']") == str(count)
    for code, count in summary["blocks"]["by_code"].items():
        assert await attr(page, f"#chart-blocks [data-key='block:{code}']") == str(count)
    shown = await page.eval_on_selector_all(
        "#top-questions tbody tr[data-hash]", "rows => rows.map(r => [r.dataset.hash, Number(r.dataset.value)])"
    )
    assert shown == [[q["hash"], q["hits"]] for q in summary["top_questions"]]
    assert float(await attr(page, "#legend-saved [data-series='dollars'] b")) == summary["saved"]["cost_usd"]


@pytest.fixture
def chromium() -> str:
    """Debian's chromium; `make test` installs it. Missing is a failure, never a silent skip."""
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed (make test installs it with apt-get)")
    return CHROMIUM


@pytest.fixture
def screenshot(tmp_path: Path) -> Path:
    return ROOT / "docs" / "dashboard.png" if os.environ.get("UPDATE_SCREENSHOTS") else tmp_path / "dashboard.png"


async def sign_in(page: Any, key: str) -> None:
    await page.fill("#signin-key", key)
    await page.click("#signin button[type='submit']")


async def test_dashboard_in_chromium(dashboard: Dashboard, chromium: str, screenshot: Path) -> None:
    from playwright.async_api import async_playwright

    base = dashboard.url
    problems: list[str] = []
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900}, device_scale_factor=1)
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
            page.on("response", lambda r: problems.append(f"{r.status} {r.url}") if r.status >= 400 else None)

            # No key yet: the page asks for one, and a query key (no admin scope) is refused.
            await page.goto(f"{base}/dashboard")
            await page.wait_for_selector("body[data-state='signin'] #signin:not([hidden])")
            # Both data requests are refused; wait for both before setting those refusals aside.
            async with (
                page.expect_response(lambda r: "/dashboard/api/summary" in r.url) as summary,
                page.expect_response(lambda r: "/dashboard/api/series" in r.url) as series,
            ):
                await sign_in(page, dashboard.query_key)
            assert (await summary.value).status == (await series.value).status == 403
            await page.wait_for_selector("body[data-state='signin'] #signin-error:has-text('admin')")
            assert await page.inner_text("#kpi-requests") == "–"  # nothing was shown
            await sign_in(page, dashboard.admin_key)
            await ready(page, "1h")  # the admin key worked, so any 403 so far was the query key's
            # Those refusals (responses, and the console lines that may trail them) were the point.
            problems[:] = [p for p in problems if "403" not in p]

            # The 1 h window slides every clock minute, so the page and the API agree only when both
            # read it within the same minute: load again if a minute boundary fell in between.
            for _ in range(3):
                minute = int(time.time() // 60)
                await page.goto(f"{base}/dashboard")  # the key is kept for the tab's session
                await ready(page, "1h")
                async with httpx.AsyncClient(base_url=base, headers=bearer(dashboard.admin_key)) as http:
                    hour = (await http.get("/dashboard/api/summary", params={"range": "1h"})).json()
                    week = (await http.get("/dashboard/api/summary", params={"range": "7d"})).json()
                if int(time.time() // 60) == minute:
                    break
            assert hour["requests"]["answered"] > 300 and hour["top_questions"] and hour["blocks"]["total"] > 0
            await check_page_matches_api(page, hour)
            assert await page.eval_on_selector_all("#chart-ratio circle", "c => c.length") >= 50  # a point a minute

            # The range picker refetches (and only the picked range is shown).
            loads = int(await attr(page, "body", "data-loads"))
            async with page.expect_response(lambda r: "/dashboard/api/summary?range=7d" in r.url):
                await page.click("button[data-range='7d']")
            await ready(page, "7d", after=loads)
            assert await attr(page, "button[data-range='7d']", "aria-pressed") == "true"
            assert week["requests"]["total"] > hour["requests"]["total"]
            await check_page_matches_api(page, week)

            # Auto-refresh: another load happens on its own within the 10 s interval.
            loads = int(await attr(page, "body", "data-loads"))
            await ready(page, "7d", after=loads, within_ms=20_000)

            await page.click("button[data-range='1h']")
            await ready(page, "1h")
            png = await page.screenshot(path=str(screenshot), full_page=True)
            assert len(png) > 20_000
        finally:
            await browser.close()
    assert problems == []
