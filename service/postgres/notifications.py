"""One Postgres LISTEN connection per worker, relaying NOTIFY payloads to callbacks by channel.

Two channels ride on it: corpus changes (`db.NOTIFY_CHANNEL`, which wakes the corpus watcher) and
revoked API keys (`auth.KEYS_CHANNEL`, which drops the key from the worker's auth cache). A lost
connection is re-opened every `retry_s`; while it is down, subscribers fall back on their own
polling or time-to-live.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import asyncpg

from service.postgres.db import DATABASE_ERRORS
from service.tasks import cancel_and_wait

log = logging.getLogger(__name__)


class NotificationRelay:
    def __init__(self, dsn: str, *, retry_s: float = 5.0) -> None:
        self.dsn = dsn
        self.retry_s = retry_s
        self._callbacks: dict[str, Callable[[str], None]] = {}
        self._connection: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None

    def subscribe(self, channel: str, callback: Callable[[str], None]) -> None:
        """Call `callback(payload)` for every NOTIFY on `channel`; subscribe before `start`."""
        self._callbacks[channel] = callback

    async def start(self) -> None:
        await self.ensure_listening()
        self._task = asyncio.create_task(self._run(), name="notification-relay")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()
            self._connection = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.retry_s)
            await self.ensure_listening()

    async def ensure_listening(self) -> None:
        """(Re)open the connection and LISTEN on every channel, unless it is already open."""
        if self._connection is not None and not self._connection.is_closed():
            return
        try:
            self._connection = await asyncpg.connect(self.dsn, timeout=5)
            for channel, callback in self._callbacks.items():
                await self._connection.add_listener(channel, _payload_to(callback))
        except DATABASE_ERRORS as exc:
            log.warning("cannot LISTEN for corpus changes (%s); polling", type(exc).__name__)
            self._connection = None


def _payload_to(callback: Callable[[str], None]) -> Callable[[object, int, str, str], None]:
    def on_notify(_conn: object, _pid: int, _channel: str, payload: str) -> None:
        callback(payload)

    return on_notify
