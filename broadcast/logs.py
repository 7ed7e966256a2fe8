"""The server's log setup, and log lines that a request cannot forge or colour.

Paths, headers, usernames and origins come from the network. Written raw, a
newline in one would fake a second log line, and an ESC would drive the
operator's terminal. The escaping is done once, where every record is
formatted, so no call site has to remember it.

``--log-format json`` writes each record as one JSON object instead, for log
shippers: the same message, plus the fields the call sites pass with
``extra=`` (``event``, ``peer``, ``user``, ``room``, ``code``, ``reason``...).
``json.dumps`` escapes every control character by construction, so that
format needs no filter, and its fields keep what the client sent, exactly.
"""

from __future__ import annotations

import json
import logging
import os
import re
from datetime import datetime, timezone

# C0 controls, DEL and C1 controls: the characters a terminal or a log parser
# acts on rather than shows.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f]")


def escape(text: str) -> str:
    """``text`` with every control character written as ``\\xNN``."""
    return _CONTROLS.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class EscapeControls(logging.Filter):
    """Renders each record's message with its arguments, escaped, before any handler sees it.

    Exception text is left alone: it is ours (a traceback) and spans lines
    on purpose.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = escape(record.getMessage()), None
        return True


def install() -> None:
    """Escape every record the root logger's handlers write, the libraries' included."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(EscapeControls())


# One line a record; the logger name stays out of it, so that moving code
# between modules never changes what an operator (or a test) reads.
LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"


# The event of a record whose call site names none.
DEFAULT_EVENT = "log"
# A LogRecord's own attributes; any other attribute came in with ``extra=``.
_RECORD_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JSONFormatter(logging.Formatter):
    """One JSON object a line: ``ts`` (UTC, ISO 8601), ``level``, ``event``, ``message``, the extra fields.

    The stdlib's Formatter and json module do it all; python-json-logger
    would add a dependency for the same ten lines, and a schema to map back.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "event": getattr(record, "event", DEFAULT_EVENT),
            "message": record.getMessage(),
        }
        entry.update((k, v) for k, v in vars(record).items() if k not in _RECORD_ATTRIBUTES)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup(level: str, log_format: str) -> None:
    """Log to stderr at ``level``: escaped text lines, or JSON lines."""
    # Readers are bare threads (net/listener.py): a record asking for its
    # thread's name would make each a threading._DummyThread, ~2.5 KiB that
    # Python 3.11 never frees. Neither format names a thread.
    logging.logThreads = False
    if log_format == "json":
        handler = logging.StreamHandler()
        handler.setFormatter(JSONFormatter())
        logging.basicConfig(level=level, handlers=[handler])
        return
    logging.basicConfig(level=level, format=LOG_FORMAT)
    install()


def last_words(logger: logging.Logger, level: int, message: str) -> None:
    """Log ``message`` from a signal handler that is about to end the process.

    It goes straight to stderr, formatted and filtered like any record but
    without the handler's lock: the thread the handler interrupted, or a
    reader blocked writing to a full stderr pipe, may hold that lock, and
    the process must exit now, not when it is released.
    """
    record = logger.makeRecord(logger.name, level, "(signal)", 0, message, (), None)
    for handler in logging.getLogger().handlers:
        if handler.filter(record):
            os.write(2, (handler.format(record) + "\n").encode("utf-8", "replace"))
            return
