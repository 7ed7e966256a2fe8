"""The load generator: worker processes that open, drive and check many WebSocket clients.

Why it looks like this: the load generator shares two cores with the server,
so every microsecond it spends per message is taken from the server and
would flatter or hide its limits. Each worker therefore drives all its
clients from one epoll loop over raw non-blocking sockets, does the HTTP
upgrade by hand, and handles received bytes in bulk, one recv buffer at a
time:

- fixed-payload scenarios (``Job.stream``) compare each buffer against the
  byte stream the server must send (``bytearray.startswith``, a memcmp), so a
  correct delivery costs no per-frame Python at all; the first mismatch
  switches that client to the parser, which then counts loss and disorder;
- timestamped scenarios split frames by index arithmetic and read three
  ASCII integers per message (publisher, sequence, send time).

Every loop is bounded by a deadline, every publisher by a message count.
"""

from __future__ import annotations

import errno
import itertools
import multiprocessing
import resource
import select
import socket
import time
import traceback
from array import array
from dataclasses import dataclass, field

from . import wire
from .servers import die_with_parent

# One recv takes up to this much: a burst of ~1,000 small frames in one call,
# still below glibc's mmap threshold so the buffer allocation stays cheap.
RECV_BYTES = 64 * 1024
# Handshakes in flight per process: enough to keep the server's acceptor
# busy, few enough that 2 processes stay well under the servers' 4096-slot
# listen backlog, so the connect rate is the server's and not SYN retries.
CONNECT_CONCURRENCY = 256
# A client that never reads gets a tiny receive buffer (the kernel's minimum
# is ~2.3 KB), so the server's queue for it fills quickly.
SLOW_RCVBUF_BYTES = 4096
# A windowed publisher that waits on other processes' acknowledgements
# re-reads them this often; shared memory cannot wake an epoll.
WINDOW_POLL_S = 0.001
# A process republishes its slowest receiver's progress at most this often:
# the scan over hundreds of receivers would otherwise run per loop turn.
ACK_PERIOD_S = 0.0005
# Longest epoll wait when nothing is scheduled: bounds how late a loop sees its deadline.
IDLE_POLL_S = 0.02
# Bound on the messages one publisher sends in one run (and on the expected
# stream a receiver may build: 2M x 66 B = 132 MB).
MAX_MESSAGES = 2_000_000
# A windowed publisher writes at most this many messages per loop turn, so
# the loop gets back to reading its own clients.
PUBLISH_BATCH_MSGS = 256
# Expected-stream growth step, in messages.
STREAM_CHUNK_MSGS = 4096
# After publishing stops, receivers keep reading at least this long, so a
# publisher in another process that sent its last batch a moment late is seen.
DRAIN_MIN_S = 0.1
# Publisher slots in shared memory (many-publishers uses 50).
MAX_PUBLISHERS = 64
# How long the coordinator waits for workers to answer outside the run itself.
REPLY_TIMEOUT_S = 120.0
# A load process given sources dials from this many loopback addresses
# (all of 127/8 is loopback on Linux), in turn. Each local address has its
# own ephemeral ports (28,232 here): from one, past ~15,000 connections
# plus the TIME_WAIT sockets of earlier runs, connect() took 7-13 ms to find
# a free port, and the connect rate measured the port search, not the server.
SOURCES_PER_PROC = 8
# Bound with the address only: the kernel picks the port at connect(), per
# (source, destination) pair, instead of reserving one at bind() (Linux 4.2+).
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


def source_addresses(index: int) -> tuple[str, ...]:
    """Load process ``index``'s own loopback addresses: 127.0.<index + 1>.1, .2, ..."""
    return tuple(f"127.0.{index + 1}.{k}" for k in range(1, SOURCES_PER_PROC + 1))


@dataclass
class Publisher:
    """One publishing client; it also receives, like every client."""

    pub_id: int
    rate: float | None = None  # msg/s; None: as fast as Job.window allows
    phase_s: float = 0.0  # first send at t0 + phase_s, to spread many publishers
    max_count: int = MAX_MESSAGES
    counted: bool = False  # whether its own receptions count as deliveries


@dataclass
class Job:
    """One process's share of a load: its clients and the shared timing."""

    host: str
    port: int
    subscribers: int = 0  # receive-only clients, counted as deliveries
    publishers: list[Publisher] = field(default_factory=list)
    slow: int = 0  # clients that never read after the handshake
    total_publishers: int = 0  # across all processes: what every receiver should get
    size: int = 64  # payload bytes
    stream: bool = False  # fixed payloads without send time: compare bytes, no latency
    window: int = 0  # windowed publisher: sends seq n once every receiver has n - window
    warmup_s: float = 0.0  # not measured: from t0 to t0 + warmup_s
    measure_s: float = 1.0  # deliveries and send times counted in this window
    drain_s: float = 2.0  # after the window: time to receive what is still in flight
    connect_timeout_s: float = 30.0
    connect_concurrency: int = 0  # handshakes in flight at once; 0: CONNECT_CONCURRENCY
    rate_conns: int = 0  # when this many are up, t_rate_ns is taken: the connect rate of the first ones
    tail_conns: int = 0  # when this many are up, t_tail_ns is taken: the rate of the ones after starts there
    sources: tuple[str, ...] = ()  # local addresses to dial from, in turn; (): the kernel's choice


class Client:
    """One connection's state; slotted, since the receive loop touches it per recv."""

    __slots__ = ("sock", "fd", "pub", "counted", "slow", "buf", "fast", "off", "received",
                 "next_seq", "ooo", "closed", "out", "want_out", "sent", "next_due_ns", "stage")

    def __init__(self, sock: socket.socket, pub: Publisher | None, counted: bool, slow: bool) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.pub = pub
        self.counted = counted
        self.slow = slow
        self.buf = b""  # handshake bytes, then a partial frame
        self.fast = True  # still matching the expected stream byte for byte
        self.off = 0  # bytes of the expected stream matched
        self.received = 0  # messages received in order
        self.next_seq: dict[int, int] = {}  # per publisher
        self.ooo = 0  # messages whose seq was not above the last one from that publisher
        self.closed = False  # the server ended the connection
        self.out = bytearray()  # publisher bytes the socket has not taken yet
        self.want_out = False
        self.sent = 0
        self.next_due_ns = 0
        self.stage = 0  # 0 connecting, 1 waiting for the 101


class ExpectedStream:
    """The exact bytes every receiver must get from publisher 0 in a fixed-payload run."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.frame_len = len(wire.server_frame(wire.payload(0, 0, 0, size)))
        self.data = bytearray()

    def cover(self, nbytes: int) -> None:
        have = len(self.data) // self.frame_len
        need = min(-(-nbytes // self.frame_len), MAX_MESSAGES)
        while have < need:
            upto = min(have + STREAM_CHUNK_MSGS, MAX_MESSAGES)
            self.data += b"".join(
                wire.server_frame(wire.payload(0, seq, 0, self.size)) for seq in range(have, upto))
            have = upto


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# ---------------------------------------------------------------- worker side


def _advance(client: Client, request: bytes) -> bool | None:
    """One step of a client's opening: True once upgraded, False if it failed, None to wait."""
    try:
        if client.stage == 0:  # the non-blocking connect finished, one way or the other
            if client.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                return False
            client.sock.send(request)  # ~150 bytes: an empty socket takes them whole
            client.stage = 1
            return None
        data = client.sock.recv(RECV_BYTES)
    except BlockingIOError:
        return None
    except OSError:
        return False
    client.buf += data
    head, sep, rest = client.buf.partition(b"\r\n\r\n")
    if not sep:
        return None if data and len(client.buf) < wire.MAX_RESPONSE_BYTES else False
    client.buf = rest  # frames that came right behind the response
    return wire.handshake_ok(head)


def _open_clients(job: Job):
    """Connect and upgrade every client of ``job``, at most CONNECT_CONCURRENCY at once."""
    roles = [(p, p.counted, False) for p in job.publishers]
    roles += [(None, True, False)] * job.subscribers
    roles += [(None, False, True)] * job.slow
    roles.reverse()  # pop() from the end: publishers connect first
    request = wire.handshake_request(job.host, job.port)
    deadline = time.monotonic() + job.connect_timeout_s
    pending: dict[int, Client] = {}
    clients: list[Client] = []
    failed = 0
    concurrency = job.connect_concurrency or CONNECT_CONCURRENCY
    sources = itertools.cycle(job.sources) if job.sources else None
    t_first = time.monotonic_ns()
    t_last = t_rate = t_tail = t_first
    with select.epoll() as ep:
        while (roles or pending) and time.monotonic() < deadline:
            while roles and len(pending) < concurrency:
                pub, counted, slow = roles.pop()
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if slow:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SLOW_RCVBUF_BYTES)
                try:
                    if sources is not None:
                        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                        sock.bind((next(sources), 0))
                    dialled = sock.connect_ex((job.host, job.port)) in (0, errno.EINPROGRESS)
                except OSError:  # a source address this machine does not have
                    dialled = False
                if not dialled:
                    failed += 1
                    sock.close()
                    continue
                client = Client(sock, pub, counted, slow)
                pending[client.fd] = client
                ep.register(client.fd, select.EPOLLOUT)
            for fd, _ in ep.poll(IDLE_POLL_S):
                client = pending[fd]
                stage = client.stage
                done = _advance(client, request)
                if done is None:
                    if stage != client.stage:
                        ep.modify(fd, select.EPOLLIN)
                    continue
                del pending[fd]
                ep.unregister(fd)
                if done:
                    t_last = time.monotonic_ns()
                    clients.append(client)
                    if len(clients) == job.rate_conns:
                        t_rate = t_last
                    if len(clients) == job.tail_conns:
                        t_tail = t_last
                else:
                    failed += 1
                    client.sock.close()
        for client in pending.values():
            failed += 1
            client.sock.close()
    return clients, failed, t_first, t_last, t_rate, t_tail


def _drive(job: Job, clients: list[Client], shared, index: int, nworkers: int, t0_ns: int):
    """Publish and receive from t0 until the window closes and the last messages are in."""
    size, window = job.size, job.window
    win_ns = t0_ns + int(job.warmup_s * 1e9)
    end_ns = win_ns + int(job.measure_s * 1e9)
    stop_ns = end_ns + int(job.drain_s * 1e9)
    drained_ns = end_ns + int(DRAIN_MIN_S * 1e9)
    sent_at = nworkers  # shared[sent_at + pub_id]: messages each publisher has sent
    receivers = [c for c in clients if not c.slow]  # slow clients are never read
    by_fd = {c.fd: c for c in receivers}
    ep = select.epoll()
    for c in receivers:
        ep.register(c.fd, select.EPOLLIN)
    pubs = [c for c in receivers if c.pub is not None]
    for c in pubs:
        c.next_due_ns = t0_ns + int(c.pub.phase_s * 1e9)
    stream = ExpectedStream(size) if job.stream else None
    frame_len = stream.frame_len if stream else 0
    latencies = array("q")
    deliveries = 0
    cpu_start = cpu_end = None
    in_out = select.EPOLLIN | select.EPOLLOUT
    EPOLLIN = select.EPOLLIN
    split_frames, fields = wire.split_frames, wire.fields
    monotonic_ns = time.monotonic_ns

    def parse(c: Client, data: bytes, now_ns: int) -> int:
        buf = c.buf + data if c.buf else data
        frames, used = split_frames(buf)
        c.buf = buf[used:]
        count = 0
        next_seq = c.next_seq
        for opcode, start, _ in frames:
            if opcode == wire.OP_TEXT or opcode == wire.OP_BINARY:
                pub, seq, sent_ns = fields(buf, start)
                if seq >= next_seq.get(pub, 0):
                    next_seq[pub] = seq + 1
                    c.received += 1
                else:
                    c.ooo += 1
                count += 1
                if c.counted and win_ns <= sent_ns < end_ns:
                    latencies.append(now_ns - sent_ns)
            elif opcode == wire.OP_CLOSE:
                c.closed = True
        return count

    def receive(c: Client, data: bytes, now_ns: int) -> int:
        """Take ``data`` for ``c``; return how many messages it completed."""
        if c.fast and stream is not None:
            off = c.off
            end = off + len(data)
            if end > len(stream.data):
                stream.cover(end)
            if stream.data.startswith(data, off):
                before = c.received
                c.off = end
                c.received = end // frame_len
                return c.received - before
            c.fast = False  # from here on, parse: the partial frame we matched comes first
            c.next_seq[0] = off // frame_len
            data = bytes(stream.data[off - off % frame_len:off]) + data
        c.fast = False
        return parse(c, data, now_ns)

    def flush(c: Client) -> None:
        if c.out:
            try:
                del c.out[:c.sock.send(c.out)]
            except BlockingIOError:
                pass
            except OSError:
                c.out.clear()
        want = bool(c.out)
        if want != c.want_out and not c.closed:
            c.want_out = want
            ep.modify(c.fd, in_out if want else EPOLLIN)

    def publish(now_ns: int) -> bool:
        """Send what is due; True if a windowed publisher is waiting for acknowledgements."""
        waiting = False
        for c in pubs:
            p = c.pub
            if now_ns < end_ns and not c.closed:
                if p.rate is None:
                    acked = min(shared[0:nworkers])
                    count = min(acked + window, p.max_count, c.sent + PUBLISH_BATCH_MSGS) - c.sent
                    if count > 0 and not c.out:
                        c.out += b"".join(wire.client_frame(wire.payload(p.pub_id, seq, 0, size))
                                          for seq in range(c.sent, c.sent + count))
                        c.sent += count
                    elif count <= 0:
                        waiting = True
                else:
                    while c.next_due_ns <= now_ns and c.sent < p.max_count and c.next_due_ns < end_ns:
                        send_ns = 0 if stream else monotonic_ns()
                        c.out += wire.client_frame(wire.payload(p.pub_id, c.sent, send_ns, size))
                        c.sent += 1
                        c.next_due_ns = t0_ns + int((p.phase_s + c.sent / p.rate) * 1e9)
                shared[sent_at + p.pub_id] = c.sent
            flush(c)
        return waiting

    waiting_for: list[Client] | None = None
    ack_period_ns, ack_due_ns = int(ACK_PERIOD_S * 1e9), 0
    now_ns = monotonic_ns()
    for c in receivers:
        if c.buf:  # bytes that came with the handshake response
            data, c.buf = c.buf, b""
            receive(c, data, now_ns)
    while now_ns < stop_ns:
        if cpu_start is None and now_ns >= win_ns:
            cpu_start = _cpu_seconds()
        if now_ns >= end_ns:
            if cpu_end is None:
                cpu_end = _cpu_seconds()
            if now_ns >= drained_ns:
                total = sum(shared[sent_at:sent_at + job.total_publishers])
                candidates = receivers if waiting_for is None else waiting_for
                waiting_for = [c for c in candidates if c.received < total and not c.closed]
                if not waiting_for:
                    break
        blocked = publish(now_ns) if now_ns >= t0_ns else False
        if window and now_ns >= ack_due_ns:  # the slowest receiver's progress, for the windowed publisher
            shared[index] = min((c.received for c in receivers if not c.closed), default=MAX_MESSAGES)
            ack_due_ns = now_ns + ack_period_ns
        if blocked:
            timeout = WINDOW_POLL_S
        else:
            wake = min((c.next_due_ns for c in pubs
                        if c.pub.rate and c.sent < c.pub.max_count and not c.closed), default=stop_ns)
            for boundary in (t0_ns, win_ns, end_ns):
                if now_ns < boundary:
                    wake = min(wake, boundary)
                    break
            timeout = min(IDLE_POLL_S, max(0.0, (wake - now_ns) / 1e9))
        for fd, events in ep.poll(timeout):
            c = by_fd[fd]
            if events & select.EPOLLOUT:
                flush(c)
            if not events & (EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                continue
            try:
                data = c.sock.recv(RECV_BYTES)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            t_ns = monotonic_ns()
            if data:
                got = receive(c, data, t_ns)
                if c.counted and win_ns <= t_ns < end_ns:
                    deliveries += got
            else:
                c.closed = True
                ep.unregister(fd)
                del by_fd[fd]
        now_ns = monotonic_ns()
    if cpu_start is None:
        cpu_start = _cpu_seconds()
    if cpu_end is None:
        cpu_end = _cpu_seconds()
    ep.close()

    total = sum(shared[sent_at:sent_at + job.total_publishers])
    counted = [c for c in receivers if c.counted]
    # A receiver has seen up to the highest seq it got from each publisher:
    # below that, what it did not get was skipped (lost); above, still in flight.
    seen = [c.received if c.fast else sum(c.next_seq.values()) for c in counted]
    return {
        "deliveries": deliveries,
        "received": sum(c.received for c in counted),
        "expected": total * len(counted),
        "lost": sum(upto - c.received for upto, c in zip(seen, counted, strict=True)),
        "undelivered": sum(max(0, total - upto) for upto in seen),
        "out_of_order": sum(c.ooo for c in counted),
        "closed_by_server": sum(c.closed for c in counted),
        "complete": sum(c.received >= total for c in counted),
        "receivers": len(counted),
        "sent": {c.pub.pub_id: c.sent for c in pubs},
        "latencies_ns": latencies,
        "cpu_s": cpu_end - cpu_start,
    }


def _run_job(job: Job, pipe, shared, index: int, nworkers: int) -> None:
    clients: list[Client] = []
    try:
        clients, failed, t_first, t_last, t_rate, t_tail = _open_clients(job)
        pipe.send(("ready", {
            "connected": len(clients), "failed": failed, "t_first_ns": t_first, "t_last_ns": t_last,
            "t_rate_ns": t_rate if job.rate_conns and len(clients) >= job.rate_conns else None,
            "t_tail_ns": t_tail if job.tail_conns and len(clients) >= job.tail_conns else None,
            "slow_ports": [c.sock.getsockname()[1] for c in clients if c.slow],
        }))
        command = pipe.recv()
        if not (isinstance(command, tuple) and command[0] == "go"):
            return  # the coordinator gave up on this run
        pipe.send(("done", _drive(job, clients, shared, index, nworkers, command[1])))
    finally:
        for client in clients:
            client.sock.close()


def _worker_main(index: int, nworkers: int, pipe, shared) -> None:
    """Serve jobs until told to stop; errors go back to the coordinator as text."""
    die_with_parent()  # forked with the coordinator's pipe ends open, it would never see EOF
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    while True:
        job = pipe.recv()
        if job is None:
            return
        if not isinstance(job, Job):
            continue  # a stray "go" or "abort" for a job that already failed
        try:
            _run_job(job, pipe, shared, index, nworkers)
        except Exception:
            pipe.send(("error", traceback.format_exc()))


# ----------------------------------------------------------- coordinator side


class LoadPool:
    """Worker processes kept for the whole benchmark, so no run pays for process start-up."""

    def __init__(self, procs: int) -> None:
        ctx = multiprocessing.get_context("fork")  # before any server or thread exists
        self.procs = procs
        self.shared = ctx.RawArray("q", procs + MAX_PUBLISHERS)
        self._pipes = []
        self._workers = []
        for i in range(procs):
            mine, theirs = ctx.Pipe()
            worker = ctx.Process(target=_worker_main, args=(i, procs, theirs, self.shared),
                                 name=f"loadgen-{i}", daemon=True)
            worker.start()
            self._pipes.append(mine)
            self._workers.append(worker)

    def _gather(self, expect: str, timeout: float) -> list:
        replies = []
        deadline = time.monotonic() + timeout
        for i, pipe in enumerate(self._pipes):
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"loadgen-{i} did not answer within {timeout:.0f} s")
            kind, body = pipe.recv()
            if kind != expect:
                raise RuntimeError(f"loadgen-{i}: {kind}: {body}")
            replies.append(body)
        return replies

    def connect(self, jobs: list[Job]) -> list[dict]:
        """Hand out one job per worker; return once all their clients are connected."""
        assert len(jobs) == self.procs
        for i in range(len(self.shared)):
            self.shared[i] = 0
        for pipe, job in zip(self._pipes, jobs, strict=True):
            pipe.send(job)
        return self._gather("ready", max(j.connect_timeout_s for j in jobs) + REPLY_TIMEOUT_S)

    def go(self, t0_ns: int) -> None:
        for pipe in self._pipes:
            pipe.send(("go", t0_ns))

    def results(self, timeout: float) -> list[dict]:
        return self._gather("done", timeout)

    def close(self, force: bool = False) -> None:
        """Stop the workers; ``force`` after a failed run, when they may be mid-job."""
        for pipe in self._pipes:
            try:
                pipe.send(None)
            except OSError:
                pass
        for worker in self._workers:
            worker.join(0 if force else 5)
            if worker.is_alive():
                worker.terminate()
                worker.join()
