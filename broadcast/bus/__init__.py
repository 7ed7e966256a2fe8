"""Where a message goes once a client has sent it: this node alone, or every node round Redis.

The bus delivers into rooms (chat.rooms); it may import the application
boundary types it delivers to, never the engine (net/) beyond them.
"""
