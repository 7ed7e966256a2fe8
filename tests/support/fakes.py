"""Stand-ins for what the unit tests must control: the clock."""

from __future__ import annotations


class FakeTime:
    """Stands in for a module's ``time`` (``monkeypatch.setattr(module, "time", clock)``).

    ``monotonic()`` is ``now``, which only the test moves: "a socket stalled
    for 2 s" or "a bucket refilled for 0.5 s" without waiting for either.
    """

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def monotonic(self) -> float:
        return self.now
