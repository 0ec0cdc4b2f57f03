#!/usr/bin/env python
"""Train DCM's local-RoI expert (VISTA3D) with simulated protocol clicks.

Usage (from a clone, with the package installed: ``pip install -e .``)::

    torchrun --nproc_per_node=N train_local_roi/train.py --config configs/train_local_roi.yaml [key=value ...]
    python train_local_roi/train.py --config configs/train_local_roi_reduced.yaml train.epochs=2

Overrides are ``dotted.key=value`` (YAML values); ``+new.key=value`` adds a key (e.g. ``+train.max_steps=10``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    from dcm.config import load_config
    from dcm.errors import DCMError
    from dcm.training.local_roi import LocalRoITrainer

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML config (path, or a name in configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        summary = LocalRoITrainer(cfg).fit()
    except DCMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"done: {summary['steps']} steps in {summary['seconds']:.1f} s "
              f"({summary['samples_per_second']:.3f} samples/s); step losses: {json.dumps(summary['step_losses'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
