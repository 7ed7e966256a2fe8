"""The peers our server is measured against, each written the way its own docs recommend for broadcast.

Same semantics for all: path /ws, every message to every client including
its sender, in order, no compression, 1 MiB messages, no keepalive.
``benchmarks/reference_server.py`` (websockets asyncio) is the oldest of them.
"""

import argparse
import resource


def command_line(description: str) -> argparse.Namespace:
    """``--host`` and ``--port`` as the harness passes them, with the open-file limit raised as ours raises it.

    Only the limit is raised, so that the capacity scenario compares servers
    and not the shell's default of 1,024 descriptors.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return args
