"""The ONNX export cache on a host without torch: straight to an older export, or a clear refusal."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from service.embeddings.model_cache import EXPORT_FORMAT, ModelUnavailable, ensure_exported, exported_model


def _without_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules: `import torch` fails and importlib.util.find_spec("torch") is None.
    monkeypatch.setitem(sys.modules, "torch", None)


def _nothing_new(root: Path) -> bool:
    """No export of the current format, finished or staged, was started under `root`."""
    parent = exported_model(root).directory.parent
    return not exported_model(root).directory.exists() and not list(parent.glob(".export-*"))


def test_without_torch_an_older_export_is_served_without_trying_a_new_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It used to start an export child first (which, without torch, fails) on every worker start."""
    _without_torch(monkeypatch)
    older = exported_model(tmp_path, EXPORT_FORMAT - 1)
    older.directory.mkdir(parents=True)
    older.manifest.write_text("{}")  # complete, as far as the cache can tell
    assert ensure_exported(tmp_path) == older
    assert _nothing_new(tmp_path)


def test_without_torch_and_nothing_older_the_refusal_names_the_local_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _without_torch(monkeypatch)
    with pytest.raises(ModelUnavailable, match=r"torch is not installed.*ragcache\[local\]"):
        ensure_exported(tmp_path)
    assert _nothing_new(tmp_path)
