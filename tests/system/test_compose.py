"""The production stack as files: docker-compose.yml, the Dockerfile, Prometheus and Grafana.

No Docker engine runs here, so the compose file is checked by what `docker-compose config`
(Debian's `docker-compose` 1.29, which `make test` installs) resolves it to, and the
Grafana dashboard's PromQL is checked against the metrics `service/observability/prometheus.py` really
exports: a renamed metric or label must break this test, not a panel in production.

docker-compose 1.29's `config` accepts `--profile` but prints every service whatever the
profile, so which services start by default is read from their `profiles:` keys.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from service.observability.outcomes import ATTEMPT_OUTCOMES, OUTCOMES
from service.observability.prometheus import HitRatios, PrometheusMetrics
from tests.support.compose import SECRETS, run_compose_config
from tests.support.servers import ROOT

DEPLOY = ROOT / "deploy"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
GRAFANA_PROVISIONING = DEPLOY / "grafana" / "provisioning"
GRAFANA_DASHBOARDS = DEPLOY / "grafana" / "dashboards"

DEFAULT_SERVICES = {"api", "postgres", "redis"}
MONITORING_SERVICES = {"prometheus", "grafana"}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


# -- docker-compose config -------------------------------------------------------------------
def compose_config(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The compose file as `docker-compose config` resolves it, from a clean environment.

    Only PATH is inherited and the env file holds only SECRETS and `env`, so a developer's
    shell or `.env` cannot change what is checked.
    """
    result = run_compose_config(tmp_path, {**SECRETS, **(env or {})}, *args)
    assert result.returncode == 0, f"docker-compose config failed:\n{result.stderr}"
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    return config


@pytest.fixture(scope="module")
def compose(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return compose_config(tmp_path_factory.mktemp("compose"))


@pytest.fixture(scope="module")
def compose_monitoring(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return compose_config(tmp_path_factory.mktemp("compose"), "--profile", "monitoring")


def started_by_default(config: dict[str, Any]) -> set[str]:
    return {name for name, svc in config["services"].items() if not svc.get("profiles")}


def workers(command: list[str]) -> int:
    assert "--workers" in command, command
    return int(command[command.index("--workers") + 1])


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> source (an absolute host path for binds, the volume name otherwise)."""
    out = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume["source"], volume["target"]
        out[target] = source
    return out


def test_default_stack_is_api_postgres_redis_and_monitoring_is_a_profile(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == DEFAULT_SERVICES | MONITORING_SERVICES
    assert started_by_default(compose) == DEFAULT_SERVICES
    for name in MONITORING_SERVICES:
        assert services[name]["profiles"] == ["monitoring"], name
    # `docker compose up` without the profile must not need a service of the profile.
    for name in DEFAULT_SERVICES:
        assert set(services[name].get("depends_on", {})) <= DEFAULT_SERVICES, name


def test_monitoring_profile_resolves(compose_monitoring: dict[str, Any]) -> None:
    services = compose_monitoring["services"]
    assert set(services) >= MONITORING_SERVICES
    prometheus, grafana = services["prometheus"], services["grafana"]

    prom_mounts = mounts(prometheus)
    assert Path(prom_mounts["/etc/prometheus/prometheus.yml"]) == PROMETHEUS_CONFIG
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    assert prom_mounts["/prometheus"] in compose_monitoring["volumes"]  # named volume for the TSDB
    assert prometheus["depends_on"]["api"]["condition"] == "service_started"

    graf_mounts = mounts(grafana)
    assert Path(graf_mounts["/etc/grafana/provisioning"]) == GRAFANA_PROVISIONING
    assert Path(graf_mounts["/etc/grafana/dashboards"]) == GRAFANA_DASHBOARDS
    assert graf_mounts["/var/lib/grafana"] in compose_monitoring["volumes"]
    assert grafana["depends_on"]["prometheus"]["condition"] == "service_healthy"
    home = PurePosixPath(grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home.parent == PurePosixPath("/etc/grafana/dashboards")
    assert (GRAFANA_DASHBOARDS / home.name).is_file()


def test_api_service(compose: dict[str, Any]) -> None:
    api = compose["services"]["api"]
    command = api["command"]
    assert command[0] == "rag-serve"
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert workers(command) >= 2
    assert api["build"]["context"] == str(ROOT)
    for dependency in ("postgres", "redis"):
        assert api["depends_on"][dependency]["condition"] == "service_healthy"
    env = api["environment"]
    assert urlsplit(env["DATABASE_URL"]).hostname == "postgres"
    assert urlsplit(env["REDIS_URL"]).hostname == "redis"
    # /metrics needs an admin key; Prometheus sends one (see the comment in docker-compose.yml).
    assert env["RAG_METRICS_PUBLIC"] == "false"
    # Provider settings are passed through when set in the shell, never forced to "" (which
    # would configure a provider without a client).
    assert env["ANTHROPIC_API_KEY"] is None and env["OPENAI_BASE_URL"] is None
    assert "/health" in " ".join(api["healthcheck"]["test"])
    assert any(p["target"] == 8000 if isinstance(p, dict) else p.split("/")[0].endswith(":8000") for p in api["ports"])


def test_worker_count_is_a_compose_variable(tmp_path: Path) -> None:
    config = compose_config(tmp_path, env={"API_WORKERS": "4"})
    assert workers(config["services"]["api"]["command"]) == 4


def test_every_service_has_a_healthcheck_and_a_pinned_image(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        check = service.get("healthcheck")
        assert check and not check.get("disable") and check["test"], f"{name} has no healthcheck"
        if name == "api":
            continue  # built from the Dockerfile (its base image is checked below)
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and tag and tag != "latest" and re.search(r"\d", tag), f"{name}: unpinned image {image}"
    images = {name: service.get("image", "") for name, service in compose["services"].items()}
    assert images["postgres"].startswith("pgvector/pgvector:") and images["postgres"].endswith("-pg17")
    assert images["redis"].split(":")[0] in ("redis", "valkey/valkey")


def test_data_lives_in_named_volumes(compose: dict[str, Any]) -> None:
    services, volumes = compose["services"], compose["volumes"]
    assert mounts(services["postgres"])["/var/lib/postgresql/data"] in volumes
    assert mounts(services["redis"])["/data"] in volumes
    command = " ".join(services["redis"]["command"]).split()  # a shell line (the password stays out of argv)
    assert command[command.index("--appendonly") + 1] == "yes"  # AOF: the cache survives a restart
    # Bounded memory that only evicts keys with a TTL (docs/operations.md, "Bounded memory").
    assert command[command.index("--maxmemory-policy") + 1] == "volatile-lru"
    assert command[command.index("--maxmemory") + 1] == "256mb"


# -- Prometheus and Grafana files ------------------------------------------------------------
def test_prometheus_scrapes_the_api(compose: dict[str, Any]) -> None:
    config = load_yaml(PROMETHEUS_CONFIG)
    targets = []
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            targets += [(job.get("metrics_path", "/metrics"), target) for target in static["targets"]]
    assert ("/metrics", "api:8000") in targets
    # The port is the one the api really listens on.
    command = compose["services"]["api"]["command"]
    assert command[command.index("--port") + 1] == "8000"


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard() -> None:
    datasources = [
        ds
        for path in sorted((GRAFANA_PROVISIONING / "datasources").glob("*.y*ml"))
        for ds in load_yaml(path)["datasources"]
    ]
    assert len(datasources) == 1
    (prometheus,) = datasources
    assert prometheus["type"] == "prometheus"
    assert urlsplit(prometheus["url"]).hostname == "prometheus" and urlsplit(prometheus["url"]).port == 9090

    providers = [
        p for path in (GRAFANA_PROVISIONING / "dashboards").glob("*.y*ml") for p in load_yaml(path)["providers"]
    ]
    assert [p["options"]["path"] for p in providers] == ["/etc/grafana/dashboards"]  # the mount in compose

    dashboards = sorted(GRAFANA_DASHBOARDS.glob("*.json"))
    assert dashboards
    for path in dashboards:
        dashboard = json.loads(path.read_text(encoding="utf-8"))
        for panel in panels(dashboard):
            for item in (panel, *panel.get("targets", [])):
                if "datasource" in item:
                    assert item["datasource"]["uid"] == prometheus["uid"], panel["title"]


# -- the dashboard's PromQL against service/observability/prometheus.py -----------------------------------
def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query of every dashboard."""
    out = []
    for path in sorted(GRAFANA_DASHBOARDS.glob("*.json")):
        for panel in panels(json.loads(path.read_text(encoding="utf-8"))):
            out += [(panel["title"], t["expr"]) for t in panel.get("targets", []) if t.get("expr")]
    return out


@cache
def exported_series() -> dict[str, str]:
    """Sample name -> metric family, for every ragcache metric in the real exposition."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created")}
    names = {}
    exposition = PrometheusMetrics().exposition().decode()
    for family in text_string_to_metric_families(exposition):
        if family.name.startswith("ragcache_"):
            for suffix in suffixes.get(family.type, ("",)):
                names[family.name + suffix] = family.name
    return names


@cache
def family_labels() -> dict[str, frozenset[str]]:
    """Metric family -> its label names, from the metric objects of service/observability/prometheus.py.

    prometheus-client exposes no samples (so no label names) for a labelled metric that has
    not been used yet, so they are read from the metric objects; the hit-ratio gauge is
    computed at scrape time from the request counter, so it is computed here from a
    private registry that has one request.
    """
    labels = {}
    for metric in PrometheusMetrics().all():
        labels[metric._name] = frozenset(metric._labelnames)
    registry = CollectorRegistry()
    Counter("ragcache_requests", "requests", ["outcome"], registry=registry).labels("hit").inc()
    for family in HitRatios(registry).collect():
        labels.setdefault(family.name, frozenset(k for s in family.samples for k in s.labels))
    return labels


# Labels Prometheus itself adds to every scraped series (plus the one deploy/ sets).
TARGET_LABELS = frozenset({"job", "instance", "service"})
# Label values that service/observability/outcomes.py fixes, per (family, label).
KNOWN_VALUES = {
    ("ragcache_requests", "outcome"): set(OUTCOMES),
    ("ragcache_ttft_seconds", "outcome"): set(OUTCOMES),
    ("ragcache_request_latency_seconds", "outcome"): set(OUTCOMES),
    ("ragcache_provider_attempts", "outcome"): set(ATTEMPT_OUTCOMES),
}

_RANGE = re.compile(r"\[[^\]]*\]")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_SELECTOR = re.compile(r"([A-Za-z_:][\w:]*)?\s*\{([^{}]*)\}")
_MATCHER = re.compile(r'\s*([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)')
_NUMBER = re.compile(r"(?<![\w:])\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")
_WORD = re.compile(r"([A-Za-z_:][\w:]*)(\s*\()?")
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan"})


@dataclasses.dataclass
class Query:
    selectors: list[tuple[str, list[tuple[str, str, str]]]]  # (series name, [(label, op, value)])
    grouping: set[str]


def parse_promql(expr: str) -> Query:
    """The series selectors and grouping labels of a PromQL expression (enough for dashboards:
    selectors, aggregations with by/without, functions, arithmetic; no `@` or label_replace)."""
    text = _RANGE.sub(" ", expr)  # [5m], [$__rate_interval], subqueries
    grouping: set[str] = set()
    for match in _GROUPING.finditer(text):
        grouping |= {label.strip() for label in match.group(2).split(",") if label.strip()}
    text = _GROUPING.sub(" ", text)
    selectors = []
    for match in _SELECTOR.finditer(text):
        name, body = match.group(1), match.group(2)
        assert name, f"selector without a metric name in {expr!r}"
        matchers = [(m.group(1), m.group(2), m.group(3)) for m in _MATCHER.finditer(body)]
        assert "".join(m.group(0) for m in _MATCHER.finditer(body)).strip() == body.strip(), f"matchers {body!r}"
        selectors.append((name, matchers))
    text = _NUMBER.sub(" ", _STRING.sub(" ", _SELECTOR.sub(" ", text)))
    for match in _WORD.finditer(text):
        word, call = match.group(1), match.group(2)
        if not call and word.lower() not in _KEYWORDS:
            selectors.append((word, []))
    return Query(selectors, grouping)


def test_promql_parser_on_known_shapes() -> None:
    query = parse_promql(
        'histogram_quantile(0.95, sum by (le) (rate(ragcache_ttft_seconds_bucket{outcome=~"hit|semantic_hit"}'
        "[$__rate_interval]))) / sum(rate(ragcache_requests_total[5m])) * 60"
    )
    assert query.selectors == [
        ("ragcache_ttft_seconds_bucket", [("outcome", "=~", "hit|semantic_hit")]),
        ("ragcache_requests_total", []),
    ]
    assert query.grouping == {"le"}


def test_dashboard_queries_use_only_real_metrics_and_labels() -> None:
    series, labels = exported_series(), family_labels()
    queries = dashboard_queries()
    assert len(queries) >= 20
    used: set[str] = set()
    outcomes: set[str] = set()
    for title, expr in queries:
        query = parse_promql(expr)
        assert query.selectors, f"{title}: no metric in {expr!r}"
        allowed_grouping = set(TARGET_LABELS)
        for name, matchers in query.selectors:
            assert name in series, f"{title}: {name} is not exported by service/observability/prometheus.py ({expr})"
            family = series[name]
            used.add(family)
            allowed = labels[family] | TARGET_LABELS | ({"le"} if name.endswith("_bucket") else set())
            allowed_grouping |= allowed
            for label, op, value in matchers:
                assert label in allowed, f"{title}: {name} has no label {label!r}"
                known = KNOWN_VALUES.get((family, label))
                if known is not None and op in ("=", "=~"):
                    values = set(value.split("|")) if op == "=~" else {value}
                    assert values <= known, f"{title}: {family}{{{label}}} has no value(s) {values - known}"
                    if family == "ragcache_requests":
                        outcomes |= values
        assert query.grouping <= allowed_grouping, f"{title}: unknown grouping label(s) in {expr!r}"

    # What /dashboard shows, Grafana shows: every one of these is on some panel.
    assert {
        "ragcache_requests",  # request rate by outcome, hit ratios, calls made
        "ragcache_request_failures",
        "ragcache_provider_calls_avoided",
        "ragcache_tokens_saved",
        "ragcache_cost_saved_usd",
        "ragcache_tokens",
        "ragcache_cost_usd",
        "ragcache_ttft_seconds",
        "ragcache_routes",
        "ragcache_guardrail_blocks",
        "ragcache_provider_attempts",
        "ragcache_provider_errors",
        "ragcache_provider_retries",
        "ragcache_coalesced_followers",
    } <= used
    assert {"hit", "semantic_hit", "coalesced"} <= outcomes  # exact / semantic / coalesced hit ratios


def test_dashboard_check_catches_a_wrong_name() -> None:
    series = exported_series()
    assert "ragcache_requests_total" in series and "ragcache_ttft_seconds_bucket" in series
    assert "ragcache_request_total" not in series  # singular: a typo the test must catch
    assert "ragcache_requests" not in series  # the family name is not a series of a counter


# -- the image -----------------------------------------------------------------------------------
def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    out = []
    for line in lines:
        instruction, _, args = line.partition(" ")
        out.append((instruction.upper(), args.strip()))
    return out


def test_dockerfile() -> None:
    instructions = dockerfile_instructions()
    stages: list[str] = []
    final: list[tuple[str, str]] = []
    for instruction, args in instructions:
        if instruction == "FROM":
            image, *alias = args.split()
            assert "$" not in image, f"FROM {image}: the base image must be written out (pinned)"
            if image not in stages:
                repository, _, tag = image.partition(":")
                assert repository == "python", image
                assert re.fullmatch(r"3\.11\.\d+-slim(-\w+)?", tag), f"FROM {image}: pin python:3.11.<patch>-slim"
            if alias:
                stages.append(alias[-1])
            final = []
        final.append((instruction, args))
    assert len(stages) >= 1, "multi-stage: the build stage keeps compilers and caches out of the image"

    def last(name: str) -> str:
        found = [args for instruction, args in final if instruction == name]
        assert found, f"no {name} in the final stage"
        return found[-1]

    user = last("USER").split(":")[0]
    assert user not in ("root", "0"), "the image must run as a non-root user"
    assert "/health" in last("HEALTHCHECK")
    assert last("EXPOSE").split() == ["8000"]
    assert json.loads(last("CMD")) == ["rag-serve", "--host", "0.0.0.0", "--workers", "2"]

    runs = " ".join(args for instruction, args in instructions if instruction == "RUN")
    assert '".[local]"' in runs and "embedded" not in runs and "dev]" not in runs
    assert "--extra-index-url" in runs
    assert any(
        args.startswith("TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu")
        for instruction, args in instructions
        if instruction == "ARG"
    ), "torch must come from the CPU index (the default Linux wheel pulls CUDA)"
    local = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    assert "torch==2.13.0" in local["local"]


def test_dockerignore_keeps_secrets_and_state_out_but_not_the_sources() -> None:
    patterns = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".env", ".venv", ".git", ".ragcache"} <= patterns
    copied = {"pyproject.toml", "README.md", "service", "ingest", "examples"}
    assert not copied & patterns
