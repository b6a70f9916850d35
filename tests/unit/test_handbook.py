"""The demo corpus (examples/) names only settings, commands, options and endpoints that exist.

The handbook is what `make run` answers a newcomer from; a setting or command it invents is a
wrong answer with a citation. These checks read the real settings class, the real CLI apps and the
real routes, so renaming any of them without updating the handbook fails here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import typer

from ingest.cli import app as ingest_app
from service.cli.admin import app as admin_app
from service.cli.serve import app as serve_app
from service.http.app import create_app
from service.settings import Settings
from tests.support.demo import EXAMPLES

TEXT = "\n".join(p.read_text() for p in sorted(EXAMPLES.rglob("*")) if p.is_file())
# Variables the service reads that are not fields of Settings (library conventions).
EXTERNAL_ENV = {"OTEL_EXPORTER_OTLP_ENDPOINT"}


def setting_names() -> set[str]:
    names = set(EXTERNAL_ENV)
    for name, field in Settings.model_fields.items():
        names.add((field.alias or name).upper())
    return names


def command_tree() -> dict[str, set[str]]:
    """`rag-x sub …` → the option names it accepts, for every command path of the three CLIs."""
    tree: dict[str, set[str]] = {}

    def walk(path: str, command: Any) -> None:
        tree[path] = {opt for p in command.params for opt in getattr(p, "opts", [])}
        for name, sub in getattr(command, "commands", {}).items():
            walk(f"{path} {name}", sub)

    for name, app in (("rag-ingest", ingest_app), ("rag-admin", admin_app), ("rag-serve", serve_app)):
        walk(name, typer.main.get_command(app))
    return tree


def test_every_setting_the_handbook_names_exists() -> None:
    named = set(re.findall(r"\b(?:RAG_[A-Z0-9_]+|[A-Z]+_(?:API_KEY|BASE_URL|URL))\b", TEXT))
    assert named, "the handbook should name its settings"
    assert named - setting_names() == set()


def test_every_command_and_option_the_handbook_names_exists() -> None:
    tree = command_tree()
    uses = re.findall(
        r"\b(rag-(?:ingest|admin|serve)(?: [a-z]+){0,2})((?: --?[a-z][a-z-]*(?: [A-Za-z0-9_./*',-]+)?)*)", TEXT
    )
    assert len(uses) > 10
    problems = []
    for words, options in uses:
        path = words
        while path not in tree and " " in path:  # "rag-ingest add docs" → "rag-ingest add"
            path = path.rsplit(" ", 1)[0]
        # Words after a group must be one of its subcommands; after a leaf they are its arguments.
        is_group = any(other.startswith(f"{path} ") for other in tree)
        if path not in tree or (path != words and is_group):
            problems.append(f"unknown command: {words}")
            continue
        for option in re.findall(r"(--?[a-z][a-z-]*)", options):
            if option not in tree[path]:
                problems.append(f"{path} has no option {option}")
    assert not problems, problems


@pytest.mark.parametrize("flag", sorted(set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", TEXT))))
def test_every_flag_belongs_to_some_command(flag: str) -> None:
    assert any(flag in options for options in command_tree().values()), flag


def test_every_endpoint_the_handbook_names_exists(tmp_path: Path) -> None:
    app = create_app(Settings(_env_file=None, data_dir=tmp_path))  # type: ignore[call-arg]
    paths = set(app.openapi()["paths"])
    named = {
        n.rstrip("/.") for n in re.findall(r"(?<![\w.])(/(?:rag|v1|dashboard|metrics|ready|health)[a-z/_]*)", TEXT)
    }
    named -= {"/rag", "/v1"}  # the families, as in "every request to /rag/* and /v1/*"
    assert {"/rag/stream", "/v1/chat/completions"} <= named
    assert named - paths == set()
