"""Bearer tokens already verified by this process, remembered for a short while (the query API's hot path).

Verifying a JWT (``billing_runtime.auth.authenticate``: HS256 signature, audience, issuer, expiry) is about a
tenth of the CPU of a balance read, and a client sends the same token on every request. A token string that
passed verification once is remembered with its principal until the earlier of its own expiry (``exp``) and
``VERIFIED_TOKEN_SECONDS_MAX`` from now, then verified again. The key is the whole token, signature included,
so only a byte-for-byte identical token hits; anything else (a new, altered or expired token, a missing or
malformed header) goes through ``authenticate`` exactly as before, with the same errors. The bound on the age
of an entry bounds how long a token stays accepted after its signing key is withdrawn (JWKS: PyJWKClient
caches keys for minutes anyway); the secret or JWKS URL itself only changes with a restart.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable

import orjson
from billing_projections.limits import VERIFIED_TOKEN_SECONDS_MAX, VERIFIED_TOKENS_MAX
from billing_runtime.auth import Principal, authenticate
from fastapi import Request


class VerifiedTokens:
    def __init__(self, seconds_max: float = VERIFIED_TOKEN_SECONDS_MAX, entries_max: int = VERIFIED_TOKENS_MAX,
                 clock: Callable[[], float] = time.time) -> None:
        self._seconds_max = seconds_max
        self._entries_max = entries_max
        self._clock = clock
        self._known: dict[str, tuple[Principal, float]] = {}  # header value -> (principal, trusted until)

    def principal(self, request: Request) -> Principal:
        """``authenticate(request)``, from memory when this exact header was verified recently."""
        header = request.headers.get("authorization", "")
        found = self._known.get(header)
        now = self._clock()
        if found is not None and now < found[1]:
            return found[0]
        principal = authenticate(request)  # raises 401 problems, as ever
        expires = _expiry(header)
        if expires is not None:
            if len(self._known) >= self._entries_max:
                for stale in list(self._known)[: self._entries_max // 2]:
                    del self._known[stale]
            self._known[header] = (principal, min(expires, now + self._seconds_max))
        return principal

    def __len__(self) -> int:
        return len(self._known)


def _expiry(header: str) -> float | None:
    """The ``exp`` claim of a token that just passed verification (so it is well-formed and has one); None if it
    cannot be read (then the token is not remembered)."""
    try:
        payload = header.partition(" ")[2].strip().split(".")[1]
        claims = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        expires = claims["exp"]
    except (IndexError, ValueError, KeyError, TypeError):
        return None
    return float(expires) if type(expires) in (int, float) else None


_STATE = "projections_verified_tokens"


async def reader(request: Request) -> Principal:
    """A FastAPI dependency like ``billing_runtime.auth.require()`` (any role), through the app's own
    ``VerifiedTokens`` (one per app and token verifier: an app with other keys never trusts these)."""
    state = request.app.state
    verifier = getattr(state, "token_verifier", None)
    found = getattr(state, _STATE, None)
    if found is None or found[0] is not verifier:
        found = (verifier, VerifiedTokens())
        setattr(state, _STATE, found)
    return found[1].principal(request)
