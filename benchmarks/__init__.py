"""Benchmark harness: our thread-based server against the peers users pick: websockets, picows, socketify, gorilla.

Run ``python -m benchmarks run`` (``--quick`` for a smoke test). The load
generator lives in separate processes with a deliberately minimal receive
path, so that what is measured is the server, not the client.
"""
