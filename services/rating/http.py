"""Rating's HTTP routes: catalogue authoring and reading, period close, close lines."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime
from typing import Annotated, Any

from billing_events import ids, topics
from billing_events.catalog import CATALOG_DOCUMENT_BYTES_MAX, CatalogDocument, too_large_to_publish
from billing_events.messages import LedgerCommand
from billing_events.timeutil import parse_timestamp, utcnow
from billing_rating.aggregation import period_of
from billing_rating.catalog_view import CatalogError, check_meters_kept, validate_document
from billing_rating.close import close_period, lines_of
from billing_rating.service import RatingService
from billing_rating.subscriptions import meters_of_live_plans
from billing_rating.text import subunits_text
from billing_runtime.auth import Principal, Role, check_tenant, require, require_operator, require_platform
from billing_runtime.bodies import described_by
from billing_runtime.bus import OutMessage
from billing_runtime.problems import Problem
from fastapi import APIRouter, Body, Depends

# Validated by ``validate_document`` (its refusals are ``invalid-catalog`` problems naming the field and the rating
# checks of every price); the model it validates with describes the body.
CatalogBody = Annotated[dict[str, Any], described_by(CatalogDocument), Body()]
PERIOD = re.compile(r"^\d{4}-(0[1-9]|1[0-2])$")
PERIOD_READ = ("`period`: a calendar month `YYYY-MM` (UTC), or a subscription period by its start with its offset, "
               "as an invoice usage line's `trace.rating_periods` names it (`2026-11-02T00:00:00+00:00`; "
               "URL-encoded). Anything else: 422 `invalid-period`.")


def _now() -> datetime:
    return utcnow()


def publish_command(document: dict[str, Any], issued_by: str) -> LedgerCommand:
    digest = hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()
    return LedgerCommand(command_id=ids.command_id("catalog.publish", digest), kind="catalog.publish",
                         issued_at=utcnow(), issued_by=issued_by, payload={"document": document, "digest": digest})


def build_router(service: RatingService) -> APIRouter:
    router = APIRouter(tags=["catalog"])

    def current() -> dict[str, Any]:
        if not service.catalog.version:
            raise Problem(404, "Not found", "No catalogue has been published yet.", kind="no-catalog")
        return service.catalog.document

    @router.get("/v1/catalog", summary="The current catalogue version")
    async def get_catalog(_: Principal = Depends(require())) -> dict[str, Any]:
        return {"version": service.catalog.version, **current()}

    @router.get("/v1/catalog/meters")
    async def get_meters(_: Principal = Depends(require())) -> dict[str, Any]:
        return {"version": service.catalog.version, "meters": current().get("meters", [])}

    @router.get("/v1/catalog/plans", summary="Plans: name, version, cadence, currency, allowances, status")
    async def get_plans(_: Principal = Depends(require())) -> dict[str, Any]:
        plans = [
            {**plan, "status": "published",
             "allowances": {c["meter"]: c.get("included", "0") for c in plan.get("charges", [])}}
            for plan in current().get("plans", [])
        ]
        return {"version": service.catalog.version, "plans": plans}

    @router.get("/v1/catalog/packages", summary="Credit packages with effective credits and cost per credit")
    async def get_packages(_: Principal = Depends(require())) -> dict[str, Any]:
        return {"version": service.catalog.version, "packages": current().get("packages", [])}

    @router.post("/v1/catalog", status_code=202, summary="Publish a catalogue (operator: platform admin)",
                 description="Validated here (meters, price specs, plans, packages), then recorded by the "
                             "ledger as the next immutable version, which replaces the whole catalogue. Same "
                             "content, same command id. Refused (422 `invalid-catalog`, nothing published): a "
                             "document with no meter, plan or package, and one that leaves out a meter the plan "
                             "of a subscription (not canceled) charges. Refused (413 `catalog-too-large`, nothing "
                             f"published): a document of more than {CATALOG_DOCUMENT_BYTES_MAX:,} bytes as published "
                             "(JSON with every default filled in), which would not fit in one Kafka record. The "
                             "answer's `catalog_digest` names this catalogue: a `credit.grant` command in a credit "
                             "unit it declares may carry it to be applied only once the ledger has published it.")
    async def post_catalog(document: CatalogBody,
                           principal: Principal = Depends(require_operator(Role.ADMIN))) -> dict[str, Any]:
        try:
            parsed = validate_document(document)
            check_meters_kept(parsed, await meters_of_live_plans(service.db))
        except CatalogError as exc:
            raise Problem(422, "Invalid catalogue", str(exc), kind="invalid-catalog") from exc
        published = parsed.model_dump(mode="json")
        too_large = too_large_to_publish(published)
        if too_large:
            raise Problem(413, "Catalogue too large", too_large, kind="catalog-too-large",
                          bytes_max=CATALOG_DOCUMENT_BYTES_MAX)
        command = publish_command(published, f"user:{principal.subject}")
        await service.bus.publish([OutMessage(topics.LEDGER_COMMANDS, str(ids.catalog_id()), command.to_json(),
                                              (("schema", b"ledger.command/v1"),))])
        # The digest names this catalogue: a ``credit.grant`` in a unit it declares may carry it (``catalog_digest``)
        # to be applied once the ledger has published it, whichever partition the ledger reads first.
        return {"command_id": str(command.command_id), "status": "accepted",
                "catalog_digest": command.payload["digest"]}

    @router.post("/v1/rating/periods/{period}/close",
                 summary="Close a billing period (platform admin or service token; idempotent)",
                 description="Closes a calendar month (`YYYY-MM`, UTC) of the accounts billed by calendar month, "
                             "once it has ended: a month that has not ended yet (the current one, or one in the "
                             "future) is refused with 422 `period-not-ended` and nothing is closed.")
    async def post_close(period: str,
                         _: Principal = Depends(require_platform(Role.ADMIN, Role.SERVICE))) -> dict[str, Any]:
        if not (period.isascii() and PERIOD.fullmatch(period)):  # ASCII digits only, no trailing newline
            raise Problem(422, "Invalid period", "Use YYYY-MM.", kind="invalid-period")
        if period >= period_of(_now()):
            # Closed early, the rest of the month's usage would be late (refused under `late_policy: reject`, else
            # billed in the next month) and its max/last/unique_count meters priced on part of it.
            year, month = int(period[:4]), int(period[5:])
            raise Problem(422, "Period not ended",
                          f"{period} has not ended yet: a calendar month (UTC) can be closed from its end on, "
                          f"{year + month // 12:04d}-{month % 12 + 1:02d}-01T00:00:00+00:00.", kind="period-not-ended")
        lines = await close_period(service.db, service.bus, service.catalog, period)
        return {"period": period, "lines": [line.__dict__ for line in lines]}

    @router.get("/v1/rating/periods/{period}/accounts/{tenant}/lines", summary="Closed lines of a tenant",
                description=PERIOD_READ)
    async def get_lines(period: str, tenant: str, principal: Principal = Depends(require())) -> dict[str, Any]:
        check_tenant(principal, tenant)
        lines = [line for key in period_keys(period) for line in await lines_of(service.db, key, tenant)]
        return {"period": period, "tenant": tenant, "lines": [line.__dict__ for line in lines]}

    @router.get("/v1/rating/periods/{period}/accounts/{tenant}/decisions",
                summary="Every rating decision of a tenant in a period, with its inputs (the audit trace)",
                description=PERIOD_READ)
    async def get_decisions(period: str, tenant: str, meter: str | None = None,
                            principal: Principal = Depends(require())) -> dict[str, Any]:
        check_tenant(principal, tenant)
        keys = period_keys(period)
        rows = await service.db.fetch(
            "SELECT r.event_id, r.meter, r.group_key, r.event_time, r.quantity, r.quantity_before, r.quantity_after, "
            "r.amount_subunits, r.unit, r.catalog_version, r.decision, r.output, r.rated_at, f.reason AS refusal, "
            "f.adjustment_subunits FROM rated_events r LEFT JOIN refused_debits f "
            "ON f.account_id = r.account_id AND f.event_id = r.event_id "
            f"WHERE r.tenant = $1 AND r.period IN ({', '.join(f'${i + 2}' for i in range(len(keys)))}) "
            "ORDER BY r.event_time, r.event_id", tenant, *keys)
        decisions = []
        for row in rows:
            if meter and row["meter"] != meter:
                continue
            cause, reason = _trace_of(row["output"])
            decisions.append({
                "event_id": row["event_id"], "meter": row["meter"], "group": row["group_key"],
                "event_time": row["event_time"], "decision": row["decision"], "quantity": row["quantity"],
                "quantity_before": row["quantity_before"], "quantity_after": row["quantity_after"],
                "amount": subunits_text(int(row["amount_subunits"])), "unit": row["unit"],
                "catalog_version": row["catalog_version"], "model": cause.get("model"),
                "operation": cause.get("operation"), "user": cause.get("user"), "rated_at": row["rated_at"],
                "reason": row["refusal"] or reason,
                "refusal_adjustment": (subunits_text(int(row["adjustment_subunits"]))
                                       if row["adjustment_subunits"] is not None else None),
            })
        return {"period": period, "tenant": tenant, "decisions": decisions}

    return router


def _trace_of(output: str | None) -> tuple[dict[str, Any], str | None]:
    """(the cause, the reason of a refusal) of a decision's stored output: a ``usage.debit`` command carries its
    cause; a dead letter (``usage.rejected/v1``: ``no_price``, ``period_closed``, ...) carries the reason and the
    event itself as a JSON string (``payload``), whose properties name the model, operation and user."""
    if not output:
        return {}, None
    message = json.loads(output)
    payload = message.get("payload")
    if isinstance(payload, dict):  # a ledger command
        return payload.get("cause") or {}, None
    event = json.loads(payload) if isinstance(payload, str) else None
    properties = (event.get("properties") if isinstance(event, dict) else None) or {}
    return {key: properties.get(key) for key in ("model", "operation", "user")}, message.get("reason")


def period_keys(period: str) -> list[str]:
    """The rating periods a period read back (lines, decisions) names: a calendar month ``YYYY-MM`` (UTC; accounts
    without a subscription, and usage rated before rating knew of one), or a subscription period by its start with
    its offset, as an invoice usage line's ``trace.rating_periods`` names it (``2026-11-02T00:00:00+00:00``; rating
    keys a subscription's period by ``period_start.isoformat()``): that text, and the same instant written in UTC.
    Anything else is 422 ``invalid-period``: else no period could have any decision."""
    if period.isascii() and PERIOD.fullmatch(period):
        return [period]
    if period.isascii() and len(period) >= len("2026-11-02T00:00Z") and period[10:11] == "T":
        try:
            start = parse_timestamp(period)
        except ValueError:
            pass
        else:
            return list(dict.fromkeys([period, start.isoformat(), start.astimezone(UTC).isoformat()]))
    raise Problem(422, "Invalid period", "Use a calendar month YYYY-MM (2026-11) or a subscription period's start "
                  "as an invoice line's trace names it (2026-11-02T00:00:00+00:00).", kind="invalid-period")
