"""The README's configuration table names every ``BILLING_*`` setting the code reads: an operator looks there, not in
the code (``BILLING_SCHEDULER_INTERVAL_SECONDS`` and six others were read and documented nowhere users look)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NAME = re.compile(r"BILLING_[A-Z0-9_]*[A-Z0-9]")
# ``BILLING_{INGEST,RATING,LEDGER,PROJECTIONS}_PORT``: one row for several names.
BRACES = re.compile(r"BILLING_\{([A-Z0-9_,]+)\}_([A-Z0-9_]+)")


def read_by_the_code() -> set[str]:
    names: set[str] = set()
    for folder in ("libs", "services", "cli"):
        for path in (ROOT / folder).rglob("*.py"):
            # The per-service ports are read as f"BILLING_{name.upper()}_PORT": the braces row documents them.
            names.update(NAME.findall(path.read_text()))
    return names


def in_the_readme_table() -> set[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Configuration (environment)", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    names: set[str] = set()
    for row in rows:
        first_cell = row.split(" | ", 1)[0]
        for parts, suffix in BRACES.findall(first_cell):
            names.update(f"BILLING_{part}_{suffix}" for part in parts.split(","))
        names.update(NAME.findall(BRACES.sub("", first_cell)))
    return names


def test_every_billing_setting_the_code_reads_has_a_row_in_the_readmes_configuration_table() -> None:
    missing = sorted(read_by_the_code() - in_the_readme_table())
    assert missing == [], f"add these to README.md's configuration table: {missing}"
    assert {"BILLING_SCHEDULER_INTERVAL_SECONDS", "BILLING_LEDGER_PORT"} <= in_the_readme_table()
