"""How often an expert alone honours its clicks, measured with its training interaction on held-out data.

After each click step of the simulated interaction (no augmentation, no gradient), every click given so far
is checked on that step's binary prediction with :func:`dcm.training.clicks.clicks_honoured` (its voxel and
6 face neighbours inside the mask for a positive click, outside for a negative one). The global expert's
centre click (a convention) is left out. Prints per-step fractions (and the mean Dice of each step's masks) and
writes them as JSON::

    python -m dcm.training.click_honour --expert local --config configs/train_local_roi_small.yaml \\
        --weights runs/x/latest.pt --data HELD_OUT_CASES [--passes 2] [--out honour.json]
    python -m dcm.training.click_honour --expert global --config configs/train_global_roi_small.yaml \\
        --weights runs/y/latest.pt --data HELD_OUT_CROPS

``--data`` is a folder of challenge cases (local) or of ``train_global_roi/preprocess.py`` crops (global).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from dcm.config import load_config
from dcm.training.clicks import clicks_honoured
from dcm.training.trainer import sample_seed

__all__ = ["honour_local", "honour_global", "main"]


def _tally(table: Dict[int, List[float]], step: int, honoured: np.ndarray, newest: bool, dice: float) -> None:
    # all honoured, all clicks, newest honoured, newest clicks, Dice sum, masks
    row = table.setdefault(step, [0, 0, 0, 0, 0.0, 0])
    row[4] += dice
    row[5] += 1
    row[0] += int(honoured.sum())
    row[1] += int(honoured.size)
    if honoured.size:
        row[2] += int(honoured[-1]) if newest else 0
        row[3] += 1 if newest else 0


def honour_local(cfg: dict, weights: str, data: str, passes: int = 1) -> Dict[int, List[int]]:
    """Per click step: [honoured, clicks, newest honoured, newest] over every object of every patch."""
    from dcm.metrics import DICE_BOTH_EMPTY_TRAINING, dice
    from dcm.training.local_roi import LocalRoITrainer

    cfg["data"].update(data_dir=data, crop_background_ratio=0.0, augment={
        "scale_intensity": {"factors": 0.0, "prob": 0.0}, "shift_intensity": {"offsets": 0.0, "prob": 0.0},
        "gaussian_noise": {"mean": 0.0, "std": 0.0, "prob": 0.0}, "flip_prob": 0.0,
        "rot90": {"prob": 0.0, "max_k": 3, "planes": []}})
    trainer = LocalRoITrainer(cfg)
    model = trainer.build_model()
    trainer.init_weights(model, weights)
    model.eval()
    model.record = True
    dataset = trainer.build_dataset()
    table: Dict[int, List[int]] = {}
    with torch.no_grad():
        for epoch in range(passes):
            dataset.set_epoch(epoch)
            for index in range(len(dataset)):
                generator = torch.Generator().manual_seed(sample_seed(trainer.seed, epoch, index))
                trainer.training_step(model, [dataset[index]], generator)
                record = model.last_interaction[0]
                for step, pred in enumerate(record["preds"]):
                    for k, clicks in enumerate(record["clicks"]):
                        given = [(zyx, lab) for zyx, lab in clicks[:step + 1] if lab >= 0]
                        honoured = clicks_honoured(pred[k], [c for c, _ in given], [lab for _, lab in given])
                        _tally(table, step, honoured, clicks[step][1] >= 0,
                               dice(record["gts"][k], pred[k], DICE_BOTH_EMPTY_TRAINING))
    return table


def honour_global(cfg: dict, weights: str, data: str, passes: int = 1) -> Dict[int, List[int]]:
    """Per correction step: [honoured, clicks, newest honoured, newest] (one candidate chain per crop)."""
    import dataclasses

    from dcm.training.global_roi import GlobalRoICropDataset, GlobalRoITrainer, dice_per_sample, run_interaction

    trainer = GlobalRoITrainer(cfg)
    model = trainer.build_model()
    trainer.init_weights(model, weights)
    model.eval()
    config = dataclasses.replace(trainer.interaction, num_candidates=1, record_masks=True)
    dataset = GlobalRoICropDataset(data, size=int(trainer.model_config()["img_size"]),
                                   augment={k: {"enabled": False} for k in ("flip", "elastic", "affine", "intensity")},
                                   seed=trainer.seed, pattern=str(cfg["data"].get("pattern", "*.npz")))
    table: Dict[int, List[int]] = {}
    with torch.no_grad():
        for epoch in range(passes):
            for index in range(len(dataset)):
                item = dataset[index]
                generator = torch.Generator().manual_seed(sample_seed(trainer.seed, epoch, index))
                out = run_interaction(model, item["image"][None], item["label"][None], generator, config,
                                      trainer.loss_fn)
                points, labels = out["record"]["points"][0], out["record"]["labels"][0]
                for s, step in enumerate(out["record"]["steps"]):
                    pred = step["candidate_preds"][0, 0].numpy()
                    given = slice(1, s + 2)  # correction clicks so far (index 0: the centre click)
                    honoured = clicks_honoured(pred, points[given].tolist(), labels[given].tolist())
                    dice = float(dice_per_sample(step["candidate_preds"][:1], item["label"][None]).mean())
                    _tally(table, s + 1, honoured, True, dice)
    return table


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--expert", choices=("global", "local"), required=True)
    p.add_argument("--config", required=True)
    p.add_argument("--weights", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--passes", type=int, default=1, help="passes over the data (each with its own draws)")
    p.add_argument("--out", default=None)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    run = honour_local if args.expert == "local" else honour_global
    table = run(cfg, args.weights, args.data, args.passes)
    total = np.sum([row for row in table.values()], axis=0)
    result = {"expert": args.expert, "weights": args.weights,
              "per_step": {str(s): {"honoured": r[0] / max(r[1], 1), "clicks": r[1],
                                    "newest_honoured": r[2] / max(r[3], 1), "newest": r[3], "dice": r[4] / max(r[5], 1)}
                           for s, r in sorted(table.items())},
              "all": {"honoured": float(total[0] / max(total[1], 1)), "clicks": int(total[1]),
                      "newest_honoured": float(total[2] / max(total[3], 1)), "newest": int(total[3])}}
    print(f"{args.expert} {args.weights}")
    print("step | all clicks honoured | newest click honoured | Dice")
    for s, r in result["per_step"].items():
        print(f"{s} | {r['honoured']:.3f} ({r['clicks']}) | {r['newest_honoured']:.3f} ({r['newest']}) | "
              f"{r['dice']:.3f}")
    a = result["all"]
    print(f"all | {a['honoured']:.3f} ({a['clicks']}) | {a['newest_honoured']:.3f} ({a['newest']})")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
