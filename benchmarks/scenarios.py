"""The loads, and the numbers each one takes from a server.

A scenario run starts its own fresh server(s), hands one ``Job`` per load
process, and turns the processes' counts into flat metrics. All timing is
CLOCK_MONOTONIC, which the coordinator, the load processes and the send
stamps inside payloads share.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import resource
import socket
import statistics
import tempfile
import time
from dataclasses import dataclass, field

from . import wire
from .loadgen import Job, LoadPool, Publisher, source_addresses
from .servers import HOST, ServerProcess, machine_idle_seconds

# Fan-out publisher window W, in messages: it sends seq n only once every
# receiver (all processes, read through shared memory) has seq n - W. At
# least this many, so each client's queue can batch (~17 KB, far below our
# 4 MiB eviction) ...
FANOUT_WINDOW_MIN_MSGS = 256
# ... and at least this many deliveries in flight, ~50 ms of our server's
# work: its reader takes the GIL for a whole received batch, handing it to
# the writers between its system calls, and a load process may wait for a
# core meanwhile; a shallower window leaves the server idle between round
# trips (at 100 subscribers, W = 256 measured 30% less).
FANOUT_INFLIGHT_DELIVERIES = 102_400
FANOUT_SIZE_BYTES = 64
LATENCY_SUBSCRIBERS = 100
LATENCY_RATE_HZ = 200
# redis-latency: the latency load on 2 nodes of ours sharing one redis-server,
# the subscribers split evenly; the publisher is on the first node ("same
# node": its messages come back to it through Redis) and the second node
# only gets them through Redis ("cross node").
REDIS_NODES = ("same_node", "cross_node")
# redis-fanout: fanout-100's load, its subscribers split over those 2 nodes.
REDIS_FANOUT_SUBSCRIBERS = 100
MANY_PUBLISHERS = 50
MANY_RATE_HZ = 20  # per publisher: 1,000 msg/s in, 50,000 deliveries/s out
SMALL_SIZE_BYTES = 64
SLOW_SUBSCRIBERS = 100
# Slow-consumer load: big enough messages that the stalled client's queue
# overflows our 4 MiB limit in ~2 s (2 MB/s), so its eviction falls inside
# the run; 50,000 deliveries/s keeps both servers below saturation.
SLOW_RATE_HZ = 500
SLOW_SIZE_BYTES = 4096
# The coordinator looks at the stalled client's TCP state this often.
WATCH_PERIOD_S = 0.05
CORES = os.cpu_count() or 1
# Load processes get "go" this long before t0, so all start on time.
START_LEAD_S = 0.2
# After a burst of connects the server needs a moment before its RSS and
# thread count stop moving (threads finish starting, buffers are touched).
SETTLE_S = 1.0
# --quick's, which measures nothing: 4 settles per server were a tenth of its 2 minutes.
QUICK_SETTLE_S = 0.3
# Capacity: the single broadcast is sent in this window, and must reach
# everyone within the drain time or it counts as not reached.
CAPACITY_SEND_S = 0.2
CAPACITY_REACH_TIMEOUT_S = 10.0
CAPACITY_CONNECT_TIMEOUT_S = 120.0
# Capacity dials with this many handshakes in flight in all, split over the
# load processes: the connection-rate load of issue 13 ("5,000 clients
# dialling 64 at a time"), a crowd arriving, not a flood filling the backlog.
CAPACITY_DIAL_CONCURRENCY = 64
# capacity-19k: issue 13's 19,000 connections held (its full run; --quick
# holds Plan.held_conns), with our server's --max-connections raised to
# them and --max-handshakes lowered to this, 8x the dials in flight, so
# both fit a 20,000 open-files limit.
HELD_CONNS = 19_000
HELD_HANDSHAKES = 512
HELD_ARGS = ("--max-connections", str(HELD_CONNS), "--max-handshakes", str(HELD_HANDSHAKES))
# Our server admits at most its open-files limit less this (FD_RESERVE in
# broadcast/net/listener.py) less --max-handshakes: at the default 4,096
# that would be 15,840 of a 20,000 limit.
SERVER_FD_RESERVE = 64
# Messages still in flight when the window closes get this long to arrive;
# what has not arrived by then is reported as undelivered, not lost.
DRAIN_S = 5.0
# --quick's: the peers that fall behind at fan-out 1,000 waited out the whole
# drain, 10 s of its 2 minutes.
QUICK_DRAIN_S = 2.0
# Extra time the coordinator allows the load processes to report.
RESULT_MARGIN_S = 30.0
# history-join: the room is filled with this many messages (our default
# --history-size), then each of this many joiners asks for them all ...
HISTORY_MESSAGES = 100
HISTORY_JOINS = 50
# ... and one fill or join that takes longer than this is broken, not slow.
HISTORY_JOIN_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Plan:
    """Durations and sizes: full, or --quick for a smoke test."""

    warmup_s: float
    measure_s: float  # latency, redis-latency, many-publishers
    slow_measure_s: float
    capacity_conns: int  # RSS and threads are taken with this many connected
    capacity_repeats: int
    rate_conns: int = 5_000  # connects/s over the first this many of them, and over the last
    fanout_measure_s: float = 10.0
    held_conns: int = HELD_CONNS  # capacity-19k, in 1 repeat: it is ours only
    drain_s: float = DRAIN_S
    settle_s: float = SETTLE_S

    @classmethod
    def make(cls, quick: bool) -> Plan:
        """Windows sized so that 5 servers fit: the full run in 15 minutes, --quick in 2.

        The slow-consumer window must outlast our eviction of the stalled
        client (~5 s) in the full run; --quick is a smoke test of every path,
        not a measurement.
        """
        if quick:
            return cls(warmup_s=0.3, measure_s=1.0, slow_measure_s=1.0,
                       capacity_conns=2_000, capacity_repeats=1, rate_conns=1_000, fanout_measure_s=1.0,
                       held_conns=3_000, drain_s=QUICK_DRAIN_S, settle_s=QUICK_SETTLE_S)
        return cls(warmup_s=1.0, measure_s=5.0, slow_measure_s=7.0,
                   capacity_conns=10_000, capacity_repeats=2, rate_conns=5_000, fanout_measure_s=5.0)

    @classmethod
    def load(cls, saved: dict) -> Plan:
        """A Plan from a results file; fields it predates get their defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in names})


@dataclass
class Context:
    """What every scenario run gets besides its load processes."""

    plan: Plan
    log: object  # open file for the servers' stderr
    # Called as on_window(server, seconds) when a measured window opens: the
    # profiler's way in.
    on_window: object = None
    # Called as on_connects(server) as capacity starts dialling, since what it
    # measures is the connecting, not its window (one broadcast); what it
    # returns is called once every client is up.
    on_connects: object = None
    # Runs so far per scenario, for those that alternate their variants' order.
    turns: dict = field(default_factory=dict)


@contextlib.contextmanager
def started(kind: str, log, extra: tuple[str, ...] = ()):
    server = ServerProcess.start(kind, log, extra)
    try:
        yield server
    finally:
        server.stop()


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (i < total % parts) for i in range(parts)]


def _jobs(pool: LoadPool, server: ServerProcess, subscribers: int, publishers: list[Publisher],
          slow: int = 0, **common) -> list[Job]:
    """Spread clients evenly over the load processes; publishers round-robin from the first."""
    jobs = [Job(HOST, server.port, subscribers=n, total_publishers=len(publishers), **common)
            for n in _split(subscribers, pool.procs)]
    for i, pub in enumerate(publishers):
        jobs[i % pool.procs].publishers.append(pub)
    jobs[-1].slow = slow
    return jobs


def _percentile(sorted_values, q: float):
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def _receipts(results: list[dict], measure_s: float) -> dict:
    """Deliveries, sequence checks and latency percentiles over some load processes' results."""
    latencies = sorted(x for r in results for x in r["latencies_ns"])

    def ms(ns):
        return None if ns is None else ns / 1e6

    return {
        "deliveries_per_s": sum(r["deliveries"] for r in results) / measure_s,
        "lost": sum(r["lost"] for r in results),
        "undelivered": sum(r["undelivered"] for r in results),
        "out_of_order": sum(r["out_of_order"] for r in results),
        "closed_by_server": sum(r["closed_by_server"] for r in results),
        "reached": sum(r["complete"] for r in results),
        "receivers": sum(r["receivers"] for r in results),
        "p50_ms": ms(_percentile(latencies, 0.50)),
        "p99_ms": ms(_percentile(latencies, 0.99)),
        "max_ms": ms(latencies[-1] if latencies else None),
        "latency_samples": len(latencies),
    }


def _drive(ctx: Context, pool: LoadPool, server: ServerProcess, jobs: list[Job], connected=None,
           watch=None, partial_ok: bool = False, cpu_parts: dict | None = None,
           groups: dict | None = None) -> dict:
    """Connect, run, and summarize one load.

    ``connected(ready)`` runs once every client is up, before any message;
    ``watch(t0)`` is polled while the load runs. A client that cannot
    connect makes the run worthless unless ``partial_ok`` (capacity counts them).
    ``cpu_parts`` ({name: process}, default {"server": server}): the
    processes whose CPU is the server side's, each also reported as
    ``<name>_cpu_pct``. ``groups`` ({label: job indices}): receipts of
    those jobs' clients alone, reported as ``<label>_<metric>``.
    """
    parts = cpu_parts or {"server": server}
    ready = pool.connect(jobs)
    failed = sum(r["failed"] for r in ready)
    if failed and (not partial_ok or not sum(r["connected"] for r in ready)):
        pool.go(0)  # t0 in the past: the load processes drain nothing and report at once
        pool.results(RESULT_MARGIN_S)
        raise RuntimeError(f"{failed} client(s) could not connect to the {server.kind} server")
    if connected:
        connected(ready)
    job = jobs[0]
    t0 = time.monotonic() + START_LEAD_S
    t_win, t_end = t0 + job.warmup_s, t0 + job.warmup_s + job.measure_s
    pool.go(int(t0 * 1e9))
    cpu = {}
    for name, until in (("start", t_win), ("end", t_end)):
        while (now := time.monotonic()) < until:
            if watch:
                watch(t0)
            time.sleep(min(WATCH_PERIOD_S, until - now))
        cpu[name] = {part: proc.cpu_seconds() for part, proc in parts.items()}
        cpu["idle_" + name] = machine_idle_seconds()
        cpu["wall_" + name] = time.monotonic()
        if name == "start" and ctx.on_window:
            ctx.on_window(server, job.measure_s)
    results = pool.results(job.drain_s + RESULT_MARGIN_S)

    procs_cpu = [r["cpu_s"] / job.measure_s * 100 for r in results]
    parts_cpu = {part: (cpu["end"][part] - cpu["start"][part]) / job.measure_s * 100 for part in parts}
    out = _receipts(results, job.measure_s)
    out.update({
        "published": sum(sum(r["sent"].values()) for r in results),
        "server_cpu_pct": sum(parts_cpu.values()),
        "loadgen_cpu_pct": sum(procs_cpu),
        "loadgen_max_proc_cpu_pct": max(procs_cpu),
        "machine_cpu_pct": (CORES * (cpu["wall_end"] - cpu["wall_start"]) - (cpu["idle_end"] - cpu["idle_start"]))
                           / job.measure_s * 100,
        "connected": sum(r["connected"] for r in ready),
        "connect_failed": sum(r["failed"] for r in ready),
    })
    if cpu_parts:
        out.update({f"{part}_cpu_pct": pct for part, pct in parts_cpu.items()})
    for label, indices in (groups or {}).items():
        mine = _receipts([results[i] for i in indices], job.measure_s)
        mine["connected"] = sum(ready[i]["connected"] for i in indices)
        out.update({f"{label}_{k}": v for k, v in mine.items()})
    span_ns = max(r["t_last_ns"] for r in ready) - min(r["t_first_ns"] for r in ready)
    out["other_cpu_pct"] = out["machine_cpu_pct"] - out["server_cpu_pct"] - out["loadgen_cpu_pct"]
    out["connect_per_s"] = out["connected"] / (span_ns / 1e9) if span_ns > 0 else None
    out["slow_ports"] = [p for r in ready for p in r["slow_ports"]]
    return out


def fanout(subscribers: int, ours_args: tuple[str, ...] = ()):
    """The fan-out load; ``ours_args``: extra flags for our server (history-fanout's variants)."""
    window = max(FANOUT_WINDOW_MIN_MSGS, FANOUT_INFLIGHT_DELIVERIES // subscribers)

    # The gorilla hub drops a client whose send channel is full, and Go
    # allocates that channel whole at connect, so its size is the peer's to
    # choose per load: the window, since no client is ever more than the
    # window behind (elsewhere the example's 256 holds every load).
    extra = {"gorilla": ("-send-buffer", str(window)), "ours": ours_args}

    def run(kind: str, pool: LoadPool, ctx: Context) -> dict:
        plan = ctx.plan
        with started(kind, ctx.log, extra.get(kind, ())) as server:
            jobs = _jobs(pool, server, subscribers, [Publisher(0)], stream=True, window=window,
                         size=FANOUT_SIZE_BYTES,
                         warmup_s=plan.warmup_s, measure_s=plan.fanout_measure_s, drain_s=plan.drain_s)
            return _drive(ctx, pool, server, jobs)
    return run


def latency(kind: str, pool: LoadPool, ctx: Context) -> dict:
    plan = ctx.plan
    with started(kind, ctx.log) as server:
        jobs = _jobs(pool, server, LATENCY_SUBSCRIBERS, [Publisher(0, rate=LATENCY_RATE_HZ)],
                     size=SMALL_SIZE_BYTES, warmup_s=plan.warmup_s, measure_s=plan.measure_s,
                     drain_s=plan.drain_s)
        return _drive(ctx, pool, server, jobs)


def _alternate(name: str, ctx: Context, single, nodes) -> tuple[dict, dict]:
    """Run ``single()`` and ``nodes()``, each on fresh processes, alternating which goes first per call."""
    turn = ctx.turns.get(name, 0)
    ctx.turns[name] = turn + 1
    if turn % 2:
        later = nodes()
        return single(), later
    return single(), nodes()  # left to right: single first


def _check_redis_kind(name: str, kind: str, pool: LoadPool) -> None:
    if kind != "ours":
        raise ValueError(f"{name} runs our server only")
    if pool.procs < len(REDIS_NODES):
        raise RuntimeError(f"{name} needs at least {len(REDIS_NODES)} load processes")


def redis_latency(kind: str, pool: LoadPool, ctx: Context) -> dict:
    """The latency load over 2 nodes sharing one Redis, and on 1 node without Redis for comparison.

    Ours only: no peer has a Redis mode. Each call runs both
    variants on fresh processes, alternating which goes first.
    """
    _check_redis_kind("redis-latency", kind, pool)
    plan = ctx.plan
    single, nodes = _alternate("redis-latency", ctx, lambda: latency(kind, pool, ctx), lambda: _redis_nodes(
        pool, ctx, LATENCY_SUBSCRIBERS, Publisher(0, rate=LATENCY_RATE_HZ), plan.measure_s,
        size=SMALL_SIZE_BYTES))
    out = dict(nodes)
    for key in ("p50_ms", "p99_ms", "max_ms", "deliveries_per_s", "lost", "undelivered", "out_of_order",
                "receivers", "server_cpu_pct", "loadgen_cpu_pct", "other_cpu_pct"):
        out["single_" + key] = single[key]
    for label in REDIS_NODES:
        for key in ("p50_ms", "p99_ms"):
            a, b = out[f"{label}_{key}"], single[key]
            out[f"{label}_{key}_vs_single"] = a / b if a is not None and b else None
    return out


def redis_fanout(kind: str, pool: LoadPool, ctx: Context) -> dict:
    """fanout-100 with its subscribers split over 2 nodes sharing one Redis, and on 1 node alone.

    Ours only, like redis-latency, and run the same way. The publisher is on
    node A, so each message makes the one Redis round trip every node
    delivers from; the window spans both nodes' receivers. Scale-out's
    yardstick is the 1-node run: ``deliveries_per_s`` is both nodes' total.
    """
    _check_redis_kind("redis-fanout", kind, pool)
    plan = ctx.plan
    window = max(FANOUT_WINDOW_MIN_MSGS, FANOUT_INFLIGHT_DELIVERIES // REDIS_FANOUT_SUBSCRIBERS)
    single, nodes = _alternate("redis-fanout", ctx, lambda: fanout(REDIS_FANOUT_SUBSCRIBERS)(kind, pool, ctx),
                               lambda: _redis_nodes(pool, ctx, REDIS_FANOUT_SUBSCRIBERS, Publisher(0),
                                                    plan.fanout_measure_s, size=FANOUT_SIZE_BYTES,
                                                    stream=True, window=window))
    out = dict(nodes)
    for key in ("deliveries_per_s", "lost", "undelivered", "out_of_order", "receivers", "server_cpu_pct",
                "loadgen_cpu_pct", "other_cpu_pct"):
        out["single_" + key] = single[key]
    out["nodes_vs_single"] = nodes["deliveries_per_s"] / single["deliveries_per_s"]
    return out


def _redis_nodes(pool: LoadPool, ctx: Context, subscribers: int, publisher: Publisher, measure_s: float,
                 **load) -> dict:
    """One run of a load over a fresh redis-server and 2 fresh nodes; all stopped whatever happens.

    ``subscribers`` are split evenly over the nodes, ``publisher`` is the
    first load process's, on node A; ``load``: the Job fields of the load.
    """
    plan = ctx.plan
    with contextlib.ExitStack() as stack:
        scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-redis-"))
        redis = ServerProcess.start("redis", ctx.log, ("--dir", scratch), cwd=scratch)
        stack.callback(redis.stop)  # registered first: stopped last, after the nodes
        url = f"redis://{HOST}:{redis.port}/0"
        nodes = []
        for _ in REDIS_NODES:
            node = ServerProcess.start("ours", ctx.log, ("--redis-url", url))
            stack.callback(node.stop)
            nodes.append(node)
        for node in nodes:
            node.wait_subscribed()
        procs = _split(pool.procs, len(nodes))
        subs = _split(subscribers, len(nodes))
        jobs, groups = [], {}
        for label, node, nprocs, nsubs in zip(REDIS_NODES, nodes, procs, subs, strict=True):
            groups[label] = list(range(len(jobs), len(jobs) + nprocs))
            jobs += [Job(HOST, node.port, subscribers=n, total_publishers=1, warmup_s=plan.warmup_s,
                         measure_s=measure_s, drain_s=plan.drain_s, **load)
                     for n in _split(nsubs, nprocs)]
        jobs[0].publishers.append(publisher)
        cpu_parts = {"node_a": nodes[0], "node_b": nodes[1], "redis": redis}
        out = _drive(ctx, pool, nodes[0], jobs, cpu_parts=cpu_parts, groups=groups)
        # A node cut off from Redis delivers its own clients' messages locally:
        # its numbers would then not be the round trip's.
        for label, node in zip(REDIS_NODES, nodes, strict=True):
            try:
                state = node.health().get("redis")
            except (OSError, ValueError) as exc:
                state = str(exc)
            if state != "ok":
                raise RuntimeError(f"{label} node lost Redis during the run (/healthz redis: {state})")
        return out


def many_publishers(kind: str, pool: LoadPool, ctx: Context) -> dict:
    plan = ctx.plan
    spread_s = 1 / (MANY_PUBLISHERS * MANY_RATE_HZ)  # evenly interleaved, not in lockstep
    pubs = [Publisher(i, rate=MANY_RATE_HZ, phase_s=i * spread_s, counted=True)
            for i in range(MANY_PUBLISHERS)]
    with started(kind, ctx.log) as server:
        jobs = _jobs(pool, server, 0, pubs, size=SMALL_SIZE_BYTES, warmup_s=plan.warmup_s,
                     measure_s=plan.measure_s, drain_s=plan.drain_s)
        return _drive(ctx, pool, server, jobs)


def capacity(held: str, ours_args: tuple[str, ...] = ()):
    """N = ``plan.<held>`` connections dialled 64 at a time, then one of them publishes once.

    The connect rate over the first and over the last ``plan.rate_conns``,
    and over all N, shows whether accepting slows as connections pile up.
    Each load process dials from its own loopback addresses, so the
    machine's ephemeral ports are not what slows it. ``ours_args``: flags
    for our server (capacity-19k raises its limits).
    """
    def run(kind: str, pool: LoadPool, ctx: Context) -> dict:
        plan = ctx.plan
        n = getattr(plan, held)
        if "--max-handshakes" in ours_args:
            need = n + int(ours_args[ours_args.index("--max-handshakes") + 1]) + SERVER_FD_RESERVE
            limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            if limit < need:
                raise RuntimeError(f"{n:,} connections need an open-files limit of {need:,}; "
                                   f"ulimit -Hn is {limit:,}")
        with started(kind, ctx.log, ours_args if kind == "ours" else ()) as server:
            time.sleep(plan.settle_s)
            rss_before = server.rss_bytes()
            jobs = _jobs(pool, server, n - 1, [Publisher(0, rate=1.0, max_count=1, counted=True)],
                         size=SMALL_SIZE_BYTES, measure_s=CAPACITY_SEND_S,
                         drain_s=CAPACITY_REACH_TIMEOUT_S, connect_timeout_s=CAPACITY_CONNECT_TIMEOUT_S,
                         connect_concurrency=max(1, CAPACITY_DIAL_CONCURRENCY // pool.procs))
            for i, (job, share) in enumerate(zip(jobs, _split(plan.rate_conns, pool.procs), strict=True)):
                job.rate_conns = share
                job.tail_conns = job.subscribers + len(job.publishers) - share
                job.sources = source_addresses(i)
            seen = {}
            profiled = ctx.on_connects(server) if ctx.on_connects and kind == "ours" else None

            def settled(ready) -> None:
                if profiled:
                    profiled()
                firsts, tails = [r["t_rate_ns"] for r in ready], [r["t_tail_ns"] for r in ready]
                if None not in firsts:  # every process got its share of the first rate_conns up
                    seen["rate"] = plan.rate_conns / ((max(firsts) - min(r["t_first_ns"] for r in ready)) / 1e9)
                if None not in tails:  # ... and of the last ones
                    seen["last"] = plan.rate_conns / ((max(r["t_last_ns"] for r in ready) - max(tails)) / 1e9)
                time.sleep(plan.settle_s)
                seen["rss"] = server.rss_bytes()
                seen["threads"] = server.threads()

            out = _drive(ctx, pool, server, jobs, connected=settled, partial_ok=True)
        connected = max(out["connected"], 1)
        first, last = seen.get("rate"), seen.get("last")
        out.update({
            "rss_before_mib": rss_before / 2**20,
            "rss_after_mib": seen["rss"] / 2**20,
            "rss_per_conn_kib": (seen["rss"] - rss_before) / connected / 1024,
            "connect_first_per_s": first,
            "connect_last_per_s": last,
            "last_vs_first": last / first if first and last else None,
            "server_threads": seen["threads"],
            "broadcast_reach_ms": out["max_ms"] if out["reached"] == out["receivers"] else None,
        })
        return out
    return run


def _slow_run(kind: str, pool: LoadPool, ctx: Context, slow: int) -> dict:
    plan = ctx.plan
    with started(kind, ctx.log) as server:
        jobs = _jobs(pool, server, SLOW_SUBSCRIBERS, [Publisher(0, rate=SLOW_RATE_HZ)], slow=slow,
                     size=SLOW_SIZE_BYTES, warmup_s=plan.warmup_s, measure_s=plan.slow_measure_s,
                     drain_s=plan.drain_s)
        ports: list[int] = []
        gone = {}

        def watch(t0: float) -> None:
            if ports and "at" not in gone and not server.still_connected(ports[0]):
                gone["at"] = time.monotonic() - t0

        out = _drive(ctx, pool, server, jobs, watch=watch,
                     connected=lambda ready: ports.extend(p for r in ready for p in r["slow_ports"]))
    out["disconnect_s"] = gone.get("at")  # from t0; None: still connected when the window closed
    return out


def slow_consumer(kind: str, pool: LoadPool, ctx: Context) -> dict:
    """The same load without, then with, one client that never reads."""
    base, with_slow = (_slow_run(kind, pool, ctx, slow) for slow in (0, 1))
    out = dict(with_slow)
    out.update({
        "baseline_deliveries_per_s": base["deliveries_per_s"],
        "baseline_p99_ms": base["p99_ms"],
        "kept_deliveries": with_slow["deliveries_per_s"] / base["deliveries_per_s"],
        "p99_vs_baseline": (with_slow["p99_ms"] / base["p99_ms"]
                            if with_slow["p99_ms"] and base["p99_ms"] else None),
        "baseline_server_cpu_pct": base["server_cpu_pct"],
        "baseline_loadgen_cpu_pct": base["loadgen_cpu_pct"],
        "slow_disconnect_s": with_slow["disconnect_s"],
        "scenario_s": ctx.plan.warmup_s + ctx.plan.slow_measure_s,
    })
    return out


_HISTORY_VARIANTS = {"off_": fanout(100, ("--history-size", "0")), "on_": fanout(100)}


def history_fanout(kind: str, pool: LoadPool, ctx: Context) -> dict:
    """fanout-100 on our server with history off, then on (default size), alternating which goes first.

    Ours only: the peers keep no history. Metrics are prefixed ``off_``/``on_``.
    """
    if kind != "ours":
        raise ValueError("history-fanout runs our server only")
    turn = ctx.turns.get("history-fanout", 0)
    ctx.turns["history-fanout"] = turn + 1
    order = list(_HISTORY_VARIANTS)[::-1 if turn % 2 else 1]
    out = {}
    for prefix in order:
        out.update({prefix + k: v for k, v in _HISTORY_VARIANTS[prefix](kind, pool, ctx).items()
                    if k != "slow_ports"})
    out["on_vs_off"] = out["on_deliveries_per_s"] / out["off_deliveries_per_s"]
    return out


def _frames_until(sock: socket.socket, want: int, buf: bytes = b"") -> tuple[list[bytes], bytes]:
    """Read until ``want`` text frames have come; return their payloads and what came after."""
    got: list[bytes] = []
    while True:
        frames, used = wire.split_frames(buf)
        for opcode, start, end in frames:
            if opcode == wire.OP_CLOSE:
                raise RuntimeError("the server closed a history client")
            if opcode == wire.OP_TEXT:
                got.append(buf[start:end])
        buf = buf[used:]
        if len(got) >= want:
            return got, buf
        data = sock.recv(65536)
        if not data:
            raise RuntimeError("the server ended a history client's connection")
        buf += data


def _history_client(port: int, query: str = "") -> tuple[socket.socket, bytes]:
    """A connected, upgraded blocking client of the default room, and the bytes behind the 101."""
    sock = socket.create_connection((HOST, port), timeout=HISTORY_JOIN_TIMEOUT_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(wire.handshake_request(HOST, port, wire.WS_PATH + query))
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data or len(buf) > wire.MAX_RESPONSE_BYTES:
            sock.close()
            raise RuntimeError("no WebSocket handshake from the server")
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    if not wire.handshake_ok(head):
        sock.close()
        raise RuntimeError(f"handshake refused: {head.splitlines()[0]!r}")
    return sock, rest


def _sequence_check(payloads: list[bytes]) -> dict:
    """Loss and order of one client's messages from publisher 0, expected as seq 0, 1, 2, ..."""
    lost = ooo = 0
    next_seq = 0
    for data in payloads:
        _, seq, _ = wire.fields(data, 0)
        if seq < next_seq:
            ooo += 1
            continue
        lost += seq - next_seq
        next_seq = seq + 1
    return {"lost": lost, "out_of_order": ooo, "undelivered": max(0, HISTORY_MESSAGES - next_seq)}


def history_join(kind: str, pool: LoadPool, ctx: Context) -> dict:
    """Time from starting a connection with ``?history=N`` to holding the Nth history message.

    Ours only. One client fills the default room with N messages (and gets
    them back, so they are all in history), then joiners, one at a time,
    are each timed from connect through the handshake to the Nth message;
    every joiner's messages are checked for loss and order like the load
    processes'.
    """
    if kind != "ours":
        raise ValueError("history-join runs our server only")
    with started(kind, ctx.log) as server:
        filler, rest = _history_client(server.port)
        with filler:
            filler.sendall(b"".join(wire.client_frame(wire.payload(0, seq, 0, SMALL_SIZE_BYTES))
                                    for seq in range(HISTORY_MESSAGES)))
            echoed, _ = _frames_until(filler, HISTORY_MESSAGES, rest)
            totals = _sequence_check(echoed)
            times_ns = []
            for _ in range(HISTORY_JOINS):
                t0 = time.monotonic_ns()
                sock, rest = _history_client(server.port, f"?history={HISTORY_MESSAGES}")
                with sock:
                    got, _ = _frames_until(sock, HISTORY_MESSAGES, rest)
                    times_ns.append(time.monotonic_ns() - t0)
                for k, v in _sequence_check(got[:HISTORY_MESSAGES]).items():
                    totals[k] += v
    return {
        "join_history_p50_ms": statistics.median(times_ns) / 1e6,
        "join_history_max_ms": max(times_ns) / 1e6,
        "joins": len(times_ns),
        "history_messages": HISTORY_MESSAGES,
        **totals,
    }


SCENARIOS = {
    "fanout-10": fanout(10),
    "fanout-100": fanout(100),
    "fanout-1000": fanout(1000),
    "latency": latency,
    "redis-latency": redis_latency,
    "redis-fanout": redis_fanout,
    "many-publishers": many_publishers,
    "capacity": capacity("capacity_conns"),
    "capacity-19k": capacity("held_conns", HELD_ARGS),
    "slow-consumer": slow_consumer,
    "history-fanout": history_fanout,
    "history-join": history_join,
}
# Left out of --quick unless named: its path is capacity's, which --quick runs, and
# its thousands of connections would push --quick past its 2 minutes.
FULL_ONLY = ("capacity-19k",)
# Which servers each scenario runs against (default: all, in turn, every repeat).
KINDS = ("ours", "ref", "picows", "socketify", "gorilla", "floor")
# The peers a user would pick: what "the best peer" is chosen from.
PEERS = ("ref", "picows", "socketify", "gorilla")
_ALL_BUT_FLOOR = ("ours", *PEERS)
# The design floor (peers/threaded_floor.py) runs where a target is at or past it:
# latency and connecting; elsewhere it would only lengthen the run.
SCENARIO_KINDS = {"redis-latency": ("ours",), "redis-fanout": ("ours",), "capacity-19k": ("ours",),
                  "history-fanout": ("ours",), "history-join": ("ours",), "latency": KINDS, "capacity": KINDS}
SCENARIO_KINDS.update({name: _ALL_BUT_FLOOR for name in SCENARIOS if name not in SCENARIO_KINDS})
