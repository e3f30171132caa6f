"""Figures of one run: the JSON document, the Markdown summary and the PNG plot (matplotlib)."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.bench.harness import resources
from tests.bench.harness.kafka_watch import STAGES, Snapshot

if TYPE_CHECKING:
    from tests.bench.harness.run import Bench, Phase
    from tests.bench.harness.stream import Expected

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
    failed = [s for s in window if int(s[2]) not in ok]
    result["errors"] = len(failed)
    if failed:
        kinds = Counter(f"{int(s[2])} {s[3] if len(s) > 3 else ''}".strip()[:120] for s in failed)
        result["error_kinds"] = dict(kinds.most_common(5))
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


def phase_figures(phase: Phase, probes: dict[str, Any], marker_interval: float) -> dict[str, Any]:
    start, done = phase.marks["produce_start"], phase.marks["done"]
    markers = [m["latency_ms"] for m in probes.get("markers", []) if "latency_ms" in m and start <= m["published"] <= done]
    holds = probes.get("holds", {})
    return {
        "name": phase.name, "events": phase.data.size, "good": phase.data.expected.good_count,
        "rate_offered": phase.rate or "max", "finished": phase.finished,
        "seconds": round(phase.seconds, 2), "events_per_second": round(phase.events_per_second),
        "produce_events_per_second": round(phase.data.size / max(phase.marks["produce_end"] - start, 1e-9)),
        "timeline": {k: round(v, 3) for k, v in phase.marks.items()},
        "visible_latency": distribution(markers),
        "balance_reads": _timed(probes.get("reads", []), start, done, (200,), probes.get("reads_skipped")),
        "holds": (_timed(holds.get("samples", []), start, done, (200, 201), holds.get("skipped"))
                  if holds.get("available") else None),
    }


def build(bench: Bench, phases: list[Phase], expected: Expected, idle: tuple[float, float],
          snapshots: list[Snapshot], usage: list[dict[str, Any]], probes: dict[str, Any], recon: dict[str, Any],
          raw: dict[str, Any], profiles: dict[str, Any]) -> dict[str, Any]:
    first = phases[0]
    start, done = first.marks["produce_start"], first.marks["done"]
    e2e = first.events_per_second
    markers = [m for m in probes.get("markers", []) if "latency_ms" in m]
    idle_markers = [m["latency_ms"] for m in markers if idle[0] <= m["published"] <= idle[1]]
    holds = probes.get("holds", {})
    events = sum(p.data.size for p in phases)
    result: dict[str, Any] = {
        "name": bench.name, "namespace": bench.namespace,
        "code": {"commit": bench.commit, "snapshot": bench.config.snapshot,
                 "source": str(bench.config.source) if bench.config.source else None,
                 "working_tree_changes_in_services": bench.dirty},
        "stream": {"events": events, "good": expected.good_count, "duplicates": expected.duplicates,
                   "bad": expected.bad_count, "tenants": len(bench.tenants), "by_meter": dict(expected.by_meter)},
        "end_to_end": {
            "phase": first.name, "seconds": round(first.seconds, 2), "events_per_second": round(e2e),
            "good_events_per_second": round(first.data.expected.good_count / first.seconds) if first.seconds else 0,
            "produce_events_per_second": round(first.data.size / max(first.marks["produce_end"] - start, 1e-9)),
            "definition": "all stream events (good, duplicate, bad) of the first phase, from the first send to "
                          "<ns>.billing.usage.raw until every tenant's balance in the projections API shows exactly "
                          "its expected charge and every bad event has its dead letter",
        },
        "phases": [phase_figures(p, probes, bench.config.marker_interval) for p in phases],
        "idle": {"visible_latency": distribution(idle_markers),
                 "balance_reads": _timed(probes.get("reads", []), idle[0], idle[1], (200,), probes.get("reads_skipped")),
                 "holds": (_timed(holds.get("samples", []), idle[0], idle[1], (200, 201), holds.get("skipped"))
                           if holds.get("available") else None)},
        "probes": {"reader_rate": bench.config.reader_rate, "hold_rate": bench.config.hold_rate,
                   "marker_interval_seconds": bench.config.marker_interval,
                   "markers_published": probes.get("marker_totals", {}).get("published_total"),
                   "holds": "measured" if holds.get("available") else holds.get("note", "not measured"),
                   "visible_latency_definition": "marker usage event published to raw -> balance API shows it "
                                                 "(polled every 10 ms)"},
        "stages": stage_figures(snapshots, events,
                                trickle_per_second=1 / bench.config.marker_interval + bench.config.hold_rate),
        "resources": resources.summarise(usage, start, done, list(bench.services), first.data.size),
        "raw_limits": raw,
        "ratios": {},
        "reconciliation": recon,
        "profiles": profiles,
        "probe_errors": probes.get("errors", []),
        "notes": bench.notes,
        "series": {"kafka": [s.as_dict() for s in snapshots], "resources": usage, "markers": markers, "t0": start,
                   "phases": [{"name": p.name, **{k: round(v - start, 3) for k, v in p.marks.items()}}
                              for p in phases]},
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


def _lat(entry: dict[str, Any] | None) -> str:
    if not entry or not entry.get("n"):
        return "–"
    return f"{_ms(entry, 'p50_ms')} / {_ms(entry, 'p95_ms')} / {_ms(entry, 'p99_ms')} ms (n={entry['n']:,})"


def markdown(result: dict[str, Any]) -> str:
    s, e2e, recon = result["stream"], result["end_to_end"], result["reconciliation"]
    phases = result["phases"]
    lines = [f"## make bench: {result['name']}", ""]
    described = "; then ".join(
        f"{p['name']}: {p['events']:,} events " + ("as fast as possible" if p["rate_offered"] == "max"
                                                    else f"at {p['rate_offered']:,.0f}/s offered")
        for p in phases)
    lines.append(f"{described}. {s['tenants']} tenants; {s['good']:,} good, {s['duplicates']:,} duplicates, "
                 f"{s['bad']:,} bad events; meters {s['by_meter']}.")
    code = result.get("code", {})
    lines.append(f"Code: commit {code.get('commit', '?')[:12]}"
                 + (f"; services from the tree {code['source']}" if code.get("source") else
                    " (snapshot of the commit)" if code.get("snapshot") else
                    " + uncommitted changes in libs/services/cli" if code.get("working_tree_changes_in_services")
                    else ""))
    lines.append(f"Machine: {result.get('machine', {}).get('host_cores')} cores, load average at start "
                 f"{result.get('machine', {}).get('load_average_at_start')} (shared: see 'everything else' CPU); host speed "
                 f"{result.get('machine', {}).get('host_speed_ms')} -> {result.get('machine', {}).get('host_speed_ms_after')} "
                 "ms (harness/resources.host_speed_ms, lower is faster: compare runs of similar speed).")
    lines.append("")
    lines += ["| figure | value | target |", "|---|---|---|"]
    ok = e2e["events_per_second"] >= TARGET_E2E_EVENTS_PER_SECOND
    lines.append(f"| end-to-end throughput, {e2e['phase']} (raw -> balance visible) | "
                 f"**{e2e['events_per_second']:,} events/s** ({e2e['seconds']:.1f} s) | "
                 f"≥ {TARGET_E2E_EVENTS_PER_SECOND:,}/s{_pass(ok)} |")
    lines.append(f"| produce rate (aiokafka, raw topic) | {e2e['produce_events_per_second']:,} events/s | |")
    for p in phases[1:]:
        state = "all visible" if p["finished"] else "NOT all visible in time"
        lines.append(f"| {p['name']} phase: {p['events']:,} events at {p['rate_offered']:,.0f}/s offered | "
                     f"{p['events_per_second']:,} events/s from first send to last visible ({state}) | |")
    probes = result["probes"]
    for p in phases:
        lat = p["visible_latency"]
        p99 = lat.get("p99_ms")
        lines.append(f"| publish -> visible balance p50 / p95 / p99, {p['name']} | {_lat(lat)} | "
                     f"p99 < {TARGET_VISIBLE_P99_MS:,} ms{_pass(None if p99 is None else p99 < TARGET_VISIBLE_P99_MS)} |")
    lines.append(f"| publish -> visible balance, idle | {_lat(result['idle']['visible_latency'])} | |")
    for p in phases:
        reads = p["balance_reads"]
        rp99 = reads.get("p99_ms")
        lines.append(f"| balance read p50 / p95 / p99, {p['name']} ({probes['reader_rate']:.0f}/s offered; "
                     f"errors {reads.get('errors', 0)}, not sent with 32 in flight {reads.get('not_sent', 0)}) | "
                     f"{_lat(reads)} | p99 < {TARGET_READ_P99_MS} ms"
                     f"{_pass(None if rp99 is None else rp99 < TARGET_READ_P99_MS)} |")
    lines.append(f"| balance read, idle | {_lat(result['idle']['balance_reads'])} | |")
    if probes["holds"] != "measured":
        lines.append(f"| hold decision p99 | {probes['holds']} | |")
    else:
        for p in phases:
            h = p["holds"] or {}
            lines.append(f"| hold decision p50 / p95 / p99, {p['name']} ({probes['hold_rate']:.0f}/s offered, one "
                         f"tenant; errors {h.get('errors', 0)}, not sent {h.get('not_sent', 0)}) | {_lat(h)} | |")
        lines.append(f"| hold decision, idle | {_lat(result['idle']['holds'])} | |")
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
              "CPU % of a core | CPU ms per usage event | peak RSS MB |")
    lines.append("")
    lines.append(f"Stages (CPU: mean over the {e2e['phase']} phase; rates: 1-s intervals in which the stage moved more "
                 "than the probes' trickle.)")
    lines += [header, "|---|---|---|---|---|---|---|---|---|"]
    per_event = result["resources"].get("cpu_ms_per_event", {})
    cpu = result["resources"]["cpu_percent_of_core"]
    rss = result["resources"]["peak_rss_mb"]
    for stage, f in result["stages"].items():
        name = stage.split(" ")[0]
        if name == "produce":
            continue  # the producer's rate is in the table above
        lines.append(f"| {stage} | {f['records']:,} | {f['records_per_usage_event']} | "
                     f"{f['records_per_second_busy']:,}/s | {f['peak_records_per_second_1s']:,}/s | "
                     f"{f.get('max_lag', '')} | {cpu.get(name, '')} | {per_event.get(name, '')} | "
                     f"{rss.get(name, '')} |")
    others = {k: v for k, v in cpu.items() if k not in rss}
    lines += ["", f"CPU during the {e2e['phase']} phase (% of one core; "
              f"{result['resources']['cores']} cores = {100 * result['resources']['cores']} %): "
              + ", ".join(f"{k} {v}" for k, v in others.items())
              + f". CPU ms per usage event, services + Kafka + PostgreSQL: {per_event.get('pipeline total', '–')} "
              f"(includes serving the probes' reads and holds)."]
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

    def rate(values: list[int], smooth: int = 3) -> list[float]:
        """Records/s between samples, as a centred moving average over ``smooth`` samples (batches commit in
        steps, so 1-s rates alternate between 0 and twice the real rate)."""
        raw = [(values[i] - values[i - 1]) / max(times[i] - times[i - 1], 1e-9) for i in range(1, len(values))]
        half = smooth // 2
        return [sum(raw[max(0, i - half):i + half + 1]) / len(raw[max(0, i - half):i + half + 1])
                for i in range(len(raw))]

    ax = axes[0]
    ax.plot(mid, rate([k["end"]["billing.usage.raw"] for k in kafka]), label="produced (raw)", color="grey",
            linestyle="--")
    for stage in STAGES:
        ax.plot(mid, rate([k["committed"][stage] for k in kafka]), label=stage)
    ax.plot(mid, rate([k["end"]["billing.ledger.events"] for k in kafka]), label="relay (ledger events)",
            linestyle=":")
    stage_peak = max((r for stage in STAGES for r in rate([k["committed"][stage] for k in kafka])), default=0)
    if stage_peak > 0:
        ax.set_ylim(0, stage_peak * 1.3)  # the producer's burst would flatten the stages' curves
    ax.set_ylabel("records/s (3-s mean; producer clipped)")
    ax.set_title(f"{result['name']}: end to end {result['end_to_end']['events_per_second']:,} events/s "
                 f"({result['end_to_end']['phase']}); red: phase start (dotted), produced (dashed), visible (solid)",
                 fontsize=9)
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
        ours = [100 * sum(usage[i]["cpu"].get(n, 0) - usage[i - 1]["cpu"].get(n, 0) for n in names)
                / max(usage[i]["t"] - usage[i - 1]["t"], 1e-9) for i in range(1, len(usage))]
        ax.plot(ut[1:], machine, label="machine", color="black", linewidth=0.8)
        ax.plot(ut[1:], [max(0.0, m - o) for m, o in zip(machine, ours, strict=True)],
                label="other processes", color="grey", linewidth=0.8, linestyle="--")
    ax.set_ylabel("CPU % of a core")
    ax.legend(loc="upper right", fontsize=7, ncol=3)
    ax = axes[3]
    markers = series["markers"]
    ax.scatter([m["published"] - t0 for m in markers], [m["latency_ms"] for m in markers], s=6)
    ax.set_yscale("log")
    ax.set_ylabel("publish -> visible (ms)")
    ax.set_xlabel("seconds since the first event was produced")
    for a in axes:
        for phase in series["phases"]:
            for key, style in (("produce_start", ":"), ("produce_end", "--"), ("done", "-")):
                if key in phase:
                    a.axvline(phase[key], color="red", linestyle=style, linewidth=0.8)
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
