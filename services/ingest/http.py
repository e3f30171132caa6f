"""HTTP routes of the ingest gateway: ``POST /v1/usage`` (up to 1,000 events, gzip accepted) and
``POST /v1/webhooks/{gateway}`` (payment webhooks)."""

from __future__ import annotations

import gzip
import uuid
import zlib
from typing import Annotated, Any

from billing_events.messages import loads_exact
from billing_ingest.payments import PaymentWebhooks
from billing_ingest.service import IngestService
from billing_runtime.auth import Principal, Role, require
from billing_runtime.body_limit import BodyTooLarge
from billing_runtime.problems import Problem, payload_too_large, problem_response
from billing_runtime.settings import Settings
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

UsageSender = Annotated[Principal, Depends(require(Role.SERVICE, Role.ADMIN))]


def body_limits(settings: Settings) -> dict[str, int]:
    """The routes' own request body limits, instead of the app's default (``ServiceParts.body_limits``)."""
    return {"/v1/usage": settings.http_body_bytes_max, "/v1/webhooks/{gateway}": settings.webhook_body_bytes_max}


def build_router(service: IngestService) -> APIRouter:
    router = APIRouter(tags=["ingest"])
    limit = service.settings.http_events_per_request_max
    body_max = service.settings.http_body_bytes_max

    @router.post("/v1/usage", summary="Send usage events",
                 description="One event object, a list of events, or {\"events\": [...]} (at most 1,000). "
                             "Every event gets its own result: accepted, duplicate or rejected with a reason.")
    async def post_usage(request: Request, principal: UsageSender) -> dict[str, Any]:
        body = await read_body_capped(request, body_max)
        if request.headers.get("content-encoding", "").lower() == "gzip":
            try:
                decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
                body = decompressor.decompress(body, body_max + 1)
            except (zlib.error, gzip.BadGzipFile) as exc:
                raise Problem(400, "Bad request", "The gzip body could not be decompressed.",
                              kind="bad-gzip") from exc
        if len(body) > body_max:
            raise payload_too_large(body_max)
        try:
            data = loads_exact(body)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise Problem(400, "Invalid JSON", f"The body is not valid JSON: {str(exc)[:120]}",
                          kind="invalid-json") from exc
        if isinstance(data, dict) and "events" in data:
            data = data["events"]
        events = data if isinstance(data, list) else [data]
        if not events:
            raise Problem(422, "No events", "Send at least one usage event.", kind="no-events")
        if len(events) > limit:
            raise Problem(413, "Too many events", f"At most {limit} events per request.", kind="too-many-events")
        if principal.tenant is not None:
            foreign = [e for e in events if isinstance(e, dict) and e.get("tenant") not in (principal.tenant,)]
            if foreign:
                raise Problem(403, "Forbidden", "This token may only send usage for its own tenant.",
                              kind="forbidden")
        request_id = request.headers.get("x-request-id") or str(uuid.uuid4())
        outcomes = await service.process([(e, f"http:{request_id}:{i}") for i, e in enumerate(events)])
        results = [dict(o.as_dict(), index=i) for i, o in enumerate(outcomes)]
        return {
            "accepted": sum(o.status == "accepted" for o in outcomes),
            "duplicates": sum(o.status == "duplicate" for o in outcomes),
            "rejected": sum(o.status == "rejected" for o in outcomes),
            "results": results,
        }

    return router


async def read_body_capped(request: Request, body_max: int) -> bytes:
    """The raw body, refused with 413 as soon as it exceeds ``body_max`` bytes (never buffered beyond it):
    ``BodyTooLarge``, answered as the app's body limit answers (the 413 at once, then the rest of the body dropped,
    then the connection closed: ``billing_runtime.body_limit.refuse``)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > body_max:
        raise BodyTooLarge(body_max, unread=int(declared), body_started=False)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await request.receive()
        if message["type"] != "http.request":
            raise ClientDisconnect
        chunk, more = message.get("body", b""), message.get("more_body", False)
        size += len(chunk)
        if size > body_max:
            raise BodyTooLarge(body_max, unread=None if more else 0, body_started=True)
        chunks.append(chunk)
        if not more:
            return b"".join(chunks)


def build_webhook_router(webhooks: PaymentWebhooks, body_max: int) -> APIRouter:
    router = APIRouter(tags=["payments"])

    @router.post("/v1/webhooks/{gateway}", summary="Payment gateway webhook",
                 description="Called by Stripe, Razorpay or PayPal (no bearer token: the gateway's signature over "
                             "the raw body is the authentication). A verified event is re-checked with the "
                             "gateway's API before a payment notification is published; a forged, expired, "
                             "tampered or replayed webhook is refused with problem+json and changes nothing.")
    async def post_webhook(gateway: str, request: Request) -> Response:
        if gateway not in webhooks.gateways:  # before reading a byte of an unknown gateway's body
            return problem_response(404, "Not found", f"No payment gateway {gateway!r} is enabled here.",
                                    kind="unknown-gateway", instance=request.url.path)
        body = await read_body_capped(request, body_max)
        result = await webhooks.handle(gateway, body, request.headers)
        if result.problem is not None:
            return problem_response(result.status, _TITLES.get(result.status, "Webhook refused"), result.detail,
                                    kind=result.problem, instance=request.url.path, event_id=result.event_id)
        return JSONResponse(result.body(), status_code=result.status)

    return router


_TITLES = {400: "Webhook refused", 404: "Not found", 409: "Webhook replayed", 422: "Payment not confirmed",
           502: "Gateway unavailable", 503: "Try again later"}
