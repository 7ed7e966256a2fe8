"""The server's log setup, and log lines that a request cannot forge or colour.

Paths, headers, usernames and origins come from the network. Written raw, a
newline in one would fake a second log line, and an ESC would drive the
operator's terminal. The escaping is done once, where every record is
formatted, so no call site has to remember it and a later formatter (JSON
lines) gets the same guarantee from the same filter.
"""

from __future__ import annotations

import logging
import re

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


def setup(level: str) -> None:
    """Log to stderr at ``level``, escaped."""
    # Readers are bare threads (net/listener.py): a record asking for its
    # thread's name would make each a threading._DummyThread, ~2.5 KiB that
    # Python 3.11 never frees. LOG_FORMAT names no thread.
    logging.logThreads = False
    logging.basicConfig(level=level, format=LOG_FORMAT)
    install()
