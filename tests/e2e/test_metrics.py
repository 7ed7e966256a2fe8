"""GET /metrics (issue 12, point 3): Prometheus text that moves with real traffic.

Real server processes on 127.0.0.1, real WebSocket clients (websockets'
sync client), and the output read back with prometheus-client's own parser,
so a malformed exposition fails here as it would in Prometheus. Every wait
is bounded and ends on an event: a message received, a log line.
"""

from __future__ import annotations

import contextlib
import re
import socket
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from support.process import SERVER, run
from support.rawws import RawWS
from support.redis import wait_health
from support.wsclients import recv, ws_connect

WAIT = 5.0  # seconds for any single expected event
METRICS_URL = re.compile(r"metrics on (http://[0-9.]+:\d+/metrics)")
CLIENTS = 3
MESSAGES = 5
TEXT = "hello metrics"
# What one masked client frame of TEXT costs on the wire (2 header + 4 mask bytes),
# and one unmasked server frame (2 header bytes).
CLIENT_FRAME_BYTES = len(TEXT) + 6
SERVER_FRAME_BYTES = len(TEXT) + 2


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str, str]:
    """(status, Content-Type, body) of a GET, error statuses included."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=WAIT) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers["Content-Type"], error.read().decode()


def scrape(url: str, headers: dict[str, str] | None = None) -> dict[tuple[str, frozenset], float]:
    """Every sample at ``url``, parsed by prometheus-client: (name, labels) -> value."""
    status, content_type, body = get(url, headers)
    assert status == 200, (status, body)
    assert content_type.startswith("text/plain"), content_type
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def wait_metrics(url: str, ready, what: str) -> dict[tuple[str, frozenset], float]:
    """Scrape until ``ready(samples)``: a state the server reaches a moment after the event we saw."""
    deadline = time.monotonic() + WAIT
    while True:
        samples = scrape(url)
        if ready(samples):
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} within {WAIT}s: {samples}")
        time.sleep(0.05)


def metrics_url(server) -> str:
    return server.wait_for_log(METRICS_URL, WAIT).group(1)


@pytest.mark.parametrize("where", ["main-port", "own-port"])
def test_values_move_with_traffic(start_server, where):
    """3 clients, 5 messages: 3 connections, +5 received, +15 delivered, bytes both ways, one close, refusals."""
    server = start_server(*(["--metrics-port", "0"] if where == "own-port" else []))
    url = metrics_url(server)
    if where == "own-port":
        assert not url.startswith(f"http://127.0.0.1:{server.port}/"), url
        assert get(f"http://127.0.0.1:{server.port}/metrics")[0] == 404  # not on the public port too
    before = scrape(url)
    assert value(before, "broadcast_build_info", version="0.1.0", node=_node(before)) == 1
    assert value(before, "broadcast_redis_state", state="off") == 1
    assert value(before, "broadcast_rooms") == 0  # made by their first member
    with contextlib.ExitStack() as stack:
        # Anonymous: no join notices to count.
        clients = [stack.enter_context(ws_connect(server.url)) for _ in range(CLIENTS)]
        server.wait_for_log(rf"connect anonymous@\S+ \({CLIENTS} online\)", WAIT)
        for _ in range(MESSAGES):
            clients[0].send(TEXT)
        for ws in clients:
            assert [recv(ws, WAIT) for _ in range(MESSAGES)] == [TEXT] * MESSAGES
        # Sent, but the writer marks it so a moment after the socket took it.
        after = wait_metrics(url, lambda s: value(s, "broadcast_queued_bytes") == 0, "all sent")
        assert value(after, "broadcast_connections") == CLIENTS
        assert value(after, "broadcast_rooms") == 1
        assert value(after, "broadcast_history_bytes") >= MESSAGES * len(TEXT)  # kept for late joiners
        assert value(after, "broadcast_messages_received_total") - \
            value(before, "broadcast_messages_received_total") == MESSAGES
        assert value(after, "broadcast_messages_delivered_total") - \
            value(before, "broadcast_messages_delivered_total") == MESSAGES * CLIENTS
        received = value(after, "broadcast_received_bytes_total") - value(before, "broadcast_received_bytes_total")
        assert received >= MESSAGES * CLIENT_FRAME_BYTES
        sent = value(after, "broadcast_sent_bytes_total") - value(before, "broadcast_sent_bytes_total")
        assert sent >= MESSAGES * CLIENTS * SERVER_FRAME_BYTES
        clients.pop().close(1000, "raw client text never becomes a label")
        server.wait_for_log(rf"disconnect anonymous@\S+: closed by client: 1000 .* \({CLIENTS - 1} online\)", WAIT)
        assert get(f"http://127.0.0.1:{server.port}/nowhere")[0] == 404
        server.wait_for_log(r"refused \S+: 404", WAIT)
        # The idle one, and on the main port the scrape itself, are in their handshake.
        opening = 1 if where == "own-port" else 2
        with socket.create_connection((server.host, server.port), WAIT) as idle:  # opens, never asks
            idle.sendall(b"GET /ws HTTP/1.1\r\n")
            # The leaver holds its connection until the server hangs up, a moment after the log line.
            later = wait_metrics(url, lambda s: value(s, "broadcast_handshakes") == opening
                                 and value(s, "broadcast_connections") == CLIENTS - 1,
                                 f"{opening} opening and {CLIENTS - 1} joined")
        assert value(later, "broadcast_closes_total", code="1000", reason="client") == 1
        assert not [k for k in later if k[0] == "broadcast_closes_total" and "raw" in str(k)]
        assert value(later, "broadcast_handshake_refusals_total", status="404") - \
            value(before, "broadcast_handshake_refusals_total", status="404") == 1
    # Each connection keeps its own tallies, summed when scraped: those of the gone stay counted.
    gone = wait_metrics(url, lambda s: value(s, "broadcast_connections") == 0, "everyone gone")
    assert value(gone, "broadcast_messages_received_total") - \
        value(before, "broadcast_messages_received_total") == MESSAGES
    assert value(gone, "broadcast_received_bytes_total") - value(before, "broadcast_received_bytes_total") >= received
    assert value(gone, "broadcast_messages_delivered_total") - \
        value(before, "broadcast_messages_delivered_total") == MESSAGES * CLIENTS


def _node(samples) -> str:
    (labels,) = [dict(k[1]) for k in samples if k[0] == "broadcast_build_info"]
    return labels["node"]


def test_the_node_id_is_the_one_healthz_gives(server):
    status, _, body = get(f"http://127.0.0.1:{server.port}/healthz")
    assert f'"node": "{_node(scrape(metrics_url(server)))}"' in body, body


def test_with_a_token_the_main_port_wants_it_and_the_own_port_does_not(start_server):
    server = start_server("--token", "s3cret")
    url = metrics_url(server)
    status, _, body = get(url)
    assert status == 401, body
    server.wait_for_log(r"refused \S+: 401 missing or invalid token", WAIT)
    assert get(url, {"Authorization": "Bearer wrong"})[0] == 401
    samples = scrape(url, {"Authorization": "Bearer s3cret"})
    assert value(samples, "broadcast_handshake_refusals_total", status="401") == 2
    assert "s3cret" not in server.log
    own = start_server("--token", "s3cret", "--metrics-port", "0")
    assert value(scrape(metrics_url(own)), "broadcast_connections") == 0


def test_no_metrics_turns_it_off(start_server):
    server = start_server("--no-metrics")
    server.wait_for_log(r"metrics: off", WAIT)
    status, _, body = get(f"http://127.0.0.1:{server.port}/metrics")
    assert status == 404 and "no WebSocket at /metrics" in body, (status, body)


@pytest.mark.parametrize("args, problem", [
    (["--metrics-host", "127.0.0.1"], "--metrics-host needs --metrics-port"),
    (["--no-metrics", "--metrics-port", "9100"], "--no-metrics and --metrics-port contradict each other"),
    (["--metrics-port", "70000"], "port must be 0-65535"),
])
def test_bad_metrics_flags_cost_one_line_and_exit_2(args, problem):
    result = run(SERVER, *args)
    assert result.returncode == 2, result
    assert result.stderr.count("\n") == 1 and problem in result.stderr, result.stderr


def test_a_metrics_port_in_use_is_an_error_naming_it(start_server):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        server = start_server("--metrics-port", str(port), expect_listening=False)
        assert server.wait_exit(WAIT * 2) == 1
    assert f"cannot listen for metrics on 127.0.0.1:{port}" in server.log, server.log
    assert "Traceback" not in server.log


def test_a_slow_consumer_counts_as_an_eviction_and_a_1008_close(start_server):
    """A client that never reads, behind a publisher: one eviction, closes{code=1008, reason=slow_consumer}."""
    server = start_server("--send-queue-bytes", "65536", "--write-timeout", "0")
    url = metrics_url(server)
    stuck = RawWS.connect(server.port, rcvbuf=4096)  # and never reads
    evicted = r"closing anonymous@\S+: 1008 slow consumer"
    try:
        with ws_connect(server.url) as publisher:  # its library reads for it all along
            server.wait_for_log(r"\(2 online\)", WAIT)
            chunk = "x" * 65536
            deadline = time.monotonic() + 6 * WAIT
            for _ in range(2000):  # bounded: the eviction comes after a few MiB and STALLED_AFTER_S
                publisher.send(chunk)
                if re.search(evicted, server.log) or time.monotonic() > deadline:
                    break
            server.wait_for_log(evicted, WAIT)
            samples = wait_metrics(url, lambda s: value(s, "broadcast_closes_total", code="1008",
                                                        reason="slow_consumer") == 1, "the eviction's close")
    finally:
        stuck.close()
    assert value(samples, "broadcast_evictions_total") == 1


@pytest.mark.redis
def test_redis_state_and_publish_latency(start_server, redis_server):
    server = start_server("--redis-url", redis_server.url)
    wait_health(server, "ok", WAIT)
    url = metrics_url(server)
    before = scrape(url)
    assert value(before, "broadcast_redis_state", state="ok") == 1
    assert value(before, "broadcast_redis_state", state="off") == 0
    with ws_connect(server.url) as ws:  # anonymous: one publish, no notices
        server.wait_for_log("connect anonymous", WAIT)
        ws.send(TEXT)
        assert recv(ws, WAIT) == TEXT  # back round Redis
    after = scrape(url)
    published = value(after, "broadcast_redis_publish_seconds_count") - \
        value(before, "broadcast_redis_publish_seconds_count")
    assert published == 1
    assert value(after, "broadcast_redis_publish_seconds_bucket", le="+Inf") == \
        value(after, "broadcast_redis_publish_seconds_count")
    assert 0 < value(after, "broadcast_redis_publish_seconds_sum") < WAIT
