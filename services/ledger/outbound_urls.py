"""Tenant-set outbound URLs (the alerts ``webhook_url``): refused when they point at private addresses (SSRF).

A tenant admin sets the URL and the ledger POSTs to it, so without a check a tenant could make the ledger call
``127.0.0.1``, ``10.0.0.0/8``, ``169.254.169.254`` (cloud metadata), ``::1`` or ``localhost``. Checked twice:

- when set (``check_url``): the scheme, and a host that is an IP literal or a local name must be public;
- at send time (``check_resolved``): every address the host resolves to must be public, so a name that resolved
  publicly when set and privately now (DNS rebinding) is refused. A host that does not resolve is left to the
  HTTP client (which cannot connect either).

``BILLING_OUTBOUND_PRIVATE_TARGETS_ALLOWED=true`` allows private targets (on-premises deployments); default off.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit

LOCAL_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback")


class OutboundUrlRefused(ValueError):
    """The URL is not an http(s) URL to a public address."""


def _is_private(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast


def _host(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise OutboundUrlRefused("must be an http(s) URL with a host")
    return parts.hostname.rstrip(".").lower()


def check_url(url: str, *, private_allowed: bool) -> None:
    """Raises ``OutboundUrlRefused`` for a non-http(s) URL, or (unless allowed) a private or local host."""
    host = _host(url)
    if private_allowed:
        return
    if host in LOCAL_NAMES or host.endswith(".localhost"):
        raise OutboundUrlRefused(f"host {host!r} is local")
    try:
        private = _is_private(host)
    except ValueError:
        return  # a name: checked again, resolved, at send time
    if private:
        raise OutboundUrlRefused(f"address {host} is not public")


async def check_resolved(url: str, *, private_allowed: bool) -> None:
    """``check_url``, then every address the host resolves to now must be public (DNS rebinding)."""
    check_url(url, private_allowed=private_allowed)
    if private_allowed:
        return
    host = _host(url)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return  # does not resolve: the client cannot connect either
    for info in infos:
        if _is_private(str(info[4][0])):
            raise OutboundUrlRefused(f"host {host!r} resolves to {info[4][0]}, which is not public")
