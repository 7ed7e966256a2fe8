"""Turn repeated runs into medians, ratios and target verdicts, as a table and as JSON.

Medians, because one run on a shared 2-core machine can be disturbed by
anything; ratios against the reference measured in the same invocation,
because absolute numbers only mean something next to their yardstick.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from .servers import NAMES

# Per receiver and publisher: sequence numbers skipped (a later one came),
# still missing when the run ended (drain time over), and not increasing.
CHECKS = [("lost", "lost", "{:,.0f}"), ("undelivered", "undelivered at end", "{:,.0f}"),
          ("out_of_order", "out of order", "{:,.0f}")]
# What the table shows per scenario: (metric, label, format).
SHOWN = {
    "fanout": [("deliveries_per_s", "deliveries/s", "{:,.0f}"), *CHECKS],
    "latency": [("p50_ms", "p50 ms", "{:.2f}"), ("p99_ms", "p99 ms", "{:.2f}"),
                ("deliveries_per_s", "deliveries/s", "{:,.0f}"), *CHECKS],
    "many-publishers": [("deliveries_per_s", "deliveries/s", "{:,.0f}"), ("p50_ms", "p50 ms", "{:.2f}"),
                        ("p99_ms", "p99 ms", "{:.2f}"), *CHECKS],
    "capacity": [("connected", "connected", "{:,.0f}"), ("connect_per_s", "connects/s", "{:,.0f}"),
                 ("rss_per_conn_kib", "RSS KiB/conn", "{:.1f}"), ("server_threads", "server threads", "{:,.0f}"),
                 ("broadcast_reach_ms", "broadcast reach ms", "{:.1f}"), ("reached", "reached", "{:,.0f}")],
    "slow-consumer": [("baseline_deliveries_per_s", "deliveries/s alone", "{:,.0f}"),
                      ("deliveries_per_s", "deliveries/s w/ slow", "{:,.0f}"),
                      ("kept_deliveries", "kept (w/ / alone)", "{:.3f}"),
                      ("baseline_p99_ms", "p99 ms alone", "{:.2f}"), ("p99_ms", "p99 ms w/ slow", "{:.2f}"),
                      ("p99_vs_baseline", "p99 w/ / alone", "{:.2f}"),
                      ("slow_disconnect_s", "slow one dropped after s", "{:.1f}"),
                      ("lost", "lost (others)", "{:,.0f}"),
                      ("undelivered", "undelivered (others)", "{:,.0f}")],
}
# Metrics where a ratio ours/reference says something.
RATIOS = {"deliveries_per_s", "p50_ms", "p99_ms", "connect_per_s", "rss_per_conn_kib",
          "broadcast_reach_ms", "baseline_deliveries_per_s"}
# Metrics where a missing value means "did not happen", which sorts last.
NEVER = {"slow_disconnect_s"}
CPU = [("server_cpu_pct", "server"), ("loadgen_cpu_pct", "loadgen"), ("loadgen_max_proc_cpu_pct", "max proc"),
       ("other_cpu_pct", "other")]


def _family(scenario: str) -> str:
    return "fanout" if scenario.startswith("fanout") else scenario


def median(values: list, never_last: bool = False):
    if never_last:
        keyed = sorted((math.inf if v is None else v) for v in values)
        m = keyed[(len(keyed) - 1) // 2] if keyed else math.inf  # lower median: a real value if half have one
        return None if m == math.inf else m
    real = [v for v in values if v is not None]
    return statistics.median(real) if real else None


def summarize(results: dict) -> dict:
    """{scenario: {kind: [run metrics]}} -> medians per kind, and ratios ours/ref."""
    summary = {}
    for scenario, by_kind in results.items():
        keys = {k for runs in by_kind.values() for run in runs for k, v in run.items()
                if isinstance(v, (int, float)) or v is None}
        med = {kind: {k: median([run.get(k) for run in runs], k in NEVER) for k in sorted(keys)}
               for kind, runs in by_kind.items()}
        ratio = {}
        if "ours" in med and "ref" in med:
            for k in RATIOS:
                a, b = med["ours"].get(k), med["ref"].get(k)
                if a is not None and b:
                    ratio[k] = a / b
        summary[scenario] = {"median": med, "ratio": ratio}
    return summary


def targets(summary: dict, plan) -> list[dict]:
    """The maintainers' targets, each with the measured value and a verdict (None: not measured)."""
    def get(scenario, kind, key):
        return summary.get(scenario, {}).get("median", {}).get(kind, {}).get(key)

    def ratio(scenario, key):
        return summary.get(scenario, {}).get("ratio", {}).get(key)

    rows = []

    def check(name, value, ok, shown):
        rows.append({"target": name, "value": value, "met": None if value is None else ok(value),
                     "shown": "not measured" if value is None else shown(value)})

    check("fan-out 100 subs >= 5x reference", ratio("fanout-100", "deliveries_per_s"),
          lambda v: v >= 5, lambda v: f"{v:.2f}x")
    check("fan-out 1,000 subs >= 2.5x reference", ratio("fanout-1000", "deliveries_per_s"),
          lambda v: v >= 2.5, lambda v: f"{v:.2f}x")
    p99 = ratio("latency", "p99_ms")
    check("latency p99 <= reference", p99, lambda v: v <= 1, lambda v: f"{v:.2f}x reference")
    connected = get("capacity", "ours", "connected")
    check(f"capacity: all {plan.capacity_conns:,} connect", connected,
          lambda v: v >= plan.capacity_conns, lambda v: f"{v:,.0f}")
    rss = get("capacity", "ours", "rss_per_conn_kib")
    check("capacity: RSS <= 32 KiB per idle connection", rss, lambda v: v <= 32, lambda v: f"{v:.1f} KiB")
    kept = get("slow-consumer", "ours", "kept_deliveries")
    check("slow consumer: others keep >= 90% deliveries/s", kept, lambda v: v >= 0.9, lambda v: f"{v:.1%}")
    slower = get("slow-consumer", "ours", "p99_vs_baseline")
    check("slow consumer: others' p99 <= 1.5x without it", slower, lambda v: v <= 1.5, lambda v: f"{v:.2f}x")
    return rows


def fmt(value, spec: str, never: bool = False) -> str:
    """``value`` formatted with ``spec``; a missing value is "-", or "never" for events."""
    if value is None:
        return "never" if never else "-"
    return spec.format(value)


def table(summary: dict, target_rows: list[dict]) -> str:
    head = f"{'scenario':<16} {'metric':<26} {NAMES['ours']:>12} {NAMES['ref']:>12} {'ratio':>8}"
    lines = ["Medians", head, "-" * len(head)]
    for scenario, s in summary.items():
        med, ratio = s["median"], s["ratio"]
        for i, (key, label, spec) in enumerate(SHOWN.get(_family(scenario), [])):
            cells = [fmt(med.get(kind, {}).get(key), spec, key in NEVER) for kind in ("ours", "ref")]
            r = f"{ratio[key]:.2f}x" if key in ratio else ""
            lines.append(f"{scenario if i == 0 else '':<16} {label:<26} {cells[0]:>12} {cells[1]:>12} {r:>8}")
    lines += ["", "CPU during the measured window, % of one core: loadgen = all load processes, max proc = the",
              "busiest of them, other = the rest of the machine (unattributed kernel time, other work)"]
    for kind in ("ours", "ref"):
        head = f"{NAMES[kind]:<16} " + " ".join(f"{label:>9}" for _, label in CPU)
        lines += [head, "-" * len(head)]
        for scenario, s in summary.items():
            cells = [fmt(s["median"].get(kind, {}).get(key), "{:.0f}") for key, _ in CPU]
            lines.append(f"{scenario:<16} " + " ".join(f"{c:>9}" for c in cells))
    lines += ["", "Targets"]
    for row in target_rows:
        verdict = {True: "MET", False: "MISSED", None: "-"}[row["met"]]
        lines.append(f"  {verdict:<7} {row['target']:<50} {row['shown']}")
    return "\n".join(lines)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def write_json(path: Path, document: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1, default=str) + "\n")
