"""The run-setting checks every command runs first; they live in :mod:`dcm.checks` (the evaluator and the
server use them too)."""

from dcm.checks import check_device, parse_seed

__all__ = ["check_device", "parse_seed"]
