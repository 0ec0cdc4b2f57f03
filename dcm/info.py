"""``python -m dcm.info``: the ``dcm info`` command (:mod:`dcm.cli.info`), as ``python -m dcm.demo`` is ``dcm demo``."""

from dcm.cli import info as _moved
from dcm.cli.info import *  # noqa: F401,F403


def __getattr__(name: str) -> object:
    return getattr(_moved, name)  # every other name of the module, e.g. helpers outside __all__


if __name__ == "__main__":
    raise SystemExit(_moved.main())
