"""Security flags against a real server: origins, token, TLS, abuse limits, usernames."""

from __future__ import annotations

import socket
import ssl
import threading
import time

import pytest
import trustme
import websocket
from websockets.exceptions import ConnectionClosedError, InvalidStatus
from websockets.sync.client import connect

from support.process import SERVER, clean_env, run

RECV_S = 5.0


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """A throwaway CA and a server certificate for 127.0.0.1 and localhost."""
    folder = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    chain = folder / "server.pem"
    server_cert.private_key_and_cert_chain_pem.write_to_path(chain)
    ca_file = folder / "ca.pem"
    ca.cert_pem.write_to_path(ca_file)
    key = folder / "key.pem"
    server_cert.private_key_pem.write_to_path(key)
    cert_only = folder / "cert.pem"
    cert_only.write_bytes(b"".join(blob.bytes() for blob in server_cert.cert_chain_pems))
    return {"chain": str(chain), "ca": str(ca_file), "key": str(key), "cert": str(cert_only)}


def client_context(ca_file: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=ca_file)


def status_of(url: str, **kwargs) -> int:
    with pytest.raises(InvalidStatus) as refused:
        with connect(url, open_timeout=RECV_S, **kwargs):
            pass
    return refused.value.response.status_code


# Origins: the defence against cross-site WebSocket hijacking.

def test_allowed_origin_refuses_other_origins_with_403(start_server):
    server = start_server("--allowed-origin", "https://chat.example",
                          "--allowed-origin", "https://ops.example")
    assert status_of(server.url, origin="https://evil.example") == 403
    for origin in ("https://chat.example", "https://ops.example"):
        with connect(server.url, origin=origin, open_timeout=RECV_S) as ws:
            ws.send("hello")
            assert ws.recv(RECV_S) == "hello"


def test_allowed_origin_still_admits_clients_that_send_no_origin(start_server):
    # Browsers always send Origin; command-line clients do not, and are not
    # what cross-site hijacking abuses.
    server = start_server("--allowed-origin", "https://chat.example")
    with connect(server.url, open_timeout=RECV_S) as ws:
        ws.send("cli")
        assert ws.recv(RECV_S) == "cli"


def test_without_allowed_origin_any_origin_is_accepted(server):
    with connect(server.url, origin="https://anything.example", open_timeout=RECV_S) as ws:
        ws.send("x")
        assert ws.recv(RECV_S) == "x"


# Token.

def test_token_is_required_as_bearer_header_or_query(start_server):
    server = start_server("--token", "s3cret")
    with pytest.raises(InvalidStatus) as refused:
        with connect(server.url, open_timeout=RECV_S):
            pass
    assert refused.value.response.status_code == 401
    assert refused.value.response.headers["WWW-Authenticate"].startswith("Bearer")
    assert status_of(server.url, additional_headers={"Authorization": "Bearer wrong"}) == 401
    assert status_of(server.url + "?token=s3cre") == 401
    with connect(server.url, additional_headers={"Authorization": "Bearer s3cret"},
                 open_timeout=RECV_S) as ws:
        ws.send("by header")
        assert ws.recv(RECV_S) == "by header"
    ws2 = websocket.create_connection(server.url + "?token=s3cret&username=Q", timeout=RECV_S)
    try:
        ws2.send("by query")
        assert ws2.recv() == "[Q] by query"
    finally:
        ws2.close()
    server.wait_for_log(r"refused .*: 401 missing or invalid token", count=3)


def test_token_from_environment(start_server):
    server = start_server(env=clean_env(BROADCAST_TOKEN="from-env"))
    assert status_of(server.url) == 401
    with connect(server.url + "?token=from-env", open_timeout=RECV_S) as ws:
        ws.send("ok")
        assert ws.recv(RECV_S) == "ok"


# TLS.

def test_wss_serves_both_independent_clients(start_server, certs):
    server = start_server("--certfile", certs["cert"], "--keyfile", certs["key"])
    assert "listening on wss://" in server.log
    url = f"wss://127.0.0.1:{server.port}/ws"
    with connect(url + "?username=Tess", ssl=client_context(certs["ca"]), open_timeout=RECV_S) as a:
        assert a.socket.version() in ("TLSv1.2", "TLSv1.3")
        b = websocket.create_connection(url + "?username=Ulf", timeout=RECV_S,
                                        sslopt={"ca_certs": certs["ca"]})
        try:
            assert a.recv(RECV_S) == "* Ulf joined"
            b.send("over tls " + "x" * 70000)
            assert a.recv(RECV_S) == "[Ulf] over tls " + "x" * 70000
            assert b.recv() == "[Ulf] over tls " + "x" * 70000
        finally:
            b.close()
        assert a.recv(RECV_S) == "* Ulf left"


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_wss_refuses_tls_below_1_2(start_server, certs):
    server = start_server("--certfile", certs["chain"])
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.load_verify_locations(certs["ca"])
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    old.minimum_version = ssl.TLSVersion.TLSv1
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    with socket.create_connection(("127.0.0.1", server.port), timeout=RECV_S) as raw:
        with pytest.raises(ssl.SSLError):
            old.wrap_socket(raw, server_hostname="127.0.0.1")
    # and a plaintext request on the TLS port is not answered in plaintext
    with socket.create_connection(("127.0.0.1", server.port), timeout=RECV_S) as raw:
        raw.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n")
        assert not raw.recv(1024).startswith(b"HTTP/")


@pytest.mark.parametrize("problem", ["missing", "garbage", "key-without-cert"])
def test_unloadable_certificate_stops_the_server_with_exit_2(tmp_path, certs, problem):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    args = {
        "missing": ["--certfile", str(tmp_path / "nope.pem")],
        "garbage": ["--certfile", str(garbage)],
        "key-without-cert": ["--keyfile", certs["key"]],
    }[problem]
    done = run(SERVER, "--host", "127.0.0.1", "--port", "0", *args)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert "listening" not in done.stderr  # never falls back to plaintext


def _stuck_tls_client(port: int, ca_file: str) -> ssl.SSLSocket:
    """A TLS client that completes the WebSocket handshake, then never reads."""
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.settimeout(RECV_S)
    raw.connect(("127.0.0.1", port))
    tls = client_context(ca_file).wrap_socket(raw, server_hostname="127.0.0.1")
    tls.sendall(
        b"GET /ws?username=Stuck HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )
    response = b""
    while b"\r\n\r\n" not in response:
        response += tls.recv(1)
    assert response.startswith(b"HTTP/1.1 101")
    return tls


def test_slow_consumer_over_tls_is_evicted_without_stalling_others(start_server, certs):
    server = start_server("--certfile", certs["chain"], "--send-queue-bytes", str(512 * 1024))
    url = f"wss://127.0.0.1:{server.port}/ws"
    context = client_context(certs["ca"])
    messages, size, window = 2000, 10 * 1024, 16
    stuck = _stuck_tls_client(server.port, certs["ca"])
    try:
        with connect(url + "?username=Reader", ssl=context, open_timeout=RECV_S, max_size=None) as reader, \
                connect(url + "?username=Pub", ssl=context, open_timeout=RECV_S, max_size=None,
                        max_queue=None) as pub:  # its own echoes pile up unread
            got = []
            progress = threading.Condition()

            failures = []

            def read_all() -> None:
                try:
                    while len(got) < messages:
                        text = reader.recv(RECV_S)
                        if text.startswith("[Pub] "):
                            with progress:
                                got.append(text)
                                progress.notify()
                except Exception as exc:  # reported by the main thread
                    failures.append(exc)

            thread = threading.Thread(target=read_all)
            thread.start()
            start = time.monotonic()
            for i in range(messages):
                # A healthy reader is at most `window` messages behind; only
                # the stuck client falls further back.
                with progress:
                    assert progress.wait_for(lambda: len(got) >= i - window, RECV_S), (failures, server.log)
                pub.send(f"{i:05d}".ljust(size, "."))
            thread.join(30)
            assert not failures and len(got) == messages, (failures, server.log)
            assert [int(t[6:11]) for t in got] == list(range(messages))
            server.wait_for_log(r"Stuck@.*(slow consumer|write timeout)", timeout=15)
            assert time.monotonic() - start < 30
    finally:
        stuck.close()


# Abuse limits.

def test_rate_limit_closes_a_flooding_client_with_1008(start_server):
    server = start_server("--rate-limit", "5", "--rate-burst", "5")
    with connect(server.url + "?username=Calm", open_timeout=RECV_S) as calm, \
            connect(server.url + "?username=Flood", open_timeout=RECV_S) as flood:
        assert calm.recv(RECV_S) == "* Flood joined"
        for i in range(20):
            try:
                flood.send(f"spam {i}")
            except ConnectionClosedError:
                break
        with pytest.raises(ConnectionClosedError) as closed:
            while True:
                flood.recv(RECV_S)
        assert closed.value.rcvd.code == 1008
        assert closed.value.rcvd.reason == "rate limit exceeded"
        seen = []
        while True:
            text = calm.recv(RECV_S)
            if text == "* Flood left":
                break
            seen.append(text)
        assert seen == [f"[Flood] spam {i}" for i in range(5)]
        calm.send("still here")
        assert calm.recv(RECV_S) == "[Calm] still here"


def test_max_connections_per_ip_answers_429(start_server):
    server = start_server("--max-connections-per-ip", "2")
    with connect(server.url, open_timeout=RECV_S), connect(server.url, open_timeout=RECV_S):
        assert status_of(server.url) == 429
    with connect(server.url, open_timeout=RECV_S) as again:  # slots are given back
        again.send("back")
        assert again.recv(RECV_S) == "back"


def test_require_username_refuses_anonymous_clients(start_server):
    server = start_server("--require-username")
    with pytest.raises(InvalidStatus) as refused:
        with connect(server.url, open_timeout=RECV_S):
            pass
    assert refused.value.response.status_code == 400
    assert b"username required" in refused.value.response.body
    with connect(server.url + "?username=Named", open_timeout=RECV_S) as ws:
        ws.send("[Bob] hi")
        assert ws.recv(RECV_S) == "[Named] [Bob] hi"
