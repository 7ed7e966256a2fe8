"""The layers' import rules, read from the source: the engine knows no chat, the chat no socket.

An import that crosses a boundary compiles and runs; nothing but this test
would notice that the engine had started to call up into the chat again.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "broadcast"
# Modules that reach the operating system's network, which only the engine may use.
SOCKET_MODULES = ("socket", "selectors", "ssl")
# What chat/ may see of the engine: its boundary, nothing of its internals.
ENGINE_BOUNDARY = "broadcast.net.app"


def imported(path: Path, package_dir: Path = PACKAGE) -> set[str]:
    """Every module ``path`` imports, absolute, including ``package.name`` for ``from package import name``."""
    package = path.relative_to(package_dir.parent).parts[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = list(package[:len(package) - node.level + 1]) if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def _within(name: str, top: str) -> bool:
    return name == top or name.startswith(top + ".")


def violations(layer: str, names: set[str]) -> list[str]:
    """The imports in ``names`` that a module of ``layer`` (net, chat or bus) may not make."""
    bad = []
    for name in sorted(names):
        if layer == "net" and (_within(name, "broadcast.chat") or _within(name, "broadcast.bus")):
            bad.append(name)
        elif layer == "chat":
            if any(_within(name, m) for m in SOCKET_MODULES):
                bad.append(name)
            elif _within(name, "broadcast.net") and not _within(name, ENGINE_BOUNDARY) \
                    and name != "broadcast.net":
                bad.append(name)
        elif layer == "bus" and (_within(name, "broadcast.net") or _within(name, "broadcast.chat")):
            bad.append(name)
    return bad


def modules(layer: str) -> list[Path]:
    return sorted((PACKAGE / layer).glob("*.py"))


@pytest.mark.parametrize("layer", ["net", "chat", "bus"])
def test_each_layer_imports_only_what_its_rules_allow(layer):
    found = modules(layer)
    assert found, f"no modules in broadcast/{layer}/"
    bad = {path.name: v for path in found if (v := violations(layer, imported(path)))}
    assert bad == {}


def test_the_rules_catch_a_violation(tmp_path):
    """The check is not vacuous: a module of each layer that crosses its boundary is reported."""
    sources = {
        "net": "from ..chat.rooms import Room\nfrom . import outbox\n",
        "chat": "import socket\nfrom ..net.outbox import Outbox\nfrom ..net.app import Refused\n",
        "bus": "from ..net import connection\n",
    }
    expected = {
        "net": ["broadcast.chat.rooms", "broadcast.chat.rooms.Room"],
        "chat": ["broadcast.net.outbox", "broadcast.net.outbox.Outbox", "socket"],
        "bus": ["broadcast.net", "broadcast.net.connection"],
    }
    for layer, source in sources.items():
        path = tmp_path / "broadcast" / layer / "bad.py"
        path.parent.mkdir(parents=True)
        path.write_text(source)
        assert violations(layer, imported(path, tmp_path / "broadcast")) == expected[layer]
