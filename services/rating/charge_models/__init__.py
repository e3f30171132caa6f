"""The pure pricing engine: one module per charge model behind one signature (DESIGN.md section 7).

Public API::

    parse_spec(data, *, credit_scales=None) -> PriceSpec      # validate once (catalogue load time)
    price(spec, quantity) -> PriceResult                      # pure, exact, fast; no I/O, no clock

Each model module (``flat``, ``per_unit``, ``graduated``, ``volume``, ``stairstep``, ``package``,
``percentage``) holds its spec class and ``price(spec, quantity)``; this package only validates (a pydantic
discriminated union on ``model``) and dispatches, like a charge-model factory. Adding a model means adding
a module and one entry in :data:`PRICERS`.

Errors: a spec that cannot be used raises :class:`PriceSpecError` (a ``ValueError``) whose message has one
line per problem, each naming the field (``tiers[1].up_to: ...``). A bad *quantity* (float, negative,
NaN, too large) raises ``billing_events.money.MoneyError`` (also a ``ValueError``): it is a usage problem,
not a catalogue one. Amounts are exact Decimals; rounding to ledger sub-units happens in
``billing_rating.pricing``, never here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from decimal import Decimal, Inexact
from typing import Annotated, Any

from billing_events.money import MoneyError
from pydantic import Field, TypeAdapter, ValidationError

from . import flat, graduated, package, per_unit, percentage, stairstep, volume
from .base import (
    DEFAULT_CREDIT_SCALES,
    FIELD_TOKEN,
    PriceLine,
    PriceResult,
    PriceSpecError,
    check_quantity,
    decimal_text,
)
from .flat import FlatSpec
from .graduated import GraduatedSpec
from .package import PackageSpec
from .per_unit import PerUnitSpec
from .percentage import PercentageSpec
from .stairstep import StairstepSpec
from .volume import VolumeSpec

__all__ = [
    "DEFAULT_CREDIT_SCALES",
    "MODELS",
    "FlatSpec",
    "GraduatedSpec",
    "PackageSpec",
    "PerUnitSpec",
    "PercentageSpec",
    "PriceLine",
    "PriceResult",
    "PriceSpec",
    "PriceSpecError",
    "StairstepSpec",
    "VolumeSpec",
    "amount",
    "decimal_text",
    "format_validation_error",
    "parse_spec",
    "price",
]

PriceSpec = Annotated[
    FlatSpec | PerUnitSpec | GraduatedSpec | VolumeSpec | StairstepSpec | PackageSpec | PercentageSpec,
    Field(discriminator="model"),
]

PRICERS: Mapping[type, Callable[[Any, Decimal], PriceResult]] = {
    FlatSpec: flat.price,
    PerUnitSpec: per_unit.price,
    GraduatedSpec: graduated.price,
    VolumeSpec: volume.price,
    StairstepSpec: stairstep.price,
    PackageSpec: package.price,
    PercentageSpec: percentage.price,
}

MODELS: tuple[str, ...] = ("flat", "per_unit", "graduated", "volume", "stairstep", "package", "percentage")

_ADAPTER: TypeAdapter[Any] = TypeAdapter(PriceSpec)


def parse_spec(data: Mapping[str, Any], *, credit_scales: Mapping[str, int] | None = None) -> PriceSpec:
    """Validates a price spec (a mapping, e.g. from the catalogue's JSON or YAML) into a typed spec.

    ``credit_scales`` maps the catalogue's credit unit codes to their minor scale; ``None`` means
    :data:`DEFAULT_CREDIT_SCALES` (``CREDIT`` with scale 2), ``{}`` means currencies only.
    """
    if not isinstance(data, Mapping):
        raise PriceSpecError(f"a price spec must be a mapping with a 'model' key, not {type(data).__name__}")
    scales = DEFAULT_CREDIT_SCALES if credit_scales is None else credit_scales
    try:
        return _ADAPTER.validate_python(dict(data), context={"credit_scales": dict(scales)})
    except ValidationError as exc:
        raise format_validation_error(exc, tagged=True) from None


def price(spec: PriceSpec, quantity: Decimal) -> PriceResult:
    """The exact price of ``quantity`` under ``spec`` with its breakdown; pure and deterministic.

    ``quantity`` is a non-negative Decimal (an int or a decimal string is accepted, a float is refused).
    """
    pricer = PRICERS.get(type(spec))
    if pricer is None:
        raise PriceSpecError(f"price() needs a spec from parse_spec(), not {type(spec).__name__}")
    q = check_quantity(quantity)
    try:
        return pricer(spec, q)
    except Inexact as exc:  # pragma: no cover - needs > 60 significant digits, far past the input bounds
        raise MoneyError("the price does not fit the 60-digit rating precision exactly") from exc


# Models with an amount-only function (no breakdown lines to build): what rating's real-time path needs.
AMOUNTS: Mapping[type, Callable[[Any, Decimal], Decimal]] = {
    PerUnitSpec: per_unit.amount,
    GraduatedSpec: graduated.amount,
}


def amount(spec: PriceSpec, quantity: Decimal) -> Decimal:
    """``price(spec, quantity).amount``, the same exact value, cheaper where the model has an amount-only path."""
    fast = AMOUNTS.get(type(spec))
    if fast is None:
        return price(spec, quantity).amount
    q = check_quantity(quantity)
    try:
        return fast(spec, q)
    except Inexact as exc:  # pragma: no cover - needs > 60 significant digits, far past the input bounds
        raise MoneyError("the price does not fit the 60-digit rating precision exactly") from exc


def format_validation_error(exc: ValidationError, *, tagged: bool = False) -> PriceSpecError:
    """Turns pydantic's errors into one human line per problem, each starting with the field path.

    ``tagged``: the first location element is the discriminator tag of the union; it is dropped so the
    path reads like the spec the user wrote (``tiers[1].up_to``, not ``graduated.tiers.1.up_to``).
    """
    problems: list[str] = []
    for error in exc.errors():
        loc = list(error["loc"])
        kind = error["type"]
        if kind == "union_tag_invalid":
            got = error.get("ctx", {}).get("tag")
            problems.append(f"model: unknown charge model {got!r}; expected one of {', '.join(MODELS)}")
            continue
        if kind == "union_tag_not_found":
            problems.append(f"model: missing; expected one of {', '.join(MODELS)}")
            continue
        if tagged and loc and loc[0] in MODELS:
            loc = loc[1:]
        path = _path(loc)
        original = error.get("ctx", {}).get("error")
        message = str(original) if isinstance(original, Exception) else error["msg"]
        if kind == "extra_forbidden":
            message = "unknown field (check the spelling of the key)"
        elif kind == "missing":
            message = "missing (required)"
        if FIELD_TOKEN in message:
            problems.append(message.replace(FIELD_TOKEN, path or "value"))
        elif path and message.startswith(path):
            problems.append(message)
        else:
            problems.append(f"{path}: {message}" if path else message)
    text = "invalid price spec: " + "; ".join(problems)
    return PriceSpecError(text, problems)


def _path(loc: list[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out
