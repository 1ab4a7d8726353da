"""``python -m promptcontrol.app``: the same as ``promptcontrol app``."""

import sys

from . import main

sys.exit(main())
