"""``python -m deltatune ...`` is the ``deltatune`` command (also under torchrun / accelerate launch)."""

import sys

from .cli import main

sys.exit(main())
