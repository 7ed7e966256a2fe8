"""socketify (uWebSockets for Python) broadcast peer, after socketify's examples/broadcast.py.

Its native publish/subscribe: every client subscribes to one topic and each
message is published to it, so the fan-out runs in uWebSockets' C++. The
example calls ``ws.publish``, which in uWebSockets skips the sender; our
semantics include the sender, so this uses ``app.publish``, the same topic
tree without the exclusion. Run: python -m benchmarks.peers.socketify_server --port N
"""

from socketify import App, CompressOptions

from . import command_line

TOPIC = "broadcast"
MAX_SIZE_BYTES = 1024 * 1024  # ours: --max-message-size default
# uWebSockets skips a subscriber's messages while it is this far behind
# (default 64 KiB): silent loss. Ours holds 4 MiB per client
# (--send-queue-bytes) and then drops the client, so: the same, and close.
MAX_BACKPRESSURE_BYTES = 4 * 1024 * 1024
NO_IDLE_TIMEOUT = 0  # uWebSockets: 0 disables it; every server runs without keepalive here


def main(host: str, port: int) -> None:
    app = App()

    def on_open(ws) -> None:
        ws.subscribe(TOPIC)

    def on_message(ws, message, opcode) -> None:
        app.publish(TOPIC, message, opcode)

    app.ws("/ws", {
        "compression": CompressOptions.DISABLED,
        "max_payload_length": MAX_SIZE_BYTES,
        "idle_timeout": NO_IDLE_TIMEOUT,
        "max_backpressure": MAX_BACKPRESSURE_BYTES,
        "close_on_backpressure_limit": True,
        "open": on_open,
        "message": on_message,
    })  # uWebSockets unsubscribes a client when it closes
    app.listen({"host": host, "port": port})
    app.run()


if __name__ == "__main__":
    args = command_line(__doc__.splitlines()[0])
    main(args.host, args.port)
