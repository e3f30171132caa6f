"""OAuth 2.0 bearer tokens (RFC 6750): JWTs with ``role`` and ``tenant`` claims.

Keys: a shared HS256 secret (the local development key by default, ``BILLING_JWT_SECRET`` in production)
or a JWKS URL (``BILLING_JWKS_URL``, RS256/ES256). A token with a ``tenant`` claim sees only that tenant;
a token without one is platform-wide (admin, finance, service).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import jwt
from fastapi import Request

from billing_runtime.problems import Problem
from billing_runtime.settings import Settings

TOKEN_TTL_SECONDS_DEFAULT = 8 * 3600


class Role(StrEnum):
    ADMIN = "admin"
    FINANCE = "finance"
    VIEWER = "viewer"
    SERVICE = "service"


@dataclass(frozen=True)
class Principal:
    subject: str
    role: Role
    tenant: str | None  # None: platform-wide

    def can_see(self, tenant: str) -> bool:
        return self.tenant is None or self.tenant == tenant


def mint_token(settings: Settings, *, role: str, tenant: str | None = None, subject: str | None = None,
               ttl_seconds: int = TOKEN_TTL_SECONDS_DEFAULT) -> str:
    Role(role)  # refuse unknown roles early
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": settings.jwt_issuer, "aud": settings.jwt_audience, "sub": subject or f"{role}@{tenant or 'platform'}",
        "role": role, "iat": now, "exp": now + ttl_seconds,
    }
    if tenant:
        claims["tenant"] = tenant
    return jwt.encode(claims, settings.jwt_secret, algorithm="HS256")


class TokenVerifier:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._jwks = jwt.PyJWKClient(settings.jwks_url) if settings.jwks_url else None

    def verify(self, token: str) -> Principal:
        options = {"require": ["exp", "sub", "role"]}
        if self._jwks is not None:
            key = self._jwks.get_signing_key_from_jwt(token).key
            claims = jwt.decode(token, key, algorithms=["RS256", "ES256"], audience=self._settings.jwt_audience,
                                issuer=self._settings.jwt_issuer, options=options)
        else:
            claims = jwt.decode(token, self._settings.jwt_secret, algorithms=["HS256"],
                                audience=self._settings.jwt_audience, issuer=self._settings.jwt_issuer,
                                options=options)
        try:
            role = Role(claims["role"])
        except ValueError as exc:
            raise jwt.InvalidTokenError(f"unknown role {claims['role']!r}") from exc
        return Principal(subject=str(claims["sub"]), role=role, tenant=claims.get("tenant"))


def _unauthorized(detail: str, error: str = "invalid_token") -> Problem:
    header = f'Bearer realm="billing", error="{error}", error_description="{detail}"'
    if error == "":
        header = 'Bearer realm="billing"'
    return Problem(401, "Unauthorized", detail, kind="unauthorized", headers={"WWW-Authenticate": header})


def authenticate(request: Request) -> Principal:
    verifier: TokenVerifier = request.app.state.token_verifier
    header = request.headers.get("authorization", "")
    if not header:
        raise _unauthorized("A bearer token is required.", error="")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorized("Use the Authorization: Bearer <token> scheme.", error="invalid_request")
    try:
        return verifier.verify(token.strip())
    except jwt.ExpiredSignatureError as exc:
        raise _unauthorized("The token has expired.") from exc
    except jwt.PyJWTError as exc:
        raise _unauthorized(f"The token is not valid: {exc}.") from exc


def require(*roles: Role) -> Callable[[Request], Awaitable[Principal]]:
    """A FastAPI dependency: an authenticated principal with one of ``roles`` (any role if none given).

    Async on purpose: verifying an HS256 token takes microseconds, and a sync dependency would cost a
    thread-pool round trip on every request (JWKS keys are cached by PyJWKClient after the first fetch).
    """

    async def dependency(request: Request) -> Principal:
        principal = authenticate(request)
        if roles and principal.role not in roles:
            raise Problem(403, "Forbidden", f"This action needs one of the roles: {', '.join(roles)}.",
                          kind="forbidden")
        return principal

    return dependency


def check_tenant(principal: Principal, tenant: str) -> None:
    if not principal.can_see(tenant):
        raise Problem(403, "Forbidden", "This token is scoped to another tenant.", kind="forbidden")
