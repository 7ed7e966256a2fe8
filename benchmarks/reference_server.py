"""The yardstick: the idiomatic websockets asyncio broadcast server, same semantics as ours.

Path /ws, every message relayed unchanged to every client including the
sender, no compression, 1 MiB messages, no keepalive (ours runs with
--ping-interval 0 in the benchmark too). Only the backlog and the open-file
limit are raised, as ours does, so the capacity scenario compares servers and
not kernel queue defaults. Run: python -m benchmarks.reference_server --port N
"""

import asyncio
import http
import sys
from urllib.parse import urlsplit

import websockets
from websockets.asyncio.server import serve

from .peers import command_line

MAX_SIZE_BYTES = 1024 * 1024  # ours: --max-message-size default
LISTEN_BACKLOG = 4096  # ours: LISTEN_BACKLOG


async def main(host: str, port: int) -> None:
    clients = set()  # websockets' broadcast example keeps its own set: cheaper than server.connections

    def only_ws(connection, request):
        if urlsplit(request.path).path != "/ws":
            return connection.respond(http.HTTPStatus.NOT_FOUND, "use /ws\n")

    async def relay(websocket):
        clients.add(websocket)
        try:
            async for message in websocket:
                websockets.broadcast(clients, message)
        finally:
            clients.discard(websocket)

    async with serve(relay, host, port, process_request=only_ws, compression=None,
                     max_size=MAX_SIZE_BYTES, ping_interval=None, backlog=LISTEN_BACKLOG) as server:
        bound = server.sockets[0].getsockname()
        print(f"listening on ws://{bound[0]}:{bound[1]}/ws", file=sys.stderr, flush=True)
        await server.serve_forever()


if __name__ == "__main__":
    args = command_line(__doc__.splitlines()[0])
    try:
        asyncio.run(main(args.host, args.port))
    except KeyboardInterrupt:
        pass
