"""docs/asyncapi.json and docs/openapi.json are what `billing asyncapi` / `billing openapi` generate now: a change
to a message model or a route that is not regenerated fails here."""

from __future__ import annotations

from pathlib import Path

import pytest
from billing_cli.main import app
from typer.testing import CliRunner

DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.mark.parametrize("command", ["asyncapi", "openapi"])
def test_the_committed_document_is_what_the_generator_writes(command: str, tmp_path: Path) -> None:
    out = tmp_path / f"{command}.json"
    result = CliRunner().invoke(app, [command, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_text() == (DOCS / f"{command}.json").read_text(), (
        f"docs/{command}.json is stale: run `billing {command}` and commit it")
