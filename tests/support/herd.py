"""Hold N raw WebSocket clients of a server until killed: ``python -m support.herd PORT N``.

Killed, the process leaves its sockets to the kernel, which closes them all
at once, without a close frame: a load balancer restarting, a flood's last
step. Closed one by one from the test's own process instead, they left as
fast as that process got the CPU, which the server's woken readers share.
"""

from __future__ import annotations

import resource
import sys

from support.rawws import handshake_request, open_socket, read_http_response

# Dialled before their responses are read, so that the listen backlog (4,096) always holds them.
BATCH = 500
# Each connect and each 101 is waited for this long at most.
TIMEOUT_S = 5.0
# Descriptors beyond the clients': stdio and the interpreter's own.
SPARE_FILES = 100


def main(port: int, count: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, count + SPARE_FILES)), hard))
    held = []
    while len(held) < count:
        batch = [open_socket(port, TIMEOUT_S) for _ in range(min(BATCH, count - len(held)))]
        held += batch
        for sock in batch:
            sock.sendall(handshake_request(port))
        for sock in batch:
            response = read_http_response(sock, TIMEOUT_S)
            if response is None or response.status != 101:
                sys.exit(f"client {len(held)} not upgraded: {response}")
    print("ready", flush=True)
    sys.stdin.read()  # until killed


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
