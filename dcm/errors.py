"""Error types that carry the file and the field at fault, so users get one clear line."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

__all__ = ["DCMError", "CaseError", "CheckpointError", "ConfigError"]


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
    """A checkpoint cannot be read or does not fit the model."""


class ConfigError(DCMError, ValueError):
    """A configuration file or override is invalid."""
