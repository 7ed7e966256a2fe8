"""Configuration of both programs: flags, BROADCAST_<OPTION> variables, one ini file, defaults.

Precedence is flag > environment > ``--config FILE`` ([server] and [client]
sections, keys spelled like the long options) > default. Bad configuration
costs exactly one line on stderr and exit status 2, never a traceback; a port
already in use is one line and exit status 1.

The parser is checked directly where that is enough; what users see (the
exit status, the one stderr line, the settings actually in force) is checked
on real ``scripts/server.py`` and ``scripts/client.py`` processes.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading

import pytest

from broadcast.config import parse_client_args, parse_server_args
from conftest import ROOT, clean_env
from wsclients import Closed, recv, ws_connect

SERVER = str(ROOT / "scripts" / "server.py")
CLIENT = str(ROOT / "scripts" / "client.py")
LISTENING = re.compile(r"listening on ws://([0-9.]+):(\d+)/ws")
MIB = 1024 * 1024
RUN_TIMEOUT = 15.0


@pytest.fixture(autouse=True)
def no_broadcast_env(monkeypatch):
    """Parser tests read os.environ: start each one without the developer's BROADCAST_*."""
    for key in list(os.environ):
        if key.startswith("BROADCAST_"):
            monkeypatch.delenv(key)


def write_ini(path, server: dict | None = None, client: dict | None = None):
    lines = []
    for section, values in (("server", server), ("client", client)):
        if values is not None:
            lines.append(f"[{section}]")
            lines += [f"{key} = {value}" for key, value in values.items()]
            lines.append("")
    path.write_text("\n".join(lines))
    return path


def run(script: str, *args: str, env: dict | None = None, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, script, *args], cwd=ROOT, env=clean_env(**(env or {})), input=stdin,
        capture_output=True, text=True, timeout=RUN_TIMEOUT,
    )


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


class Launched:
    """``scripts/server.py`` exactly as given (no --port added), until it listens or exits."""

    def __init__(self, *args: str, env: dict | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, SERVER, "--host", "127.0.0.1", *args], cwd=ROOT, env=clean_env(**(env or {})),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        self.lines: list[str] = []
        self.listening = threading.Event()
        self.port: int | None = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            match = LISTENING.search(line)
            if match:
                self.port = int(match.group(2))
                self.listening.set()
        self.listening.set()  # exited

    def wait(self, timeout: float = 10.0) -> int | None:
        """The listening port, or None if the server exited instead."""
        assert self.listening.wait(timeout), "server neither listened nor exited"
        return self.port

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def launch():
    launched: list[Launched] = []

    def start(*args: str, env: dict | None = None) -> Launched:
        process = Launched(*args, env=env)
        launched.append(process)
        return process

    yield start
    for process in launched:
        process.stop()


# Defaults


def test_server_defaults():
    config = parse_server_args([])
    assert config.host == "0.0.0.0"
    assert config.port == 8080
    assert config.send_queue_bytes == 4 * MIB
    assert config.max_message_size == 1 * MIB
    assert config.log_level == "INFO"
    assert config.shutdown_timeout > 0
    assert config.ping_interval > 0 and config.ping_timeout > 0
    assert config.max_connections > 0


def test_client_defaults():
    config = parse_client_args([])
    assert config.addr == "localhost:8080"
    assert config.username is None


# Precedence, at the parser


SERVER_OPTIONS = [
    # option, attribute, file value, env value, flag value, parsed (file, env, flag), default
    ("port", "port", "9000", "9001", "9002", (9000, 9001, 9002), 8080),
    ("host", "host", "10.0.0.1", "10.0.0.2", "10.0.0.3", ("10.0.0.1", "10.0.0.2", "10.0.0.3"), "0.0.0.0"),
    ("max-message-size", "max_message_size", "65536", "65537", "65538", (65536, 65537, 65538), MIB),
    ("send-queue-bytes", "send_queue_bytes", "1000", "2000", "3000", (1000, 2000, 3000), 4 * MIB),
    ("ping-interval", "ping_interval", "1.5", "0", "2.5", (1.5, 0.0, 2.5), 20.0),
    ("max-connections", "max_connections", "10", "20", "30", (10, 20, 30), 10000),
    ("shutdown-timeout", "shutdown_timeout", "1", "2", "3", (1.0, 2.0, 3.0), 5.0),
    ("log-level", "log_level", "debug", "warning", "ERROR", ("DEBUG", "WARNING", "ERROR"), "INFO"),
]

CLIENT_OPTIONS = [
    ("addr", "addr", "file.example:1", "env.example:2", "flag.example:3",
     ("file.example:1", "env.example:2", "flag.example:3"), "localhost:8080"),
    ("username", "username", "filebob", "envbob", "flagbob", ("filebob", "envbob", "flagbob"), None),
    ("linger", "linger", "0.5", "1.5", "2.5", (0.5, 1.5, 2.5), 2.0),
]


def env_name(option: str) -> str:
    return "BROADCAST_" + option.upper().replace("-", "_")


def _check_precedence(parse, section, option, attr, file_value, env_value, flag_value, parsed, default,
                      tmp_path, monkeypatch):
    ini = write_ini(tmp_path / "broadcast.ini", **{section: {option: file_value}})
    assert getattr(parse([]), attr) == default
    assert getattr(parse(["--config", str(ini)]), attr) == parsed[0]
    monkeypatch.setenv(env_name(option), env_value)
    assert getattr(parse(["--config", str(ini)]), attr) == parsed[1]
    assert getattr(parse([]), attr) == parsed[1]
    assert getattr(parse(["--config", str(ini), f"--{option}", flag_value]), attr) == parsed[2]
    assert getattr(parse([f"--{option}={flag_value}"]), attr) == parsed[2]
    monkeypatch.delenv(env_name(option))
    assert getattr(parse(["--config", str(ini), f"--{option}", flag_value]), attr) == parsed[2]


@pytest.mark.parametrize("option, attr, file_value, env_value, flag_value, parsed, default", SERVER_OPTIONS,
                         ids=[o[0] for o in SERVER_OPTIONS])
def test_server_precedence_flag_env_file_default(option, attr, file_value, env_value, flag_value, parsed, default,
                                                 tmp_path, monkeypatch):
    _check_precedence(parse_server_args, "server", option, attr, file_value, env_value, flag_value, parsed,
                      default, tmp_path, monkeypatch)


@pytest.mark.parametrize("option, attr, file_value, env_value, flag_value, parsed, default", CLIENT_OPTIONS,
                         ids=[o[0] for o in CLIENT_OPTIONS])
def test_client_precedence_flag_env_file_default(option, attr, file_value, env_value, flag_value, parsed, default,
                                                 tmp_path, monkeypatch):
    _check_precedence(parse_client_args, "client", option, attr, file_value, env_value, flag_value, parsed,
                      default, tmp_path, monkeypatch)


def test_one_file_serves_both_programs(tmp_path):
    ini = write_ini(tmp_path / "both.ini",
                    server={"port": "9000", "max-message-size": "65536", "log-level": "debug"},
                    client={"addr": "chat.example:9000", "username": "bob"})
    server = parse_server_args(["--config", str(ini)])
    assert (server.port, server.max_message_size, server.log_level) == (9000, 65536, "DEBUG")
    client = parse_client_args(["--config", str(ini)])
    assert (client.addr, client.username) == ("chat.example:9000", "bob")


def test_each_program_reads_only_its_own_section(tmp_path):
    ini = write_ini(tmp_path / "both.ini", server={"port": "9000"}, client={"username": "bob"})
    # "username" is no server option and "port" no client option: neither trips the other.
    assert parse_server_args(["--config", str(ini)]).port == 9000
    assert parse_client_args(["--config", str(ini)]).addr == "localhost:8080"


# Bad configuration, at the parser


def _parser_error(parse, argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        parse(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n"), repr(err)
    return err


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--bogus"], "--bogus"),
        (["--port", "65536"], "port"),
        (["--port", "-1"], "port"),
        (["--port", "http"], "port"),
        (["--max-message-size", "-1"], "max-message-size"),
        (["--send-queue-bytes", "-4096"], "send-queue-bytes"),
        (["--max-connections", "-1"], "max-connections"),
        (["--ping-interval", "-1"], "ping-interval"),
        (["--shutdown-timeout", "soon"], "shutdown-timeout"),
        (["--log-level", "LOUD"], "log-level"),
    ],
)
def test_server_parser_errors_are_one_line_exit_2(argv, needle, capsys):
    err = _parser_error(parse_server_args, argv, capsys)
    assert err.startswith("broadcast-server: error:")
    assert needle in err


def test_env_errors_name_the_option(monkeypatch, capsys):
    monkeypatch.setenv("BROADCAST_PORT", "70000")
    assert "port" in _parser_error(parse_server_args, [], capsys)


def test_port_bounds_are_inclusive():
    assert parse_server_args(["--port", "0"]).port == 0
    assert parse_server_args(["--port", "65535"]).port == 65535


def test_sizes_may_be_zero():
    assert parse_server_args(["--max-message-size", "0", "--send-queue-bytes", "0"]).max_message_size == 0


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
    assert failing.wait() is None
    assert failing.proc.wait(10) == 1
    assert str(busy_port) in "".join(failing.lines)
    # The environment beats the file.
    port = launch("--config", str(ini), env={"BROADCAST_PORT": "0"}).wait()
    assert port not in (None, 0, busy_port)
    # A flag beats the environment.
    port = launch("--port", "0", env={"BROADCAST_PORT": str(busy_port)}).wait()
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
