"""``billing price --spec FILE --quantity Q``: price a quantity with a spec file, offline, as exact JSON.

Why: to check a catalogue's price spec before publishing it, and to answer "what would N units cost"
without running any service. The spec file is JSON or YAML (by suffix; anything else is read as YAML,
which also accepts JSON). Numbers in the file are read as exact decimals from their text, never through a
binary float: ``0.1`` in YAML or JSON is ``Decimal("0.1")``.

Output: ``{"amount": "...", "unit": "...", "lines": [...]}`` with every decimal as an exact string.
A bad spec or quantity exits with code 2 and a message on stderr.
"""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from billing_events.money import MoneyError, parse_decimal
from billing_rating.charge_models import PriceLine, PriceResult, PriceSpecError, decimal_text, parse_spec
from billing_rating.charge_models import price as price_quantity

BAD_INPUT_EXIT_CODE = 2


class _DecimalSafeLoader(yaml.SafeLoader):
    """SafeLoader whose floats stay as their source text, so the engine parses them as exact Decimals."""


def _float_as_text(loader: yaml.SafeLoader, node: yaml.Node) -> str:
    assert isinstance(node, yaml.ScalarNode)
    return str(loader.construct_scalar(node)).replace("_", "")


_DecimalSafeLoader.add_constructor("tag:yaml.org,2002:float", _float_as_text)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number a price can use")


def load_spec_file(path: Path) -> Any:
    """Reads a JSON or YAML document with exact decimals."""
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        return json.loads(text, parse_float=Decimal, parse_constant=_refuse_constant)
    return yaml.load(text, Loader=_DecimalSafeLoader)  # a SafeLoader subclass: no arbitrary objects


def _line_json(line: PriceLine) -> dict[str, str | None]:
    return {
        "description": line.description,
        "quantity": decimal_text(line.quantity),
        "unit_amount": None if line.unit_amount is None else decimal_text(line.unit_amount),
        "flat_amount": None if line.flat_amount is None else decimal_text(line.flat_amount),
        "amount": decimal_text(line.amount),
    }


def result_json(result: PriceResult) -> dict[str, Any]:
    """The JSON shape of a price result: decimals as exact strings."""
    return {
        "amount": decimal_text(result.amount),
        "unit": result.unit,
        "lines": [_line_json(line) for line in result.lines],
    }


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=BAD_INPUT_EXIT_CODE)


def price(
    spec: Annotated[Path, typer.Option("--spec", help="Price spec file (JSON or YAML).")],
    quantity: Annotated[str, typer.Option("--quantity", help="Quantity to price, as a decimal, e.g. 1500.5")],
) -> None:
    """Price QUANTITY with the charge model in SPEC and print the exact breakdown as JSON."""
    try:
        data = load_spec_file(spec)
    except OSError as exc:
        raise _fail(f"cannot read price spec {spec}: {exc.strerror or exc}") from None
    except (yaml.YAMLError, ValueError) as exc:
        raise _fail(f"price spec {spec} is not valid JSON or YAML: {exc}") from None
    try:
        parsed = parse_spec(data)
    except PriceSpecError as exc:
        raise _fail(f"bad price spec {spec}:\n  " + "\n  ".join(exc.problems)) from None
    try:
        result = price_quantity(parsed, parse_decimal(quantity, field="--quantity"))
    except MoneyError as exc:
        raise _fail(str(exc)) from None
    typer.echo(json.dumps(result_json(result), indent=2))
