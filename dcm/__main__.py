"""``python -m dcm``: the ``dcm`` command (:mod:`dcm.cli.main`)."""

import sys

from dcm.cli.main import main

sys.exit(main())
