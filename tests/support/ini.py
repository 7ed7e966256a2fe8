"""Configuration files for the parser and the programs, written the way the README shows them."""

from __future__ import annotations


def write_ini(path, server: dict | None = None, client: dict | None = None):
    """A broadcast.ini with a [server] and/or [client] section of ``key = value`` lines; its path."""
    lines = []
    for section, values in (("server", server), ("client", client)):
        if values is not None:
            lines.append(f"[{section}]")
            lines += [f"{key} = {value}" for key, value in values.items()]
            lines.append("")
    path.write_text("\n".join(lines))
    return path
