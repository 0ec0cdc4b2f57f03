"""Error types that carry the file and the field at fault, so users get one clear line."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

__all__ = ["DCMError", "CaseError", "CheckpointError", "ConfigError", "OutputError"]


class DCMError(Exception):
    """Base class of every error DCM raises on purpose."""


class CaseError(DCMError, ValueError):
    """A challenge case (or an image / label file) is unreadable or inconsistent.

    ``str(err)`` is a single line: ``<file>: <field>: <problem>``.
    """

    def __init__(self, path: Optional[Union[str, Path]], field: Optional[str], problem: str):
        self.path = None if path is None else str(path)
        self.field = field
        self.problem = problem
        parts = [p for p in (self.path, field) if p]
        super().__init__(": ".join(parts + [problem]))


class CheckpointError(DCMError, ValueError):
    """A checkpoint cannot be read or does not fit the model.

    ``path``: the file, when the raiser knew it; a message raised about an already loaded object has none,
    and :meth:`naming` adds the file the caller loaded it from.
    """

    def __init__(self, message: str, path: Optional[Union[str, Path]] = None):
        self.path = None if path is None else str(path)
        super().__init__(message if path is None or message.startswith(f"{path}:") else f"{path}: {message}")

    def naming(self, path: Optional[Union[str, Path]]) -> str:
        """The one-line message, starting with ``path`` when it does not name a file yet."""
        msg = " ".join(str(self).split())
        if path is None or self.path is not None or str(path) in msg:
            return msg
        return f"{path}: {msg}"


class ConfigError(DCMError, ValueError):
    """A configuration file or override is invalid."""


class OutputError(DCMError, ValueError):
    """An output path cannot be written (a folder, a path under a file, a read-only place, ...)."""
