"""Keeps `make bench` working: the end-to-end bench harness at a tiny size, on the real stack.

Asserts only that a run completes, writes its files and reconciles (every event posted exactly once or
rejected with its reason); speed is `make bench`'s business, not a test's.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from tests.bench.harness.run import BenchConfig, run_bench

pytestmark = pytest.mark.integration


def test_bench_harness_runs_and_reconciles(infra: dict[str, str], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in infra.items():
        monkeypatch.setenv(name, value)
    config = BenchConfig(events=400, tenants=3, reader_rate=20, hold_rate=5, idle_seconds=1, timeout=90,
                         paced_seconds=2, paced_rate=60, out_dir=tmp_path, label="smoke")
    result = asyncio.run(run_bench(config))

    recon = result["reconciliation"]
    assert recon["ok"], recon["problems"]
    assert recon["posted_once"] == recon["good_events"] > 0
    assert recon["dead_letters"] == recon["bad_events_sent"] > 0
    assert recon["markers_posted"] == recon["markers_published"] > 0
    assert result["end_to_end"]["events_per_second"] > 0
    assert set(result["stages"]) >= {"ingest", "rating", "ledger", "projections"}
    assert [p["name"] for p in result["phases"]] == ["backlog", "paced"]
    assert result["raw_limits"]["kafka"]["events_per_second"] > 0
    assert result["raw_limits"]["postgres"]["batched_rows_per_second"] > 0
    for kind in ("json", "markdown", "png"):
        assert Path(result["files"][kind]).stat().st_size > 0
    assert json.loads(Path(result["files"]["json"]).read_text())["reconciliation"]["ok"]
    assert "RECONCILED" in result["summary_markdown"]
