"""``python -m benchmarks run``: every scenario against every server, interleaved, then a table.

Runs take the servers in turn, ours, websockets, picows, socketify, gorilla,
ours, ... so that slow drift of the machine (heat, background work) lands on
all of them alike. A peer that cannot be installed or built is reported as
missing, with the reason, in the progress, the table and the JSON.
``python -m benchmarks profile`` runs one scenario against ours under py-spy.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import websockets

from . import profile, report, servers
from .loadgen import LoadPool
from .scenarios import FULL_ONLY, KINDS, SCENARIO_KINDS, SCENARIOS, Context, Plan
from .servers import NAMES, ROOT, machine_idle_seconds

RESULTS = ROOT / "benchmarks" / "results"  # git-ignored
# Before starting, the machine is watched this long for other work ...
QUIET_CHECK_S = 1.0
# ... and more than this (% of one core) busy earns a warning: numbers will be noisy.
QUIET_MAX_PCT = 20.0


def _server_version() -> dict:
    """Which server code was measured: others may be editing broadcast/ while this runs."""
    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    # --no-optional-locks: a status must never hold the index lock against someone's commit.
    status = git("--no-optional-locks", "status", "--porcelain", "--", "broadcast", "scripts")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status)}


def _redis_version() -> str | None:
    """The redis-server measured by redis-latency and redis-fanout, when they run."""
    try:
        return subprocess.run([servers.REDIS_SERVER, "--version"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _background_cpu_pct() -> float:
    """How busy the machine is before we load it: others' work distorts every number."""
    cores = os.cpu_count() or 1
    idle, wall = machine_idle_seconds(), time.monotonic()
    time.sleep(QUIET_CHECK_S)
    idle, wall = machine_idle_seconds() - idle, time.monotonic() - wall
    return (cores * wall - idle) / wall * 100


def _two_nodes(m: dict) -> list[str]:
    """The checks and CPU of a 2-node Redis run beside its 1-node run (redis-latency, redis-fanout)."""
    return [f"lost {m['lost']} undelivered {m['undelivered']} ooo {m['out_of_order']} (2 nodes), "
            f"{m['single_lost']} {m['single_undelivered']} {m['single_out_of_order']} (1 node)",
            f"cpu nodes {m['node_a_cpu_pct']:.0f}+{m['node_b_cpu_pct']:.0f}% "
            f"redis {m['redis_cpu_pct']:.0f}% loadgen {m['loadgen_cpu_pct']:.0f}%"]


def _progress(elapsed: float, scenario: str, kind: str, rep: int, m: dict) -> str:
    parts = [f"[{elapsed:5.0f}s] {scenario:<16} {NAMES[kind]:<10} #{rep + 1}"]
    if scenario == "redis-latency":
        parts.append(", ".join(
            f"{label} p50 {report.fmt(m[key + '_p50_ms'], '{:.2f}')} p99 {report.fmt(m[key + '_p99_ms'], '{:.2f}')} ms"
            for label, key in (("1 node no Redis", "single"), ("same node via Redis", "same_node"),
                               ("cross node", "cross_node"))))
        return ", ".join(parts + _two_nodes(m))
    if scenario == "redis-fanout":
        parts.append(f"1 node {m['single_deliveries_per_s']:,.0f}, 2 nodes {m['deliveries_per_s']:,.0f} "
                     f"({m['same_node_deliveries_per_s']:,.0f} + {m['cross_node_deliveries_per_s']:,.0f}) "
                     f"deliveries/s ({m['nodes_vs_single']:.1%})")
        return ", ".join(parts + _two_nodes(m))
    if scenario == "history-fanout":
        parts.append(f"history off {m['off_deliveries_per_s']:,.0f}, on {m['on_deliveries_per_s']:,.0f} "
                     f"deliveries/s ({m['on_vs_off']:.1%}), lost {m['off_lost']}+{m['on_lost']} "
                     f"undelivered {m['off_undelivered']}+{m['on_undelivered']} "
                     f"ooo {m['off_out_of_order']}+{m['on_out_of_order']}")
        return ", ".join(parts)
    if scenario == "history-join":
        parts.append(f"join to {m['history_messages']} history messages: median {m['join_history_p50_ms']:.2f} ms "
                     f"over {m['joins']} joins (max {m['join_history_max_ms']:.2f}), "
                     f"lost {m['lost']} undelivered {m['undelivered']} ooo {m['out_of_order']}")
        return ", ".join(parts)
    if scenario.startswith("capacity"):
        parts.append(f"{m['connected']:,} connected at {m['connect_per_s'] or 0:,.0f}/s "
                     f"(first ones {report.fmt(m['connect_first_per_s'], '{:,.0f}')}/s, "
                     f"last ones {report.fmt(m['connect_last_per_s'], '{:,.0f}')}/s), "
                     f"reached {m['reached']:,} of {m['receivers']:,}, "
                     f"{m['rss_per_conn_kib']:.1f} KiB/conn, reach {report.fmt(m['broadcast_reach_ms'], '{:.0f}')} ms")
    else:
        parts.append(f"{m['deliveries_per_s']:,.0f} deliveries/s")
        if m["p99_ms"] is not None:
            parts.append(f"p99 {m['p99_ms']:.2f} ms")
        parts.append(f"lost {m['lost']} undelivered {m['undelivered']} ooo {m['out_of_order']}")
    if scenario == "slow-consumer":
        parts.append(f"slow one dropped at {report.fmt(m['slow_disconnect_s'], '{:.1f} s', True)}")
    parts.append(f"cpu server {m['server_cpu_pct']:.0f}% loadgen {m['loadgen_cpu_pct']:.0f}%")
    return ", ".join(parts)


def run(args: argparse.Namespace) -> int:
    plan = Plan.make(args.quick)
    repeats = args.repeats or (1 if args.quick else 2)
    selected = args.scenario or [name for name in SCENARIOS if not (args.quick and name in FULL_ONLY)]
    RESULTS.mkdir(parents=True, exist_ok=True)
    wanted = args.server or list(KINDS)
    missing = {kind: why for kind in wanted if (why := servers.prepare(kind))}
    for kind, why in missing.items():
        print(f"missing: {NAMES[kind]}: {why}", file=sys.stderr, flush=True)
    kinds = [kind for kind in KINDS if kind in wanted and kind not in missing]
    results = {name: {kind: [] for kind in SCENARIO_KINDS.get(name, KINDS) if kind in kinds} for name in selected}
    errors = []
    version = _server_version()
    background = _background_cpu_pct()
    if background > QUIET_MAX_PCT:
        print(f"warning: before the benchmark, other work used {background:.0f}% of a core; "
              "expect noisy numbers (see the 'other' CPU column)", file=sys.stderr)
    started = time.monotonic()
    pool = LoadPool(args.procs)
    with open(RESULTS / "servers.log", "w") as log:
        ctx = Context(plan, log)
        try:
            for name in selected:
                reps = {"capacity": min(repeats, plan.capacity_repeats), "capacity-19k": 1}.get(name, repeats)
                for rep in range(reps):
                    for kind in results[name]:
                        try:
                            metrics = SCENARIOS[name](kind, pool, ctx)
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
    document = {
        "meta": {
            "python": platform.python_version(), "websockets": websockets.__version__,
            "cpus": os.cpu_count(), "load_processes": args.procs, "quick": args.quick,
            "repeats": repeats, "elapsed_s": elapsed, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "plan": dataclasses.asdict(plan), "servers": NAMES, "missing": missing,
            "background_cpu_pct": background,
            "server_code": version,
            "redis_server": _redis_version() if {"redis-latency", "redis-fanout"} & set(selected) else None,
        },
        "runs": results,
        "errors": errors,
    }
    report.write_json(Path(args.out), document)  # the runs are safe before anything else can fail
    document["summary"] = summary = report.summarize(results)
    document["targets"] = target_rows = report.targets(summary, plan)
    report.write_json(Path(args.out), document)
    print(report.table(summary, target_rows, missing))
    print(f"\n{len(selected)} scenario(s), {repeats} repeat(s), {elapsed:.0f} s; "
          f"{args.procs} load processes; results in {args.out}")
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    return 1 if errors else 0


def show(args: argparse.Namespace) -> int:
    """Print the table again from a results file."""
    document = report.read_json(Path(args.file))
    summary = report.summarize(document["runs"])
    print(report.table(summary, report.targets(summary, Plan.load(document["meta"]["plan"])),
                       document["meta"].get("missing", {})))
    return 0


def profile_run(args: argparse.Namespace) -> int:
    plan = Plan.make(args.quick)
    RESULTS.mkdir(parents=True, exist_ok=True)
    raw = RESULTS / f"profile-{args.scenario}.txt"
    profiler = profile.Profiler(raw, args.gil)
    pool = LoadPool(args.procs)
    try:
        with open(RESULTS / "servers.log", "w") as log:
            metrics = SCENARIOS[args.scenario]("ours", pool, Context(plan, log, on_window=profiler, on_connects=profiler.connects))
    finally:
        pool.close()
        profiler.wait()
    print(_progress(0, args.scenario, "ours", 0, metrics), file=sys.stderr)
    print(profile.summarize(raw))
    print(f"\nraw py-spy stacks (collapsed format, for flamegraph.pl or speedscope): {raw}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark the broadcast server against its peers: websockets, picows, socketify, gorilla.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("run", help="run the scenarios against every server")
    p.add_argument("--quick", action="store_true", help="short runs, 1 repeat, 2,000-connection capacity (< 2 min)")
    p.add_argument("--scenario", action="append", choices=list(SCENARIOS),
                   help="run only this scenario (repeatable; default all)")
    p.add_argument("--server", action="append", choices=list(KINDS),
                   help="run only this server (repeatable; default all)")
    p.add_argument("--repeats", type=int, default=None, help="runs per server and scenario (default 2, quick 1)")
    p.add_argument("--procs", type=int, default=max(2, os.cpu_count() or 2),
                   help="load-generator processes (default: one per core, at least 2)")
    p.add_argument("--out", default=str(RESULTS / "latest.json"), help="JSON results file (default %(default)s)")
    p = commands.add_parser("profile", help="run one scenario against our server under py-spy")
    p.add_argument("scenario", nargs="?", default="fanout-1000", choices=list(SCENARIOS))
    p.add_argument("--quick", action="store_true", help="the short --quick durations")
    p.add_argument("--gil", action=argparse.BooleanOptionalAction, default=True,
                   help="sample only the thread holding the GIL (default on)")
    p.add_argument("--procs", type=int, default=max(2, os.cpu_count() or 2), help="load-generator processes")
    p = commands.add_parser("report", help="print the table of a results file again")
    p.add_argument("file", nargs="?", default=str(RESULTS / "latest.json"))
    args = parser.parse_args(argv)
    return {"run": run, "profile": profile_run, "report": show}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
