"""Run the chat client from a checkout: python scripts/client.py --addr HOST:PORT.

The repository root goes first on sys.path so this works without installing
the package, and runs this checkout's code even when another copy is installed.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from broadcast.client import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
