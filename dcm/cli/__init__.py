"""DCM's command-line modules, apart from the library code; ``dcm.cli.main`` is the ``dcm`` command.

The shared checks every entry point runs (:mod:`dcm.cli.common`) are importable from here, as they were
when this package was one module. The command modules themselves load only when a command runs.
"""

from dcm.cli.common import check_device, parse_seed

__all__ = ["check_device", "parse_seed"]
