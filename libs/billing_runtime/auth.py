"""OAuth 2.0 bearer tokens (RFC 6750): JWTs with ``role`` and ``tenant`` claims.

Keys: a shared HS256 secret (the local development key by default, ``BILLING_JWT_SECRET`` in production)
or a JWKS URL (``BILLING_JWKS_URL``, RS256/ES256). A token with a ``tenant`` claim sees only that tenant;
a token without one is platform-wide (admin, finance, service).

Who is an operator is decided here and nowhere else: platform staff, i.e. the admin or finance role WITHOUT a
``tenant`` claim. A token with a ``tenant`` claim is the customer's own (its admin, finance, service or viewer)
whatever its role: it acts on its own account as a customer, never as the platform. Operator actions (catalogue
publish, period close, billing cycle, adjustments, refunds, refund-request review, pool capacity, identity
verification, ...) use ``require_operator``/``require_platform``; a tenant's token gets 403 problem+json there.

A request is refused before anything of it is looked at, so that a stranger gets the same answer whatever it
sends, never a 422 that tells it how the route would have read its request: without a valid bearer token, 401
problem+json with ``WWW-Authenticate``; with a token that may not act on the route (its role, or a tenant addressed
by a ``{tenant}`` in the path or a ``tenant`` query filter its route declares, that the token may not see), 403. The
``require*`` dependencies (the route's *guard*) check the token, its role and the tenant, and FastAPI solves them
before it validates the query, the path's other parameters and the body; the one validation error FastAPI raises
before any dependency, a body that is not JSON, is answered by the guard too (``refused_first``, installed by
``billing_runtime.http``). Routes still call ``check_tenant`` themselves.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import jwt
from fastapi import Request
from fastapi.routing import APIRoute

from billing_runtime.problems import Problem
from billing_runtime.settings import Settings

TOKEN_TTL_SECONDS_DEFAULT = 8 * 3600
# A token that passed verification is taken on trust (same token string) for at most this long, never past its
# own ``exp``: this bounds how long a token stays accepted after its signing key is withdrawn (PyJWKClient
# caches JWKS keys for minutes anyway). The memory holds at most this many tokens (the older half is dropped).
VERIFIED_TOKEN_SECONDS_MAX = 60.0
VERIFIED_TOKENS_MAX = 10_000


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

    @property
    def platform(self) -> bool:
        """A platform-wide token (no ``tenant`` claim): platform staff or a platform service."""
        return self.tenant is None

    def is_operator(self, *roles: Role) -> bool:
        """Platform staff: one of ``roles`` (admin or finance if none given) and no ``tenant`` claim."""
        return self.tenant is None and self.role in (roles or OPERATOR_ROLES)


OPERATOR_ROLES = (Role.ADMIN, Role.FINANCE)


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
    """Verifies bearer tokens, remembering the ones it accepted for a short while.

    Verifying a JWT (signature, audience, issuer, expiry) was a third of the HTTP layer's CPU of a hold and a
    tenth of a balance read's, and a client sends the same token on every request. Only a byte-for-byte
    identical token (signature included) is answered from memory; anything else is verified, with the same
    errors. The memory belongs to this verifier: other keys (another verifier) never trust its entries.
    """

    def __init__(self, settings: Settings, *, seconds_max: float = VERIFIED_TOKEN_SECONDS_MAX,
                 entries_max: int = VERIFIED_TOKENS_MAX, clock: Callable[[], float] = time.time) -> None:
        assert seconds_max >= 0 and entries_max >= 2
        self._settings = settings
        self._jwks = jwt.PyJWKClient(settings.jwks_url) if settings.jwks_url else None
        self._seconds_max = seconds_max
        self._entries_max = entries_max
        self._clock = clock
        self._verified: dict[str, tuple[Principal, float]] = {}  # token -> (principal, trusted until)

    def verify(self, token: str) -> Principal:
        now = self._clock()
        found = self._verified.get(token)
        if found is not None:
            if now < found[1]:
                return found[0]
            del self._verified[token]
        principal, expires = self._verify(token)
        if len(self._verified) >= self._entries_max:
            for stale in list(self._verified)[: self._entries_max // 2]:
                del self._verified[stale]
        self._verified[token] = (principal, min(expires, now + self._seconds_max))
        return principal

    def __len__(self) -> int:
        return len(self._verified)

    def _verify(self, token: str) -> tuple[Principal, float]:
        """The principal of a valid token and its ``exp``; raises ``jwt.PyJWTError`` otherwise."""
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
        expires = claims["exp"]
        if type(expires) not in (int, float):
            raise jwt.InvalidTokenError("exp must be a number")
        return Principal(subject=str(claims["sub"]), role=role, tenant=claims.get("tenant")), float(expires)


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


Guard = Callable[[Request], Awaitable[Principal]]
# The dependencies ``require`` and ``require_platform`` make: a route that depends on one authenticates its requests.
_GUARDS: weakref.WeakSet[Guard] = weakref.WeakSet()


def require(*roles: Role) -> Guard:
    """A FastAPI dependency: an authenticated principal with one of ``roles`` (any role if none given).

    Async on purpose: verifying an HS256 token takes microseconds, and a sync dependency would cost a
    thread-pool round trip on every request (JWKS keys are cached by PyJWKClient after the first fetch).
    """

    async def dependency(request: Request) -> Principal:
        principal = authenticate(request)
        if roles and principal.role not in roles:
            raise Problem(403, "Forbidden", f"This action needs one of the roles: {', '.join(roles)}.",
                          kind="forbidden")
        if principal.tenant is not None:
            check_addressed_tenant(principal, request)
        return principal

    _GUARDS.add(dependency)
    return dependency


def require_platform(*roles: Role) -> Guard:
    """A FastAPI dependency: a platform-wide principal (no ``tenant`` claim) with one of ``roles``.

    For actions of the platform, not of one customer: a tenant-scoped token gets 403 whatever its role.
    """
    assert roles

    async def dependency(request: Request) -> Principal:
        principal = authenticate(request)
        if principal.role not in roles:
            raise Problem(403, "Forbidden", f"This action needs one of the roles: {', '.join(roles)}.",
                          kind="forbidden")
        if principal.tenant is not None:
            raise Problem(403, "Forbidden", f"This is an operator action: it needs a platform-wide token (role "
                          f"{' or '.join(roles)} without a tenant claim); a tenant's own token may not use it.",
                          kind="forbidden")
        return principal

    _GUARDS.add(dependency)
    return dependency


def require_operator(*roles: Role) -> Guard:
    """A FastAPI dependency: platform staff (``Principal.is_operator``): admin or finance if no ``roles``."""
    return require_platform(*(roles or OPERATOR_ROLES))


def _other_tenant() -> Problem:
    return Problem(403, "Forbidden", "This token is scoped to another tenant.", kind="forbidden")


def check_tenant(principal: Principal, tenant: str) -> None:
    if not principal.can_see(tenant):
        raise _other_tenant()


def addressed_tenant(request: Request) -> str | None:
    """The tenant a request is addressed to: its path's ``{tenant}``, else the ``tenant`` query filter of a route
    that declares one (``/v1/reports/...?tenant=``, the dashboard's finance page); None for any other request.
    The path's text as sent, before its pattern is checked: a tenant that is not well-formed is not the token's."""
    tenant = request.path_params.get("tenant")
    if tenant is not None:
        return str(tenant)
    if b"tenant=" not in request.scope.get("query_string", b""):
        return None
    route = request.scope.get("route")
    if isinstance(route, APIRoute) and any(p.alias == "tenant" for p in route.dependant.query_params):
        return request.query_params.get("tenant")
    return None


def check_addressed_tenant(principal: Principal, request: Request) -> None:
    """403 problem+json when ``principal`` may not see the tenant the request is addressed to."""
    tenant = addressed_tenant(request)
    if tenant is not None and not principal.can_see(tenant):
        raise _other_tenant()


def guard_of(route: object) -> Guard | None:
    """The dependency of ``route`` (an ``APIRoute``) that authenticates its requests, if it has one."""
    if not isinstance(route, APIRoute):
        return None
    pending = list(route.dependant.dependencies)
    while pending:
        dependant = pending.pop()
        if dependant.call in _GUARDS:
            return dependant.call
        pending.extend(dependant.dependencies)
    return None


async def refused_first(request: Request) -> Problem | None:
    """The refusal a request gets before its validation errors (``install_problem_handlers``): its route's guard's
    (401 without a valid bearer token, 403 for a role or a tenant the token may not act as or see); on a route
    without one, the 403 of a token that may not see the tenant addressed (``foreign_tenant``). None when the
    request may go on to its validation errors."""
    guard = guard_of(request.scope.get("route"))
    if guard is None:
        return foreign_tenant(request)
    try:
        await guard(request)
    except Problem as refusal:
        return refusal
    return None


def foreign_tenant(request: Request) -> Problem | None:
    """The 403 a request's bearer token gets for the tenant the request is addressed to, if it may not see it;
    None when it may, or when the request has no valid bearer token (the route answers those as it does)."""
    tenant = addressed_tenant(request)
    if tenant is None or not request.headers.get("authorization"):
        return None
    try:
        principal = authenticate(request)
    except Problem:
        return None
    return None if principal.can_see(tenant) else _other_tenant()
