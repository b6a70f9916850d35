"""Who the client is: the peer address, or what a trusted reverse proxy says it is.

Forwarded headers (`X-Forwarded-For`, `X-Forwarded-Proto`) are believed only from the proxies
listed in RAG_TRUSTED_PROXIES (addresses or networks; default none). Anyone else could write
any address there, and the failed-authentication limit, which is kept per client address,
would count each made-up address apart. uvicorn applies the headers before the app runs, so
`rag-serve` (and the test kit) configure it from here rather than from uvicorn's own defaults,
which trust 127.0.0.1.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from service.settings import Settings


def trusted_proxies(settings: Settings) -> list[str]:
    """RAG_TRUSTED_PROXIES as a list (validated by Settings)."""
    return [item.strip() for item in settings.trusted_proxies.split(",") if item.strip()]


def uvicorn_proxy_options(settings: Settings) -> dict[str, Any]:
    """uvicorn.run/Config arguments: forwarded headers honoured only from the trusted proxies."""
    proxies = trusted_proxies(settings)
    if not proxies:
        return {"proxy_headers": False}
    return {"proxy_headers": True, "forwarded_allow_ips": ",".join(proxies)}


def throttle_address(host: str | None) -> str:
    """The unit the failed-authentication limit counts in: one IPv4 address, or one IPv6 /64.

    An IPv6 host is usually given a whole /64, so counting single addresses would let it try
    2^64 times as many keys.
    """
    if not host:
        return "unknown"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host  # a unix socket path or a test client's name: count it as it is
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network(f"{address}/64", strict=False))
    return str(address)
