"""What the local expert answers to one positive click at each object's centre voxel, without the engine.

    python benchmarks/probe_local_expert.py --case runs/realsets/MR_inia19_neuromaps_val_001.npz [--weights W]

Per object of the case: its size, the local expert's largest and mean probability on its window, the
probability at the click, the voxels above 0.5, and the Dice of that mask (``configs/dcm_small.yaml``).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", required=True)
    parser.add_argument("--config", default="dcm_small")
    parser.add_argument("--weights")
    args = parser.parse_args(argv)
    from dcm.data.cases import Click, ObjectPrompts, load_case
    from dcm.experts import build_experts_from_config
    from dcm.metrics import dice
    from dcm.tables import markdown_table

    _, experts = build_experts_from_config(args.config, weights=args.weights, overrides=("engine.policy=local_only",))
    case = load_case(args.case)
    local = experts["local"]
    local.set_image(case.image, case.spacing_zyx)
    rows = []
    for label in range(1, int(case.gts.max()) + 1):
        gt = case.gts == label
        voxels = np.argwhere(gt)
        if not len(voxels):
            continue
        at = tuple(int(v) for v in voxels[len(voxels) // 2])
        pred = local.predict(ObjectPrompts(label=label, clicks=[Click(at, True)]))
        mask = np.zeros(gt.shape, bool)
        mask[pred.roi] = pred.prob > 0.5
        inner = tuple(a - s.start for a, s in zip(at, pred.roi))
        rows.append([label, int(gt.sum()), float(pred.prob.max()), float(pred.prob.mean()), float(pred.prob[inner]),
                     int(mask.sum()), dice(gt, mask)])
    print(markdown_table(["object", "voxels", "max p", "mean p", "p at click", "voxels p > 0.5", "Dice"], rows,
                         digits=3))
    return 0


if __name__ == "__main__":
    sys.exit(main())
