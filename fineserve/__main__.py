"""``python -m fineserve``: the same as the ``fineserve`` command."""

import sys

from fineserve.cli import main

sys.exit(main())
