"""Run the broadcast server from a checkout: python scripts/server.py --port 8080."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from broadcast.server import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
