"""``python -m dcm.evaluate``: see :mod:`dcm.evaluate.cli`."""

import sys

from dcm.evaluate.cli import main

if __name__ == "__main__":
    sys.exit(main())
