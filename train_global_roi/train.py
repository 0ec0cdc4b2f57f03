"""Train the global-RoI expert (SAM-Med3D-64) on cached object crops.

    torchrun --nproc_per_node=2 train_global_roi/train.py --config configs/train_global_roi.yaml \
        data.data_dir=/data/crops train.init_from=/weights/sam_med3d_turbo.pth
    python train_global_roi/train.py --config configs/train_global_roi_reduced.yaml data.data_dir=... train.resume=auto

Trailing ``key=value`` arguments override the config (``+key=value`` adds a key). Without ``torchrun`` it runs as
a single process. Rank 0 prints ``SUMMARY <json list of step losses>`` at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from dcm.config import load_config
from dcm.training.global_roi import GlobalRoITrainer


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Train DCM's global-RoI expert (DDP under torchrun).")
    parser.add_argument("--config", default="train_global_roi.yaml",
                        help="YAML config (path, or name under configs/); default: %(default)s")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value (+key=value to add a key)")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    trainer = GlobalRoITrainer(cfg)
    summary = trainer.fit()
    if trainer.dist.is_main:
        print("SUMMARY", json.dumps(summary["step_losses"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
