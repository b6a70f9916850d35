"""The compose stack's defaults (issue 12, finding 12), as `docker-compose config` resolves them:
secrets the user must provide (compose refuses to start without them), Redis with a password,
metrics private, ports on loopback, and every container with dropped capabilities, a
read-only root, no-new-privileges and a memory limit."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.support.compose import SECRETS, run_compose_config
from tests.support.servers import ROOT


def compose(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run_compose_config(tmp_path, env)


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    result = compose(tmp_path_factory.mktemp("compose"), SECRETS)
    assert result.returncode == 0, result.stderr
    loaded: dict[str, Any] = yaml.safe_load(result.stdout)
    return loaded


@pytest.mark.parametrize("missing", sorted(SECRETS))
def test_compose_refuses_to_start_without_each_secret(tmp_path: Path, missing: str) -> None:
    for value in (None, ""):  # unset, or left empty as in deploy/compose.env.example
        env = {k: v for k, v in SECRETS.items() if k != missing}
        if value is not None:
            env[missing] = value
        result = compose(tmp_path, env)
        assert result.returncode != 0, f"compose started without {missing}"
        assert f"set {missing} in .env" in result.stderr, result.stderr


def test_the_example_env_file_lists_every_secret_and_sets_none() -> None:
    lines = (ROOT / "deploy" / "compose.env.example").read_text(encoding="utf-8").splitlines()
    assignments = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
    assert assignments == dict.fromkeys(SECRETS, "")


def test_secrets_come_from_the_env_file_and_redis_needs_one(config: dict[str, Any]) -> None:
    services = config["services"]
    api_env = services["api"]["environment"]
    assert urlsplit(api_env["DATABASE_URL"]).password == SECRETS["POSTGRES_PASSWORD"]
    assert urlsplit(api_env["REDIS_URL"]).password == SECRETS["REDIS_PASSWORD"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == SECRETS["POSTGRES_PASSWORD"]
    assert services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == SECRETS["GRAFANA_ADMIN_PASSWORD"]
    redis = services["redis"]
    assert redis["environment"]["REDIS_PASSWORD"] == SECRETS["REDIS_PASSWORD"]
    assert redis["environment"]["REDISCLI_AUTH"] == SECRETS["REDIS_PASSWORD"]  # the healthcheck's redis-cli
    command = " ".join(redis["command"])
    assert "requirepass" in command and "redis-server" in command
    assert SECRETS["REDIS_PASSWORD"] not in command  # read from the environment at start, not in argv


def test_metrics_are_private_and_prometheus_sends_a_key(config: dict[str, Any]) -> None:
    assert config["services"]["api"]["environment"]["RAG_METRICS_PUBLIC"] == "false"
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text(encoding="utf-8"))
    (job,) = [j for j in prometheus["scrape_configs"] if j["job_name"] == "ragcache"]
    key_path = job["authorization"]["credentials_file"]
    volumes = [
        v if isinstance(v, str) else f"{v['source']}:{v['target']}:{'ro' if v.get('read_only') else 'rw'}"
        for v in config["services"]["prometheus"]["volumes"]
    ]
    mounted = [v for v in volumes if v.split(":")[1] == key_path]
    assert (
        mounted
        and mounted[0].endswith(":ro")
        and mounted[0].split(":")[0] == str(ROOT / "deploy/prometheus/ragcache.key")
    )
    assert "deploy/prometheus/ragcache.key" in (ROOT / ".gitignore").read_text(encoding="utf-8")


def test_every_port_is_published_on_loopback_only(config: dict[str, Any]) -> None:
    published = [(name, port) for name, svc in config["services"].items() for port in svc.get("ports", [])]
    assert {name for name, _ in published} >= {"api"}
    for name, port in published:
        host_ip = port.get("host_ip") if isinstance(port, dict) else port.split(":")[0]
        assert host_ip == "127.0.0.1", (name, port)


def test_every_container_runs_with_least_privilege(config: dict[str, Any]) -> None:
    for name, service in config["services"].items():
        assert service.get("cap_drop") == ["ALL"], name
        assert service.get("read_only") is True, name
        assert "no-new-privileges:true" in service.get("security_opt", []), name
        assert service.get("mem_limit"), name
        assert set(service.get("cap_add", [])) <= {"CHOWN", "DAC_OVERRIDE", "FOWNER", "SETGID", "SETUID"}, name
    assert not config["services"]["redis"].get("cap_add")
    assert config["services"]["redis"]["user"] == "redis"
