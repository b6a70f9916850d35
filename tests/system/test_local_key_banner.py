"""`rag-serve --local-key` prints the admin key for a person, never into a JSON log stream
(issue 12, "Also"): the banner is written outside the log scrubber."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from service.cli.serve import LOCAL_KEY_FILE
from service.settings import Settings
from tests.support.servers import BIN, ROOT, cli_env


def _banner(settings: Settings, log_format: str) -> str:
    """rag-serve's stderr up to the banner's curl line; the server is stopped before it serves."""
    env = cli_env(settings, RAG_LOG_FORMAT=log_format, RAG_PORT="0", RAG_LOG_LEVEL="warning", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        [BIN / "rag-serve", "--local-key"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,  # not a terminal: what a log shipper reads
        text=True,
    )
    lines: list[str] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if line.strip().startswith("curl "):
                break
    finally:
        proc.kill()
        proc.wait()
    return "".join(lines)


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_the_key_is_printed_only_outside_json_logs(settings: Settings, log_format: str, tmp_path: Path) -> None:
    banner = _banner(settings, log_format)
    key = (settings.data_dir / LOCAL_KEY_FILE).read_text().strip()
    assert key.startswith("rck_") and "curl " in banner, banner
    if log_format == "json":
        assert key not in banner and key.split("_")[2] not in banner
        assert "not printed" in banner and str(settings.data_dir / LOCAL_KEY_FILE) in banner
    else:
        assert f"Bearer {key}" in banner  # `make run`: the point is to show it
