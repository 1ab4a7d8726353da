"""``python -m promptcontrol.cli``: the same as ``python -m promptcontrol``."""

import sys

from .entry import main

sys.exit(main())
