"""Command-line, environment and ini-file configuration for both programs.

Every option can be given as a flag, as ``BROADCAST_<OPTION>`` in the
environment, or as a key in the ``[server]`` or ``[client]`` section of the
file named by ``--config``; configargparse applies that precedence for us.
Bad configuration must cost the user one line on stderr and exit code 2, never
a traceback, so the parser's ``error`` is narrowed to exactly that.
"""

from __future__ import annotations

import argparse
import logging
import sys

import configargparse
from redis.connection import parse_url

ENV_PREFIX = "BROADCAST_"

MIB = 1024 * 1024


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
seconds = _non_negative_float("seconds")


def _redis_url(text: str) -> str:
    """Checked by redis-py's own parser, so a typo fails at start, not at first use."""
    try:
        parse_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad Redis URL {text!r}: {exc}") from None
    return text


def _log_level(text: str) -> str:
    level = text.upper()
    if level not in logging.getLevelNamesMapping():
        raise argparse.ArgumentTypeError(f"unknown log level {text!r}")
    return level


def _section_parser(section: str) -> type[configargparse.IniConfigParser]:
    """configargparse wants a class it can build with no arguments."""

    class SectionParser(configargparse.IniConfigParser):
        def __init__(self) -> None:
            super().__init__([section], split_ml_text_to_list=False)

    return SectionParser


def _parser(section: str, description: str) -> OneLineParser:
    parser = OneLineParser(
        prog=f"broadcast-{section}",
        description=description,
        config_file_parser_class=_section_parser(section),
        auto_env_var_prefix=ENV_PREFIX,
        args_for_setting_config_path=["--config"],
        config_arg_help_message=f"ini file whose [{section}] section sets any long option",
    )
    return parser


def server_parser() -> OneLineParser:
    p = _parser("server", "WebSocket broadcast server: every message reaches every client.")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default %(default)s)")
    p.add_argument("--port", type=port, default=8080, help="TCP port; 0 picks a free one (default %(default)s)")
    p.add_argument("--max-message-size", type=size, default=1 * MIB, metavar="BYTES",
                   help="largest message accepted; bigger ones close with 1009 (default %(default)s)")
    p.add_argument("--send-queue-bytes", type=size, default=4 * MIB, metavar="BYTES",
                   help="unsent bytes a client may fall behind before it is evicted with 1008 (default %(default)s)")
    p.add_argument("--write-timeout", type=seconds, default=10.0, metavar="SECONDS",
                   help="a client whose socket accepts nothing for this long is evicted (default %(default)s)")
    p.add_argument("--ping-interval", type=seconds, default=20.0, metavar="SECONDS",
                   help="keepalive ping period; 0 disables keepalive (default %(default)s)")
    p.add_argument("--ping-timeout", type=seconds, default=20.0, metavar="SECONDS",
                   help="a ping unanswered this long drops the client; 0 disables (default %(default)s)")
    p.add_argument("--max-connections", type=count, default=10000,
                   help="joined clients beyond this get HTTP 503; never more than the open-files limit "
                        "allows (default %(default)s)")
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
                   help="how long SIGINT/SIGTERM waits for clients to close (default %(default)s)")
    p.add_argument("--log-level", type=_log_level, default="INFO", help="(default %(default)s)")
    security = p.add_argument_group("security")
    security.add_argument("--allowed-origin", action="append", metavar="ORIGIN",
                          help="accept browsers only from this Origin (repeatable); "
                               "without it every origin is accepted")
    security.add_argument("--token", default=None,
                          help="shared secret clients must present as 'Authorization: Bearer TOKEN' or ?token=")
    security.add_argument("--certfile", default=None, help="PEM certificate chain: serve wss:// instead of ws://")
    security.add_argument("--keyfile", default=None, help="PEM private key, if not inside --certfile")
    security.add_argument("--rate-limit", type=seconds, default=0.0, metavar="MSGS_PER_SEC",
                          help="messages a client may send per second on average; over it, close 1008 (default off)")
    security.add_argument("--rate-burst", type=count, default=None, metavar="MSGS",
                          help="messages a client may send at once under --rate-limit (default: one second's worth)")
    security.add_argument("--max-connections-per-ip", type=count, default=0,
                          help="connections one address may hold; past it HTTP 429 (default off)")
    security.add_argument("--require-username", action="store_true",
                          help="refuse anonymous clients, who could otherwise type '[Bob] hi' and pass as Bob")
    nodes = p.add_argument_group("several servers")
    nodes.add_argument("--redis-url", type=_redis_url, default=None, metavar="redis://HOST:PORT/DB",
                       help="share one room with every server on this Redis (default: this server alone)")
    nodes.add_argument("--redis-channel", default="broadcast", help="pub/sub channel (default %(default)s)")
    nodes.add_argument("--redis-optional", action="store_true",
                       help="start alone, with a warning, if Redis is unreachable at start")
    return p


def client_parser() -> OneLineParser:
    p = _parser("client", "Interactive chat client for a broadcast server.")
    p.add_argument("--addr", default="localhost:8080",
                   help="HOST:PORT of the server, or a full ws:// or wss:// URL (default %(default)s)")
    p.add_argument("--username", default=None, help="name shown with your messages")
    p.add_argument("--token", default=None, help="sent as 'Authorization: Bearer TOKEN' (server --token)")
    p.add_argument("--ca-file", default=None, metavar="PEM",
                   help="CA certificates to verify a wss:// server with (default: the system's)")
    p.add_argument("--linger", type=seconds, default=2.0, metavar="SECONDS",
                   help="when input is piped: after end of input, wait at most this long "
                        "for the echo of what was sent (default %(default)s)")
    return p


def parse_server_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = server_parser()
    config = parser.parse_args(argv)
    if config.keyfile and not config.certfile:
        parser.error("--keyfile needs --certfile")
    if config.rate_burst is None:
        config.rate_burst = max(1, round(config.rate_limit))
    return config


def parse_client_args(argv: list[str] | None = None) -> argparse.Namespace:
    return client_parser().parse_args(argv)
