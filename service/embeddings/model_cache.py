"""The ONNX export of the packaged all-MiniLM-L6-v2: made once per model directory, then reused.

The export needs torch (the `local` extra), so it runs in a child process: the process that asked
for it (an API worker) never imports torch. The result lands atomically: it is built in a private
temporary directory next to its final place and renamed into place complete, so a crash leaves
no half-written model and concurrent starters (several workers, ingest and serve) wait on a file
lock for the first one's export instead of exporting twice.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MODEL_NAME = "all-MiniLM-L6-v2"
# Bump when service/embeddings/export.py changes what it writes; older exports are then ignored.
# 2: the weights in WEIGHTS_FILE beside the graph, which ONNX Runtime maps instead of copying.
EXPORT_FORMAT = 2
MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"
WEIGHTS_FILE = "model.onnx.data"
TOKENIZER_FILE = "tokenizer.json"
EXPORT_TIMEOUT_S = 900.0
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the directory holding `service/`


class ModelUnavailable(RuntimeError):
    """The ONNX model is neither cached nor exportable here (e.g. the `local` extra is missing)."""


class _InDirectory:
    """A file of an export, as a read-only attribute: `export.model` is `export.directory / MODEL_FILE`."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, export: ExportedModel, owner: type | None = None) -> Path:
        return export.directory / self.name


@dataclass(frozen=True)
class ExportedModel:
    directory: Path

    model = _InDirectory(MODEL_FILE)
    weights = _InDirectory(WEIGHTS_FILE)  # beside the graph: memory-mapped by ONNX Runtime, not copied
    tokenizer = _InDirectory(TOKENIZER_FILE)
    manifest = _InDirectory(MANIFEST)

    def complete(self) -> bool:
        # The manifest is written last, and the directory only appears by rename once complete.
        return self.manifest.is_file()


def exported_model(root: Path, export_format: int = EXPORT_FORMAT) -> ExportedModel:
    """Where the export lives under a model directory (it may not exist yet)."""
    return ExportedModel(root / MODEL_NAME / f"onnx-fp32-v{export_format}")


def _older_export(root: Path) -> ExportedModel | None:
    """The newest complete export of an older format: the same model and vectors, laid out the old
    way (format 1: the weights inside model.onnx, copied into each process instead of mapped)."""
    for export_format in range(EXPORT_FORMAT - 1, 0, -1):
        older = exported_model(root, export_format)
        if older.complete():
            return older
    return None


def ensure_exported(root: Path, *, timeout_s: float = EXPORT_TIMEOUT_S) -> ExportedModel:
    """The cached export under `root`, exporting it first (once, in a child process) if missing.

    Blocking (the export takes ~20 s of CPU); call it from a thread in async code.
    """
    exported = exported_model(root)
    if exported.complete():
        return exported
    parent = exported.directory.parent
    _private_dirs(root, parent)
    lock_fd = os.open(root / f".{MODEL_NAME}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)  # another process may be exporting: wait for it
        if exported.complete():
            return exported
        if importlib.util.find_spec("torch") is None:
            # No torch here (a worker given RAG_MODEL_DIR with an export made by an older
            # version): an export could only fail, so serve the older one straight away.
            return _older_or_raise(root, ModelUnavailable(_needs_local_extra("torch is not installed")))
        if exported.directory.exists():  # a directory without a manifest is not ours to trust
            shutil.rmtree(exported.directory)
        staging = Path(tempfile.mkdtemp(prefix=".export-", dir=parent))  # mode 0700
        try:
            try:
                _run_export(staging, timeout_s)
            except ModelUnavailable as exc:  # the export failed (or timed out) all the same
                return _older_or_raise(root, exc)
            for path in staging.iterdir():
                path.chmod(0o600)
                _fsync(path)
            staging.rename(exported.directory)
            _fsync(parent)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        os.close(lock_fd)  # releases the lock
    return exported


def _older_or_raise(root: Path, failure: ModelUnavailable) -> ExportedModel:
    """An older export to serve rather than not start, since no new one can be made here; else `failure`."""
    older = _older_export(root)
    if older is None:
        raise failure
    log.warning("serving the older ONNX export %s: a new one could not be made here", older.directory.name)
    return older


def _needs_local_extra(reason: str) -> str:
    return (
        f"could not export {MODEL_NAME} to ONNX ({reason}); it needs the `local` extra "
        "(pip install 'ragcache[local]') once, or RAG_MODEL_DIR pointing at an existing export"
    )


def _private_dirs(*dirs: Path) -> None:
    for directory in dirs:
        if not directory.is_dir():
            directory.mkdir(parents=True, exist_ok=True)
            directory.chmod(0o700)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _run_export(staging: Path, timeout_s: float) -> None:
    env = dict(os.environ)
    # The child must import this very code base, whatever the working directory.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PACKAGE_ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        done = subprocess.run(  # noqa: S603 - our own module, run by this interpreter
            [sys.executable, "-m", "service.embeddings.export", str(staging)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ModelUnavailable(f"exporting {MODEL_NAME} to ONNX took over {timeout_s:.0f} s") from exc
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ModelUnavailable(_needs_local_extra(last))
