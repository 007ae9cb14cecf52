"""``python3 -m targetmirror.cli``: the ``targetmirror`` command (the lab runs it this way)."""

import sys

from targetmirror.cli import main

sys.exit(main())
