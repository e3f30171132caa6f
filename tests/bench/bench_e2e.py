"""End-to-end bench on the real stack (what ``make bench`` runs; a plain script, pytest does not collect it).

    eval "$(bash deploy/local/stack.sh env)"
    .venv/bin/python tests/bench/bench_e2e.py [--events 50000] [--tenants 20]
    .venv/bin/python tests/bench/bench_e2e.py --duration 300 --rate 10000     # the sustained 5-minute target
    .venv/bin/python tests/bench/bench_e2e.py --events 50000 --profile ledger  # py-spy on the ledger process

Starts the four services as separate processes in a fresh namespace, applies a catalogue (per-unit,
graduated and AI token meters) and accounts with ``billing catalog apply``, produces a realistic stream to
``<ns>.billing.usage.raw`` and measures in one run: end-to-end throughput, per-stage throughput and consumer
lag over time, publish -> visible balance latency, balance read and hold decision latency under load, CPU and
peak RSS per service, and the raw Kafka / PostgreSQL limits with the same messages. Every run ends with a
reconciliation.

Phases: by default a *backlog* (``--events`` produced as fast as possible: the maximum end-to-end rate),
then a *paced* phase (``--paced-seconds`` at ``--paced-rate``, default half the backlog's rate), because
publish -> visible latency under a backlog only measures the backlog. ``--duration`` replaces both with one
*sustained* phase at ``--rate``. Writes ``bench/results/<name>.json``, ``.md`` and ``.png`` and prints the Markdown summary;
exits 1 when the run does not reconcile.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: make `tests.` importable
    sys.path.insert(0, str(ROOT))

from billing_runtime.logging import configure_logging

from tests.bench.harness.run import SERVICES, BenchConfig, run_bench


def parse(argv: list[str] | None = None) -> BenchConfig:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000, help="stream size (backlog mode)")
    parser.add_argument("--duration", type=float, default=None,
                        help="sustained mode: produce at --rate for this many seconds (events = rate x duration)")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="offered events/s (0: as fast as possible; --duration defaults it to 10000)")
    parser.add_argument("--paced-seconds", type=float, default=30.0,
                        help="after the backlog, a paced phase of this length (0: none) for latency under load")
    parser.add_argument("--paced-rate", type=float, default=None,
                        help="events/s of the paced phase (default: half the backlog's end-to-end rate)")
    parser.add_argument("--tenants", type=int, default=20)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--batch", type=int, default=None, help="BILLING_BATCH_RECORDS_MAX for the services")
    parser.add_argument("--reader-rate", type=float, default=200.0, help="balance reads/s during the run")
    parser.add_argument("--hold-rate", type=float, default=50.0, help="hold decisions/s (0: off)")
    parser.add_argument("--marker-interval", type=float, default=0.25, help="seconds between latency markers")
    parser.add_argument("--idle-seconds", type=float, default=5.0, help="probes after the load, for idle figures")
    parser.add_argument("--no-raw-limits", action="store_true", help="skip the raw Kafka/PostgreSQL limits")
    parser.add_argument("--profile", default="",
                        help=f"comma-separated services to profile with py-spy ({', '.join(SERVICES)}, or all)")
    parser.add_argument("--profile-rate", type=int, default=100, help="py-spy samples/s")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--timeout", type=float, default=None, help="seconds for the pipeline to drain")
    parser.add_argument("--keep", action="store_true", help="keep the namespace's topics and schemas")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--snapshot", action="store_true",
                        help="run the services from `git archive HEAD` (not the working tree being edited)")
    parser.add_argument("--source", type=Path, default=None,
                        help="run the services from this tree instead (same layout, e.g. a patched copy)")
    parser.add_argument("--label", default="e2e", help="file name prefix of the results")
    args = parser.parse_args(argv)
    profiled = list(SERVICES) if args.profile == "all" else [p for p in args.profile.split(",") if p]
    unknown = set(profiled) - set(SERVICES)
    if unknown:
        parser.error(f"unknown services to profile: {sorted(unknown)}")
    return BenchConfig(events=args.events, tenants=args.tenants, rate=args.rate, duration=args.duration,
                       paced_seconds=args.paced_seconds, paced_rate=args.paced_rate,
                       partitions=args.partitions, batch_records_max=args.batch, reader_rate=args.reader_rate,
                       hold_rate=args.hold_rate, marker_interval=args.marker_interval,
                       idle_seconds=args.idle_seconds, raw_limits=not args.no_raw_limits, profile=profiled,
                       profile_rate=args.profile_rate, seed=args.seed, timeout=args.timeout, keep=args.keep,
                       out_dir=args.out, plot=not args.no_plot, label=args.label, snapshot=args.snapshot,
                       source=args.source)


def main(argv: list[str] | None = None) -> int:
    if not os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or not os.environ.get("DATABASE_URL"):
        print("set KAFKA_BOOTSTRAP_SERVERS and DATABASE_URL: eval \"$(bash deploy/local/stack.sh env)\"",
              file=sys.stderr)
        return 2
    configure_logging(json_output=True, level=40)
    result = asyncio.run(run_bench(parse(argv)))
    print()
    print(result["summary_markdown"])
    for kind, path in result["files"].items():
        print(f"{kind}: {path}")
    return 0 if result["reconciliation"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
