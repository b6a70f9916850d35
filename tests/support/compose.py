"""`docker-compose config` from a clean environment, for the compose tests (no Docker engine needed)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.servers import ROOT

# The secrets compose refuses to start without (the user's .env; deploy/compose.env.example).
SECRETS = {"POSTGRES_PASSWORD": "pgsecret1", "REDIS_PASSWORD": "redissecret2", "GRAFANA_ADMIN_PASSWORD": "grafsecret3"}


def run_compose_config(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`docker-compose [args] config` with only PATH inherited and `env` as the whole env file,
    so a developer's shell or `.env` cannot change what is checked."""
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail(
            "docker-compose is not installed, so docker-compose.yml cannot be validated. Install Debian's "
            "package (`apt-get install docker-compose`, 1.29.x, works without a Docker engine); "
            "`make test` does this when it is missing."
        )
    env_file = tmp_path / "compose.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()), encoding="utf-8")
    files = ["--project-directory", str(ROOT), "-f", str(ROOT / "docker-compose.yml")]
    return subprocess.run(
        [exe, *files, "--env-file", str(env_file), *args, "config"],
        cwd=ROOT,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
