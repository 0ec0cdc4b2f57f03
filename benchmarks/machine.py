"""What machine a benchmark ran on, for its table and CSV rows."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description() -> str:
    """``<cpu>; <n> CPUs; <t> threads; torch <version>``."""
    import torch

    return f"{cpu_name()}; {os.cpu_count()} CPUs; {torch.get_num_threads()} threads; torch {torch.__version__}"
