"""Moved to :mod:`dcm.cli.demo`: ``python -m dcm.demo`` and imports from ``dcm.demo`` keep working."""

from dcm.cli import demo as _moved
from dcm.cli.demo import *  # noqa: F401,F403


def __getattr__(name: str) -> object:
    return getattr(_moved, name)  # every other name of the moved module, e.g. helpers outside __all__


if __name__ == "__main__":
    raise SystemExit(_moved.main())
