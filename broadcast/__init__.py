"""broadcast: a threaded WebSocket broadcast server and its command-line chat client."""

__version__ = "0.1.0"
