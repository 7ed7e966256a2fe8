"""The shipped systemd unit, contrib/broadcast-server.service, checked with systemd's own tools.

``systemd-analyze verify`` and ``security --offline`` read unit files from disk
and need no systemd running as PID 1, so they work in a container. ``verify``
insists that ExecStart's program exists: each test checks a copy whose
ExecStart runs this interpreter on this checkout's scripts/server.py instead of
the /opt/broadcast virtual environment the README installs.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
import warnings

import pytest

from broadcast.config import parse_server_args
from support.process import ROOT, clean_env

UNIT = ROOT / "contrib" / "broadcast-server.service"
INSTALLED_PROGRAM = "/opt/broadcast/bin/broadcast-server"  # the README's venv in /opt/broadcast
NOT_INSTALLED = "systemd-analyze not installed: service unit tests SKIPPED (apt-get install systemd)"
ANALYZE_TIMEOUT_S = 30  # it loads every unit on the system; generous under load
# security's exposure in tenths, as --threshold takes it: 2.0 and under is what it calls "OK".
MAX_EXPOSURE = 20


@pytest.fixture
def analyze() -> str:
    found = shutil.which("systemd-analyze")
    if not found:
        warnings.warn(NOT_INSTALLED)  # in the warnings summary too, not only the skip list
        pytest.skip(NOT_INSTALLED)
    return found


def runnable_copy(tmp_path, text: str | None = None):
    """The unit (or ``text``) with ExecStart's program replaced by one that exists here."""
    text = UNIT.read_text() if text is None else text
    local = f"ExecStart={sys.executable} {ROOT / 'scripts' / 'server.py'}"
    text, replaced = re.subn(rf"^ExecStart={re.escape(INSTALLED_PROGRAM)}", local, text, flags=re.M)
    assert replaced == 1, f"{UNIT.name} no longer runs {INSTALLED_PROGRAM}; keep the README's install steps true"
    copy = tmp_path / UNIT.name
    copy.write_text(text)
    return copy


def verify_problems(analyze: str, unit) -> list[str]:
    """Everything ``verify`` says about this unit.

    It exits 0 on an unknown key or an unparsable value (it only warns and ignores
    the line), so every line naming the unit counts, as well as a failing exit.
    """
    done = subprocess.run(
        [analyze, "verify", "--recursive-errors=no", str(unit)],
        cwd=unit.parent, env=clean_env(), capture_output=True, text=True, timeout=ANALYZE_TIMEOUT_S,
    )
    problems = [line for line in (done.stdout + done.stderr).splitlines() if unit.name in line]
    if done.returncode != 0:
        problems.append(f"exit {done.returncode}: {done.stderr.strip()}")
    return problems


def unit_settings() -> configparser.ConfigParser:
    # Repeated keys (SystemCallFilter=) are legal in units: the last one is kept here.
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser


def timespan_us(analyze: str, value: str) -> int:
    """A systemd time span in microseconds, as systemd itself parses it."""
    out = subprocess.run(
        [analyze, "timespan", value], capture_output=True, text=True, check=True, timeout=ANALYZE_TIMEOUT_S,
    ).stdout
    return int(re.search(r"μs: (\d+)", out).group(1))


def test_unit_verifies_clean(analyze, tmp_path):
    assert verify_problems(analyze, runnable_copy(tmp_path)) == []


@pytest.mark.parametrize("broken, expected", [
    (("ProtectSystem=strict", "ProtectSytem=strict"), "Unknown key"),
    (("TimeoutStopSec=15s", "TimeoutStopSec=fifteen"), "Failed to parse"),
    (("[Service]", "[Servic]"), "Unknown section"),
])
def test_verify_catches_a_broken_unit(analyze, tmp_path, broken, expected):
    """The check above can fail: a typo, a bad value, a lost section are all reported."""
    old, new = broken
    text = UNIT.read_text()
    assert old in text
    problems = verify_problems(analyze, runnable_copy(tmp_path, text.replace(old, new)))
    assert any(expected in line for line in problems), problems


def test_verify_catches_a_missing_program(analyze, tmp_path):
    copy = tmp_path / UNIT.name
    copy.write_text(UNIT.read_text())  # ExecStart still names /opt/broadcast, absent here
    assert any("is not executable" in line for line in verify_problems(analyze, copy))


def test_sandbox_exposure_stays_low(analyze, tmp_path):
    """security --offline scores the sandbox; the shipped unit is "OK", a bare one is not."""
    def exposed(unit) -> subprocess.CompletedProcess:
        return subprocess.run(
            [analyze, "security", "--offline=yes", f"--threshold={MAX_EXPOSURE}", "--no-pager", str(unit)],
            cwd=unit.parent, env=clean_env(), capture_output=True, text=True, timeout=ANALYZE_TIMEOUT_S,
        )

    shipped = exposed(runnable_copy(tmp_path))
    assert shipped.returncode == 0, shipped.stdout[-2000:] + shipped.stderr
    assert "Overall exposure level" in shipped.stdout

    bare_dir = tmp_path / "bare"
    bare_dir.mkdir()
    bare_text = "[Service]\n" + next(l for l in UNIT.read_text().splitlines() if l.startswith("ExecStart=")) + "\n"
    assert exposed(runnable_copy(bare_dir, bare_text)).returncode != 0


def test_unit_fits_the_server(analyze, monkeypatch):
    """Stop timeout, file and thread limits, and signals agree with the server's defaults."""
    for name in [k for k in os.environ if k.startswith("BROADCAST_")]:
        monkeypatch.delenv(name)
    defaults = parse_server_args([])
    service = unit_settings()["Service"]

    assert service["ExecStart"].split()[0] == INSTALLED_PROGRAM
    assert service["KillSignal"] == "SIGTERM"  # the server's graceful stop (SIGINT would do too)
    # systemd sends SIGKILL after TimeoutStopSec: the server must finish its own shutdown first.
    assert timespan_us(analyze, service["TimeoutStopSec"]) > defaults.shutdown_timeout * 1_000_000
    assert service["Restart"] == "on-failure"
    # One descriptor and one thread per client.
    assert int(service["LimitNOFILE"]) > defaults.max_connections
    assert int(service["TasksMax"]) > defaults.max_connections
