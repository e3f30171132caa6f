"""HTTP routes of the ingest gateway: ``POST /v1/usage`` (up to 1,000 events, gzip accepted)."""

from __future__ import annotations

import gzip
import uuid
import zlib
from typing import Any

from fastapi import APIRouter, Depends, Request

from billing_events.messages import loads_exact
from billing_ingest.service import IngestService
from billing_runtime.auth import Principal, Role, require
from billing_runtime.problems import Problem


def build_router(service: IngestService) -> APIRouter:
    router = APIRouter(tags=["ingest"])
    limit = service.settings.http_events_per_request_max
    body_max = service.settings.http_body_bytes_max

    @router.post("/v1/usage", summary="Send usage events",
                 description="One event object, a list of events, or {\"events\": [...]} (at most 1,000). "
                             "Every event gets its own result: accepted, duplicate or rejected with a reason.")
    async def post_usage(request: Request,
                         principal: Principal = Depends(require(Role.SERVICE, Role.ADMIN))) -> dict[str, Any]:
        body = await request.body()
        if request.headers.get("content-encoding", "").lower() == "gzip":
            try:
                decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
                body = decompressor.decompress(body, body_max + 1)
            except (zlib.error, gzip.BadGzipFile) as exc:
                raise Problem(400, "Bad request", "The gzip body could not be decompressed.",
                              kind="bad-gzip") from exc
        if len(body) > body_max:
            raise Problem(413, "Payload too large", f"Bodies are limited to {body_max} bytes.",
                          kind="payload-too-large")
        try:
            data = loads_exact(body)
        except (ValueError, UnicodeDecodeError) as exc:
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
