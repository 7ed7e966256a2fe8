"""websockets' ServerProtocol, with the UTF-8 check RFC 6455 leaves to the application.

Text is checked frame by frame inside the library's parser, not after it has
handed over its events: the parser answers pings and close frames as it
goes, so a later check would let a pong or a clean close follow an invalid
frame. Raising from ``recv_frame`` makes the library fail the connection at
that very frame with 1007, and discard the rest.

Replies keep their place among messages. The library answers a ping inside
``receive_data``, before we see the frames of that read, and a message is
relayed only once its last frame is handled, so a pong taken from
``data_to_send`` afterwards would follow the echo of a message that came
after the ping. ``recv_frame`` therefore moves the replies owed so far into
the event list, as a list of bytes, ahead of the next frame: the reader
sends each such list when it reaches it. What the last frames of a read
are owed (a close reply above all) stays in ``data_to_send``, for after.

The size limit is the library's own: it refuses a frame from its header,
before buffering it. It counts a control frame against what is left of the
current message, so a ping inside a message within 125 bytes of the limit
closes with 1009; refusing oversized frames up front is worth that.
"""

from __future__ import annotations

import codecs
from collections.abc import Generator

from websockets.frames import Frame, Opcode
from websockets.protocol import OPEN, Protocol
from websockets.server import ServerProtocol

_utf8_decoder = codecs.getincrementaldecoder("utf-8")
_TEXT, _BINARY, _CONT = Opcode.TEXT, Opcode.BINARY, Opcode.CONT


class _FramesAfterResponse(Protocol):
    """Parse frames only once the handshake response is sent.

    ``ServerProtocol.parse`` goes straight from the request to frames, while
    still CONNECTING: a pipelined second request then fails as a bad frame
    and half-closes before the first is answered, and an early ping's pong
    is queued ahead of the 101. Sits between ServerProtocol and Protocol in
    the MRO, where ServerProtocol's ``super().parse()`` lands, and waits.
    The 101 replaces the whole chain with a fresh frame parser
    (``BroadcastProtocol.send_response``), which the caller starts with
    ``receive_data(b"")``: ServerProtocol's suspended frame would hold the
    Request and its headers, ~2 KiB, for the connection's life. A refusal
    replaces it with ``discard`` and never resumes it.
    """

    def parse(self) -> Generator[None]:
        while True:
            yield


def _first_offered(protocol: ServerProtocol, offered) -> str | None:
    """Ours that the client offers, else none: the library's default refuses a client that offers none."""
    for subprotocol in protocol.available_subprotocols or ():
        if subprotocol in offered:
            return subprotocol
    return None


class BroadcastProtocol(ServerProtocol, _FramesAfterResponse):
    def __init__(self, **kwargs) -> None:
        super().__init__(select_subprotocol=_first_offered, **kwargs)
        self._decoder = None  # while a text message is in progress

    def send_response(self, response) -> None:
        super().send_response(response)
        if self.state is OPEN:
            self.parser = Protocol.parse(self)  # see _FramesAfterResponse

    def recv_frame(self, frame: Frame) -> None:
        if self.writes:
            self.events.append(self.data_to_send())  # owed before whatever this frame completes
        opcode = frame.opcode
        if opcode is _TEXT or opcode is _BINARY:
            if self.current_size is not None:
                return super().recv_frame(frame)  # 1002: the last message is unfinished
            self._decoder = _utf8_decoder() if opcode is _TEXT else None
        if opcode is _TEXT or opcode is _CONT:
            if self._decoder is not None:
                self._decoder.decode(frame.data, frame.fin)  # UnicodeDecodeError: 1007
            if frame.fin:
                self._decoder = None
        super().recv_frame(frame)
