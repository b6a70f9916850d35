"""Collections and permission sets: what a request may read, and the cache unit that follows from it.

Every document belongs to one collection; every API key lists the collections it may read, or
`*` for all of them. A request reads the intersection of its key's collections and its own
`filters.collection`; asking for a collection outside the key's is refused, not silently emptied.

The *permission set* is that intersection, sorted and hashed. It is part of the answer cache's
key, of the semantic cache's scope and of the coalescing key, so two keys that may read exactly
the same collections share answers and in-flight generations, and two that may not never do.
`*` is a token of its own: it stands for "every collection, including those created later", so it
never equals a list of names, even one that names every collection existing today.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

ALL = "*"
DEFAULT = "default"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class CollectionForbiddenError(Exception):
    """The request asked for a collection its key may not read (the names are the caller's own)."""


def valid_name(name: str) -> bool:
    """A collection name: 1-64 letters, digits, `.`, `_`, `-`, starting with a letter or digit."""
    return bool(_NAME.fullmatch(name))


def parse_grant(raw: str | Iterable[str]) -> tuple[str, ...]:
    """A key's collections from `a,b` or a list: sorted, deduplicated; `*` alone means all.

    Raises ValueError for an empty list, a bad name, or `*` mixed with names.
    """
    items = raw.split(",") if isinstance(raw, str) else list(raw)
    names = sorted({item.strip() for item in items if item.strip()})
    if not names:
        raise ValueError("give at least one collection, or '*' for all")
    if ALL in names:
        if len(names) > 1:
            raise ValueError("'*' (every collection) cannot be combined with names")
        return (ALL,)
    bad = [n for n in names if not valid_name(n)]
    if bad:
        raise ValueError(f"invalid collection name {bad[0]!r}: use letters, digits, '.', '_' or '-' (max 64)")
    return tuple(names)


@dataclass(frozen=True)
class PermissionSet:
    """The collections one request may read: sorted names, or `("*",)` for every collection."""

    collections: tuple[str, ...]

    @property
    def everything(self) -> bool:
        return self.collections == (ALL,)

    @property
    def names(self) -> tuple[str, ...] | None:
        """The names to filter retrieval by; None when every collection is readable."""
        return None if self.everything else self.collections

    @property
    def token(self) -> str:
        """The cache's view of the set: a short hash, equal exactly when the sets are equal."""
        canonical = "\n".join(self.collections)
        return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def permission_set(granted: Sequence[str], requested: Sequence[str] = ()) -> PermissionSet:
    """What a request reads: the key's collections (`granted`), narrowed to `requested` if given.

    Raises CollectionForbiddenError if `requested` names a collection outside `granted`.
    """
    grant = parse_grant(granted)
    if not requested:
        return PermissionSet(grant)
    wanted = tuple(sorted(set(requested)))
    if grant != (ALL,) and not set(wanted) <= set(grant):
        raise CollectionForbiddenError("this API key may not read the requested collection")
    return PermissionSet(wanted)


def metric_labels(collections: Sequence[str], labelled: AbstractSet[str]) -> tuple[str, ...]:
    """The `collection` label values one request counts under: its permission set's names when they
    are in the configured list (RAG_METRICS_COLLECTIONS), else `other`; `all` for `*`.

    Bounded by the list (plus `other` and `all`) whatever collections and keys exist.
    """
    if tuple(collections) == (ALL,):
        return ("all",)
    return tuple(sorted({name if name in labelled else "other" for name in collections}))
