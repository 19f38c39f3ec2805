"""``python -m deltatune ...``: the ``deltatune`` command."""

import sys

from .cli import main

sys.exit(main())
