"""``python -m server.bench``."""

import sys

from .cli import main

sys.exit(main())
