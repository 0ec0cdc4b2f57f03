"""Atomic file writes: a file DCM writes is either absent, the previous complete version, or the new one.

Temporary files are named ``.<name>.<pid>.<random><suffix>`` next to the target, so a process can tell its
own (and those of processes that no longer run) from those of another process writing to the same folder.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, List, Union

from dcm.errors import OutputError

__all__ = ["atomic_path", "atomic_torch_save", "check_writable", "stale_temporaries"]

_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[^.]+(?P<suffix>\..+)$")
#: ``.<name>.<random>.tmp``: what versions before the process id in the name left behind.
_LEGACY_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]+\.tmp$")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: Union[str, os.PathLike], suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is synced and renamed over ``path``.

    On any exception the temporary file is removed and ``path`` is untouched. ``suffix`` lets writers that
    pick a format from the extension (SimpleITK) see the real one. The temporary name carries this
    process's id (see :func:`stale_temporaries`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_torch_save(obj: Any, path: Union[str, os.PathLike]) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash at any point leaves either the previous complete file or the new complete file.
    """
    import torch  # only writers of checkpoints pay for the import

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it runs under another user
        return True
    return True


def stale_temporaries(folder: Union[str, os.PathLike], pattern: str = "*") -> List[Path]:
    """Temporary files of :func:`atomic_path` in ``folder`` whose writer no longer runs.

    ``pattern`` filters the final names (``"*.npz"``: temporaries of ``.npz`` outputs). Files whose writer
    still runs (this process or another one writing to the same folder) are never listed; temporaries named
    without a process id (older versions) always are.
    """
    out = []
    for tmp in Path(folder).glob(".*"):
        m = _TEMP_NAME.match(tmp.name)
        if m is not None:
            stale = not _running(int(m.group("pid")))
        else:
            m, stale = _LEGACY_TEMP_NAME.match(tmp.name), True
        if m is not None and stale and Path(m.group("name")).match(pattern) and tmp.is_file():
            out.append(tmp)
    return sorted(out)


def check_writable(path: Union[str, os.PathLike], folder: bool = False) -> None:
    """Check, before any work, that ``path`` can be written (a file, or with ``folder`` a folder to write into).

    The first existing folder on the way must take a new file (tried with a temporary file, removed at
    once); folders that do not exist yet would be created by the writer. Nothing else is created.

    Raises:
        OutputError: one line naming ``path``: it is a folder (a file when ``folder``), a path under a
            file, or the place refuses new files (read-only, ``/proc``, permissions).
    """
    path = Path(path)
    where = f"{path}: cannot be written"
    if folder:
        if path.exists() and not path.is_dir():
            raise OutputError(f"{where}: it exists and is not a folder")
        probe_dir = path
    else:
        if path.is_dir():
            raise OutputError(f"{where}: it is a folder")
        if path.exists() and not path.is_file():
            raise OutputError(f"{where}: it is not a regular file")
        probe_dir = path.parent
    existing = probe_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{where}: {existing} is a file, not a folder")
    try:
        fd, name = tempfile.mkstemp(prefix=".dcm-write-check.", dir=existing)
    except OSError as e:
        reason = os.strerror(e.errno) if e.errno else str(e)
        if e.errno == errno.ENOENT:
            reason = "the folder does not take new files"
        raise OutputError(f"{where}: {existing}: {reason}") from None
    os.close(fd)
    os.unlink(name)
