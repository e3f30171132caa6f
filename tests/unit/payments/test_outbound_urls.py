"""Alert webhook URLs (tenant-set, posted to by the ledger) never reach private addresses (SSRF), unless the
deployment allows them (BILLING_OUTBOUND_PRIVATE_TARGETS_ALLOWED)."""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from billing_ledger import outbound_urls
from billing_ledger.alerts import process_pending
from billing_ledger.application import LedgerApplication
from billing_ledger.domain.payment_profile import payment_profile_id

from tests.unit.payments.support import TENANT, client, headers, ledger, run

__all__ = ["ledger"]
PRIVATE = ["http://127.0.0.1:8080/hook", "https://10.1.2.3/hook", "http://169.254.169.254/latest/meta-data/",
           "http://[::1]/hook", "http://localhost:9000/hook", "http://[::ffff:127.0.0.1]/x", "http://192.168.0.5/x"]


@pytest.mark.parametrize("url", PRIVATE)
def test_a_private_webhook_url_is_refused_when_set(ledger: LedgerApplication, url: str) -> None:
    http = client(ledger, {})
    response = http.put(f"/v1/accounts/{TENANT}/alerts", headers=headers("admin"),
                        json={"webhook_url": url, "webhook_secret": "k"})
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert "not public" in response.json()["detail"] or "local" in response.json()["detail"]
    assert ledger.read(payment_profile_id(TENANT), lambda p: dict(p.alerts)) in (None, {})


def test_a_public_webhook_url_is_accepted(ledger: LedgerApplication) -> None:
    response = client(ledger, {}).put(f"/v1/accounts/{TENANT}/alerts", headers=headers("admin"),
                                      json={"webhook_url": "https://93.184.215.14/hook", "webhook_secret": "k"})
    assert response.status_code == 200, response.text


def test_private_targets_are_allowed_when_the_deployment_says_so(ledger: LedgerApplication,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BILLING_OUTBOUND_PRIVATE_TARGETS_ALLOWED", "true")
    response = client(ledger, {}).put(f"/v1/accounts/{TENANT}/alerts", headers=headers("admin"),
                                      json={"webhook_url": "http://10.0.0.7/hook", "webhook_secret": "k"})
    assert response.status_code == 200, response.text


async def _low_balance_alert(ledger: LedgerApplication, url: str, monkeypatch: pytest.MonkeyPatch,
                             private_allowed: bool, transport: httpx.AsyncBaseTransport | None | bool = True
                             ) -> tuple[dict[str, object], list[httpx.Request]]:
    """``transport``: True, a mock answering 200 that keeps the requests; None, the network."""
    now = datetime.now(UTC)
    run(ledger, "account.open", "delta", currency="USD", low_balance_threshold="10")
    run(ledger, "credit.grant", "delta", "g", unit="USD", amount="20", grant_key="g", source="manual",
        effective_at=(now - timedelta(hours=1)).isoformat())
    monkeypatch.setenv("BILLING_OUTBOUND_PRIVATE_TARGETS_ALLOWED", "true")  # a name that resolved publicly then
    assert run(ledger, "alerts.configure", "delta", webhook_url=url, webhook_secret="k").outcome == "applied"
    monkeypatch.delenv("BILLING_OUTBOUND_PRIVATE_TARGETS_ALLOWED")
    run(ledger, "usage.debit", "delta", "u1", unit="USD", amount_subunits=15 * 10**9, meter="api_calls",
        at=now.isoformat(), cause={})
    received: list[httpx.Request] = []

    def endpoint(request: httpx.Request) -> httpx.Response:
        received.append(request)
        return httpx.Response(200)

    [alert] = await process_pending(ledger, None, attempts_max=1, private_allowed=private_allowed,
                                    transport=httpx.MockTransport(endpoint) if transport is True else None)
    return alert, received


@pytest.mark.asyncio
async def test_a_name_resolving_to_a_private_address_at_send_time_is_not_posted_to(
        ledger: LedgerApplication, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"http://{socket.gethostname()}:9/hook"  # this machine's name: a loopback or private address
    alert, received = await _low_balance_alert(ledger, url, monkeypatch, private_allowed=False)
    assert alert["webhook"] is False and received == []


@pytest.mark.asyncio
async def test_the_same_name_is_posted_to_when_private_targets_are_allowed(
        ledger: LedgerApplication, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"http://{socket.gethostname()}:9/hook"
    alert, received = await _low_balance_alert(ledger, url, monkeypatch, private_allowed=True)
    assert alert["webhook"] is True and len(received) == 1


@contextmanager
def _endpoint(host: str, port: int) -> Iterator[list[dict[str, str]]]:
    """An HTTP server on ``host``:``port`` answering 200; the headers of each request it received."""
    received: list[dict[str, str]] = []

    class Endpoint(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            received.append({k.lower(): v for k, v in self.headers.items()})
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer((host, port), Endpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield received
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.asyncio
async def test_the_webhook_goes_to_the_address_that_was_checked_not_to_a_rebound_one(
        ledger: LedgerApplication, monkeypatch: pytest.MonkeyPatch) -> None:
    """DNS rebinding between the check and the connection: the name answers a public address to the check and an
    internal one a moment later. Before, the HTTP client resolved the name again and posted to the internal
    service; now the post goes to the address that was checked, with the name in its Host header.

    Two real HTTP servers on this machine stand for the public endpoint (127.0.0.1, taken as public here) and the
    internal service (127.0.0.2); the name's answers come from a resolver that changes its mind."""
    name = "hooks.rebinding.test"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    real_getaddrinfo = socket.getaddrinfo
    answers: list[str] = []

    def rebinding(host: Any, *args: Any, **kwargs: Any) -> Any:
        if (host.decode() if isinstance(host, bytes) else host) != name:  # anyio asks with the name's bytes
            return real_getaddrinfo(host, *args, **kwargs)
        answers.append("127.0.0.1" if not answers else "127.0.0.2")
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (answers[-1], port))]

    def public_is_127_0_0_1(address: str) -> bool:
        ipaddress.ip_address(address)  # a name is not an address (ValueError), as for the real check
        return address != "127.0.0.1"

    with _endpoint("127.0.0.1", port) as public, _endpoint("127.0.0.2", port) as internal:
        monkeypatch.setattr(socket, "getaddrinfo", rebinding)
        monkeypatch.setattr(outbound_urls, "_is_private", public_is_127_0_0_1)
        alert, _ = await _low_balance_alert(ledger, f"http://{name}:{port}/hook", monkeypatch, private_allowed=False,
                                            transport=None)
    assert internal == []
    assert alert["webhook"] is True and len(public) == 1 and public[0]["host"] == f"{name}:{port}"
    assert answers[0] == "127.0.0.1"


@pytest.mark.asyncio
async def test_only_the_checked_host_is_connected_to_at_its_checked_address() -> None:
    transport = outbound_urls.PinnedTransport("https://hooks.example.test/x", None)
    async with httpx.AsyncClient(transport=transport) as client:
        with pytest.raises(httpx.ConnectError, match="does not resolve"):
            await client.post("https://hooks.example.test/x")
        with pytest.raises(httpx.ConnectError, match="only 'hooks.example.test'"):
            await client.post("https://elsewhere.test/x")


PROXY_VARIABLES = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy", "all_proxy")


@pytest.mark.asyncio
@pytest.mark.parametrize("private_allowed", [False, True])
async def test_the_webhook_goes_to_the_checked_address_not_through_the_environments_proxy(
        ledger: LedgerApplication, monkeypatch: pytest.MonkeyPatch, private_allowed: bool) -> None:
    """With ``HTTPS_PROXY`` (and the like) set, httpx sends a request to the proxy, which resolves the name itself
    and connects wherever it points, a private address included. The alert webhook ignores those variables: its
    post goes to the address that was checked. With private targets allowed there is no check, and the same
    environment sends it through the proxy (the deployment's egress).

    A real HTTP server on 127.0.0.1 stands for the endpoint (taken as public here), one on 127.0.0.3 for the proxy."""
    name = "hooks.proxied.test"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    real_getaddrinfo = socket.getaddrinfo

    def resolve(host: Any, *args: Any, **kwargs: Any) -> Any:
        if (host.decode() if isinstance(host, bytes) else host) != name:
            return real_getaddrinfo(host, *args, **kwargs)
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", port))]

    def public_is_127_0_0_1(address: str) -> bool:
        ipaddress.ip_address(address)
        return address != "127.0.0.1"

    with _endpoint("127.0.0.1", port) as endpoint, _endpoint("127.0.0.3", port) as proxy:
        for variable in PROXY_VARIABLES:
            monkeypatch.setenv(variable, f"http://127.0.0.3:{port}")
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        monkeypatch.setattr(socket, "getaddrinfo", resolve)
        monkeypatch.setattr(outbound_urls, "_is_private", public_is_127_0_0_1)
        alert, _ = await _low_balance_alert(ledger, f"http://{name}:{port}/hook", monkeypatch,
                                            private_allowed=private_allowed, transport=None)
    assert alert["webhook"] is True
    if private_allowed:
        assert endpoint == [] and len(proxy) == 1
    else:
        assert proxy == [] and len(endpoint) == 1 and endpoint[0]["host"] == f"{name}:{port}"
