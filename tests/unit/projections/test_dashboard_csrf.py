"""The dashboard's forms that change state (sign in, sign out) are refused unless posted from its own page: a
page of another site could sign a browser in with the attacker's token (login CSRF) or sign it out. Before, any
site's form posting ``token=...`` to ``/dashboard/login`` set the dashboard's cookie."""

from __future__ import annotations

import re

import httpx

from tests.unit.projections.test_api import auth
from tests.unit.projections.test_dashboard_pages import FORM, client, form_token

VIEWER = auth("viewer", "acme")["Authorization"].split()[1]
ATTACKER = auth("viewer", "globex")["Authorization"].split()[1]
__all__ = ["client"]  # the dashboard over acme's and globex's accounts, a browser's cookie jar


async def test_a_login_posted_by_another_sites_page_sets_no_cookie(client: httpx.AsyncClient) -> None:
    # The attacker's page posts its own token: the browser has no token cookie of the dashboard's to send (another
    # site's post carries none with SameSite=Strict), and the attacker cannot read one.
    refused = await client.post("/dashboard/login", content=f"token={ATTACKER}&next=/dashboard", headers={
        **FORM, "Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"})
    assert refused.status_code == 403 and "Not signed in" in refused.text
    assert "billing_token" not in client.cookies
    # Even with a token field and the browser's own cookie, a post from another origin is refused.
    csrf = await form_token(client)
    for headers in ({"Origin": "https://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"}):
        refused = await client.post("/dashboard/login", content=f"token={ATTACKER}&csrf={csrf}",
                                     headers={**FORM, **headers})
        assert refused.status_code == 403, headers
        assert "billing_token" not in client.cookies
    # A token field that is not the browser's cookie (the attacker's own, from its visit), or none.
    for field in ("", "&csrf=" + "A" * 43, f"&csrf={csrf[:-1]}"):
        refused = await client.post("/dashboard/login", content=f"token={ATTACKER}{field}", headers=FORM)
        assert refused.status_code == 403, field
        assert "billing_token" not in client.cookies
    # The refusal's page is a fresh form that works.
    again = re.search(r'name="csrf" value="([^"]+)"', refused.text)
    assert again and again.group(1) == csrf


async def test_the_dashboards_own_form_signs_in_and_out(client: httpx.AsyncClient) -> None:
    csrf = await form_token(client)
    signed_in = await client.post("/dashboard/login", content=f"token={VIEWER}&csrf={csrf}", headers={
        **FORM, "Origin": "http://test", "Sec-Fetch-Site": "same-origin"})
    assert signed_in.status_code == 303 and client.cookies.get("billing_token") == VIEWER
    page = await client.get("/dashboard/accounts/acme")
    assert page.status_code == 200
    # The sign-out form carries the token; a sign-out posted without it (another site's page) changes nothing.
    [field] = re.findall(r'action="/dashboard/logout"><input type="hidden" name="csrf" value="([^"]+)"', page.text)
    assert field == csrf
    refused = await client.post("/dashboard/logout", content="", headers={**FORM, "Origin": "https://evil.example"})
    assert refused.status_code == 403 and client.cookies.get("billing_token") == VIEWER
    signed_out = await client.post("/dashboard/logout", content=f"csrf={field}", headers=FORM)
    assert signed_out.status_code == 303 and "billing_token" not in client.cookies


async def test_the_csrf_cookie_is_strict_and_http_only(client: httpx.AsyncClient) -> None:
    page = await client.get("/dashboard/login")
    [cookie] = [c for c in page.headers.get_list("set-cookie") if c.startswith("billing_csrf=")]
    attributes = {part.strip().split("=")[0].lower(): part for part in cookie.split(";")}
    assert "httponly" in attributes and attributes["samesite"].strip().lower() == "samesite=strict"
    assert attributes["path"].strip() == "Path=/dashboard"
    # The browser's token is kept, not replaced, by the next page.
    assert "billing_csrf=" not in " ".join((await client.get("/dashboard/login")).headers.get_list("set-cookie"))


async def test_a_bad_period_filter_is_an_html_page_after_the_tenant_check(client: httpx.AsyncClient) -> None:
    viewer = auth("viewer", "acme")
    bad = await client.get("/dashboard/accounts/acme?year=abc&month=13", headers=viewer)
    assert bad.status_code == 422 and bad.headers["content-type"].startswith("text/html")
    assert "year must be a whole number from 1970 to 9999" in bad.text
    stranger = await client.get("/dashboard/accounts/globex?year=abc", headers=viewer)
    assert stranger.status_code == 403 and stranger.headers["content-type"].startswith("text/html")
