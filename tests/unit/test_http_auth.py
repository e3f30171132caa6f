"""Bearer tokens and problem+json on a real app built by the shared runtime."""

from __future__ import annotations

import jwt
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
