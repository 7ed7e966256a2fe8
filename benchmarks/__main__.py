"""``python -m benchmarks run``: every scenario against both servers, interleaved, then a table.

Runs alternate ours, reference, ours, reference... so that slow drift of
the machine (heat, background work) lands on both sides alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from pathlib import Path

import websockets

from . import report
from .loadgen import LoadPool
from .scenarios import SCENARIOS, Plan
from .servers import NAMES, ROOT

RESULTS = ROOT / "benchmarks" / "results"  # git-ignored
KINDS = ("ours", "ref")


def _progress(elapsed: float, scenario: str, kind: str, rep: int, m: dict) -> str:
    parts = [f"[{elapsed:5.0f}s] {scenario:<16} {NAMES[kind]:<10} #{rep + 1}"]
    if scenario == "capacity":
        parts.append(f"{m['connected']:,} connected at {m['connect_per_s'] or 0:,.0f}/s, "
                     f"{m['rss_per_conn_kib']:.1f} KiB/conn, reach {report._fmt(m['broadcast_reach_ms'], '{:.0f}')} ms")
    else:
        parts.append(f"{m['deliveries_per_s']:,.0f} deliveries/s")
        if m["p99_ms"] is not None:
            parts.append(f"p99 {m['p99_ms']:.2f} ms")
        parts.append(f"lost {m['lost']} ooo {m['out_of_order']}")
    if scenario == "slow-consumer":
        parts.append(f"slow one dropped after {report._fmt(m['slow_disconnect_s'], '{:.1f}', True)} s")
    parts.append(f"cpu server {m['server_cpu_pct']:.0f}% loadgen {m['loadgen_cpu_pct']:.0f}%")
    return ", ".join(parts)


def run(args: argparse.Namespace) -> int:
    plan = Plan.make(args.quick)
    repeats = args.repeats or (1 if args.quick else 3)
    selected = args.scenario or list(SCENARIOS)
    results = {name: {kind: [] for kind in KINDS} for name in selected}
    errors = []
    RESULTS.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    pool = LoadPool(args.procs)
    with open(RESULTS / "servers.log", "w") as log:
        try:
            for name in selected:
                reps = min(repeats, plan.capacity_repeats) if name == "capacity" else repeats
                for rep in range(reps):
                    for kind in KINDS:
                        try:
                            metrics = SCENARIOS[name](kind, pool, plan, log)
                        except Exception as exc:  # one broken run must not lose the others
                            errors.append(f"{name} {kind} #{rep + 1}: {exc}")
                            print(f"error: {errors[-1]}", file=sys.stderr, flush=True)
                            pool.close(force=True)
                            pool = LoadPool(args.procs)
                            continue
                        metrics.pop("slow_ports", None)
                        results[name][kind].append(metrics)
                        print(_progress(time.monotonic() - started, name, kind, rep, metrics),
                              file=sys.stderr, flush=True)
        finally:
            pool.close()
    elapsed = time.monotonic() - started

    summary = report.summarize(results)
    target_rows = report.targets(summary, plan)
    print(report.table(summary, target_rows))
    print(f"\n{len(selected)} scenario(s), {repeats} repeat(s), {elapsed:.0f} s; "
          f"{args.procs} load processes; results in {args.out}")
    report.write_json(Path(args.out), {
        "meta": {
            "python": platform.python_version(), "websockets": websockets.__version__,
            "cpus": os.cpu_count(), "load_processes": args.procs, "quick": args.quick,
            "repeats": repeats, "elapsed_s": elapsed, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "plan": dataclasses.asdict(plan), "servers": NAMES,
        },
        "summary": summary,
        "targets": target_rows,
        "runs": results,
        "errors": errors,
    })
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("run", help="run the scenarios against both servers")
    p.add_argument("--quick", action="store_true", help="short runs, 1 repeat, 2,000-connection capacity (~1-2 min)")
    p.add_argument("--scenario", action="append", choices=list(SCENARIOS),
                   help="run only this scenario (repeatable; default all)")
    p.add_argument("--repeats", type=int, default=None, help="runs per server and scenario (default 3, quick 1)")
    p.add_argument("--procs", type=int, default=max(2, os.cpu_count() or 2),
                   help="load-generator processes (default: one per core, at least 2)")
    p.add_argument("--out", default=str(RESULTS / "latest.json"), help="JSON results file (default %(default)s)")
    args = parser.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
