"""Turn repeated runs into medians, ratios and target verdicts, as a table and as JSON.

Medians, because one run on a shared 2-core machine can be disturbed by
anything; ratios of ours against the best peer measured in the same
invocation (the fastest, or the lowest where lower is better), because
absolute numbers only mean something next to their yardstick.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from .scenarios import CAPACITY_DIAL_CONCURRENCY, PEERS
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
    "capacity": [("connected", "connected", "{:,.0f}"),
                 ("connect_first_per_s", "connects/s, first ones", "{:,.0f}"),
                 ("connect_last_per_s", "connects/s, last ones", "{:,.0f}"),
                 ("connect_per_s", "connects/s, all", "{:,.0f}"),
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
    # Ours only (the peers keep no history): fanout-100 with --history-size 0, then the default.
    "history-fanout": [("off_deliveries_per_s", "deliveries/s, history off", "{:,.0f}"),
                       ("on_deliveries_per_s", "deliveries/s, history on", "{:,.0f}"),
                       ("on_vs_off", "on / off", "{:.3f}"),
                       *[("on_" + key, label + ", on", spec) for key, label, spec in CHECKS]],
    "history-join": [("join_history_p50_ms", "join to 100th history ms", "{:.2f}"),
                     ("join_history_max_ms", "  slowest join ms", "{:.2f}"), *CHECKS],
}
# Scenarios of our server alone (no peer has a Redis mode): one
# column per variant, ratios to our own single node without Redis measured
# in the same runs, never to a peer. Variants: (metric prefix, heading).
OURS_ONLY = {
    "redis-latency": {
        "title": "redis-latency: our server only (no peer has a Redis mode); 100 subscribers, 50 per node,\n"
                 "on 2 nodes sharing one redis-server, 1 publisher on node A at 200 msg/s, 64 B; 1 node = the same\n"
                 "load on one node without Redis, run alongside. Ratios are to that 1-node run, not to a peer.",
        "variants": [("single_", "1 node"), ("same_node_", "node A"), ("cross_node_", "node B")],
        "subheads": ["no Redis", "via Redis", "cross-node"],
        "rows": [("p50_ms", "p50 ms", "{:.2f}"), ("p99_ms", "p99 ms", "{:.2f}"), ("max_ms", "max ms", "{:.2f}"),
                 ("deliveries_per_s", "deliveries/s", "{:,.0f}"), *CHECKS],
        "ratios": ["p50_ms", "p99_ms"],  # shown as "<label> vs 1 node" under each
        "cpu": [("single_server_cpu_pct", "1 node"), ("node_a_cpu_pct", "node A"), ("node_b_cpu_pct", "node B"),
                ("redis_cpu_pct", "redis-server")],
    },
    "redis-fanout": {
        "title": "redis-fanout: our server only; fanout-100's load (1 publisher, 64 B, as fast as the window allows)\n"
                 "with its 100 subscribers split 50/50 over 2 nodes sharing one redis-server, the publisher on\n"
                 "node A; 1 node = fanout-100 on one node without Redis, run alongside. Ratios are to that run.",
        "variants": [("single_", "1 node"), ("", "2 nodes"), ("same_node_", "node A"), ("cross_node_", "node B")],
        "subheads": ["no Redis", "both", "via Redis", "cross-node"],
        "rows": [("deliveries_per_s", "deliveries/s", "{:,.0f}"), *CHECKS],
        "ratios": ["deliveries_per_s"],
        "ratio_of": [""],  # one node's share of the subscribers against all of them would say nothing
        "cpu": [("single_server_cpu_pct", "1 node"), ("node_a_cpu_pct", "node A"), ("node_b_cpu_pct", "node B"),
                ("redis_cpu_pct", "redis-server")],
    },
}
# Metrics where a ratio ours/peer says something: True where higher is better.
RATIOS = {"deliveries_per_s": True, "baseline_deliveries_per_s": True, "connect_per_s": True,
          "connect_first_per_s": True, "p50_ms": False, "p99_ms": False, "rss_per_conn_kib": False,
          "broadcast_reach_ms": False}
# Metrics where a missing value means "did not happen", which sorts last.
NEVER = {"slow_disconnect_s"}
CPU = [("server_cpu_pct", "server"), ("loadgen_cpu_pct", "loadgen"), ("loadgen_max_proc_cpu_pct", "max proc"),
       ("other_cpu_pct", "other")]


def _family(scenario: str) -> str:
    return scenario.split("-")[0] if scenario.startswith(("fanout", "capacity")) else scenario


def median(values: list, never_last: bool = False):
    if never_last:
        keyed = sorted((math.inf if v is None else v) for v in values)
        m = keyed[(len(keyed) - 1) // 2] if keyed else math.inf  # lower median: a real value if half have one
        return None if m == math.inf else m
    real = [v for v in values if v is not None]
    return statistics.median(real) if real else None


def summarize(results: dict) -> dict:
    """{scenario: {kind: [run metrics]}} -> medians per kind, and ours / peer.

    "ratio" is ours / the best peer, "best" names it, "vs" has ours / each peer
    and / the design floor, which is no peer; "floor" has the floor / the best peer.
    """
    summary = {}
    for scenario, by_kind in results.items():
        keys = {k for runs in by_kind.values() for run in runs for k, v in run.items()
                if isinstance(v, (int, float)) or v is None}
        med = {kind: {k: median([run.get(k) for run in runs], k in NEVER) for k in sorted(keys)}
               for kind, runs in by_kind.items() if runs}
        ratio, best, vs, floor = {}, {}, {}, {}
        ours = med.get("ours", {})
        for k, higher in RATIOS.items():
            others = {kind: m[k] for kind, m in med.items() if kind != "ours" and m.get(k)}
            peers = {kind: value for kind, value in others.items() if kind in PEERS}
            if ours.get(k) is None or not peers:
                continue
            for kind, value in others.items():
                vs.setdefault(kind, {})[k] = ours[k] / value
            best[k] = (max if higher else min)(peers, key=peers.get)
            ratio[k] = ours[k] / peers[best[k]]
            if "floor" in others:
                floor[k] = others["floor"] / peers[best[k]]
        entry = {"median": med, "ratio": ratio, "best": best, "vs": vs, "floor": floor}
        spec = OURS_ONLY.get(scenario)
        if spec and "ours" in med:  # ratios of medians to our own single node, same run
            entry["ratio_to"] = "ours single node without Redis"
            base = spec["variants"][0][0]
            for prefix in spec.get("ratio_of", [p for p, _ in spec["variants"][1:]]):
                for k in spec["ratios"]:
                    a, b = med["ours"].get(prefix + k), med["ours"].get(base + k)
                    if a is not None and b:
                        ratio[prefix + k] = a / b
        summary[scenario] = entry
    return summary


def targets(summary: dict, plan) -> list[dict]:
    """The maintainers' targets, each with the measured value and a verdict (None: not measured)."""
    def get(scenario, kind, key):
        return summary.get(scenario, {}).get("median", {}).get(kind, {}).get(key)

    def ratio(scenario, key):
        return summary.get(scenario, {}).get("ratio", {}).get(key)

    def best(scenario, key):
        return NAMES.get(summary.get(scenario, {}).get("best", {}).get(key), "?")

    rows = []

    def check(name, value, ok, shown):
        rows.append({"target": name, "value": value, "met": None if value is None else ok(value),
                     "shown": "not measured" if value is None else shown(value)})

    for subs in ("100", "1000"):
        scenario = f"fanout-{subs}"
        check(f"fan-out {int(subs):,} subs >= 1.5x the fastest peer", ratio(scenario, "deliveries_per_s"),
              lambda v: v >= 1.5, lambda v, s=scenario: f"{v:.2f}x {best(s, 'deliveries_per_s')}")
    check("latency p99 <= the best peer's", ratio("latency", "p99_ms"), lambda v: v <= 1,
          lambda v: f"{v:.2f}x {best('latency', 'p99_ms')}")
    rate = get("capacity", "ours", "connect_first_per_s")
    check(f"connects/s, first {plan.rate_conns:,}, {CAPACITY_DIAL_CONCURRENCY} at a time >= 3,000", rate,
          lambda v: v >= 3000, lambda v: f"{v:,.0f}/s")
    check("connects/s, first ones >= websockets'",
          summary.get("capacity", {}).get("vs", {}).get("ref", {}).get("connect_first_per_s"),
          lambda v: v >= 1, lambda v: f"{v:.2f}x")
    connected = get("capacity", "ours", "connected")
    check(f"capacity: all {plan.capacity_conns:,} connect", connected,
          lambda v: v >= plan.capacity_conns, lambda v: f"{v:,.0f}")
    rss = get("capacity", "ours", "rss_per_conn_kib")
    check(f"RSS per idle connection at {plan.capacity_conns:,} <= 20 KiB", rss, lambda v: v <= 20,
          lambda v: f"{v:.1f} KiB")
    held = get("capacity-19k", "ours", "connected")
    check(f"capacity-19k: all {plan.held_conns:,} held and reached", held and min(
        held, get("capacity-19k", "ours", "reached") or 0), lambda v: v >= plan.held_conns, lambda v: f"{v:,.0f}")
    kept = get("capacity-19k", "ours", "last_vs_first")
    check(f"connects/s at {plan.held_conns:,} >= 70 % of the first {plan.rate_conns:,}'s", kept,
          lambda v: v >= 0.7, lambda v: f"{v:.1%}")
    faults = [v for s in summary.values() for k, v in s["median"].get("ours", {}).items()
              if k.endswith(("lost", "out_of_order")) and v is not None]
    check("no loss, no reordering, in any scenario (ours)", sum(faults) if faults else None,
          lambda v: v == 0, lambda v: f"{v:,.0f} lost or out of order")
    scale = get("redis-fanout", "ours", "nodes_vs_single")
    check("scale-out: fan-out 100 subs on 2 nodes >= 50 % of 1 node's", scale, lambda v: v >= 0.5,
          lambda v: f"{v:.1%}")
    kept = get("history-fanout", "ours", "on_vs_off")
    check("history on: fan-out >= 90 % of history off", kept, lambda v: v >= 0.9, lambda v: f"{v:.1%}")
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


def _ours_only(scenario: str, s: dict) -> list[str]:
    """The block of a scenario of ours alone: a column per variant."""
    spec = OURS_ONLY[scenario]
    med, ratio = s["median"].get("ours", {}), s["ratio"]
    heads = [h for _, h in spec["variants"]]
    lines = [""] + spec["title"].split("\n")
    head = f"{'':<16} {'metric':<26} " + " ".join(f"{h:>12}" for h in heads)
    lines += [head, f"{'':<16} {'':<26} " + " ".join(f"{h:>12}" for h in spec["subheads"]), "-" * len(head)]
    for i, (key, label, fmt_spec) in enumerate(spec["rows"]):
        cells = [fmt(med.get(prefix + key), fmt_spec) for prefix, _ in spec["variants"]]
        lines.append(f"{scenario if i == 0 else '':<16} {label:<26} " + " ".join(f"{c:>12}" for c in cells))
        if key in spec["ratios"]:
            cells = [""] + [fmt(ratio.get(prefix + key), "{:.2f}x") for prefix, _ in spec["variants"][1:]]
            lines.append(f"{'':<16} {'  ' + label + ' vs 1 node':<26} " + " ".join(f"{c:>12}" for c in cells))
    cpu = ", ".join(f"{label} {fmt(med.get(key), '{:.0f}')}%" for key, label in spec["cpu"])
    lines.append(f"{'':<16} server CPU, % of one core: {cpu}")
    return lines


def table(summary: dict, target_rows: list[dict], missing: dict | None = None) -> str:
    """Every server a column (a missing peer too, marked so), and ours / the best peer with its name."""
    missing = missing or {}
    kinds = [kind for kind in NAMES if kind in missing or any(kind in s["median"] for s in summary.values())]
    head = (f"{'scenario':<16} {'metric':<26} " + " ".join(f"{NAMES[kind]:>12}" for kind in kinds)
            + f" {'ours / best peer':>22}")
    lines = ["Medians", head, "-" * len(head)]
    for scenario, s in summary.items():
        med, ratio = s["median"], s["ratio"]
        if scenario in OURS_ONLY:
            lines.append(f"{scenario:<16} {'(our server only: below)':<26}")
            continue
        for i, (key, label, spec) in enumerate(SHOWN.get(_family(scenario), [])):
            cells = ["missing" if kind in missing else fmt(med.get(kind, {}).get(key), spec, key in NEVER)
                     for kind in kinds]
            r = f"{ratio[key]:.2f}x {NAMES[s['best'][key]]}" if key in ratio else ""
            lines.append(f"{scenario if i == 0 else '':<16} {label:<26} " + " ".join(f"{c:>12}" for c in cells)
                         + f" {r:>22}")
    for kind, why in missing.items():
        lines.append(f"missing: {NAMES[kind]}: {why}")
    for scenario, s in summary.items():
        if scenario in OURS_ONLY:
            lines += _ours_only(scenario, s)
    lines += ["", "CPU during the measured window, % of one core: loadgen = all load processes, max proc = the",
              "busiest of them, other = the rest of the machine (unattributed kernel time, other work);",
              "redis-latency, redis-fanout: server = both nodes + redis-server, in the 2-node run"]
    for kind in kinds:
        if kind in missing:
            continue
        head = f"{NAMES[kind]:<16} " + " ".join(f"{label:>9}" for _, label in CPU)
        lines += [head, "-" * len(head)]
        for scenario, s in summary.items():
            if s["median"].get(kind, {}).get("server_cpu_pct") is None:  # history-*: CPU per variant only
                continue
            cells = [fmt(s["median"].get(kind, {}).get(key), "{:.0f}") for key, _ in CPU]
            lines.append(f"{scenario:<16} " + " ".join(f"{c:>9}" for c in cells))
    lines += ["", "Targets"]
    for row in target_rows:
        verdict = {True: "MET", False: "MISSED", None: "-"}[row["met"]]
        lines.append(f"  {verdict:<7} {row['target']:<50} {row['shown']}")
    lines += _floor_lines(summary)
    return "\n".join(lines)


def _floor_lines(summary: dict) -> list[str]:
    """Where the design floor stands against the same targets: what is past it is past the design."""
    def floor(scenario: str, key: str):
        return summary.get(scenario, {}).get("floor", {}).get(key)

    p99, rate = floor("latency", "p99_ms"), summary.get("capacity", {}).get("median", {}).get("floor", {})
    if p99 is None and not rate:
        return []
    lines = ["", f"The {NAMES['floor']} (benchmarks/peers/threaded_floor.py: a thread per connection and websockets'",
             "Sans-I/O, nothing else), same run:"]
    if p99 is not None:
        best = NAMES[summary["latency"]["best"]["p99_ms"]]
        lines.append(f"  latency p99 {fmt(summary['latency']['median']['floor'].get('p99_ms'), '{:.2f}')} ms, "
                     f"{p99:.2f}x {best}'s; ours is {summary['latency']['vs']['floor']['p99_ms']:.2f}x the floor's")
    first = rate.get("connect_first_per_s")
    if first is not None:
        ref = summary["capacity"]["median"].get("ref", {}).get("connect_first_per_s")
        against = f", {first / ref:.2f}x websockets'" if ref else ""
        ours = summary["capacity"]["vs"].get("floor", {}).get("connect_first_per_s")
        lines.append(f"  connects/s, first ones {first:,.0f}{against}"
                     + (f"; ours is {ours:.2f}x the floor's" if ours is not None else ""))
    return lines


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def write_json(path: Path, document: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1, default=str) + "\n")
