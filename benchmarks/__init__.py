"""Benchmark harness: our thread-based server against a websockets asyncio reference.

Run ``python -m benchmarks run`` (``--quick`` for a smoke test). The load
generator lives in separate processes with a deliberately minimal receive
path, so that what is measured is the server, not the client.
"""
