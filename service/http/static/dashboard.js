/*
 * ragcache dashboard: fetches /dashboard/api/summary and /dashboard/api/series and draws
 * every chart as SVG (or plain HTML bars). No library, no build step, nothing from another
 * origin, no inline script or style: the page works offline under a strict CSP.
 *
 * After each successful load <body> carries data-state="ready", data-range and an
 * incrementing data-loads, and every drawn value carries data-value, so tests (and people
 * with dev tools) can check the page against the API.
 */
"use strict";

(function () {
  const NS = "http://www.w3.org/2000/svg";
  const RANGES = ["1h", "24h", "7d"];
  const REFRESH_MS = 10000;
  const COLORS = {
    hit: "#34d399",
    semantic_hit: "#22d3ee",
    coalesced: "#a78bfa",
    miss: "#fbbf24",
    bypass: "#94a3b8",
    failed: "#f87171",
    tokens: "#60a5fa",
    cost: "#34d399",
    overall: "#e2e8f0",
  };
  const OUTCOME_LABELS = {
    hit: "exact hit",
    semantic_hit: "semantic hit",
    coalesced: "coalesced",
    miss: "miss",
    bypass: "bypass",
    failed: "failed",
  };
  const base = window.location.pathname.replace(/\/+$/, "");
  // The admin key lives in this tab only (sessionStorage): a page navigation cannot carry a
  // bearer token, and nothing here needs it beyond the tab's life.
  const KEY_ITEM = "ragcache.adminKey";
  const state = { range: initialRange(), auto: true, timer: null, seq: 0, loads: 0, data: null };

  function initialRange() {
    const wanted = window.location.hash.replace(/^#/, "");
    return RANGES.includes(wanted) ? wanted : "1h";
  }

  // -- DOM helpers ----------------------------------------------------------------------
  function $(id) {
    return document.getElementById(id);
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
    return node;
  }

  function svg(tag, attrs, parent) {
    const node = document.createElementNS(NS, tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value !== undefined && value !== null) node.setAttribute(key, String(value));
    }
    if (parent) parent.appendChild(node);
    return node;
  }

  function html(tag, attrs, text, parent) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value !== undefined && value !== null) node.setAttribute(key, String(value));
    }
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (parent) parent.appendChild(node);
    return node;
  }

  function tooltip(node, text) {
    svg("title", {}, node).textContent = text;
  }

  function setValue(id, text, value) {
    const node = $(id);
    if (!node) return;
    node.textContent = text;
    node.dataset.value = value === null || value === undefined ? "" : String(value);
  }

  // -- number formatting ----------------------------------------------------------------
  const intFormat = new Intl.NumberFormat("en-US");

  function fmtInt(n) {
    return intFormat.format(Math.round(n || 0));
  }

  function fmtCompact(n) {
    const v = Math.abs(n || 0);
    if (v >= 1e9) return (n / 1e9).toFixed(2) + "B";
    if (v >= 1e6) return (n / 1e6).toFixed(2) + "M";
    if (v >= 1e4) return (n / 1e3).toFixed(1) + "k";
    return fmtInt(n);
  }

  function fmtPct(ratio) {
    return ratio === null || ratio === undefined ? "—" : (ratio * 100).toFixed(1) + "%";
  }

  function fmtMs(ms) {
    if (ms === null || ms === undefined) return "—";
    if (ms >= 1000) return (ms / 1000).toFixed(2) + " s";
    if (ms >= 100) return ms.toFixed(0) + " ms";
    if (ms >= 1) return ms.toFixed(1) + " ms";
    return ms.toFixed(2) + " ms";
  }

  function fmtUsd(v) {
    const n = v || 0;
    if (n === 0) return "$0";
    if (n >= 100) return "$" + intFormat.format(Math.round(n));
    if (n >= 1) return "$" + n.toFixed(2);
    if (n >= 0.01) return "$" + n.toFixed(3);
    return "$" + n.toFixed(5);
  }

  /** A maximum that splits into 4 round ticks (whole ones for counts). */
  function niceMax(value, integer) {
    if (!(value > 0)) return integer ? 4 : 1;
    const raw = value / 4;
    const power = Math.pow(10, Math.floor(Math.log10(raw)));
    for (const m of integer ? [1, 2, 3, 4, 5, 6, 8, 10] : [1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10]) {
      const step = m * power;
      if (step >= raw && (!integer || Number.isInteger(step))) return step * 4;
    }
    return integer ? Math.max(4, Math.ceil(raw) * 4) : 10 * power * 4;
  }

  // -- time axis ------------------------------------------------------------------------
  const clockFormat = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });
  const dayFormat = new Intl.DateTimeFormat(undefined, { weekday: "short", day: "numeric" });
  const fullFormat = new Intl.DateTimeFormat(undefined, {
    weekday: "short",
    hour: "2-digit",
    minute: "2-digit",
  });

  function timeLabel(t, stepS) {
    const date = new Date(t * 1000);
    if (stepS >= 3600) return date.getHours() === 0 ? dayFormat.format(date) : clockFormat.format(date);
    return clockFormat.format(date);
  }

  function tickIndexes(rows, stepS) {
    const n = rows.length;
    if (stepS >= 3600) {
      const days = rows.map((r, i) => (new Date(r.t * 1000).getHours() === 0 ? i : -1)).filter((i) => i >= 0);
      if (days.length >= 2) return days;
    }
    const every = Math.max(1, Math.ceil(n / 6));
    const out = [];
    for (let i = n - 1; i >= 0; i -= every) out.unshift(i);
    return out;
  }

  // -- chart frame ----------------------------------------------------------------------
  function frame(container, opts) {
    clear(container);
    const o = Object.assign({ height: 210, left: 46, right: 14, top: 10, bottom: 24 }, opts || {});
    const width = Math.max(300, Math.floor(container.clientWidth || 560));
    const root = svg("svg", { viewBox: `0 0 ${width} ${o.height}`, width, height: o.height, role: "img" }, container);
    return { root, width, height: o.height, x0: o.left, x1: width - o.right, y0: o.height - o.bottom, y1: o.top };
  }

  function yAxis(f, max, fmt, side) {
    const g = svg("g", { class: "axis" }, f.root);
    const ticks = 4;
    for (let i = 0; i <= ticks; i++) {
      const value = (max * i) / ticks;
      const y = f.y0 - ((f.y0 - f.y1) * i) / ticks;
      if (side !== "right") svg("line", { x1: f.x0, x2: f.x1, y1: y, y2: y, class: i ? "grid-line" : "baseline" }, g);
      const text = svg(
        "text",
        side === "right"
          ? { x: f.x1 + 6, y: y + 4, "text-anchor": "start" }
          : { x: f.x0 - 6, y: y + 4, "text-anchor": "end" },
        g,
      );
      text.textContent = fmt(value);
    }
  }

  function xAxis(f, rows, stepS) {
    const g = svg("g", { class: "axis" }, f.root);
    const bw = (f.x1 - f.x0) / Math.max(rows.length, 1);
    for (const i of tickIndexes(rows, stepS)) {
      const x = f.x0 + bw * (i + 0.5);
      svg("line", { x1: x, x2: x, y1: f.y0, y2: f.y0 + 4, class: "baseline" }, g);
      const text = svg("text", { x, y: f.y0 + 16, "text-anchor": "middle" }, g);
      text.textContent = timeLabel(rows[i].t, stepS);
    }
  }

  function emptyNote(f, text) {
    const note = svg("text", { x: (f.x0 + f.x1) / 2, y: (f.y0 + f.y1) / 2, "text-anchor": "middle", class: "empty" }, f.root);
    note.textContent = text;
  }

  function legend(id, items) {
    const ul = clear($(id));
    for (const item of items) {
      const li = html("li", { "data-series": item.key }, null, ul);
      const swatch = html("span", { class: "swatch" + (item.line ? " line" : "") }, null, li);
      swatch.style.background = item.color;
      html("span", {}, item.label, li);
      if (item.value !== undefined) html("b", { "data-value": item.rawValue }, item.value, li);
    }
  }

  // -- charts -----------------------------------------------------------------------------
  /** Lines over time with gaps where a row has no data (null), and a dot on every point. */
  function lineChart(container, rows, stepS, series, opts) {
    const f = frame(container, { right: opts.right ? 56 : 14 });
    const axes = {};
    for (const side of ["left", "right"]) {
      const mine = series.filter((s) => (s.axis || "left") === side);
      if (!mine.length) continue;
      const top = opts[side + "Max"] || niceMax(Math.max(0, ...mine.flatMap((s) => rows.map(s.value).filter((v) => v !== null))));
      axes[side] = top;
      yAxis(f, top, opts[side + "Format"], side);
    }
    xAxis(f, rows, stepS);
    const bw = (f.x1 - f.x0) / Math.max(rows.length, 1);
    let drawn = 0;
    for (const s of series) {
      const top = axes[s.axis || "left"];
      const g = svg("g", { "data-series": s.key }, f.root);
      const points = rows.map((r, i) => {
        const v = s.value(r);
        return v === null || v === undefined ? null : [f.x0 + bw * (i + 0.5), f.y0 - ((f.y0 - f.y1) * v) / top, v, r];
      });
      if (s.area) {
        let d = "";
        let open = null;
        points.forEach((p, i) => {
          if (p && open === null) {
            open = p;
            d += `M${p[0]},${f.y0}L${p[0]},${p[1]}`;
          } else if (p) d += `L${p[0]},${p[1]}`;
          if (open && (!points[i + 1] || i === points.length - 1)) {
            d += `L${p[0]},${f.y0}Z`;
            open = null;
          }
        });
        if (d) svg("path", { d, fill: s.color, "fill-opacity": 0.12, stroke: "none" }, g);
      }
      let d = "";
      points.forEach((p, i) => {
        if (!p) return;
        d += (i > 0 && points[i - 1] ? "L" : "M") + `${p[0].toFixed(1)},${p[1].toFixed(1)}`;
      });
      if (d) {
        svg("path", {
          d,
          fill: "none",
          stroke: s.color,
          "stroke-width": s.width || 2,
          "stroke-dasharray": s.dash,
          "stroke-linejoin": "round",
          "stroke-linecap": "round",
        }, g);
      }
      const dots = s.dots !== false && points.filter(Boolean).length <= 200;
      for (const p of points) {
        if (!p) continue;
        drawn++;
        if (!dots) continue;
        const c = svg("circle", { cx: p[0], cy: p[1], r: 2.6, fill: s.color, "data-value": p[2], "data-t": p[3].t }, g);
        tooltip(c, `${fullFormat.format(new Date(p[3].t * 1000))} · ${s.label}: ${s.format(p[2])}`);
      }
    }
    if (!drawn) emptyNote(f, opts.empty || "No data in this range yet");
  }

  /** One stacked column per row; every segment carries its series and value. */
  function stackedBars(container, rows, stepS, series) {
    const f = frame(container);
    const totals = rows.map((r) => series.reduce((sum, s) => sum + (r[s.key] || 0), 0));
    const top = niceMax(Math.max(0, ...totals), true);
    yAxis(f, top, fmtCompact);
    xAxis(f, rows, stepS);
    const bw = (f.x1 - f.x0) / Math.max(rows.length, 1);
    const gap = bw > 6 ? Math.min(3, bw * 0.2) : 0.5;
    const scale = (f.y0 - f.y1) / top;
    const g = svg("g", {}, f.root);
    rows.forEach((r, i) => {
      let y = f.y0;
      for (const s of series) {
        const v = r[s.key] || 0;
        if (!v) continue;
        const h = v * scale;
        y -= h;
        const rect = svg("rect", {
          class: "bar",
          x: (f.x0 + bw * i + gap / 2).toFixed(2),
          y: y.toFixed(2),
          width: Math.max(bw - gap, 0.8).toFixed(2),
          height: Math.max(h, 0.5).toFixed(2),
          rx: bw > 8 ? 2 : 0,
          fill: s.color,
          "data-series": s.key,
          "data-value": v,
          "data-t": r.t,
        }, g);
        tooltip(rect, `${fullFormat.format(new Date(r.t * 1000))} · ${s.label}: ${fmtInt(v)}`);
      }
    });
    if (!totals.some((t) => t > 0)) emptyNote(f, "No requests in this range yet");
  }

  /** TTFT p50/p95 per class as horizontal bars on a log scale (hits and misses differ by orders of magnitude). */
  function ttftChart(container, ttft) {
    const classes = ["hit", "miss", "coalesced"].filter((c) => c !== "coalesced" || (ttft.coalesced && ttft.coalesced.count));
    const f = frame(container, { left: 86, right: 70, top: 8, bottom: 24 });
    const values = classes.flatMap((c) => [ttft[c].p50, ttft[c].p95]).filter((v) => v !== null && v > 0);
    if (!values.length) {
      emptyNote(f, "No answers in this range yet");
      return;
    }
    const lo = Math.pow(10, Math.floor(Math.log10(Math.min(...values, 1))));
    const hi = Math.pow(10, Math.ceil(Math.log10(Math.max(...values) * 1.05)));
    const x = (v) => f.x0 + ((f.x1 - f.x0) * (Math.log10(Math.max(v, lo)) - Math.log10(lo))) / (Math.log10(hi) - Math.log10(lo));
    const axis = svg("g", { class: "axis" }, f.root);
    for (let p = lo; p <= hi * 1.0001; p *= 10) {
      svg("line", { x1: x(p), x2: x(p), y1: f.y1, y2: f.y0, class: "grid-line" }, axis);
      const t = svg("text", { x: x(p), y: f.y0 + 16, "text-anchor": "middle" }, axis);
      t.textContent = fmtMs(p);
    }
    const band = (f.y0 - f.y1) / classes.length;
    const barH = Math.min(16, band / 3);
    classes.forEach((c, i) => {
      const cy = f.y1 + band * (i + 0.5);
      const label = svg("text", { x: f.x0 - 10, y: cy + 4, "text-anchor": "end", class: "row-label" }, f.root);
      label.textContent = c === "hit" ? "hits" : c === "miss" ? "misses" : "coalesced";
      [["p50", -barH / 2 - 2, 1], ["p95", barH / 2 + 2, 0.45]].forEach(([q, dy, opacity]) => {
        const v = ttft[c][q];
        if (v === null || v === undefined) return;
        const color = c === "hit" ? COLORS.hit : c === "miss" ? COLORS.miss : COLORS.coalesced;
        const y = cy + dy - barH / 2;
        const rect = svg("rect", {
          class: "bar",
          x: f.x0,
          y,
          width: Math.max(x(v) - f.x0, 2),
          height: barH,
          rx: 3,
          fill: color,
          "fill-opacity": opacity,
          "data-series": `${c}-${q}`,
          "data-value": v,
        }, f.root);
        tooltip(rect, `${label.textContent} ${q}: ${fmtMs(v)} (${ttft[c].count} answers)`);
        const text = svg("text", { x: Math.max(x(v), f.x0 + 2) + 6, y: y + barH / 2 + 4, class: "value-label" }, f.root);
        text.textContent = `${q} ${fmtMs(v)}`;
      });
    });
  }

  /** Horizontal bars as HTML (labels wrap and truncate better than SVG text). */
  function barList(container, groups, emptyText) {
    clear(container);
    const any = groups.some((g) => g.items.length);
    if (!any) {
      html("div", { class: "none" }, emptyText, container);
      return;
    }
    for (const group of groups) {
      if (!group.items.length) continue;
      if (group.title) html("h3", {}, group.title, container);
      const max = Math.max(...group.items.map((i) => i.value), 1);
      for (const item of group.items) {
        const row = html("div", { class: "bar-row", "data-key": item.key, "data-value": item.value }, null, container);
        row.title = `${item.title || item.label}: ${fmtInt(item.value)}`;
        html("span", { class: "label" }, item.label, row);
        const fill = html("div", { class: "fill" }, null, html("div", { class: "track" }, null, row));
        fill.style.width = `${(100 * item.value) / max}%`;
        fill.style.background = item.color;
        html("span", { class: "count" }, item.text || fmtInt(item.value), row);
      }
    }
  }

  // -- rendering ----------------------------------------------------------------------------
  function renderKpis(s) {
    const req = s.requests;
    setValue("kpi-requests", fmtInt(req.total), req.total);
    setValue("kpi-answered", fmtInt(req.answered), req.answered);
    setValue("kpi-failed", fmtInt(req.failed), req.failed);
    setValue("kpi-hit-ratio", fmtPct(s.hit_ratio.overall), s.hit_ratio.overall);
    setValue("kpi-ratio-exact", fmtPct(s.hit_ratio.exact), s.hit_ratio.exact);
    setValue("kpi-ratio-semantic", fmtPct(s.hit_ratio.semantic), s.hit_ratio.semantic);
    setValue("kpi-ratio-coalesced", fmtPct(s.hit_ratio.coalesced), s.hit_ratio.coalesced);
    setValue("kpi-avoided", fmtInt(s.provider_calls.avoided), s.provider_calls.avoided);
    setValue("kpi-made", fmtInt(s.provider_calls.made), s.provider_calls.made);
    setValue("kpi-tokens-saved", fmtCompact(s.saved.tokens), s.saved.tokens);
    setValue("kpi-saved-in", fmtCompact(s.saved.input_tokens), s.saved.input_tokens);
    setValue("kpi-saved-out", fmtCompact(s.saved.output_tokens), s.saved.output_tokens);
    setValue("kpi-cost-saved", fmtUsd(s.saved.cost_usd), s.saved.cost_usd);
    setValue("kpi-cost-paid", fmtUsd(s.tokens.cost_usd), s.tokens.cost_usd);
    const hit = s.ttft_ms.hit.p50;
    const miss = s.ttft_ms.miss.p50;
    setValue("kpi-ttft-hit", fmtMs(hit), hit);
    setValue("kpi-ttft-miss", fmtMs(miss), miss);
    const speedup = hit && miss ? miss / hit : null;
    setValue("kpi-ttft-speedup", speedup ? `${speedup >= 10 ? fmtInt(speedup) : speedup.toFixed(1)}× faster` : "—", speedup);
  }

  function render() {
    if (!state.data) return;
    const { summary, series } = state.data;
    const rows = series.rows;
    const stepS = series.step_s;
    const stepName = stepS === 60 ? "minute" : stepS === 3600 ? "hour" : `${stepS / 60} minutes`;
    document.querySelectorAll(".step-label").forEach((n) => (n.textContent = stepName));

    const banner = $("banner");
    banner.hidden = summary.available !== false;
    banner.textContent = summary.available === false ? "The metrics store (Redis) cannot be read right now: the numbers below are zeros." : "";

    renderKpis(summary);

    const ratioSeries = [
      { key: "exact", label: "exact", color: COLORS.hit, value: (r) => r.exact_ratio },
      { key: "semantic", label: "semantic", color: COLORS.semantic_hit, value: (r) => r.semantic_ratio },
      { key: "overall", label: "all (incl. coalesced)", color: COLORS.overall, dash: "4 4", width: 1.5, dots: false, value: (r) => r.hit_ratio },
    ].map((s) => Object.assign({ format: fmtPct }, s));
    lineChart($("chart-ratio"), rows, stepS, ratioSeries, {
      leftMax: 1,
      leftFormat: (v) => `${Math.round(v * 100)}%`,
      empty: "No cache-eligible requests in this range yet",
    });
    legend("legend-ratio", [
      { key: "exact", label: "exact", color: COLORS.hit, value: fmtPct(summary.hit_ratio.exact), rawValue: summary.hit_ratio.exact },
      { key: "semantic", label: "semantic", color: COLORS.semantic_hit, value: fmtPct(summary.hit_ratio.semantic), rawValue: summary.hit_ratio.semantic },
      { key: "overall", label: "all incl. coalesced", color: COLORS.overall, line: true, value: fmtPct(summary.hit_ratio.overall), rawValue: summary.hit_ratio.overall },
    ]);

    const trafficSeries = ["hit", "semantic_hit", "coalesced", "miss", "bypass", "failed"].map((key) => ({
      key,
      label: OUTCOME_LABELS[key],
      color: COLORS[key],
    }));
    stackedBars($("chart-traffic"), rows, stepS, trafficSeries);
    const counts = Object.assign({}, summary.requests.by_outcome, { failed: summary.requests.failed });
    legend(
      "legend-traffic",
      trafficSeries.map((s) => ({ key: s.key, label: s.label, color: s.color, value: fmtInt(counts[s.key] || 0), rawValue: counts[s.key] || 0 })),
    );

    ttftChart($("chart-ttft"), summary.ttft_ms);
    legend("legend-ttft", [
      { key: "hit", label: `hits (${fmtInt(summary.ttft_ms.hit.count)})`, color: COLORS.hit },
      { key: "miss", label: `misses (${fmtInt(summary.ttft_ms.miss.count)})`, color: COLORS.miss },
      { key: "p95", label: "lighter bar = p95", color: "#475569" },
    ]);

    let tokens = 0;
    let dollars = 0;
    const cumulative = rows.map((r) => {
      tokens += r.saved_tokens;
      dollars += r.saved_cost_usd;
      return { t: r.t, tokens, dollars };
    });
    lineChart(
      $("chart-saved"),
      cumulative,
      stepS,
      [
        { key: "tokens", label: "tokens saved", color: COLORS.tokens, area: true, dots: false, value: (r) => r.tokens, format: fmtCompact },
        { key: "dollars", label: "$ saved", color: COLORS.coalesced, axis: "right", dash: "5 3", dots: false, value: (r) => r.dollars, format: fmtUsd },
      ],
      { right: true, leftFormat: fmtCompact, rightFormat: (v) => (v === 0 ? "$0" : "$" + v.toFixed(v >= 0.1 ? 2 : v >= 0.001 ? 3 : 5)) },
    );
    legend("legend-saved", [
      { key: "tokens", label: "tokens", color: COLORS.tokens, line: true, value: fmtCompact(summary.saved.tokens), rawValue: summary.saved.tokens },
      { key: "dollars", label: "dollars (right axis)", color: COLORS.coalesced, line: true, value: fmtUsd(summary.saved.cost_usd), rawValue: summary.saved.cost_usd },
    ]);

    const tierColors = { small: COLORS.semantic_hit, large: COLORS.coalesced };
    barList(
      $("chart-routes"),
      [
        {
          title: "tiers",
          items: Object.entries(summary.routes.tiers).map(([tier, n]) => ({ key: `tier:${tier}`, label: tier, value: n, color: tierColors[tier] || COLORS.tokens })),
        },
        {
          title: "models",
          items: summary.routes.models.map((m) => ({
            key: `model:${m.provider}/${m.model}`,
            label: m.model,
            title: `${m.provider} / ${m.model}`,
            value: m.count,
            color: COLORS.tokens,
          })),
        },
      ],
      "No generations in this range: everything came from the cache, or nothing was asked.",
    );

    barList(
      $("chart-blocks"),
      [{ items: Object.entries(summary.blocks.by_code).map(([code, n]) => ({ key: `block:${code}`, label: code, value: n, color: COLORS.failed })) }],
      "No questions blocked in this range.",
    );

    const p = summary.provider;
    const attemptColors = { ok: COLORS.hit, error: COLORS.failed, timeout: COLORS.miss, retry: COLORS.bypass };
    barList(
      $("chart-providers"),
      [
        {
          title: "calls",
          items: Object.entries(p.attempts)
            .filter(([, n]) => n > 0)
            .map(([outcome, n]) => ({ key: `attempt:${outcome}`, label: outcome, value: n, color: attemptColors[outcome] || COLORS.tokens })),
        },
        {
          title: "errors by status",
          items: Object.entries(p.by_status).map(([status, n]) => ({ key: `status:${status}`, label: status, value: n, color: COLORS.failed })),
        },
        {
          title: "coalescing",
          items: summary.coalesced_followers
            ? [{ key: "coalesced", label: "followers", value: summary.coalesced_followers, color: COLORS.coalesced }]
            : [],
        },
      ],
      "No provider calls in this range.",
    );

    const tbody = clear($("top-questions").tBodies[0]);
    const questions = summary.top_questions;
    if (!questions.length) {
      const tr = html("tr", { class: "none" }, null, tbody);
      html("td", { colspan: 4 }, "No cache hits in this range yet.", tr);
    }
    const totalHits = questions.reduce((sum, q) => sum + q.hits, 0) || 1;
    const maxHits = Math.max(1, ...questions.map((q) => q.hits));
    questions.forEach((q, i) => {
      const tr = html("tr", { "data-hash": q.hash, "data-value": q.hits }, null, tbody);
      html("td", { class: "rank" }, i + 1, tr);
      html("code", {}, q.hash, html("td", {}, null, tr));
      html("td", { class: "num" }, fmtInt(q.hits), tr);
      const cell = html("td", { class: "share" }, null, tr);
      const row = html("div", { class: "bar-row" }, null, cell);
      html("span", { class: "label" }, `${((100 * q.hits) / totalHits).toFixed(1)}%`, row);
      const fill = html("div", { class: "fill" }, null, html("div", { class: "track" }, null, row));
      fill.style.width = `${(100 * q.hits) / maxHits}%`;
      fill.style.background = COLORS.hit;
    });
  }

  // -- loading ----------------------------------------------------------------------------
  class AuthError extends Error {}

  async function getJSON(url) {
    const headers = { Accept: "application/json", Authorization: `Bearer ${sessionStorage.getItem(KEY_ITEM)}` };
    const response = await fetch(url, { headers, cache: "no-store" });
    if (response.status === 401 || response.status === 403) {
      const body = await response.json().catch(() => ({}));
      throw new AuthError((body.error && body.error.message) || `the server answered ${response.status}`);
    }
    if (!response.ok) throw new Error(`${url.split("?")[0]} answered ${response.status}`);
    return response.json();
  }

  function askForKey(message) {
    document.body.dataset.state = "signin";
    $("status").textContent = "admin key needed";
    $("signin").hidden = false;
    $("signin-error").textContent = message || "";
    $("signin-key").focus();
  }

  async function load() {
    const range = state.range;
    const seq = ++state.seq;
    if (!sessionStorage.getItem(KEY_ITEM)) {
      askForKey("");
      return;
    }
    document.body.dataset.state = "loading";
    try {
      const query = `?range=${encodeURIComponent(range)}`;
      const [summary, series] = await Promise.all([getJSON(`${base}/api/summary${query}`), getJSON(`${base}/api/series${query}`)]);
      if (seq !== state.seq) return; // a newer load (another range) superseded this one
      state.data = { summary, series };
      render();
      state.loads += 1;
      document.body.dataset.range = range;
      document.body.dataset.loads = String(state.loads);
      document.body.dataset.state = "ready";
      $("status").textContent = `updated ${new Date().toLocaleTimeString()}`;
    } catch (error) {
      if (seq !== state.seq) return;
      if (error instanceof AuthError) {
        sessionStorage.removeItem(KEY_ITEM);
        askForKey(error.message);
        return;
      }
      document.body.dataset.state = "error";
      $("status").textContent = "cannot load the metrics";
      const banner = $("banner");
      banner.hidden = false;
      banner.textContent = `The dashboard could not load its data (${error.message}). It retries on the next refresh.`;
    }
  }

  function schedule() {
    if (state.timer) window.clearInterval(state.timer);
    state.timer = state.auto
      ? window.setInterval(() => {
          if (!document.hidden) load();
        }, REFRESH_MS)
      : null;
  }

  function selectRange(range) {
    if (!RANGES.includes(range)) return;
    state.range = range;
    document.querySelectorAll(".range button").forEach((b) => b.setAttribute("aria-pressed", String(b.dataset.range === range)));
    window.history.replaceState(null, "", `#${range}`);
    load();
    schedule(); // the next automatic refresh is a full interval after a manual change
  }

  function start() {
    $("signin").addEventListener("submit", (event) => {
      event.preventDefault();
      const key = $("signin-key").value.trim();
      if (!key) return;
      sessionStorage.setItem(KEY_ITEM, key);
      $("signin-key").value = "";
      $("signin").hidden = true;
      load();
    });
    document.querySelectorAll(".range button").forEach((button) => {
      button.addEventListener("click", () => selectRange(button.dataset.range));
    });
    const auto = $("auto");
    auto.addEventListener("click", () => {
      state.auto = !state.auto;
      auto.setAttribute("aria-pressed", String(state.auto));
      schedule();
      if (state.auto) load();
    });
    window.addEventListener("hashchange", () => {
      const wanted = initialRange();
      if (wanted !== state.range) selectRange(wanted);
    });
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden && state.auto) load();
    });
    let resizeTimer = null;
    window.addEventListener("resize", () => {
      window.clearTimeout(resizeTimer);
      resizeTimer = window.setTimeout(render, 150);
    });
    selectRange(state.range);
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
