"""Figures of one run: the JSON document, the Markdown summary and the PNG plot (matplotlib)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.bench.harness import resources
from tests.bench.harness.kafka_watch import STAGES, Snapshot

if TYPE_CHECKING:
    from tests.bench.harness.run import Bench
    from tests.bench.harness.stream import Stream

TARGET_E2E_EVENTS_PER_SECOND = 10_000
TARGET_VISIBLE_P99_MS = 1_000
TARGET_READ_P99_MS = 5


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def distribution(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    return {"n": len(values), "p50_ms": round(percentile(values, 0.50) or 0, 2),
            "p95_ms": round(percentile(values, 0.95) or 0, 2), "p99_ms": round(percentile(values, 0.99) or 0, 2),
            "max_ms": round(max(values), 2)}


def _timed(samples: list[list[float]], start: float, end: float, ok: tuple[int, ...],
           skipped: list[float] | None = None) -> dict[str, Any]:
    window = [s for s in samples if start <= s[0] <= end]
    result = distribution([s[1] for s in window if int(s[2]) in ok])
    result["errors"] = sum(1 for s in window if int(s[2]) not in ok)
    # Arrivals not sent because the client already had its maximum in flight: the server fell behind.
    result["not_sent"] = sum(1 for t in skipped or [] if start <= t <= end)
    if end > start:
        result["sent_per_second"] = round(len(window) / (end - start), 1)
    return result


def stage_figures(snapshots: list[Snapshot], events: int, trickle_per_second: float) -> dict[str, Any]:
    """Per consumer group: records processed, rate while busy, peak 1-s rate, max lag; and the two topics
    written without a group of ours (raw: the producer; ledger events: the ledger's outbox relay).

    "While busy" counts only the 1-s intervals in which the stage moved more than the probes' own trickle
    (markers and holds, ``trickle_per_second``), so the idle tail and the baseline do not dilute the rate."""
    if len(snapshots) < 2:
        return {}
    figures: dict[str, Any] = {}
    times = [s.at for s in snapshots]

    def series(values: list[int]) -> dict[str, Any]:
        processed = values[-1] - values[0]
        busy_records, busy_seconds, peak = 0, 0.0, 0.0
        for i in range(1, len(values)):
            dt = times[i] - times[i - 1]
            delta = values[i] - values[i - 1]
            if dt <= 0:
                continue
            peak = max(peak, delta / dt)
            if delta > 3 * trickle_per_second * dt + 5:
                busy_records += delta
                busy_seconds += dt
        return {"records": processed, "records_per_usage_event": round(processed / events, 3) if events else None,
                "busy_seconds": round(busy_seconds, 1),
                "records_per_second_busy": round(busy_records / busy_seconds) if busy_seconds else 0,
                "peak_records_per_second_1s": round(peak)}

    figures["produce (raw topic)"] = series([s.end["billing.usage.raw"] for s in snapshots])
    for stage, (_, topic) in STAGES.items():
        entry = series([s.committed[stage] for s in snapshots])
        lags = [s.lag[stage] for s in snapshots]
        entry["max_lag"] = max(lags)
        entry["topic"] = topic
        figures[stage] = entry
        if stage == "ledger":
            figures["relay (ledger events)"] = series([s.end["billing.ledger.events"] for s in snapshots])
    return figures


def build(bench: Bench, data: Stream, snapshots: list[Snapshot], usage: list[dict[str, Any]],
          probes: dict[str, Any], recon: dict[str, Any], raw: dict[str, Any],
          profiles: dict[str, Any]) -> dict[str, Any]:
    marks = bench.marks
    start, done = marks["produce_start"], marks["done"]
    idle_start, idle_end = done + 1.0, marks.get("idle_end", done)
    seconds = done - start
    e2e = data.size / seconds if seconds > 0 else 0.0
    markers = [m for m in probes.get("markers", []) if "latency_ms" in m]
    load_markers = [m["latency_ms"] for m in markers if start <= m["published"] <= done]
    idle_markers = [m["latency_ms"] for m in markers if m["published"] >= idle_start]
    holds = probes.get("holds", {})
    result: dict[str, Any] = {
        "name": bench.name, "namespace": bench.namespace,
        "stream": {"events": data.size, "good": data.expected.good_count, "duplicates": data.expected.duplicates,
                   "bad": data.expected.bad_count, "tenants": len(bench.tenants),
                   "by_meter": dict(data.expected.by_meter), "rate_offered": bench.config.rate or "max"},
        "timeline": {k: round(v - start, 3) for k, v in marks.items()},
        "end_to_end": {
            "seconds": round(seconds, 2), "events_per_second": round(e2e),
            "good_events_per_second": round(data.expected.good_count / seconds) if seconds > 0 else 0,
            "produce_events_per_second": round(data.size / max(marks["produce_end"] - start, 1e-9)),
            "definition": "all stream events (good, duplicate, bad) from the first send to <ns>.billing.usage.raw "
                          "until every tenant's balance in the projections API shows exactly its expected charge "
                          "and every bad event has its dead letter",
        },
        "stages": stage_figures(snapshots, data.size,
                                trickle_per_second=1 / bench.config.marker_interval + bench.config.hold_rate),
        "visible_latency": {"under_load": distribution(load_markers), "idle": distribution(idle_markers),
                            "published": probes.get("marker_totals", {}).get("published_total"),
                            "definition": "marker usage event published to raw -> balance API shows it "
                                          "(polled every 10 ms)"},
        "balance_reads": {"under_load": _timed(probes.get("reads", []), start, done, (200,),
                                               probes.get("reads_skipped")),
                          "idle": _timed(probes.get("reads", []), idle_start, idle_end, (200,),
                                         probes.get("reads_skipped")),
                          "rate": bench.config.reader_rate},
        "holds": ({"under_load": _timed(holds.get("samples", []), start, done, (200, 201), holds.get("skipped")),
                   "idle": _timed(holds.get("samples", []), idle_start, idle_end, (200, 201), holds.get("skipped")),
                   "rate": bench.config.hold_rate}
                  if holds.get("available") else {"skipped": holds.get("note", "not measured")}),
        "resources": resources.summarise(usage, start, done, list(bench.services)),
        "raw_limits": raw,
        "ratios": {},
        "reconciliation": recon,
        "profiles": profiles,
        "probe_errors": probes.get("errors", []),
        "notes": bench.notes,
        "series": {"kafka": [s.as_dict() for s in snapshots], "resources": usage,
                   "markers": markers, "t0": start},
    }
    if raw.get("kafka"):
        result["ratios"]["e2e_vs_raw_kafka"] = round(e2e / raw["kafka"]["events_per_second"], 4)
    if raw.get("postgres"):
        result["ratios"]["e2e_vs_pg_copy_batched"] = round(e2e / raw["postgres"]["batched_rows_per_second"], 4)
        result["ratios"]["e2e_vs_pg_copy_single"] = round(e2e / raw["postgres"]["single_rows_per_second"], 4)
    return result


def _ms(entry: dict[str, Any], key: str) -> str:
    value = entry.get(key)
    return "–" if value is None else f"{value:,.1f}"


def _pass(ok: bool | None) -> str:
    return "" if ok is None else (" ✅" if ok else " ❌")


def markdown(result: dict[str, Any]) -> str:
    s, e2e, recon = result["stream"], result["end_to_end"], result["reconciliation"]
    load_lat = result["visible_latency"]["under_load"]
    reads = result["balance_reads"]["under_load"]
    cfg = result.get("config", {})
    lines = [f"## make bench: {result['name']}", ""]
    mode = (f"sustained {cfg.get('duration')} s at {s['rate_offered']:,} events/s offered" if cfg.get("duration")
            else f"backlog of {s['events']:,} events produced as fast as possible" if s["rate_offered"] == "max"
            else f"{s['events']:,} events at {s['rate_offered']:,}/s offered")
    lines.append(f"{mode}; {s['tenants']} tenants; {s['good']:,} good, {s['duplicates']:,} duplicates, "
                 f"{s['bad']:,} bad; meters {s['by_meter']}.")
    lines.append(f"Machine: {result.get('machine', {}).get('host_cores')} cores, load average at start "
                 f"{result.get('machine', {}).get('load_average_at_start')} (shared: see 'everything else' CPU).")
    lines.append("")
    lines += ["| figure | value | target |", "|---|---|---|"]
    lines.append(f"| end-to-end throughput (raw -> balance visible) | **{e2e['events_per_second']:,} events/s** "
                 f"({e2e['seconds']:.1f} s) | ≥ {TARGET_E2E_EVENTS_PER_SECOND:,}/s"
                 f"{_pass(e2e['events_per_second'] >= TARGET_E2E_EVENTS_PER_SECOND)} |")
    lines.append(f"| produce rate (aiokafka, raw topic) | {e2e['produce_events_per_second']:,} events/s | |")
    p99 = load_lat.get("p99_ms")
    lines.append(f"| publish -> visible balance p50 / p95 / p99 (under load, n={load_lat.get('n', 0)}) | "
                 f"{_ms(load_lat, 'p50_ms')} / {_ms(load_lat, 'p95_ms')} / {_ms(load_lat, 'p99_ms')} ms | "
                 f"p99 < {TARGET_VISIBLE_P99_MS:,} ms{_pass(None if p99 is None else p99 < TARGET_VISIBLE_P99_MS)} |")
    idle = result["visible_latency"]["idle"]
    lines.append(f"| publish -> visible balance p50 / p99 (idle, n={idle.get('n', 0)}) | "
                 f"{_ms(idle, 'p50_ms')} / {_ms(idle, 'p99_ms')} ms | |")
    rp99 = reads.get("p99_ms")
    lines.append(f"| balance read p50 / p99 under load ({result['balance_reads']['rate']:.0f} req/s offered, "
                 f"n={reads.get('n', 0)}, errors {reads.get('errors', 0)}, not sent (32 in flight) "
                 f"{reads.get('not_sent', 0)}) | {_ms(reads, 'p50_ms')} / "
                 f"{_ms(reads, 'p99_ms')} ms | p99 < {TARGET_READ_P99_MS} ms"
                 f"{_pass(None if rp99 is None else rp99 < TARGET_READ_P99_MS)} |")
    idle_reads = result["balance_reads"]["idle"]
    lines.append(f"| balance read p50 / p99 idle (n={idle_reads.get('n', 0)}) | {_ms(idle_reads, 'p50_ms')} / "
                 f"{_ms(idle_reads, 'p99_ms')} ms | |")
    holds = result["holds"]
    if "skipped" in holds:
        lines.append(f"| hold decision p99 | {holds['skipped']} | |")
    else:
        h = holds["under_load"]
        lines.append(f"| hold decision p50 / p99 under load ({holds['rate']:.0f}/s, n={h.get('n', 0)}, errors "
                     f"{h.get('errors', 0)}) | {_ms(h, 'p50_ms')} / {_ms(h, 'p99_ms')} ms | |")
    raw, ratios = result["raw_limits"], result["ratios"]
    if raw.get("kafka"):
        lines.append(f"| raw Kafka produce+consume, same messages | {raw['kafka']['events_per_second']:,} events/s "
                     f"| ours = {100 * ratios['e2e_vs_raw_kafka']:.1f} % |")
    if raw.get("postgres"):
        pg = raw["postgres"]
        lines.append(f"| raw PostgreSQL COPY, {pg['batch_rows']} rows per transaction | "
                     f"{pg['batched_rows_per_second']:,} rows/s | ours = {100 * ratios['e2e_vs_pg_copy_batched']:.1f} % |")
        lines.append(f"| raw PostgreSQL COPY, one transaction | {pg['single_rows_per_second']:,} rows/s | "
                     f"ours = {100 * ratios['e2e_vs_pg_copy_single']:.1f} % |")
    verdict = ("**RECONCILED**: " if recon["ok"] else "**NOT RECONCILED**: ") + (
        f"{recon['posted_once']:,} of {recon['good_events']:,} good events posted exactly once (ledger events); "
        f"{recon['dead_letters']:,} dead letters for {recon['bad_events_sent']:,} bad events, reasons as sent "
        f"({', '.join(f'{k} {v}' for k, v in recon['dead_letters_by_reason'].items())}); "
        f"{recon['duplicates_sent']:,} duplicates changed no balance; {recon['tenants_checked']} balances = "
        f"catalogue prices (total {recon['expected_charge_usd']} USD); {recon['markers_posted']} markers posted")
    lines.append(f"| reconciliation | {verdict} | exactly once{_pass(recon['ok'])} |")
    for problem in recon["problems"]:
        lines.append(f"| ❌ | {problem} | |")
    header = ("| stage (consumer group / topic) | records | per usage event | rate while busy | peak 1 s | max lag | "
              "CPU % of a core | peak RSS MB |")
    lines += ["", header, "|---|---|---|---|---|---|---|---|"]
    cpu = result["resources"]["cpu_percent_of_core"]
    rss = result["resources"]["peak_rss_mb"]
    for stage, f in result["stages"].items():
        name = stage.split(" ")[0]
        lines.append(f"| {stage} | {f['records']:,} | {f['records_per_usage_event']} | "
                     f"{f['records_per_second_busy']:,}/s | {f['peak_records_per_second_1s']:,}/s | "
                     f"{f.get('max_lag', '')} | {cpu.get(name, '')} | {rss.get(name, '')} |")
    others = {k: v for k, v in cpu.items() if k not in rss}
    lines += ["", "CPU during the load window (% of one core; "
              f"{result['resources']['cores']} cores = {100 * result['resources']['cores']} %): "
              + ", ".join(f"{k} {v}" for k, v in others.items())]
    for name, prof in result.get("profiles", {}).items():
        threads = ", ".join(f"{t} {busy} %" for t, busy, _ in prof.get("threads_busy_percent", [])[:6])
        lines += ["", (f"### py-spy profile: {name} ({prof['samples']:,} samples doing or waiting on work; "
                  f"threads busy: {threads})"), "",
                  "| self time (leaf) | % | | by library | % |", "|---|---|---|---|---|"]
        selfs, areas = prof["self"][:15], prof["areas"][:15]
        for i in range(max(len(selfs), len(areas))):
            a = selfs[i] if i < len(selfs) else ["", ""]
            b = areas[i] if i < len(areas) else ["", ""]
            lines.append(f"| `{a[0]}` | {a[1]} | | {b[0]} | {b[1]} |")
        lines += ["", "| inclusive (with callees) | % |", "|---|---|"]
        lines += [f"| `{n}` | {v} |" for n, v in prof["inclusive"][:25]]
    for note in result.get("notes", []):
        lines.append(f"\nNote: {note}")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = result["series"]
    t0 = series["t0"]
    kafka = series["kafka"]
    fig, axes = plt.subplots(4, 1, figsize=(11, 13), sharex=True)
    times = [k["t"] - t0 for k in kafka]
    mid = [(times[i] + times[i - 1]) / 2 for i in range(1, len(times))]

    def rate(values: list[int]) -> list[float]:
        return [(values[i] - values[i - 1]) / max(times[i] - times[i - 1], 1e-9) for i in range(1, len(values))]

    ax = axes[0]
    ax.plot(mid, rate([k["end"]["billing.usage.raw"] for k in kafka]), label="produced (raw)", color="grey",
            linestyle="--")
    for stage in STAGES:
        ax.plot(mid, rate([k["committed"][stage] for k in kafka]), label=stage)
    ax.plot(mid, rate([k["end"]["billing.ledger.events"] for k in kafka]), label="relay (ledger events)",
            linestyle=":")
    ax.set_ylabel("records/s (committed)")
    ax.set_title(f"{result['name']}: end to end {result['end_to_end']['events_per_second']:,} events/s")
    ax.legend(loc="upper right", fontsize=8)
    ax = axes[1]
    for stage in STAGES:
        ax.plot(times, [k["lag"][stage] for k in kafka], label=stage)
    ax.set_ylabel("consumer lag (records)")
    ax.legend(loc="upper right", fontsize=8)
    ax = axes[2]
    usage = series["resources"]
    if len(usage) > 1:
        ut = [u["t"] - t0 for u in usage]
        names = [n for n in usage[-1]["cpu"]]
        for name in names:
            values = [100 * (usage[i]["cpu"].get(name, 0) - usage[i - 1]["cpu"].get(name, 0))
                      / max(usage[i]["t"] - usage[i - 1]["t"], 1e-9) for i in range(1, len(usage))]
            ax.plot(ut[1:], values, label=name)
        machine = [100 * (usage[i]["machine_busy"] - usage[i - 1]["machine_busy"])
                   / max(usage[i]["t"] - usage[i - 1]["t"], 1e-9) for i in range(1, len(usage))]
        ax.plot(ut[1:], machine, label="machine", color="black", linewidth=0.8)
    ax.set_ylabel("CPU % of a core")
    ax.legend(loc="upper right", fontsize=7, ncol=3)
    ax = axes[3]
    markers = series["markers"]
    ax.scatter([m["published"] - t0 for m in markers], [m["latency_ms"] for m in markers], s=6)
    ax.set_yscale("log")
    ax.set_ylabel("publish -> visible (ms)")
    ax.set_xlabel("seconds since the first event was produced")
    for a in axes:
        for key, style in (("produce_end", "--"), ("done", "-")):
            if key in result["timeline"]:
                a.axvline(result["timeline"][key], color="red", linestyle=style, linewidth=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write(bench: Bench, result: dict[str, Any]) -> dict[str, Path]:
    out = bench.config.out_dir
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{bench.name}.json", "markdown": out / f"{bench.name}.md"}
    text = markdown(result)
    result["summary_markdown"] = text
    paths["markdown"].write_text(text)
    if bench.config.plot:
        paths["png"] = out / f"{bench.name}.png"
        try:
            plot(result, paths["png"])
        except Exception as exc:  # noqa: BLE001 - a plotting problem must not lose the run's figures
            result["notes"].append(f"plot failed: {exc!r}")
            paths.pop("png")
    paths["json"].write_text(json.dumps(result, indent=1, default=str))
    return paths
