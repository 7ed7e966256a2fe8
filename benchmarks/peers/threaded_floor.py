"""The design card's floor: a thread per connection and websockets' Sans-I/O, with nothing else.

Not a peer, and not a server anyone should run: it is what the card
(a thread per connection, a lock-guarded client list, a blocking reader)
costs before any of our features, measured with the same load as everyone.
Where it misses a target, that target is beyond the design on this machine,
whatever our own code does. It keeps the peers' semantics (path /ws is not
checked; every message to every client, its sender included, in one order;
no compression, 1 MiB messages, no keepalive) and drops everything else:

- the acceptor reads the request and sends the 101 itself, blocking, as
  ours does when the request is in already; a client that sends nothing
  holds it up, and there are no limits, no rooms, no admission;
- a message is sent inline by its reader, to every client in turn, under
  the lock that guards the list, so there is one order, and no writer to
  hand it to; a client that does not read blocks everyone (no bound);
- the collector and the switch interval are ours (broadcast/server.py).

Run: python -m benchmarks.peers.threaded_floor --port N
"""

import gc
import socket
import sys
import threading
from _thread import start_new_thread

from websockets.frames import Frame, Opcode
from websockets.server import ServerProtocol

from broadcast.net.listener import LISTEN_BACKLOG
from broadcast.server import GC_YOUNG_THRESHOLD, SWITCH_INTERVAL_S, THREAD_STACK_BYTES

from . import command_line

MAX_SIZE_BYTES = 1024 * 1024  # ours: --max-message-size default
REQUEST_BYTES = 4096  # ours: transport.RECV_FIRST_BYTES
READ_BYTES = 2048  # ours: transport.RECV_IDLE_BYTES

_DATA = (Opcode.TEXT, Opcode.BINARY)
clients: set[socket.socket] = set()
lock = threading.Lock()  # guards clients, and orders every fan-out


def relay(sock: socket.socket, protocol: ServerProtocol) -> None:
    """One client's reader: every message it sends goes to every client, in the order the lock takes them."""
    try:
        while data := sock.recv(READ_BYTES):
            protocol.receive_data(data)
            for frame in protocol.events_received():
                if frame.opcode in _DATA:  # the benchmark never fragments
                    encoded = Frame(frame.opcode, frame.data).serialize(mask=False)
                    with lock:
                        for client in clients:
                            try:
                                client.sendall(encoded)
                            except OSError:
                                pass  # its own reader finds out and leaves
            for out in protocol.data_to_send():  # pongs, the close reply
                if out:
                    sock.sendall(out)
    except OSError:
        pass
    finally:
        with lock:
            clients.discard(sock)
        sock.close()


def serve(host: str, port: int) -> None:
    listener = socket.create_server((host, port), backlog=LISTEN_BACKLOG)
    while True:
        sock, _ = listener.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        protocol = ServerProtocol(max_size=MAX_SIZE_BYTES)
        protocol.receive_data(sock.recv(REQUEST_BYTES))
        requests = protocol.events_received()
        if not requests:  # the harness's probe, or a request in pieces: the floor does not wait for one
            sock.close()
            continue
        response = protocol.accept(requests[0])
        protocol.send_response(response)
        try:
            for out in protocol.data_to_send():
                sock.sendall(out)
        except OSError:
            pass
        if response.status_code != 101:
            sock.close()
            continue
        with lock:
            clients.add(sock)
        start_new_thread(relay, (sock, protocol))


if __name__ == "__main__":
    args = command_line(__doc__.splitlines()[0])
    threading.stack_size(THREAD_STACK_BYTES)
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    serve(args.host, args.port)
