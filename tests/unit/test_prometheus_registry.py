"""The Prometheus metric objects belong to the app that created them, not to the process."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from service.observability.prometheus import PrometheusMetrics


def samples(prometheus: PrometheusMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(prometheus.exposition().decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_two_apps_in_one_process_count_separately() -> None:
    a, b = PrometheusMetrics(), PrometheusMetrics()  # a second one must not raise "Duplicated timeseries"
    a.requests.labels("hit").inc(3)
    a.requests.labels("miss").inc()
    b.requests.labels("miss").inc()
    in_a, in_b = samples(a), samples(b)
    assert in_a[("ragcache_requests_total", (("outcome", "hit"),))] == 3
    assert ("ragcache_requests_total", (("outcome", "hit"),)) not in in_b
    assert in_a[("ragcache_cache_hit_ratio", (("kind", "exact"),))] == 0.75
    assert in_b[("ragcache_cache_hit_ratio", (("kind", "overall"),))] == 0.0


def test_unlabelled_counters_and_process_metrics_are_exposed_before_any_request() -> None:
    names = {name for name, _ in samples(PrometheusMetrics())}
    assert {"ragcache_provider_calls_avoided_total", "ragcache_cost_usd_total"} <= names
    assert "process_resident_memory_bytes" in names or "python_info" in names
