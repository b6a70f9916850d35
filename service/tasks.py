"""Helpers for long-lived asyncio tasks, with no imports of the service's own packages so any of them may use it."""

from __future__ import annotations

import asyncio
import contextlib


async def cancel_and_wait(task: asyncio.Task[None] | None) -> None:
    """Stop a background loop and wait until it has stopped (no-op for None)."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
