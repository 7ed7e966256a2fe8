"""picows (Cython, asyncio) broadcast peer, after picows' examples/broadcast_server.py.

The example's way to send to many: keep the connected transports in a set and
call ``transport.send`` on each; picows copies the frame into each transport's
buffer, so one received payload can go to all. The example holds weak
references so that clients hold none to each other once its server is
gone; this process exits with its server, so it keeps the transports. Run:
python -m benchmarks.peers.picows_server --port N
"""

import asyncio
from urllib.parse import urlsplit

from picows import WSFrame, WSListener, WSMsgType, WSTransport, WSUpgradeRequest, ws_create_server

from . import command_line

MAX_SIZE_BYTES = 1024 * 1024  # ours: --max-message-size default
LISTEN_BACKLOG = 4096  # ours: LISTEN_BACKLOG
WS_PATH = b"/ws"  # picows hands the request path over as bytes


class Relay(WSListener):
    """One client: its data frames go to every transport in ``clients``, its own included."""

    def __init__(self, clients: set) -> None:
        self.clients = clients

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.clients.add(transport)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.clients.discard(transport)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()
        elif frame.msg_type in (WSMsgType.TEXT, WSMsgType.BINARY):  # the benchmark never fragments
            payload = frame.get_payload_as_memoryview()  # valid for this callback: send copies it
            for client in self.clients:
                client.send(frame.msg_type, payload)


async def main(host: str, port: int) -> None:
    clients: set = set()

    def route(request: WSUpgradeRequest):
        return Relay(clients) if urlsplit(request.path).path == WS_PATH else None  # None: picows answers 404

    server = await ws_create_server(route, host, port, max_frame_size=MAX_SIZE_BYTES, backlog=LISTEN_BACKLOG)
    await server.serve_forever()


if __name__ == "__main__":
    args = command_line(__doc__.splitlines()[0])
    asyncio.run(main(args.host, args.port))  # the harness stops it with SIGTERM
