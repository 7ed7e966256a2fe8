"""The chat application layer: rooms, names, history, recovery and presence.

Nothing in chat/ touches a socket, a thread of its own or the network engine:
it is handed names, texts and clocks, and hands back decisions and
pre-encoded frames, so every rule can be unit-tested as a rule and the engine
(net/) can change underneath it. Its modules may import only the standard
library, ``websockets.frames`` (for building frames), one another and the
engine's boundary (``net.app``: the Member port, Admit, Refused), never the
rest of net/ or bus/ (tests/unit/test_layers.py holds them to that).
"""
