"""broadcast: a threaded WebSocket broadcast server and its command-line chat client."""
