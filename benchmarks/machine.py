"""What machine a benchmark ran on, for its table and CSV rows."""

from __future__ import annotations

import csv
import datetime as _dt
import os
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from dcm.models.precision import cpu_name  # one reader of /proc/cpuinfo; scripts import it from here too


def machine_description() -> str:
    """``<cpu>; <n> CPUs; <t> threads; torch <version>``."""
    import torch

    return f"{cpu_name()}; {os.cpu_count()} CPUs; {torch.get_num_threads()} threads; torch {torch.__version__}"


def write_csv(path: Path, columns: Sequence[str], rows: Iterable[Sequence[Any]], append: bool = False,
              machine: Optional[str] = None) -> None:
    """Write benchmark rows to ``path`` under ``columns``; each row is prefixed with the date and the machine
    (the first two columns; default :func:`machine_description`). ``append`` adds to an existing file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "a" if append and path.exists() else "w"
    stamp = _dt.datetime.now().isoformat(timespec="seconds")
    machine = machine or machine_description()
    with open(path, mode, newline="") as f:
        w = csv.writer(f)
        if mode == "w":
            w.writerow(columns)
        for row in rows:
            w.writerow([stamp, machine, *row])
    print(f"wrote {path}")
