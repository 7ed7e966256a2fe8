"""The configuration parser in-process: defaults, precedence, sections, list syntax and its errors.

``parse_server_args``/``parse_client_args`` read flags, the environment and
the file; here they run in the test's own process, so each test starts with
no BROADCAST_* of the developer's. What the programs do with a bad
configuration (one line, exit 2) is tests/e2e/test_config.py's.
"""

from __future__ import annotations

import pytest

from broadcast.config import parse_client_args, parse_server_args
from support.ini import write_ini

pytestmark = pytest.mark.usefixtures("no_broadcast_env")

MIB = 1024 * 1024
README_LIST = "[https://a.example, https://b.example]"  # the README's example of the list syntax


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


def test_max_message_size_may_be_zero():
    assert parse_server_args(["--max-message-size", "0"]).max_message_size == 0


# One file, one list syntax


def test_broadcast_config_is_like_config_at_the_parser(tmp_path, monkeypatch):
    ini = write_ini(tmp_path / "both.ini", server={"port": "9000"}, client={"username": "filebob"})
    monkeypatch.setenv("BROADCAST_CONFIG", str(ini))
    assert parse_server_args([]).port == 9000
    assert parse_client_args([]).username == "filebob"
    # --config still wins over the variable, like every flag.
    other = write_ini(tmp_path / "other.ini", server={"port": "9001"})
    assert parse_server_args(["--config", str(other)]).port == 9001


@pytest.mark.parametrize("value", [README_LIST, '["https://a.example", "https://b.example"]',
                                   "[https://a.example,https://b.example]"])
def test_one_list_syntax_in_the_file_and_the_environment(value, tmp_path, monkeypatch):
    expected = ["https://a.example", "https://b.example"]
    ini = write_ini(tmp_path / "list.ini", server={"allowed-origin": value})
    assert parse_server_args(["--config", str(ini)]).allowed_origin == expected
    monkeypatch.setenv("BROADCAST_ALLOWED_ORIGIN", value)
    assert parse_server_args([]).allowed_origin == expected


def test_a_single_value_is_a_list_of_one_in_both(tmp_path, monkeypatch):
    ini = write_ini(tmp_path / "one.ini", server={"allowed-origin": "https://a.example"})
    assert parse_server_args(["--config", str(ini)]).allowed_origin == ["https://a.example"]
    monkeypatch.setenv("BROADCAST_ALLOWED_ORIGIN", "https://a.example")
    assert parse_server_args([]).allowed_origin == ["https://a.example"]
