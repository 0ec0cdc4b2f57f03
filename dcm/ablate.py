"""Moved to :mod:`dcm.cli.ablate`: ``python -m dcm.ablate`` and imports from ``dcm.ablate`` keep working."""

from dcm.cli import ablate as _moved
from dcm.cli.ablate import *  # noqa: F401,F403


def __getattr__(name: str) -> object:
    return getattr(_moved, name)  # every other name of the moved module, e.g. helpers outside __all__


if __name__ == "__main__":
    raise SystemExit(_moved.main())
