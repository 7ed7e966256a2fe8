"""The keepalive and deadline thread: one for all connections, so an idle client costs no timer."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from ..config import ServerConfig

log = logging.getLogger(__name__)

# The ticker looks at deadlines at least this often.
TICK_MAX_S = 0.5
# And at most this often, however short the configured periods.
TICK_MIN_S = 0.01


class Ticker:
    def __init__(self, config: ServerConfig, connections: Callable[[], tuple]) -> None:
        self.config = config
        self._connections = connections  # a snapshot of the listener's set, taken under its lock

    def start(self) -> None:
        threading.Thread(target=self._run, name="ticker", daemon=True).start()

    def _run(self) -> None:
        c = self.config
        periods = [p / 4 for p in (c.ping_interval, c.ping_timeout, c.write_timeout, c.open_timeout) if p]
        period = max(TICK_MIN_S, min([TICK_MAX_S, *periods]))
        while True:
            time.sleep(period)
            now = time.monotonic()
            for conn in self._connections():
                try:
                    conn.tick(now, c.ping_interval, c.ping_timeout, c.write_timeout)
                except Exception:  # keep every other connection's keepalive going
                    log.exception("ticker failed on %s", conn.label)
                    conn.abort("internal error")
