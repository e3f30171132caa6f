"""Verified bearer tokens are remembered briefly, byte for byte, never past their expiry; the rest is verified."""

from __future__ import annotations

from typing import Any

import pytest
from billing_projections import tokens
from billing_projections.tokens import VerifiedTokens
from billing_runtime.auth import Role, TokenVerifier, mint_token
from billing_runtime.problems import Problem
from billing_runtime.settings import Settings
from starlette.requests import Request

SETTINGS = Settings()


class _App:
    class state:  # shaped like Starlette's app.state
        token_verifier = TokenVerifier(SETTINGS)


def _request(header: str | None) -> Request:
    headers = [] if header is None else [(b"authorization", header.encode())]
    return Request({"type": "http", "method": "GET", "path": "/", "headers": headers, "app": _App})


class _Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def verifications(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every call of the real ``authenticate`` (the header it verified)."""
    calls: list[str] = []
    real = tokens.authenticate

    def counting(request: Request) -> Any:
        calls.append(request.headers.get("authorization", ""))
        return real(request)

    monkeypatch.setattr(tokens, "authenticate", counting)
    return calls


def test_a_verified_token_is_trusted_until_the_bound(verifications: list[str]) -> None:
    import time

    clock = _Clock(time.time())
    known = VerifiedTokens(seconds_max=60, clock=clock)
    header = f"Bearer {mint_token(SETTINGS, role='viewer', tenant='acme')}"
    first = known.principal(_request(header))
    assert first.role is Role.VIEWER and first.tenant == "acme"
    clock.now += 59
    assert known.principal(_request(header)) == first
    assert len(verifications) == 1
    clock.now += 2  # past the bound: verified again
    assert known.principal(_request(header)) == first
    assert len(verifications) == 2


def test_never_past_the_tokens_own_expiry(verifications: list[str]) -> None:
    import time

    clock = _Clock(time.time())
    known = VerifiedTokens(seconds_max=3600, clock=clock)
    header = f"Bearer {mint_token(SETTINGS, role='viewer', tenant='acme', ttl_seconds=5)}"
    known.principal(_request(header))
    clock.now += 4
    known.principal(_request(header))
    assert len(verifications) == 1
    clock.now += 30  # past exp: verified again (PyJWT sees the real time; this token is still valid there)
    known.principal(_request(header))
    assert len(verifications) == 2


def test_bad_or_missing_tokens_are_refused_every_time(verifications: list[str]) -> None:
    known = VerifiedTokens()
    good = mint_token(SETTINGS, role="viewer", tenant="acme")
    forged = good[:-2] + ("AA" if not good.endswith("AA") else "BB")
    expired = mint_token(SETTINGS, role="viewer", tenant="acme", ttl_seconds=-10)
    for header in (None, "Basic abc", f"Bearer {forged}", f"Bearer {expired}", "Bearer not.a.jwt"):
        for _ in range(2):
            with pytest.raises(Problem) as caught:
                known.principal(_request(header))
            assert caught.value.status == 401
    assert len(known) == 0
    assert len(verifications) == 10


def test_an_other_token_of_the_same_subject_is_verified_itself(verifications: list[str]) -> None:
    known = VerifiedTokens()
    one = f"Bearer {mint_token(SETTINGS, role='viewer', tenant='acme', ttl_seconds=100)}"
    other = f"Bearer {mint_token(SETTINGS, role='admin', ttl_seconds=200)}"
    assert known.principal(_request(one)).tenant == "acme"
    assert known.principal(_request(other)).role is Role.ADMIN
    assert known.principal(_request(one)).tenant == "acme"
    assert verifications == [one, other]


def test_the_memory_is_bounded() -> None:
    known = VerifiedTokens(entries_max=10)
    for i in range(25):
        known.principal(_request(f"Bearer {mint_token(SETTINGS, role='viewer', tenant=f't{i}')}"))
    assert len(known) <= 10


async def test_the_dependency_keeps_one_memory_per_app_and_verifier() -> None:
    header = f"Bearer {mint_token(SETTINGS, role='viewer', tenant='acme')}"
    principal = await tokens.reader(_request(header))
    assert principal.tenant == "acme"
    first = _App.state.projections_verified_tokens  # type: ignore[attr-defined]
    assert first[0] is _App.state.token_verifier and len(first[1]) == 1
    _App.state.token_verifier = TokenVerifier(SETTINGS)  # another verifier (other keys): a fresh memory
    await tokens.reader(_request(header))
    assert _App.state.projections_verified_tokens[0] is _App.state.token_verifier  # type: ignore[attr-defined]
