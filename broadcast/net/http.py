"""Plain HTTP on the WebSocket port, apart from the upgrade: a route table and one way to answer.

A path in the table is answered by its handler and never reaches the
application's admission; everything else is a WebSocket request. Refusals
(4xx, 5xx with a reason) are built here too, so every non-101 response the
server sends has the same headers, in the same order, as websockets'
``reject`` gives.
"""

from __future__ import annotations

import email.utils
import http
from collections.abc import Callable
from dataclasses import dataclass

from websockets.datastructures import Headers
from websockets.http11 import Response

from .app import Refused

TEXT_PLAIN = "text/plain; charset=utf-8"


@dataclass(frozen=True)
class Reply:
    status: int
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


# path -> handler(request) -> Reply; the handlers run under the connection's lock, so they must not block.
# A path ending in "/" also answers every path one segment below it ("/rooms/" answers "/rooms/lobby"),
# except "/" itself, which answers only "/": "/ws" must stay the application's. A handler may raise Refused.
Routes = dict[str, Callable[[object], Reply]]


def route(routes: Routes, path: str) -> Callable[[object], Reply] | None:
    """The handler for ``path``: its own entry, else its parent's ``/`` entry; None for a WebSocket path."""
    handler = routes.get(path)
    if handler is None:
        parent = path[:path.rfind("/") + 1]
        if parent != "/":
            handler = routes.get(parent)
    return handler


def respond(reply: Reply) -> Response:
    """The one place a plain HTTP response is built; the connection closes after it."""
    status = http.HTTPStatus(reply.status)
    headers = Headers([
        ("Date", email.utils.formatdate(usegmt=True)),
        ("Connection", "close"),
        ("Content-Length", str(len(reply.body))),
        ("Content-Type", reply.content_type),
        *reply.headers,
    ])
    return Response(status.value, status.phrase, headers, reply.body)


def refusal(refused: Refused) -> Response:
    return respond(Reply(refused.status, TEXT_PLAIN, (refused.reason + "\n").encode(), refused.headers))
