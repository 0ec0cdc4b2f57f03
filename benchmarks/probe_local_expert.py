"""What the local expert answers to one positive click at each object's centre voxel, without the engine.

    python benchmarks/probe_local_expert.py --case runs/realsets/MR_inia19_neuromaps_val_001.npz [--weights W]
    python benchmarks/probe_local_expert.py --case A.npz B.npz ... --points 0 4 12 [--weights W]

Per object of the case: its size, the local expert's largest and mean probability on its window, the
probability at the click, the voxels above 0.5, and the Dice of that mask (``configs/dcm_small.yaml``).

``--points N ...``: an upper bound for prompts that carry the object's extent. For each N, the centre click
plus N positive and N negative points drawn (seeded) from the *ground truth* within 14 voxels of the centre;
prints, per N, the mean Dice inside the expert's window over every object of the cases.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

#: the oracle points are drawn within this many voxels of the centre click (inside the small expert's 32^3 window)
ORACLE_HALF_WIDTH = 14


def oracle_points(gt: np.ndarray, at, count: int, rng: np.random.Generator):
    """``count`` positive and ``count`` negative (z, y, x) points of ``gt`` within the half-width of ``at``."""
    lo = np.maximum(np.array(at) - ORACLE_HALF_WIDTH, 0)
    hi = np.minimum(np.array(at) + ORACLE_HALF_WIDTH, gt.shape)
    sub = gt[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    points = []
    for voxels, positive in ((np.argwhere(sub) + lo, True), (np.argwhere(~sub) + lo, False)):
        if len(voxels):
            for i in rng.choice(len(voxels), min(count, len(voxels)), replace=False):
                points.append((tuple(int(x) for x in voxels[i]), positive))
    return points


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", required=True, nargs="+")
    parser.add_argument("--config", default="dcm_small")
    parser.add_argument("--weights")
    parser.add_argument("--points", type=int, nargs="+", help="oracle points per sign (see the module docstring)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the oracle points")
    args = parser.parse_args(argv)
    from dcm.data.cases import Click, ObjectPrompts, load_case
    from dcm.experts import build_experts_from_config
    from dcm.metrics import dice
    from dcm.tables import markdown_table

    _, experts = build_experts_from_config(args.config, weights=args.weights, overrides=("engine.policy=local_only",))
    local = experts["local"]
    rng = np.random.default_rng(args.seed)
    rows, window_dice = [], {n: [] for n in args.points or []}
    for path in args.case:
        case = load_case(path)
        local.set_image(case.image, case.spacing_zyx)
        for label in range(1, int(case.gts.max()) + 1):
            gt = case.gts == label
            voxels = np.argwhere(gt)
            if not len(voxels):
                continue
            at = tuple(int(v) for v in voxels[len(voxels) // 2])
            if args.points:
                for n in args.points:
                    extra = oracle_points(gt, at, n, rng) if n else []  # n = 0 draws nothing from rng
                    clicks = [Click(at, True)] + [Click(p, positive) for p, positive in extra]
                    pred = local.predict(ObjectPrompts(label=label, clicks=clicks))
                    inside = np.zeros(gt.shape, bool)
                    inside[pred.roi] = gt[pred.roi]
                    answer = np.zeros(gt.shape, bool)
                    answer[pred.roi] = pred.prob > 0.5
                    window_dice[n].append(dice(inside, answer))
                continue
            pred = local.predict(ObjectPrompts(label=label, clicks=[Click(at, True)]))
            mask = np.zeros(gt.shape, bool)
            mask[pred.roi] = pred.prob > 0.5
            inner = tuple(a - s.start for a, s in zip(at, pred.roi))
            rows.append([label, int(gt.sum()), float(pred.prob.max()), float(pred.prob.mean()),
                         float(pred.prob[inner]), int(mask.sum()), dice(gt, mask)])
    if args.points:
        print(markdown_table(["oracle points per sign", "objects", "mean Dice in the window"],
                             [[n, len(v), float(np.mean(v))] for n, v in window_dice.items()], digits=3))
    else:
        print(markdown_table(["object", "voxels", "max p", "mean p", "p at click", "voxels p > 0.5", "Dice"], rows,
                             digits=3))
    return 0


if __name__ == "__main__":
    sys.exit(main())
