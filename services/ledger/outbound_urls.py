"""Tenant-set outbound URLs (the alerts ``webhook_url``): refused when they point at private addresses (SSRF).

A tenant admin sets the URL and the ledger POSTs to it, so without a check a tenant could make the ledger call
``127.0.0.1``, ``10.0.0.0/8``, ``169.254.169.254`` (cloud metadata), ``::1`` or ``localhost``. Checked twice:

- when set (``check_url``): the scheme, and a host that is an IP literal or a local name must be public;
- at send time (``public_address``): every address the host resolves to must be public, so a name that resolved
  publicly when set and privately now (DNS rebinding) is refused; and the request goes to exactly the address that
  was checked (``PinnedTransport``). Before, the HTTP client resolved the name again to connect, so a name could
  answer a public address to the check and a private one to the connection a moment later. The URL is unchanged:
  the ``Host`` header, TLS's server name and the certificate check are the name's. A name that does not resolve
  has no address to connect to: the attempt fails as an unreachable endpoint does.

No proxy: the proxy variables of the environment (``HTTPS_PROXY``, ``HTTP_PROXY``, ``ALL_PROXY``, which httpx honours
otherwise) are not used for these requests (``trust_env=False`` in ``alerts.post_signed``), as a proxy resolves the
name itself and connects wherever it points: a private target would be reachable through it. A deployment whose
egress must go through a proxy delivers alert webhooks only with ``BILLING_OUTBOUND_PRIVATE_TARGETS_ALLOWED`` (no
check at all: the proxy's own rules are then the only ones).

``BILLING_OUTBOUND_PRIVATE_TARGETS_ALLOWED=true`` allows private targets (on-premises deployments); default off.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

import httpcore
import httpx

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


async def public_address(url: str) -> str | None:
    """The address to connect to for ``url``: the first its host resolves to now, once every one of them is public
    (raises ``OutboundUrlRefused`` otherwise, or for what ``check_url`` refuses); None if the name does not
    resolve. Connect to it, and to nothing else, with ``PinnedTransport``."""
    check_url(url, private_allowed=False)
    host = _host(url)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return None
    addresses = [str(info[4][0]) for info in infos]
    for address in addresses:
        if _is_private(address):
            raise OutboundUrlRefused(f"host {host!r} resolves to {address}, which is not public")
    return addresses[0] if addresses else None


class _PinnedNetwork(httpcore.AsyncNetworkBackend):
    """httpcore's sockets, except that a connection to ``host`` goes to ``address`` and to no other host."""

    def __init__(self, host: str, address: str | None) -> None:
        self._host = host
        self._address = address
        self._network = httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                          socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None
                          ) -> httpcore.AsyncNetworkStream:
        if host.rstrip(".").lower() != self._host:  # only the checked URL's host (no redirect is followed)
            raise httpcore.ConnectError(f"only {self._host!r} may be connected to, not {host!r}")
        if self._address is None:
            raise httpcore.ConnectError(f"host {host!r} does not resolve")
        return await self._network.connect_tcp(self._address, port, timeout=timeout, local_address=local_address,
                                               socket_options=socket_options)

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None
                                  ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("no unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self._network.sleep(seconds)


class PinnedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport, connecting to ``host`` at ``address`` only (``public_address``: the address that was
    checked); URL, ``Host`` header and TLS (server name, certificate) stay the host's. ``address`` None: the name
    did not resolve, every connection fails (``httpx.ConnectError``).

    httpx takes no network backend, so the connection pool it made is replaced by one with the same TLS settings
    whose backend connects there (tests/unit/payments/test_outbound_urls.py sends through it)."""

    def __init__(self, url: str, address: str | None) -> None:
        super().__init__()
        self._pool = httpcore.AsyncConnectionPool(ssl_context=httpx.create_ssl_context(),
                                                  network_backend=_PinnedNetwork(_host(url), address))
