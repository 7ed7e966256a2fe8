"""The README's quick start, run as written, in a fresh copy of the tree.

pip is told to refuse every install outside a virtual environment
(``PIP_REQUIRE_VIRTUALENV``), as the system Python of Debian and Ubuntu does
("externally-managed-environment"): the command has to make its own.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess

import pytest

from support.process import ROOT, clean_env
from support.wsclients import recv, send, url_for, ws_connect

README = ROOT / "README.md"
INSTALL_TIMEOUT_S = 240  # a venv and a pip install from the package index, on a loaded machine
# What a working tree may hold that a fresh clone does not.
NOT_IN_A_CLONE = shutil.ignore_patterns(
    ".git", ".venv", "__pycache__", "*.egg-info", ".pytest_cache", ".hypothesis", "build", "dist", "results",
)


def quick_start() -> str:
    """The README's first command: its first indented block, which must be one line."""
    block: list[str] = []
    for line in README.read_text().splitlines():
        if line.startswith("    "):
            block.append(line.strip())
        elif block and line.strip():
            break
    assert len(block) == 1, f"the quick start is not one line: {block}"
    return block[0]


@pytest.mark.timeout(INSTALL_TIMEOUT_S + 60)
def test_quick_start_works_where_system_pip_refuses(tmp_path, start_server):
    *setup, launch = quick_start().split(" && ")
    words = shlex.split(launch)
    flags_at = words.index("--port")
    assert "scripts/server.py" in words[:flags_at] and words[flags_at + 1] == "8080", launch

    copy = tmp_path / "broadcast"
    shutil.copytree(ROOT, copy, ignore=NOT_IN_A_CLONE)
    env = clean_env(PIP_REQUIRE_VIRTUALENV="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PYTHONPATH", None)  # everything must come from the command's own environment
    done = subprocess.run(
        ["bash", "-c", " && ".join(setup)], cwd=copy, env=env,
        capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    # The README's program, in the copy; the port becomes 0 on 127.0.0.1 (start_server's).
    program = [str(copy / word) if (copy / word).exists() else word for word in words[:flags_at]]
    assert program[0].startswith(str(copy)), f"{words[0]} is not the copy's own interpreter"
    server = start_server(*words[flags_at + 2:], env=env, program=program)
    with ws_connect(url_for(server, "Alice")) as ws:
        send(ws, "hi")
        assert recv(ws) == "[Alice] hi"
    assert server.stop() == 0
