"""Where our server's time goes under a scenario's load: py-spy samples of its measured window.

py-spy is not a project dependency (``pip install py-spy``). It samples from
outside the process in --nonblocking mode, so the server is not paused while
sampled. With ``gil`` only the thread holding the GIL is sampled: for a
thread-based Python server whose ceiling is the GIL, that is the question.
"""

from __future__ import annotations

import collections
import math
import re
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

# Samples per second: a few thousand samples over a window, little load on the machine.
RATE_HZ = 250
TOP_FUNCTIONS = 20
_LINE = re.compile(r":\d+\)$")


class Profiler:
    """``on_window`` hook for scenarios: records one raw py-spy profile of our server."""

    def __init__(self, out: Path, gil: bool) -> None:
        if shutil.which("py-spy") is None:
            raise SystemExit("py-spy is not installed: pip install py-spy")
        self.out = out
        self.gil = gil
        self.proc: subprocess.Popen | None = None

    def __call__(self, server, seconds: float | None) -> None:
        """Sample ``server`` (ours only) for ``seconds``, or until ``stop`` if None; once per profile."""
        if server.kind != "ours" or self.proc is not None:
            return
        cmd = ["py-spy", "record", "--pid", str(server.pid), "--rate", str(RATE_HZ), "--format", "raw",
               "--output", str(self.out), "--nonblocking"]
        if seconds is not None:
            cmd += ["--duration", str(math.floor(seconds))]
        if self.gil:
            cmd.append("--gil")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def connects(self, server) -> Callable[[], None]:
        """``on_connects``: sample ``server`` from now until the returned call (py-spy writes its profile on SIGINT)."""
        self(server, None)
        return self.stop

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)

    def wait(self) -> None:
        if self.proc is not None:
            self.proc.wait()


def summarize(raw: Path, top: int = TOP_FUNCTIONS) -> str:
    """Top functions by own samples, by samples with them on the stack, and top lines, from py-spy's raw output."""
    own: collections.Counter = collections.Counter()
    own_lines: collections.Counter = collections.Counter()
    inclusive: collections.Counter = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        own_lines[stack.rpartition(";")[2]] += n
        frames = [_LINE.sub(")", f) for f in stack.split(";")]  # functions, not lines
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    if not total:
        return "no samples (did the server run?)"
    lines = [f"{total} samples"]
    for title, counter in (("own time", own), ("on the stack", inclusive), ("own time, per line", own_lines)):
        lines += ["", f"top {top} by {title}:"]
        lines += [f"  {n / total:6.1%}  {frame}" for frame, n in counter.most_common(top)]
    return "\n".join(lines)
