"""The chat page at ``/``: static files shipped as package data, served from memory.

The files are read once, at import, through importlib.resources, so that a
non-editable install (or a zip) serves them too, a request costs no file I/O
(route handlers run under a connection's lock), and a running server never
serves half of an upgrade. The headers make the page a closed box: a
Content-Security-Policy with no inline script and connections to this host
only, no MIME sniffing, no framing, no referrer.
"""

from __future__ import annotations

import re
from importlib import resources

from ..net.http import Reply, Routes

# URL path -> (file of this package, Content-Type).
ASSETS = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
    "/static/icon.svg": ("icon.svg", "image/svg+xml"),
}
# Revalidate on every load: the files are a few KiB, and a script cached
# from before an upgrade must never drive the page of after it.
CACHE_CONTROL = "no-cache"
# A Host value that may be written into the policy as it stands: a name or
# IPv4 address, or a bracketed IPv6 one, and a port. Anything else (it comes
# from the request) gets 'self' alone, which browsers that follow CSP 3 also
# match against ws:// and wss:// on this host.
_PLAIN_HOST = re.compile(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")

_FILES = {path: (resources.files(__name__).joinpath(name).read_bytes(), content_type)
          for path, (name, content_type) in ASSETS.items()}


def content_security_policy(host: str) -> str:
    """Everything from this origin only; the WebSocket to this host, named as the browser asked for it."""
    connect = "'self'"
    if _PLAIN_HOST.fullmatch(host):
        connect += f" ws://{host} wss://{host}"
    return ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
            f"connect-src {connect}; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _serve(path: str):
    body, content_type = _FILES[path]

    def serve(request) -> Reply:
        headers = (
            ("Cache-Control", CACHE_CONTROL),
            ("Content-Security-Policy", content_security_policy(request.headers.get("Host", ""))),
            ("X-Content-Type-Options", "nosniff"),
            ("X-Frame-Options", "DENY"),
            ("Referrer-Policy", "no-referrer"),
        )
        return Reply(200, content_type, body, headers)

    return serve


def routes() -> Routes:
    """The page's paths, for the server's route table."""
    return {path: _serve(path) for path in ASSETS}
