"""Checks of run settings (device, seed) every entry point runs before the work, so bad settings get one
line and exit 2: the commands, the evaluator and its workers, the server."""

from __future__ import annotations

from typing import Any, Optional

from dcm.errors import ConfigError

__all__ = ["check_device", "parse_seed"]


def parse_seed(value: Any, name: str = "--seed / DCM_SEED") -> int:
    """``value`` as an integer seed.

    Raises:
        ConfigError: not an integer (one line naming ``name``).
    """
    try:
        return int(str(value).strip())
    except ValueError:
        raise ConfigError(f"{name}: {value!r} is not an integer") from None


def check_device(device: Optional[str], name: str = "--device") -> None:
    """Refuse a device this torch cannot use: not a device name, not CPU / CUDA, or CUDA without a GPU.

    ``None``, ``""`` and ``auto`` pass (CUDA when available, else the CPU).

    Raises:
        ConfigError: one line naming ``name`` and the device.
    """
    import torch

    if device in (None, "", "auto"):
        return
    try:
        dev = torch.device(str(device))
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"{name} {device!r}: not a device (use auto, cpu or cuda[:N])") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"{name} {device!r}: DCM runs on cpu or cuda only")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only torch" if torch.version.cuda is None else "no visible GPU"
            raise ConfigError(f"{name} {device!r}: CUDA is not available ({build}, torch {torch.__version__}); "
                              f"use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"{name} {device!r}: only {torch.cuda.device_count()} GPU(s) visible")
