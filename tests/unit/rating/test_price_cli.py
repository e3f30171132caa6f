"""``billing price --spec FILE --quantity Q`` through typer's test runner, on a throw-away app.

The real ``billing`` app registers the same command function; building a two-level app here (a callback
plus the command) reproduces ``billing price ...`` without depending on cli/main.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from billing_cli.price import price
from typer.testing import CliRunner

GRADUATED_YAML = """\
model: graduated
unit: USD
tiers:
  - {up_to: 100, unit_amount: 0.10, flat_amount: 1}
  - {up_to: 1_000, unit_amount: 0.05, flat_amount: 2}
  - {up_to: null, unit_amount: 0.01}
"""


@pytest.fixture
def app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def root() -> None:
        """billing (test stand-in)"""

    app.command("price")(price)
    return app


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def run(app: typer.Typer, runner: CliRunner, spec: Path, quantity: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, ["price", "--spec", str(spec), "--quantity", quantity])


def test_prices_a_yaml_spec_with_exact_decimals(app: typer.Typer, runner: CliRunner, tmp_path: Path) -> None:
    spec = tmp_path / "graduated.yaml"
    spec.write_text(GRADUATED_YAML)
    result = run(app, runner, spec, "100.5")
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert body == {
        "amount": "13.025",
        "unit": "USD",
        "lines": [
            {
                "description": "tier 1 (up to 100)",
                "quantity": "100",
                "unit_amount": "0.1",
                "flat_amount": "1",
                "amount": "11",
            },
            {
                "description": "tier 2 (100 to 1000)",
                "quantity": "0.5",
                "unit_amount": "0.05",
                "flat_amount": "2",
                "amount": "2.025",
            },
        ],
    }


def test_prices_a_json_spec_with_json_numbers(app: typer.Typer, runner: CliRunner, tmp_path: Path) -> None:
    spec = tmp_path / "tokens.json"
    spec.write_text('{"model": "per_unit", "unit": "USD", "unit_amount": 0.000002}')
    result = run(app, runner, spec, "100000000000000")
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert body["amount"] == "200000000"
    assert body["lines"][0]["flat_amount"] is None


def test_zero_quantity(app: typer.Typer, runner: CliRunner, tmp_path: Path) -> None:
    spec = tmp_path / "flat.yml"
    spec.write_text("model: flat\nunit: CREDIT\namount: 10\n")
    result = run(app, runner, spec, "0")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"amount": "0", "unit": "CREDIT", "lines": []}


def test_bad_spec_exits_2_naming_the_field(app: typer.Typer, runner: CliRunner, tmp_path: Path) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text(
        "model: graduated\nunit: USD\ntiers:\n  - {up_to: 100}\n  - {up_to: 50}\n  - {up_to: null}\n"
    )
    result = run(app, runner, spec, "1")
    assert result.exit_code == 2
    assert "tiers[1].up_to (50) must be greater" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model: flat\nunit: USD\namount: -1\n", "amount must not be negative"),
        ("model: nope\nunit: USD\n", "unknown charge model 'nope'"),
        ("- just\n- a list\n", "must be a mapping"),
        ("model: flat\nunit: [unclosed\n", "not valid JSON or YAML"),
        ("model: flat\nunit: USD\namount: .inf\n", "amount is not a decimal number"),
    ],
)
def test_bad_specs(app: typer.Typer, runner: CliRunner, tmp_path: Path, text: str, message: str) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    result = run(app, runner, spec, "1")
    assert result.exit_code == 2
    assert message in result.stderr


def test_missing_file_and_bad_quantity(app: typer.Typer, runner: CliRunner, tmp_path: Path) -> None:
    missing = run(app, runner, tmp_path / "absent.yaml", "1")
    assert missing.exit_code == 2
    assert "cannot read price spec" in missing.stderr
    spec = tmp_path / "flat.yaml"
    spec.write_text("model: flat\nunit: USD\namount: 10\n")
    for quantity, message in [
        ("-3", "must not be negative"),
        ("1e400", "too large"),
        ("ten", "not a decimal"),
    ]:
        result = run(app, runner, spec, quantity)
        assert result.exit_code == 2, quantity
        assert message in result.stderr


def test_bad_json_constant(app: typer.Typer, runner: CliRunner, tmp_path: Path) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text('{"model": "flat", "unit": "USD", "amount": NaN}')
    result = run(app, runner, spec, "1")
    assert result.exit_code == 2
    assert "NaN" in result.stderr


def test_options_are_required(app: typer.Typer, runner: CliRunner) -> None:
    result = runner.invoke(app, ["price", "--quantity", "1"])
    assert result.exit_code == 2
