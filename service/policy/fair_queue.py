"""A bounded waiting line served round-robin by key: one key's backlog cannot starve another's.

Pure data structure (no I/O, no clock): service/answer/admission.py puts waiters in it and
takes the next one out when a slot frees.

- `pop` serves keys in turn: the head of the first key's line, then that key goes to the back
  of the rotation. A key that arrives behind a long backlog waits for at most one turn per key.
- `push` on a full queue makes room at the expense of the key with the longest backlog: its
  newest waiter is displaced and returned. If the newcomer's own key would have the longest
  backlog, the newcomer itself is returned (refused) instead.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Generic, TypeVar

T = TypeVar("T")


class FairQueue(Generic[T]):
    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        self.capacity = capacity
        self._lines: OrderedDict[str, deque[T]] = OrderedDict()  # rotation order: first is served next
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def backlog(self, key: str) -> int:
        line = self._lines.get(key)
        return len(line) if line is not None else 0

    def push(self, key: str, item: T) -> T | None:
        """Queue `item` under `key`; returns the waiter that lost its place (maybe `item`), or None."""
        displaced: T | None = None
        if self._size >= self.capacity:
            if not self._lines:  # capacity 0
                return item
            longest = max(self._lines, key=lambda k: len(self._lines[k]))  # first in rotation among equals
            if self.backlog(key) >= len(self._lines[longest]):
                return item
            displaced = self._take(longest, newest=True)
        self._lines.setdefault(key, deque()).append(item)
        self._size += 1
        return displaced

    def pop(self) -> T | None:
        """The next waiter in round-robin order, or None when nobody waits."""
        if not self._lines:
            return None
        key = next(iter(self._lines))
        item = self._take(key, newest=False)
        if key in self._lines:
            self._lines.move_to_end(key)
        return item

    def remove(self, key: str, item: T) -> bool:
        """Take out a waiter that gave up; False when it is no longer queued (served or displaced)."""
        line = self._lines.get(key)
        if line is None or item not in line:
            return False
        line.remove(item)
        self._size -= 1
        if not line:
            del self._lines[key]
        return True

    def _take(self, key: str, *, newest: bool) -> T:
        line = self._lines[key]
        item = line.pop() if newest else line.popleft()
        self._size -= 1
        if not line:
            del self._lines[key]
        return item
