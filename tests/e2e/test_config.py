"""Configuration of both programs: flags, BROADCAST_<OPTION> variables, one ini file, defaults.

Precedence is flag > environment > ``--config FILE`` or ``BROADCAST_CONFIG``
([server] and [client] sections only, keys spelled like the long options) >
default. Bad configuration costs exactly one line on stderr and exit status 2,
never a traceback, and never a secret; a port already in use is one line and
exit status 1. The limits, listening address, exposure line and masking of
secrets (issue 8, points 5-9) are checked here too, on real processes.

The parser is checked directly where that is enough; what users see (the
exit status, the one stderr line, the settings actually in force) is checked
on real ``scripts/server.py`` and ``scripts/client.py`` processes.
"""

from __future__ import annotations

import functools
import os
import re
import socket
import subprocess
import time

import pytest
import trustme
from pytest_redis.config import get_config
from websockets.exceptions import InvalidStatus

from broadcast.config import parse_client_args, parse_server_args
from support import process
from support.process import CLIENT, LISTENING, ROOT, SERVER, clean_env
from support.ini import write_ini
from support.redis import NOT_INSTALLED, TestRedis
from support.wsclients import Closed, http_get, recv, ws_connect

MIB = 1024 * 1024
RUN_TIMEOUT = 15.0


pytestmark = pytest.mark.usefixtures("no_broadcast_env")


def run(program: list[str], *args: str, env: dict | None = None, stdin: str = "") -> subprocess.CompletedProcess:
    return process.run(program, *args, env=clean_env(**(env or {})), input=stdin, timeout=RUN_TIMEOUT)


def assert_one_line_error(result: subprocess.CompletedProcess, status: int = 2) -> str:
    assert result.returncode == status, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.endswith("\n") and result.stderr.count("\n") == 1, repr(result.stderr)
    assert result.stdout == ""
    return result.stderr


@pytest.fixture
def busy_port():
    """A port on 127.0.0.1 that is taken (listening) for the whole test."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.fixture
def launch(start_server):
    """``scripts/server.py`` exactly as given (no --port added), not waiting for it to listen."""
    return functools.partial(start_server, add_port=False, expect_listening=False)


# Bad configuration, as the user sees it: one line, exit 2, no traceback


BAD_SERVER_CONFIGS = {
    "unknown flag": (["--bogus"], {}, None),
    "unknown flag value": (["--port"], {}, None),
    "unknown ini key": ([], {}, {"bogus": "1"}),
    "port too big (flag)": (["--port", "65536"], {}, None),
    "port negative (flag)": (["--port", "-1"], {}, None),
    "port too big (env)": ([], {"BROADCAST_PORT": "99999"}, None),
    "port too big (ini)": ([], {}, {"port": "70000"}),
    "port not a number (ini)": ([], {}, {"port": "eighty"}),
    "negative size (flag)": (["--max-message-size", "-1"], {}, None),
    "negative size (env)": ([], {"BROADCAST_SEND_QUEUE_BYTES": "-5"}, None),
    "negative size (ini)": ([], {}, {"max-message-size": "-3"}),
    "bad log level": (["--log-level", "chatty"], {}, None),
    "negative timeout": (["--shutdown-timeout", "-1"], {}, None),
}


@pytest.mark.parametrize("args, env, ini", list(BAD_SERVER_CONFIGS.values()), ids=list(BAD_SERVER_CONFIGS))
def test_bad_server_config_is_one_line_exit_2(args, env, ini, tmp_path):
    if ini is not None:
        args = ["--config", str(write_ini(tmp_path / "bad.ini", server=ini)), *args]
    err = assert_one_line_error(run(SERVER, "--host", "127.0.0.1", *args, env=env))
    assert err.startswith("broadcast-server: error:")


def test_missing_config_file_is_one_line_exit_2(tmp_path):
    missing = tmp_path / "nowhere.ini"
    err = assert_one_line_error(run(SERVER, "--config", str(missing)))
    assert "nowhere.ini" in err


def test_unreadable_config_file_is_one_line_exit_2(tmp_path):
    # A directory cannot be read as a file, even by root (chmod 000 can).
    err = assert_one_line_error(run(SERVER, "--config", str(tmp_path)))
    assert str(tmp_path) in err


def test_malformed_ini_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.ini"
    bad.write_text("port = 9000\n[server\n")  # no section header, and a broken one
    assert_one_line_error(run(SERVER, "--config", str(bad)))


@pytest.mark.parametrize(
    "args, ini",
    [(["--bogus"], None), ([], {"bogus": "1"}), (["--linger", "-1"], None), (["--linger", "soon"], None)],
    ids=["unknown-flag", "unknown-ini-key", "negative-linger", "bad-linger"],
)
def test_bad_client_config_is_one_line_exit_2(args, ini, tmp_path):
    if ini is not None:
        args = ["--config", str(write_ini(tmp_path / "bad.ini", client=ini)), *args]
    err = assert_one_line_error(run(CLIENT, *args))
    assert err.startswith("broadcast-client: error:")


def test_client_config_file_errors_are_one_line_exit_2(tmp_path):
    assert_one_line_error(run(CLIENT, "--config", str(tmp_path / "nowhere.ini")))
    assert_one_line_error(run(CLIENT, "--config", str(tmp_path)))


def test_port_in_use_is_one_line_exit_1(busy_port):
    err = assert_one_line_error(run(SERVER, "--host", "127.0.0.1", "--port", str(busy_port)), status=1)
    assert str(busy_port) in err
    assert "cannot listen" in err


# Precedence, in force in real processes


def test_server_port_precedence_in_a_real_process(busy_port, tmp_path, launch):
    ini = write_ini(tmp_path / "s.ini", server={"port": str(busy_port)})
    # File alone: the file's (busy) port is used, and fails.
    failing = launch("--config", str(ini))
    assert failing.listening_port() is None
    assert failing.proc.wait(10) == 1
    assert str(busy_port) in "".join(failing.lines)
    # The environment beats the file.
    port = launch("--config", str(ini), env=clean_env(BROADCAST_PORT="0")).listening_port()
    assert port not in (None, 0, busy_port)
    # A flag beats the environment.
    port = launch("--port", "0", env=clean_env(BROADCAST_PORT=str(busy_port))).listening_port()
    assert port not in (None, 0, busy_port)


def _largest_message_accepted(server, limit: int) -> None:
    """Messages of ``limit`` bytes are relayed; ``limit + 1`` closes with 1009."""
    with ws_connect(server.url) as ws:
        ws.send("x" * limit)
        assert ws.recv(timeout=5) == "x" * limit
        ws.send("x" * (limit + 1))
        with pytest.raises(Closed) as info:
            recv(ws, 5)
        assert info.value.code == 1009


@pytest.mark.parametrize(
    "use_env, use_flag, limit",
    [(False, False, 100), (True, False, 200), (True, True, 300)],
    ids=["file", "env-over-file", "flag-over-env"],
)
def test_server_max_message_size_precedence_in_a_real_process(start_server, tmp_path, use_env, use_flag, limit):
    ini = write_ini(tmp_path / "s.ini", server={"max-message-size": "100"})
    env = clean_env(BROADCAST_MAX_MESSAGE_SIZE="200") if use_env else None
    flags = ["--max-message-size", "300"] if use_flag else []
    server = start_server("--config", str(ini), *flags, env=env)
    _largest_message_accepted(server, limit)


def run_client(ini, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run(CLIENT, "--config", str(ini), "--linger", "5", *args, env=env, stdin="hello\n")


def test_one_file_configures_a_real_server_and_a_real_client(start_server, tmp_path):
    ini = tmp_path / "broadcast.ini"
    server_section = {"port": "1", "max-message-size": "64"}  # port: the fixture's --port 0 flag wins
    write_ini(ini, server=server_section, client={"addr": "127.0.0.1:1", "username": "filebob"})
    server = start_server("--config", str(ini))
    # The [server] section is in force (and the [client] one did not bother the server).
    _largest_message_accepted(server, 64)

    # Now point the file's [client] section at that server; the [server] section stays.
    write_ini(ini, server=server_section, client={"addr": server.addr, "username": "filebob"})
    result = run_client(ini)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["[filebob] hello"]

    # Environment over file, for both options.
    result = run_client(ini, env={"BROADCAST_USERNAME": "envbob"})
    assert result.stdout.splitlines() == ["[envbob] hello"], result.stderr
    write_ini(ini, server=server_section, client={"addr": "127.0.0.1:1", "username": "filebob"})
    result = run_client(ini, env={"BROADCAST_ADDR": server.addr})
    assert result.stdout.splitlines() == ["[filebob] hello"], result.stderr

    # Flag over environment, for both options.
    result = run_client(ini, "--username", "flagbob", "--addr", server.addr,
                        env={"BROADCAST_USERNAME": "envbob", "BROADCAST_ADDR": "127.0.0.1:1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["[flagbob] hello"]

    # And the file's address is really used: nothing listens on port 1.
    result = run_client(ini)
    assert result.returncode == 1
    assert "127.0.0.1:1" in result.stderr


# Issue 8: configuration never silently falls back to defaults


def test_broadcast_config_configures_real_programs(start_server, tmp_path):
    ini = tmp_path / "broadcast.ini"
    write_ini(ini, server={"max-message-size": "100"}, client={"username": "filebob"})
    server = start_server(env=clean_env(BROADCAST_CONFIG=str(ini)))
    _largest_message_accepted(server, 100)
    result = run(CLIENT, "--addr", server.addr, "--linger", "5", env={"BROADCAST_CONFIG": str(ini)},
                 stdin="hello\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["[filebob] hello"]


@pytest.mark.parametrize("script", [SERVER, CLIENT], ids=["server", "client"])
@pytest.mark.parametrize("what", ["missing", "unreadable"])
def test_broadcast_config_missing_or_unreadable_is_the_same_error(script, what, tmp_path):
    path = str(tmp_path / "nowhere.ini") if what == "missing" else str(tmp_path)
    by_flag = assert_one_line_error(run(script, "--config", path))
    by_env = assert_one_line_error(run(script, env={"BROADCAST_CONFIG": path}))
    assert by_env == by_flag
    assert path in by_env


@pytest.mark.parametrize("section", ["Server", "serverr", "srv", "DEFAULT", "Client"])
@pytest.mark.parametrize("script", [SERVER, CLIENT], ids=["server", "client"])
def test_unknown_section_is_an_error_naming_file_and_sections(script, section, tmp_path):
    ini = tmp_path / "typo.ini"
    ini.write_text(f"[{section}]\nport = 9000\n\n[client]\nusername = bob\n")
    err = assert_one_line_error(run(script, "--config", str(ini)))
    assert str(ini) in err
    assert f"[{section}]" in err and "[client]" in err  # the sections found


def test_server_warns_once_when_the_file_has_no_server_section(start_server, tmp_path):
    ini = write_ini(tmp_path / "client-only.ini", client={"username": "bob"})
    server = start_server("--config", str(ini))
    warnings = [line for line in server.lines if "WARNING" in line and str(ini) in line]
    assert len(warnings) == 1, server.log
    assert "[server]" in warnings[0]


def test_client_warns_once_when_the_file_has_no_client_section(server, tmp_path):
    ini = write_ini(tmp_path / "server-only.ini", server={"port": "9000"})
    result = run(CLIENT, "--config", str(ini), "--addr", server.addr, "--linger", "5", stdin="hi\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["hi"]
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and str(ini) in warnings[0] and "[client]" in warnings[0], result.stderr


README_LIST = "[https://a.example, https://b.example]"


def test_readme_list_example_is_in_force_in_a_real_server(start_server, tmp_path):
    readme = (ROOT / "README.md").read_text()
    line = f"allowed-origin = {README_LIST}"
    assert f"`{line}`" in readme  # the very line the README shows
    server = start_server("--config", str(write_ini(tmp_path / "s.ini", server={"allowed-origin": README_LIST})))
    for origin in ("https://a.example", "https://b.example"):
        with ws_connect(server.url, origin=origin) as ws:
            ws.send("hi")
            assert ws.recv(timeout=5) == "hi"
    with pytest.raises(Exception, match="403"):
        ws_connect(server.url, origin="https://c.example")


def _uncommented(text: str) -> str:
    """broadcast.ini.example with its commented-out settings turned on, as a user would."""
    return "\n".join(re.sub(r"^# (\S+ = .*)$", r"\1", line) for line in text.splitlines())


def test_example_ini_and_readme_sample_work_as_written(tmp_path, start_server):
    example = (ROOT / "broadcast.ini.example").read_text()
    readme = (ROOT / "README.md").read_text()
    sample = re.search(r"```ini\n(.*?)```", readme, re.S).group(1)
    for name, text in [("example.ini", example), ("all.ini", _uncommented(example)), ("readme.ini", sample)]:
        path = tmp_path / name
        path.write_text(text)
        server, client = parse_server_args(["--config", str(path)]), parse_client_args(["--config", str(path)])
        assert server.config_warnings == client.config_warnings == []
    everything = parse_server_args(["--config", str(tmp_path / "all.ini")])
    assert everything.allowed_origin == ["https://chat.example.com", "https://ops.example.com"]
    assert everything.require_username is True
    # As written, the example starts a real server (the fixture's --port 0 wins over 8080).
    start_server("--config", str(tmp_path / "example.ini"))


@pytest.mark.parametrize(
    "text, needles",
    [
        ("[server]\nport = 1\nport = 2\n", ["line 3", "port"]),
        ("port = 9000\n[server]\n", ["line 1"]),
        ("[server]\nport = 1\ntoken s3cret\n", ["line 3"]),
        ("[server]\nport = 1\n[server]\n", ["line 3", "server"]),
        ("[server]\nbogus = 1\n", ["unknown key 'bogus'", "[server]"]),
        ("[server]\nport = 70000\n", ["port", "70000"]),
        ("[server]\nmax-connections = many\n", ["max-connections", "many"]),
        ("[server]\nconfig = other.ini\n", ["unknown key 'config'"]),
        ("[server]\nrequire-username = maybe\n", ["require-username", "maybe"]),
    ],
    ids=["duplicate-key", "no-section", "no-delimiter", "duplicate-section", "unknown-key", "bad-port", "bad-count", "config-key",
         "bad-switch"],
)
def test_ini_errors_name_the_file_and_line(text, needles, tmp_path):
    ini = tmp_path / "bad.ini"
    ini.write_text(text)
    err = assert_one_line_error(run(SERVER, "--config", str(ini)))
    assert str(ini) in err
    assert "unrecognized arguments" not in err
    for needle in needles:
        assert needle in err
    assert "s3cret" not in err  # a line is located, never quoted


# Every limit: 0 is off or refused, and --help says which.

ZERO_IS_OFF = ["--max-message-size", "--max-connections-per-ip", "--rate-limit", "--write-timeout",
               "--ping-interval", "--ping-timeout", "--open-timeout", "--shutdown-timeout"]
ZERO_IS_REFUSED = ["--max-connections", "--send-queue-bytes", "--rate-burst"]


def _help_of(option: str) -> str:
    """The --help text of one option, joined onto one line."""
    entries = re.split(r"\n  (?=-)", run(SERVER, "--help").stdout)  # each option's entry starts "  -"
    entry = next(e for e in entries if e.startswith(f"{option} "))
    return " ".join(entry.split())


@pytest.mark.parametrize("option", ZERO_IS_OFF + ZERO_IS_REFUSED)
def test_help_says_what_zero_means(option):
    words = _help_of(option)
    if option in ZERO_IS_REFUSED:
        assert "0 is refused" in words, words
    else:
        assert re.search(r"\b0 (means|disables|waits|drops)", words), words


@pytest.mark.parametrize("option", ZERO_IS_REFUSED)
def test_zero_that_would_refuse_everyone_is_refused_at_start(option):
    err = assert_one_line_error(run(SERVER, "--host", "127.0.0.1", "--port", "0", "--rate-limit", "5", option, "0"))
    assert option.lstrip("-") in err


def test_zero_limits_that_mean_off_admit_and_deliver(start_server):
    zeros = [arg for option in ZERO_IS_OFF for arg in (option, "0")]
    server = start_server(*zeros)
    big = "x" * (2 * MIB)  # over the 1 MiB default: the size limit is off
    with ws_connect(server.url) as first, ws_connect(server.url) as second:
        for _ in range(20):  # a rate limit of 0 is no limit
            first.send("hi")
        assert [first.recv(timeout=5) for _ in range(20)] == ["hi"] * 20
        first.send(big)
        assert first.recv(timeout=10) == big
        assert [second.recv(timeout=5) for _ in range(21)][-1] == big


def _health_status(server) -> int:
    status, _body = http_get(server, "/healthz")
    return status


def _until(attempt, timeout: float = 10.0):
    """Retry ``attempt`` until it returns something true: a slot is freed once its reader has
    seen the peer hang up, which under load can trail the peer's close by a moment."""
    deadline = time.monotonic() + timeout
    while not (result := attempt()):
        assert time.monotonic() < deadline, f"still not so after {timeout}s"
    return result


def _admitted(url: str):
    try:
        return ws_connect(url)
    except InvalidStatus as refused:
        assert refused.response.status_code == 503
        return None


def test_healthz_is_503_while_the_node_is_full(start_server):
    server = start_server("--max-connections", "1")
    assert _health_status(server) == 200
    with _until(lambda: _admitted(server.url)) as ws:
        ws.send("in")
        assert ws.recv(timeout=5) == "in"
        assert _health_status(server) == 503
        with pytest.raises(InvalidStatus, match="503"):
            ws_connect(server.url)
    server.wait_for_log(r"disconnect anonymous@")
    _until(lambda: _health_status(server) == 200)


def test_a_big_message_is_echoed_whole_with_the_default_queue(start_server):
    server = start_server("--max-message-size", str(16 * MIB))
    message = os.urandom(10 * MIB)
    with ws_connect(server.url) as sender, ws_connect(server.url) as reader:
        sender.send(message)
        assert sender.recv(timeout=30) == message
        assert reader.recv(timeout=30) == message
    assert "slow consumer" not in server.log


def test_a_message_bigger_than_a_small_queue_still_reaches_readers(start_server):
    server = start_server("--send-queue-bytes", "1024", "--max-message-size", str(MIB))
    message = "y" * (512 * 1024)
    with ws_connect(server.url) as sender:
        for _ in range(3):
            sender.send(message)
            assert sender.recv(timeout=10) == message
    assert "slow consumer" not in server.log


def _ipv6_loopback() -> bool:
    try:
        with socket.create_server(("::1", 0), family=socket.AF_INET6):
            return True
    except OSError:
        return False


needs_ipv6 = pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")


def _echo(url: str) -> None:
    with ws_connect(url) as ws:
        ws.send("v6")
        assert ws.recv(timeout=5) == "v6"


@needs_ipv6
def test_host_ipv6_loopback_listens_on_ipv6(start_server):
    server = start_server("--host", "::1")
    match = server.wait_for_log(LISTENING)
    assert match.group(1) == "[::1]"
    _echo(f"ws://[::1]:{match.group(2)}/ws")


@needs_ipv6
@pytest.mark.skipif(not socket.has_dualstack_ipv6(), reason="no dual-stack sockets on this OS")
def test_host_any_ipv6_is_dual_stack(start_server):
    server = start_server("--host", "::")
    match = server.wait_for_log(LISTENING)
    assert match.group(1) == "[::]"
    _echo(f"ws://[::1]:{match.group(2)}/ws")
    _echo(f"ws://127.0.0.1:{match.group(2)}/ws")


def test_localhost_binds_ipv4_loopback_as_documented(start_server):
    server = start_server("--host", "localhost")
    assert server.wait_for_log(LISTENING).group(1) == "127.0.0.1"
    assert "`localhost` binds `127.0.0.1`" in (ROOT / "README.md").read_text()


EXPOSURE = re.compile(r"exposure: (\S+), TLS (on|off), token (on|off), origins: (.*)$")


def test_exposure_line_on_loopback(server):
    match = server.wait_for_log(EXPOSURE)
    assert match.groups() == (server.url, "off", "off", "any origin")
    assert "beyond loopback" not in server.log


def test_exposure_line_with_token_and_origins(start_server):
    server = start_server("--host", "0.0.0.0", "--token", "s3cret-token",
                          "--allowed-origin", "https://a.example", "--allowed-origin", "https://b.example")
    match = server.wait_for_log(EXPOSURE)
    assert match.groups()[1:] == ("off", "on", "https://a.example, https://b.example")
    assert match.group(1).startswith("ws://0.0.0.0:")
    assert "beyond loopback" not in server.log  # a token guards it
    assert "s3cret-token" not in server.log


def test_exposure_line_with_tls_beyond_loopback(start_server, tmp_path):
    chain = tmp_path / "server.pem"
    trustme.CA().issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(chain)
    server = start_server("--host", "0.0.0.0", "--certfile", str(chain))
    match = server.wait_for_log(EXPOSURE)
    assert match.group(1).startswith("wss://0.0.0.0:")
    assert match.groups()[1:] == ("on", "off", "any origin")
    assert "beyond loopback" not in server.log  # TLS guards it


def test_warning_when_open_beyond_loopback(start_server):
    server = start_server("--host", "0.0.0.0")
    assert server.wait_for_log(EXPOSURE).groups()[1:] == ("off", "off", "any origin")
    server.wait_for_log(r"WARNING listening beyond loopback with neither --token nor TLS")


# Secrets never reach a log line or an error message.

SECRET = "pa55-w0rd-never-shown"


@pytest.fixture
def redis_with_password(request, tmp_path_factory):
    """A real redis-server that requires SECRET."""
    if not get_config(request).exec:
        pytest.skip(NOT_INSTALLED)
    server = TestRedis(request, tmp_path_factory.mktemp("redis")).start()
    server.admin.config_set("requirepass", SECRET)  # the admin connection stays authenticated
    yield server
    server.close()


@pytest.mark.redis
def test_redis_password_never_logged(start_server, redis_with_password):
    redis_server = redis_with_password
    url = f"redis://:{SECRET}@{redis_server.host}:{redis_server.port}/0"
    # A wrong password: refused at start, exit 1, and neither password is shown.
    wrong = start_server("--redis-url", url.replace(SECRET, SECRET + "x"), expect_listening=False)
    assert wrong.wait_exit() == 1
    assert "cannot reach redis" in wrong.log and "***" in wrong.log
    node = start_server("--redis-url", url)
    # An outage and the recovery are logged with the URL, password masked.
    redis_server.crash()
    node.wait_for_log(r"redis \S+ unreachable", timeout=10)
    redis_server.start()
    redis_server.client().config_set("requirepass", SECRET)
    node.wait_for_log(r"redis \S+ is back", timeout=15)
    node.stop()
    assert f":***@{redis_server.host}" in node.log
    assert SECRET not in node.log and SECRET not in wrong.log


def test_redis_password_not_in_a_url_error():
    err = assert_one_line_error(run(SERVER, "--redis-url", f"redis://:{SECRET}@host:notaport/0"))
    assert SECRET not in err and "***" in err


def test_client_never_shows_a_token_in_its_address(server):
    # Refused handshake (wrong path) and refused connection (nothing listens on port 1).
    for addr in (f"ws://{server.addr}/nowhere?token={SECRET}", f"ws://127.0.0.1:1/ws?token={SECRET}"):
        result = run(CLIENT, "--addr", addr, stdin="")
        assert result.returncode == 1, result.stderr
        assert SECRET not in result.stderr and "token=***" in result.stderr, result.stderr


def test_server_never_logs_a_token(start_server):
    server = start_server("--token", SECRET)
    with pytest.raises(Exception, match="401"):
        ws_connect(f"{server.url}?token=wrong-{SECRET}")
    with ws_connect(f"{server.url}?token={SECRET}") as ws:
        ws.send("hi")
        assert ws.recv(timeout=5) == "hi"
    server.wait_for_log(r"refused .*401")
    server.wait_for_log(r"connect anonymous@")
    assert SECRET not in server.log
