"""Command-line, environment and ini-file configuration for both programs.

Every option can be given as a flag, as ``BROADCAST_<OPTION>`` in the
environment, or as a key in the ``[server]`` or ``[client]`` section of the
file named by ``--config`` or ``BROADCAST_CONFIG``; configargparse applies
that precedence for us. Bad configuration must cost the user one line on
stderr and exit code 2, never a traceback, so the parser's ``error`` is
narrowed to exactly that. A file is never half-read: a section or key this
program does not know is an error naming the file, not a silent default.

The programs get a frozen dataclass each (``ServerConfig``, ``ClientConfig``),
never the parser's Namespace: a module reads only fields that exist, and
nobody changes the configuration after it is parsed.
"""

from __future__ import annotations

import argparse
import configparser
import json
import logging
import sys
from dataclasses import dataclass

import configargparse
from redis.connection import parse_url

from .redact import redact_url
from . import __version__

ENV_PREFIX = "BROADCAST_"
CONFIG_ENV = ENV_PREFIX + "CONFIG"
# The sections a file may have: one per program, so one file serves both.
SECTIONS = ("server", "client")
# What configargparse takes for a switch (store_true) in a file or the environment.
SWITCH_WORDS = frozenset({"true", "false", "yes", "no", "on", "off", "1", "0"})

MIB = 1024 * 1024
LOG_FORMATS = ("text", "json")
# The metrics listener answers anyone who reaches it, with no token: loopback
# unless the operator names an address a scraper on another host can use.
METRICS_HOST = "127.0.0.1"


@dataclass(frozen=True)
class ServerConfig:
    host: str
    port: int
    max_message_size: int  # bytes; 0 is no limit
    send_queue_bytes: int
    write_timeout: float  # seconds; 0 disables, as for the other timeouts
    ping_interval: float
    ping_timeout: float
    max_connections: int
    max_handshakes: int
    max_handshakes_per_ip: int
    max_pending_bytes: int
    open_timeout: float
    shutdown_timeout: float
    no_web: bool
    log_level: str
    log_format: str  # "text" or "json"
    no_metrics: bool
    metrics_host: str | None  # with metrics_port: /metrics on a listener of its own
    metrics_port: int | None
    allowed_origin: list[str] | None
    token: str | None
    certfile: str | None
    keyfile: str | None
    rate_limit: float  # messages a second; 0 is off
    rate_burst: int
    max_connections_per_ip: int
    require_username: bool
    max_rooms: int
    history_size: int  # messages per room; 0 keeps none
    history_bytes: int  # per room
    history_total_bytes: int  # across rooms
    history_ttl: float  # seconds; 0 is no expiry
    allow_duplicate_names: bool
    redis_url: str | None
    redis_channel: str
    redis_optional: bool
    redis_retention: float  # seconds of every room's stream kept for catch-up, past its last 1,000
    presence_ttl: float  # seconds a dead node's members and names outlive it
    config_file: str | None
    config_warnings: list[str]  # from the file, for the server to log


@dataclass(frozen=True)
class ClientConfig:
    addr: str
    room: str | None
    username: str | None
    token: str | None
    ca_file: str | None
    linger: float
    connect_timeout: float
    reconnect_timeout: float
    listen_only: bool
    max_message_size: int
    no_color: bool
    timestamps: bool
    header: list[str] | None
    origin: str | None
    insecure: bool
    config_file: str | None
    config_warnings: list[str]


class OneLineParser(configargparse.ArgumentParser):
    """An ArgumentParser whose errors are one line and exit 2.

    argparse prints the whole usage block before the message; an operator
    reading a service log wants the reason alone.
    """

    def error(self, message: str) -> None:  # noqa: D401 - argparse API
        # Some messages (configparser's) span lines; an error is one line.
        message = " ".join(message.split())
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def _bounded_int(low: int, high: int | None, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            span = f"{low}-{high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"{what} must be {span}, got {value}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


def _non_negative_float(what: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a number, got {text!r}") from None
        if not value >= 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"{what} must be a finite number >= 0, got {text}")
        return value

    parse.__name__ = what
    return parse


port = _bounded_int(0, 65535, "port")
size = _bounded_int(0, None, "size")
count = _bounded_int(0, None, "count")
# Limits for which 0 would refuse or evict every client: at least 1.
positive_size = _bounded_int(1, None, "size")
positive_count = _bounded_int(1, None, "count")
seconds = _non_negative_float("seconds")


def _redis_url(text: str) -> str:
    """Checked by redis-py's own parser, so a typo fails at start, not at first use."""
    try:
        parse_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad Redis URL {redact_url(text)!r}: {exc}") from None
    return text


def _log_level(text: str) -> str:
    level = text.upper()
    if level not in logging.getLevelNamesMapping():
        raise argparse.ArgumentTypeError(f"unknown log level {text!r}")
    return level


def split_list(value: str) -> list[str] | str:
    """The one list syntax, ``[A, B]``, read exactly as configargparse reads it from the environment.

    JSON (``["A", "B"]``) is taken as JSON; otherwise the items are what lies
    between the commas, stripped. A value without brackets is one item.
    """
    if not (value.startswith("[") and value.endswith("]")):
        return value
    try:
        items = json.loads(value)
    except ValueError:
        return [item.strip() for item in value[1:-1].split(",")]
    return [str(item) for item in items] if isinstance(items, list) else value


class SectionParser(configargparse.ConfigFileParser):
    """Reads one program's section of the shared ini file, strictly.

    configargparse's own IniConfigParser ignores sections it was not told
    about (so ``[Server]`` silently configures nothing), evaluates lists as
    Python literals (so ``[https://a.example]`` is a syntax error), and lets
    an unknown key surface as an unrecognized command-line argument. Here
    stdlib configparser reads the file, which gives the file name and line of
    a syntax error; values are taken verbatim, as from the environment.
    """

    def __init__(self, section: str) -> None:
        super().__init__()
        self.section = section
        self.owner: configargparse.ArgumentParser | None = None  # set once the parser exists
        self.warnings: list[str] = []  # for the program to log once logging is set up

    def get_syntax_description(self) -> str:
        return (f"ini: a [{self.section}] section of 'key = value' lines, keys being the long options; "
                "lists are written [A, B]")

    def _keys(self) -> dict[str, argparse.Action]:
        """Each key a file may set: the long options, minus --config and --help."""
        return {
            key: action
            for action in self.owner._actions
            if not getattr(action, "is_config_file_arg", False) and not isinstance(action, argparse._HelpAction)
            for key in self.owner.get_possible_config_keys(action)
        }

    def parse(self, stream) -> dict[str, str | list[str]]:
        name = getattr(stream, "name", "config file")
        # default_section="" can never match a header, so [DEFAULT] is just
        # another unknown section; no interpolation, so '%' is kept as typed.
        ini = configparser.ConfigParser(interpolation=None, default_section="")
        try:
            ini.read_string(stream.read(), source=name)
        except configparser.MissingSectionHeaderError as exc:
            raise configargparse.ConfigFileParserException(
                f"{name}: line {exc.lineno}: a setting before any [server] or [client] section") from None
        except configparser.ParsingError as exc:
            # Not exc's own text: it quotes the line, which may hold a secret.
            lines = ", ".join(str(lineno) for lineno, _ in exc.errors)
            raise configargparse.ConfigFileParserException(
                f"{name}: line {lines}: not a 'key = value' line") from None
        except (configparser.Error, UnicodeDecodeError) as exc:
            raise configargparse.ConfigFileParserException(f"invalid config file {name}: {exc}") from None
        found = ini.sections()
        unknown = [s for s in found if s not in SECTIONS]
        if unknown:
            listed = ", ".join(f"[{s}]" for s in found)
            raise configargparse.ConfigFileParserException(
                f"{name}: unknown section [{unknown[0]}] (sections found: {listed}; "
                f"allowed: [server], [client])")
        if self.section not in found:
            self.warnings.append(f"config file {name} has no [{self.section}] section; nothing in it applies")
            return {}
        keys = self._keys()
        items: dict[str, str | list[str]] = {}
        for key, value in ini.items(self.section):
            action = keys.get(key)
            if action is None:
                raise configargparse.ConfigFileParserException(
                    f"{name}: unknown key '{key}' in section [{self.section}]")
            if "\n" in value:
                raise configargparse.ConfigFileParserException(
                    f"{name}: [{self.section}] {key}: a value must fit on one line (lists are [A, B])")
            items[key] = split_list(value) if isinstance(action, argparse._AppendAction) else value
            self._check(name, key, action, items[key])
        return items

    def _check(self, name: str, key: str, action: argparse.Action, value: str | list[str]) -> None:
        """Type-check here, where the file is known: argparse would blame a flag nobody typed."""
        if isinstance(action, argparse._StoreTrueAction) and value.lower() not in SWITCH_WORDS:
            raise configargparse.ConfigFileParserException(
                f"{name}: [{self.section}] {key}: expected true or false, got {value!r}")
        if action.type is None:
            return
        for item in value if isinstance(value, list) else [value]:
            try:
                action.type(item)
            except argparse.ArgumentTypeError as exc:
                raise configargparse.ConfigFileParserException(
                    f"{name}: [{self.section}] {key}: {exc}") from None


def _parser(section: str, description: str) -> OneLineParser:
    section_parser = SectionParser(section)
    parser = OneLineParser(
        prog=f"broadcast-{section}",
        description=description,
        config_file_parser_class=section_parser,
        auto_env_var_prefix=ENV_PREFIX,
    )
    section_parser.owner = parser
    parser.section_parser = section_parser
    # Declared here rather than with args_for_setting_config_path, which gives
    # it no environment variable: BROADCAST_CONFIG would be ignored.
    parser.add_argument("--config", dest="config_file", is_config_file_arg=True, env_var=CONFIG_ENV,
                        metavar="FILE", help=f"ini file whose [{section}] section sets any long option")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def server_parser() -> OneLineParser:
    p = _parser("server", "WebSocket broadcast server: every message reaches every client.")
    p.add_argument("--host", default="0.0.0.0",
                   help="address to listen on: an IPv4 or IPv6 address ('::' is dual-stack where the OS allows); "
                        "a name binds its IPv4 address, so localhost is 127.0.0.1 (default %(default)s)")
    p.add_argument("--port", type=port, default=8080, help="TCP port; 0 picks a free one (default %(default)s)")
    p.add_argument("--max-message-size", type=size, default=1 * MIB, metavar="BYTES",
                   help="largest message accepted; bigger ones close with 1009; 0 means unlimited (default %(default)s)")
    p.add_argument("--send-queue-bytes", type=positive_size, default=4 * MIB, metavar="BYTES",
                   help="unsent bytes a client may be behind when a message arrives before it is evicted with "
                        "1008; a message is always admitted within it; 0 is refused (default %(default)s)")
    p.add_argument("--write-timeout", type=seconds, default=10.0, metavar="SECONDS",
                   help="a client whose socket accepts nothing for this long is evicted; 0 disables "
                        "(default %(default)s)")
    p.add_argument("--ping-interval", type=seconds, default=20.0, metavar="SECONDS",
                   help="keepalive ping period; 0 disables keepalive (default %(default)s)")
    p.add_argument("--ping-timeout", type=seconds, default=20.0, metavar="SECONDS",
                   help="a ping unanswered this long drops the client; 0 disables (default %(default)s)")
    p.add_argument("--max-connections", type=positive_count, default=10000,
                   help="joined clients beyond this get HTTP 503; never more than the open-files limit "
                        "allows; 0 is refused (default %(default)s)")
    p.add_argument("--max-handshakes", type=count, default=4096,
                   help="connections that may be in their opening handshake at once, apart from the joined "
                        "ones; more are closed at accept; 0 leaves only the open-files limit (default %(default)s)")
    p.add_argument("--max-handshakes-per-ip", type=count, default=1024,
                   help="the same, from one address; 0 is no limit (default %(default)s)")
    p.add_argument("--max-pending-bytes", type=size, default=256 * MIB, metavar="BYTES",
                   help="memory all clients together may hold in unfinished messages; a client whose "
                        "fragment would pass it is closed with 1013; 0 is no limit (default %(default)s)")
    p.add_argument("--open-timeout", type=seconds, default=10.0, metavar="SECONDS",
                   help="a client must finish its opening handshake within this; 0 waits forever (default %(default)s)")
    p.add_argument("--shutdown-timeout", type=seconds, default=5.0, metavar="SECONDS",
                   help="how long SIGINT/SIGTERM waits for clients to close; 0 drops them at once "
                        "(default %(default)s)")
    p.add_argument("--no-web", action="store_true",
                   help="serve no chat page at / (it is on by default, on the WebSocket port)")
    p.add_argument("--log-level", type=_log_level, default="INFO", help="(default %(default)s)")
    p.add_argument("--log-format", choices=LOG_FORMATS, default="text",
                   help="text: one readable line a record; json: one JSON object a line, for log shippers "
                        "(default %(default)s)")
    metrics = p.add_argument_group("metrics")
    metrics.add_argument("--no-metrics", action="store_true", help="serve no Prometheus metrics at all")
    metrics.add_argument("--metrics-port", type=port, default=None,
                         help="serve /metrics on this port of its own instead of on the WebSocket port; "
                              "0 picks a free one (default: on the WebSocket port)")
    metrics.add_argument("--metrics-host", default=None,
                         help=f"address of the --metrics-port listener (default {METRICS_HOST})")
    security = p.add_argument_group("security")
    security.add_argument("--allowed-origin", action="append", metavar="ORIGIN",
                          help="accept browsers only from this Origin (repeatable); "
                               "without it every origin is accepted")
    security.add_argument("--token", default=None,
                          help="shared secret clients must present as 'Authorization: Bearer TOKEN' or ?token=")
    security.add_argument("--certfile", default=None, help="PEM certificate chain: serve wss:// instead of ws://")
    security.add_argument("--keyfile", default=None, help="PEM private key, if not inside --certfile")
    security.add_argument("--rate-limit", type=seconds, default=0.0, metavar="MSGS_PER_SEC",
                          help="messages a client may send per second on average; over it, close 1008; "
                               "0 means off (default off)")
    security.add_argument("--rate-burst", type=positive_count, default=None, metavar="MSGS",
                          help="messages a client may send at once under --rate-limit; 0 is refused "
                               "(default: one second's worth)")
    security.add_argument("--max-connections-per-ip", type=count, default=0,
                          help="connections one address may hold; past it HTTP 429; 0 means off (default off)")
    security.add_argument("--require-username", action="store_true",
                          help="refuse anonymous clients, who could otherwise type '[Bob] hi' and pass as Bob")
    rooms = p.add_argument_group("rooms and history")
    rooms.add_argument("--max-rooms", type=positive_count, default=10000,
                       help="rooms that may exist at once (a room exists while it has members or history); "
                            "a new one past it gets HTTP 503 (default %(default)s)")
    rooms.add_argument("--history-size", type=count, default=100, metavar="MSGS",
                       help="messages each room keeps for joiners and reconnecting clients; 0 keeps none "
                            "(default %(default)s)")
    rooms.add_argument("--history-bytes", type=positive_size, default=1 * MIB, metavar="BYTES",
                       help="bytes each room's history may hold (default %(default)s)")
    rooms.add_argument("--history-total-bytes", type=positive_size, default=64 * MIB, metavar="BYTES",
                       help="bytes all rooms' histories may hold; past it the largest rooms lose their "
                            "oldest messages first (default %(default)s)")
    rooms.add_argument("--history-ttl", type=seconds, default=0.0, metavar="SECONDS",
                       help="a kept message expires after this long; 0 keeps it until it is pushed out "
                            "(default off)")
    rooms.add_argument("--allow-duplicate-names", action="store_true",
                       help="let two clients in one room use the same name (by default the second gets 409)")
    nodes = p.add_argument_group("several servers")
    nodes.add_argument("--redis-url", type=_redis_url, default=None, metavar="redis://HOST:PORT/DB",
                       help="share the rooms with every server on this Redis (default: this server alone)")
    nodes.add_argument("--redis-channel", default="broadcast",
                       help="prefix of the rooms' Redis keys: one per deployment (default %(default)s)")
    nodes.add_argument("--redis-optional", action="store_true",
                       help="start with a warning if Redis is unreachable at start; rooms open once it is back")
    nodes.add_argument("--redis-retention", type=seconds, default=60.0, metavar="SECONDS",
                       help="a node that falls behind, or is cut off from Redis, this long at most catches up "
                            "with nothing lost; every room keeps its last 1,000 messages (or --history-size) "
                            "however old (default 60)")
    nodes.add_argument("--presence-ttl", type=seconds, default=10.0, metavar="SECONDS",
                       help="a node that dies leaves presence and frees its names within this (default 10)")
    return p


def client_parser() -> OneLineParser:
    p = _parser("client", "Interactive chat client for a broadcast server.")
    p.add_argument("--addr", default="localhost:8080",
                   help="HOST:PORT of the server, or a full ws:// or wss:// URL (default %(default)s)")
    p.add_argument("--room", default=None,
                   help="join this room: /ROOM after the address's path (default: the server's default room)")
    p.add_argument("--username", default=None, help="name shown with your messages")
    p.add_argument("--token", default=None, help="sent as 'Authorization: Bearer TOKEN' (server --token)")
    p.add_argument("--ca-file", default=None, metavar="PEM",
                   help="CA certificates to verify a wss:// server with (default: the system's)")
    p.add_argument("--linger", type=seconds, default=2.0, metavar="SECONDS",
                   help="when input is piped: after end of input, wait at most this long "
                        "for the echo of what was sent (default %(default)s)")
    p.add_argument("--connect-timeout", type=seconds, default=10.0, metavar="SECONDS",
                   help="to resolve, connect and finish the whole handshake, however slowly it trickles; "
                        "0 waits forever (default %(default)s)")
    p.add_argument("--reconnect-timeout", type=seconds, default=60.0, metavar="SECONDS",
                   help="after a lost connection or a server restart, keep reconnecting for at most this long, "
                        "resuming where the session left off; 0 never reconnects (default %(default)s)")
    p.add_argument("--listen-only", action="store_true",
                   help="read no input: print what arrives until the server or a signal ends it")
    p.add_argument("--max-message-size", type=size, default=4 * MIB, metavar="BYTES",
                   help="largest incoming message; a bigger one ends the session; 0 for no limit "
                        "(default %(default)s, four times the server's default)")
    p.add_argument("--no-color", action="store_true", help="no colours at a terminal (so does NO_COLOR)")
    p.add_argument("--timestamps", action="store_true", help="show the time each message arrived")
    p.add_argument("--header", action="append", metavar="NAME:VALUE",
                   help="an extra handshake request header (repeatable)")
    p.add_argument("--origin", default=None, help="send this Origin header, as a browser page would")
    p.add_argument("--insecure", action="store_true",
                   help="do not verify the wss:// server's certificate (prints a warning)")
    return p


def _parse(parser: OneLineParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, keeping the file's warnings in ``config_warnings`` for the program to report."""
    config = parser.parse_args(argv)
    config.config_warnings = parser.section_parser.warnings
    return config


def _typed(cls, namespace: argparse.Namespace):
    """``namespace`` as ``cls``; a TypeError here is an option without its field: a bug, not bad input."""
    return cls(**vars(namespace))


def parse_server_args(argv: list[str] | None = None) -> ServerConfig:
    parser = server_parser()
    config = _parse(parser, argv)
    if config.keyfile and not config.certfile:
        parser.error("--keyfile needs --certfile")
    if not config.presence_ttl > 0:
        parser.error("--presence-ttl must be > 0")
    if config.metrics_host and config.metrics_port is None:
        parser.error("--metrics-host needs --metrics-port")
    if config.no_metrics and config.metrics_port is not None:
        parser.error("--no-metrics and --metrics-port contradict each other")
    if config.metrics_port is not None and not config.metrics_host:
        config.metrics_host = METRICS_HOST
    if config.rate_burst is None:
        config.rate_burst = max(1, round(config.rate_limit))
    return _typed(ServerConfig, config)


def parse_client_args(argv: list[str] | None = None) -> ClientConfig:
    """The client has no log: a file's warning is printed, as its other messages are."""
    parser = client_parser()
    config = _parse(parser, argv)
    for warning in config.config_warnings:
        sys.stderr.write(f"{parser.prog}: warning: {warning}\n")
    return _typed(ClientConfig, config)
