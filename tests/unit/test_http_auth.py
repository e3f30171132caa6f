"""Bearer tokens and problem+json on a real app built by the shared runtime."""

from __future__ import annotations

import time

import jwt
import pytest
from billing_runtime.auth import Principal, Role, check_tenant, mint_token, require
from billing_runtime.http import create_app
from billing_runtime.settings import Settings
from fastapi import Depends
from fastapi.testclient import TestClient

SETTINGS = Settings()


def client() -> TestClient:
    app = create_app("t", SETTINGS)

    @app.get("/v1/accounts/{tenant}/thing")
    def thing(tenant: str, p: Principal = Depends(require(Role.ADMIN, Role.VIEWER))) -> dict[str, str]:
        check_tenant(p, tenant)
        return {"tenant": tenant}

    return TestClient(app)


def test_missing_token_is_401_with_www_authenticate() -> None:
    r = client().get("/v1/accounts/acme/thing")
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == 'Bearer realm="billing"'
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["status"] == 401


def test_forged_and_expired_tokens_are_401_invalid_token() -> None:
    forged = jwt.encode({"sub": "x", "role": "admin", "exp": 9999999999, "aud": "billing", "iss": "billing-local"},
                        "another-key-another-key-another-key", algorithm="HS256")
    expired = mint_token(SETTINGS, role="admin", ttl_seconds=-10)
    for token in (forged, expired, "garbage"):
        r = client().get("/v1/accounts/acme/thing", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 401
        assert 'error="invalid_token"' in r.headers["www-authenticate"]


def test_tenant_tokens_see_only_their_tenant_and_roles_are_enforced() -> None:
    c = client()
    own = {"Authorization": f"Bearer {mint_token(SETTINGS, role='viewer', tenant='acme')}"}
    assert c.get("/v1/accounts/acme/thing", headers=own).status_code == 200
    assert c.get("/v1/accounts/globex/thing", headers=own).status_code == 403
    service = {"Authorization": f"Bearer {mint_token(SETTINGS, role='service')}"}
    r = c.get("/v1/accounts/acme/thing", headers=service)
    assert r.status_code == 403 and r.headers["content-type"] == "application/problem+json"
    platform_admin = {"Authorization": f"Bearer {mint_token(SETTINGS, role='admin')}"}
    assert c.get("/v1/accounts/globex/thing", headers=platform_admin).status_code == 200


def test_health_endpoints_answer() -> None:
    c = client()
    assert c.get("/healthz").json() == {"status": "ok"}
    assert c.get("/readyz").status_code == 200
    assert c.get("/nope").headers["content-type"] == "application/problem+json"


def test_the_verifier_remembers_an_accepted_token_until_the_earlier_of_a_minute_and_its_expiry() -> None:
    from billing_runtime.auth import TokenVerifier

    now = [time.time()]
    verifier = TokenVerifier(SETTINGS, seconds_max=60, clock=lambda: now[0])
    verified = []
    real = verifier._verify
    verifier._verify = lambda token: verified.append(token) or real(token)  # type: ignore[method-assign]
    short = mint_token(SETTINGS, role="viewer", tenant="acme", ttl_seconds=30)
    long = mint_token(SETTINGS, role="viewer", tenant="acme", ttl_seconds=3600)
    principal = verifier.verify(short)
    assert principal.tenant == "acme"
    assert verifier.verify(short) is principal and verifier.verify(long) == principal
    assert verified == [short, long]  # the second call of `short` came from memory
    # A token that differs in one character is verified (and refused), never matched against the memory.
    with pytest.raises(jwt.InvalidSignatureError):
        verifier.verify(short[:-2] + ("A" if short[-2] != "A" else "B") + short[-1])
    now[0] += 45  # past the short token's exp (30 s), within the long one's minute
    verifier.verify(short)
    verifier.verify(long)
    assert verified[-1] == short and verified.count(long) == 1
    now[0] += 30  # past the minute: the long token is verified again too
    verifier.verify(long)
    assert verified.count(long) == 2


def test_the_verifier_memory_is_bounded() -> None:
    from billing_runtime.auth import TokenVerifier

    verifier = TokenVerifier(SETTINGS, entries_max=4)
    for i in range(9):
        verifier.verify(mint_token(SETTINGS, role="service", subject=f"s{i}"))
    assert len(verifier) <= 4
