"""Cross-site request forgery defence for the dashboard's forms that change state: sign in and sign out.

The dashboard keeps its bearer token in a cookie, so a page of another site could make a signed-in browser post to
it, or sign a browser in with the attacker's own token (login CSRF: what the person then does is recorded against
the attacker's account). Two checks, both required for every ``POST`` form:

- a per-browser token (double submit): every dashboard page sets a random ``billing_csrf`` cookie (HttpOnly,
  SameSite=Strict, path ``/dashboard``; Secure over HTTPS) and puts the same value in its forms' hidden ``csrf``
  field; a post whose field does not equal the cookie is refused. Another site can neither read the page nor the
  cookie, and with SameSite=Strict the browser does not even send the cookie with a post from another site;
- the ``Origin`` header, when the browser sends one (every current browser does on a ``POST``), must name this
  host (the ``Host`` header; the scheme is not compared, so a TLS-terminating proxy in front does not matter), and
  ``Sec-Fetch-Site``, when sent, must not say ``cross-site`` or ``same-site``.

A refused post changes nothing (no cookie is set or cleared) and is answered 403 with a fresh form.
"""

from __future__ import annotations

import hmac
import secrets
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import Response

COOKIE = "billing_csrf"
FIELD = "csrf"
COOKIE_PATH = "/dashboard"
TOKEN_BYTES = 32
# Values ``secrets.token_urlsafe(TOKEN_BYTES)`` writes: anything else in the cookie is replaced, not echoed.
_TOKEN_LENGTH = 43
_TOKEN_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
_CROSS_SITE = ("cross-site", "same-site")


class CsrfRefused(Exception):
    """A form post that did not come from this dashboard's own page (the message says why)."""


def _well_formed(value: str) -> bool:
    return len(value) == _TOKEN_LENGTH and set(value) <= _TOKEN_ALPHABET


def form_token(request: Request) -> str:
    """The token this page's forms carry: the browser's own (its cookie), else a new one (``set_cookie`` sets it).
    Kept on the request, so one page's forms all carry the same value."""
    known: str | None = getattr(request.state, "csrf_token", None)
    if known is not None:
        return known
    cookie = request.cookies.get(COOKIE, "")
    token = cookie if _well_formed(cookie) else secrets.token_urlsafe(TOKEN_BYTES)
    request.state.csrf_token = token
    return token


def set_cookie(request: Request, response: Response) -> None:
    """Sets the cookie on a page's response when the page made a new token (the browser had none, or another)."""
    token: str | None = getattr(request.state, "csrf_token", None)
    if token is not None and request.cookies.get(COOKIE) != token:
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict", path=COOKIE_PATH,
                            secure=request.url.scheme == "https")


def check(request: Request, form: dict[str, list[str]]) -> None:
    """Raises ``CsrfRefused`` unless the post comes from a page of this dashboard (see the module doc)."""
    fetch_site = request.headers.get("sec-fetch-site", "").lower()
    if fetch_site in _CROSS_SITE:
        raise CsrfRefused(f"the form was posted from another site (Sec-Fetch-Site: {fetch_site})")
    origin = request.headers.get("origin")
    if origin is not None:
        host = request.headers.get("host", "").lower()
        if origin == "null" or urlsplit(origin).netloc.lower() != host:
            raise CsrfRefused(f"the form was posted from another origin ({origin})")
    cookie = request.cookies.get(COOKIE, "")
    sent = (form.get(FIELD) or [""])[0]
    if not _well_formed(cookie):
        raise CsrfRefused("the form's token cookie is missing (cookies off, or it expired)")
    if not hmac.compare_digest(sent.encode(), cookie.encode()):
        raise CsrfRefused("the form's token does not match this browser's")
