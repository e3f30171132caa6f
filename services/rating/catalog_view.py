"""Rating's view of the catalogue: every price parsed once per catalogue version.

Validation for authoring lives here too (``validate_document``): the CLI and the admin routes run it
before anything reaches the ledger, so a catalogue with an unknown meter, unordered tiers, a negative
amount or an unknown currency is refused with a message naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from billing_events.catalog import STORED, CatalogDocument, MeterDef, PlanDef, nothing_to_publish
from billing_events.money import MoneyError
from billing_rating.charge_models import PriceSpec, PriceSpecError, parse_spec
from billing_rating.pricing import AiPriceTable, parse_ai_price_table
from pydantic import ValidationError


class CatalogError(ValueError):
    """A catalogue that cannot be published; the message names the offending field."""


def _scales(document: CatalogDocument) -> dict[str, int]:
    return {"CREDIT": 2, **document.credit_scales()}


def validate_document(data: Any) -> CatalogDocument:
    """The document as published, or a ``CatalogError``. A version replaces the whole catalogue, so a document
    with no meter, plan or package (``{}``: nothing to count or sell) is refused rather than publishing an empty
    one."""
    try:
        document = CatalogDocument.model_validate(data)
    except ValidationError as exc:
        problems = [
            f"{'.'.join(str(p) for p in e.get('loc', ())) or 'catalog'}: {e.get('msg', '').removeprefix('Value error, ')}"
            for e in exc.errors()
        ]
        raise CatalogError("; ".join(problems)) from None
    except MoneyError as exc:
        raise CatalogError(str(exc)) from None
    refused = nothing_to_publish(document)
    if refused:
        raise CatalogError(refused)
    scales = _scales(document)
    for index, meter in enumerate(document.meters):
        try:
            if meter.price is not None:
                parse_spec(meter.price, credit_scales=scales)
            if meter.ai_prices is not None:
                parse_ai_price_table(meter.ai_prices, credit_scales=scales)
        except PriceSpecError as exc:
            raise CatalogError(f"meters[{index}] ({meter.code}): {exc}") from None
    for index, plan in enumerate(document.plans):
        for charge_index, charge in enumerate(plan.charges):
            where = f"plans[{index}] ({plan.code}).charges[{charge_index}]"
            try:
                spec = parse_spec(charge.price, credit_scales=scales)
            except PriceSpecError as exc:
                raise CatalogError(f"{where}: {exc}") from None
            if spec.unit != plan.currency and spec.unit not in scales:
                raise CatalogError(f"{where}: unit {spec.unit!r} is neither the plan currency nor a credit unit")
    return document


def check_meters_kept(document: CatalogDocument, in_use: dict[str, list[str]]) -> None:
    """Refuses a document that removes a meter a subscription's plan charges (``in_use``: meter -> those plans,
    ``meters_of_live_plans``): its usage would be refused as an unknown meter while the subscription, which
    keeps its plan version, goes on billing it. A plan may be left out (no longer sold; subscriptions keep theirs)."""
    kept = {meter.code for meter in document.meters}
    missing = sorted(code for code in in_use if code not in kept)
    if missing:
        named = "; ".join(f"{code!r} (charged by {', '.join(in_use[code])})" for code in missing)
        raise CatalogError(f"meters: a published version replaces the whole catalogue, and this one leaves out "
                           f"meters that plans of live subscriptions charge: {named}")


@dataclass(frozen=True)
class MeterView:
    definition: MeterDef
    spec: PriceSpec | None = None
    ai_table: AiPriceTable | None = None
    error: str | None = None  # why the meter cannot be priced, if it cannot

    @property
    def code(self) -> str:
        return self.definition.code


@dataclass(frozen=True)
class CatalogView:
    version: int = 0
    meters: dict[str, MeterView] = field(default_factory=dict)
    plans: dict[tuple[str, int], PlanDef] = field(default_factory=dict)
    document: dict[str, Any] = field(default_factory=dict)


def build_view(version: int, document: dict[str, Any], plan_history: dict[tuple[str, int], dict[str, Any]]
               ) -> CatalogView:
    parsed = CatalogDocument.model_validate(document, context={STORED: True})  # as the ledger published it
    scales = _scales(parsed)
    meters: dict[str, MeterView] = {}
    for meter in parsed.meters:
        try:
            spec = parse_spec(meter.price, credit_scales=scales) if meter.price is not None else None
            table = parse_ai_price_table(meter.ai_prices, credit_scales=scales) if meter.ai_prices else None
            error = None if (spec or table) else f"meter {meter.code!r} has no price"
            meters[meter.code] = MeterView(meter, spec, table, error)
        except PriceSpecError as exc:
            meters[meter.code] = MeterView(meter, error=f"price of {meter.code!r}: {exc}")
    plans = {key: PlanDef.model_validate(content) for key, content in plan_history.items()}
    return CatalogView(version, meters, plans, document)


ZERO = Decimal(0)
