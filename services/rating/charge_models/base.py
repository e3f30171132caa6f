"""What every charge model shares: results, errors, the spec base class, bands and exact arithmetic.

Why a module of its own: each charge model is a small module with one pure function
``price(spec, quantity) -> PriceResult`` (DESIGN.md section 7). They all need the same result shape, the
same refusal of floats, the same unit validation and the same band bookkeeping, so those live here once.

Exactness. Python's ``Decimal`` operators use the *thread's* context (28 significant digits by default),
which would silently round a 15-digit quantity times an 18-digit price. Every money operation here goes
through :data:`EXACT`, a copy of ``money.RATING_CONTEXT`` (60 digits) that *traps* ``Inexact``: an
arithmetic result that does not fit is refused (``MoneyError``) instead of being rounded quietly. With the
input bounds of ``money.parse_decimal`` (15 integer and 18 fractional digits) that never happens in
practice; the trap is the proof, not a limit anyone should meet.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, Inexact
from functools import cached_property
from typing import Annotated, Any, NamedTuple

from billing_events.money import RATING_CONTEXT, MoneyError, parse_decimal, resolve_unit
from pydantic import BaseModel, ConfigDict, PlainSerializer, PlainValidator, ValidationInfo, field_validator

EXACT = RATING_CONTEXT.copy()
EXACT.traps[Inexact] = True

ZERO = Decimal(0)
ONE = Decimal(1)

# Credit types allowed when the caller passes no catalogue: the service's default credit unit.
DEFAULT_CREDIT_SCALES: Mapping[str, int] = {"CREDIT": 2}

# parse_decimal puts its ``field`` argument in its message; the spec layer does not know the full field
# path inside a validator, so it passes this token and the error formatter substitutes the path.
FIELD_TOKEN = "{field}"


class PriceSpecError(ValueError):
    """A price spec (or price table) that cannot be used, with one human line per problem.

    ``problems`` holds the individual messages, each naming the offending field (``tiers[1].up_to: ...``).
    """

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems: tuple[str, ...] = tuple(problems) or (message,)


@dataclass(frozen=True, slots=True, kw_only=True)
class PriceLine:
    """One line of a price breakdown: ``quantity * unit_amount + flat_amount == amount`` where present."""

    description: str
    quantity: Decimal
    unit_amount: Decimal | None = None
    flat_amount: Decimal | None = None
    amount: Decimal


@dataclass(frozen=True, slots=True)
class PriceResult:
    """The exact (unrounded) price of a quantity; ``amount`` is the sum of the lines' amounts.

    ``lines`` is a tuple so that the frozen result really is immutable.
    """

    amount: Decimal
    unit: str
    lines: tuple[PriceLine, ...]


def zero_result(unit: str) -> PriceResult:
    """Zero quantity costs nothing in every model (no flat fee, no first-band fee): no usage, no charge."""
    return PriceResult(ZERO, unit, ())


def decimal_text(value: Decimal) -> str:
    """Exact plain-notation text of a Decimal (no exponent, no trailing zeros): ``1E+2`` -> ``"100"``."""
    return format(value.normalize(RATING_CONTEXT), "f")


def check_quantity(quantity: Any, field: str = "quantity") -> Decimal:
    """A non-negative, bounded Decimal quantity; floats, NaN, infinities and negatives are refused."""
    if type(quantity) is Decimal and quantity.is_finite() and quantity >= 0 and quantity.adjusted() < 15:
        # Fast path for the hot loop; the fractional-digit bound only matters for absurd inputs, which
        # the EXACT context would refuse anyway.
        return quantity
    return parse_decimal(quantity, field=field)


# --- pydantic field types -------------------------------------------------------------------------------


def _amount(value: Any) -> Decimal:
    return parse_decimal(value, field=FIELD_TOKEN)


def _positive(value: Any) -> Decimal:
    result = parse_decimal(value, field=FIELD_TOKEN)
    if result <= 0:
        raise MoneyError(f"{FIELD_TOKEN} must be greater than zero")
    return result


_as_text = PlainSerializer(decimal_text, return_type=str)

# A non-negative decimal amount or price: strings, ints or Decimals; floats are refused.
Amount = Annotated[Decimal, PlainValidator(_amount), _as_text]
# A strictly positive decimal (band bounds, package sizes).
PositiveDecimal = Annotated[Decimal, PlainValidator(_positive), _as_text]


class SpecBase(BaseModel):
    """Fields and checks common to every charge model spec.

    ``unit`` is an ISO 4217 code or a credit type of the catalogue. The catalogue's credit scales arrive
    through the pydantic validation context (``{"credit_scales": {...}}``); without one, only
    :data:`DEFAULT_CREDIT_SCALES` are known.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    unit: str

    @field_validator("unit", mode="before")
    @classmethod
    def _known_unit(cls, value: Any, info: ValidationInfo) -> str:
        if not isinstance(value, str):
            raise MoneyError(f"{FIELD_TOKEN} must be a unit code such as USD or CREDIT")
        context = info.context or {}
        scales = context.get("credit_scales", DEFAULT_CREDIT_SCALES)
        return resolve_unit(value, dict(scales)).code


# --- bands (graduated, volume, stairstep) ---------------------------------------------------------------


class Band(NamedTuple):
    """A pre-computed band: covers ``(lower, upper]`` (``upper is None``: open). Built once per spec."""

    index: int
    lower: Decimal
    upper: Decimal | None
    unit_amount: Decimal
    flat_amount: Decimal
    label: str


def band_label(kind: str, index: int, lower: Decimal, upper: Decimal | None) -> str:
    """``tier 2 (100 to 1000)``: a stable description for breakdown lines, computed once per spec."""
    if upper is None:
        span = f"above {decimal_text(lower)}"
    elif lower == 0:
        span = f"up to {decimal_text(upper)}"
    else:
        span = f"{decimal_text(lower)} to {decimal_text(upper)}"
    return f"{kind} {index + 1} ({span})"


def check_bounds(upper_bounds: Sequence[Decimal | None], field: str) -> None:
    """Bands must be non-empty, strictly ascending (no overlap, no zero-width band) and end open.

    Every problem is reported, not only the first, so one round trip fixes a spec.
    """
    if not upper_bounds:
        raise ValueError(f"{field}: at least one band is required (the last with up_to: null)")
    problems: list[str] = []
    previous = ZERO
    last = len(upper_bounds) - 1
    for i, up_to in enumerate(upper_bounds):
        if up_to is None:
            if i != last:
                problems.append(
                    f"{field}[{i}].up_to: only the last band may be open (up_to: null); "
                    f"bands must be listed in ascending order of up_to"
                )
            continue
        if up_to <= previous:
            problems.append(
                f"{field}[{i}].up_to ({decimal_text(up_to)}) must be greater than the previous band's "
                f"up_to ({decimal_text(previous)}): bands must be in ascending order and must not overlap"
            )
        if i == last:
            problems.append(
                f"{field}[{i}].up_to: the last band must be open (up_to: null) so every quantity has a price"
            )
        previous = max(previous, up_to)
    if problems:
        raise ValueError("; ".join(problems))


def build_bands(kind: str, rows: Sequence[tuple[Decimal | None, Decimal, Decimal]]) -> tuple[Band, ...]:
    """Turns validated ``(up_to, unit_amount, flat_amount)`` rows into bands with their lower bounds."""
    bands: list[Band] = []
    lower = ZERO
    for i, (upper, unit_amount, flat_amount) in enumerate(rows):
        bands.append(Band(i, lower, upper, unit_amount, flat_amount, band_label(kind, i, lower, upper)))
        if upper is not None:
            lower = upper
    return tuple(bands)


def quantity_in_band(quantity: Decimal, band: Band) -> Decimal:
    """The part of ``quantity`` inside ``(lower, upper]``: ``clamp(quantity - lower, 0, upper - lower)``."""
    if quantity <= band.lower:
        return ZERO
    if band.upper is None or quantity < band.upper:
        return EXACT.subtract(quantity, band.lower)
    return EXACT.subtract(band.upper, band.lower)


class Tier(BaseModel):
    """One row of ``tiers`` (graduated and volume): an inclusive upper bound and the band's prices."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    up_to: PositiveDecimal | None = None
    unit_amount: Amount = ZERO
    flat_amount: Amount = ZERO


class TieredSpec(SpecBase):
    """Shared by graduated and volume: validates the tiers once and pre-builds the Decimal bands.

    Pre-building matters for speed: the hot path reads a tuple of plain tuples instead of walking
    pydantic models and recomputing lower bounds and labels on every evaluation. The bands are built
    eagerly after validation so a spec is complete (and safe to share across threads) once parsed.
    """

    tiers: tuple[Tier, ...]

    @field_validator("tiers")
    @classmethod
    def _ordered_and_open(cls, tiers: tuple[Tier, ...]) -> tuple[Tier, ...]:
        check_bounds([t.up_to for t in tiers], "tiers")
        return tiers

    @cached_property
    def bands(self) -> tuple[Band, ...]:
        """Built on first use and kept in the instance ``__dict__``: later reads are a plain lookup
        (a pydantic private attribute goes through ``__getattr__`` and costs ~2 us per read)."""
        return build_bands("tier", [(t.up_to, t.unit_amount, t.flat_amount) for t in self.tiers])

    def model_post_init(self, context: Any, /) -> None:
        self.bands  # noqa: B018 - build once, eagerly
