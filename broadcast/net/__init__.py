"""The network engine: sockets, TLS, the WebSocket protocol, outboxes and writers, keepalive.

It knows nothing of chat: it calls the application through ``net.app`` (admit,
opened, message, closing, closed) and hands it a ``Member`` port to send
frames to. Its modules import only the standard library, websockets and one
another, never chat/ or bus/ (tests/unit/test_layers.py holds it to that).
"""
