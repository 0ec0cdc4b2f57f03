"""Moved to :mod:`dcm.cli.segment`: ``python -m dcm.segment`` and imports from ``dcm.segment`` keep working."""

from dcm.cli import segment as _moved
from dcm.cli.segment import *  # noqa: F401,F403


def __getattr__(name: str) -> object:
    return getattr(_moved, name)  # every other name of the moved module, e.g. helpers outside __all__


if __name__ == "__main__":
    raise SystemExit(_moved.main())
