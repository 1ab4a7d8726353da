"""``python -m promptcontrol``: the command line."""

import sys


def _run() -> int:
    try:
        from .cli import main
    except KeyboardInterrupt:  # Ctrl-C while Python is still importing: no traceback
        print("promptcontrol: interrupted; nothing was written", file=sys.stderr)
        return 130
    return main()


sys.exit(_run())
