"""Trace every object-step of the protocol through the engine: where a click step loses Dice.

    python benchmarks/trace_click_steps.py --cases runs/realsets --split val --csv runs/steps_val.csv \
        [--config dcm_small] [--weights W] [override ...]

Per object and click step: the object's Dice before the step (the written label map), after the experts'
fused answer applied as it is, after the engine's click rule, and in the written label map (after the overlap
rule), with the voxels the experts and the rule added / removed. Steps whose written Dice falls by more than
0.1 are printed; every step goes to ``--csv``. Wraps :func:`dcm.engine.clicks.honour_clicks` as the predictor
calls it, so it needs ``engine.honour_clicks: true``.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List

import numpy as np


def _mask_after(prev: np.ndarray, fused: Any, threshold: float) -> np.ndarray:
    out = prev.copy()
    if fused is not None:
        covered = ~np.isnan(fused.prob)
        out[fused.region][covered] = fused.prob[covered] > threshold
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", required=True)
    parser.add_argument("--split", help="only this split of the folder's splits.json")
    parser.add_argument("--csv", required=True)
    parser.add_argument("--config", default="dcm_small")
    parser.add_argument("--weights")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    import dcm.engine.predictor as predictor_module
    from dcm.ablate import variant_predictor
    from dcm.config import load_config
    from dcm.data.cases import load_case
    from dcm.data.realsets import split_cases
    from dcm.evaluate import InProcessPredictor, evaluate_case
    from dcm.metrics import dice

    rows: List[Dict[str, Any]] = []
    gts: Dict[str, np.ndarray] = {}
    honour = predictor_module.honour_clicks

    def traced(fused, obj, promise, image, spacing, prev_pred, threshold, *settings):
        gt = gts["now"] == obj.label
        prev = (prev_pred == obj.label) if prev_pred is not None else np.zeros_like(gt)
        expert = _mask_after(prev, fused, threshold)  # before the rule changes ``fused`` in place
        out = honour(fused, obj, promise, image, spacing, prev_pred, threshold, *settings)
        after = _mask_after(prev, out, threshold)
        rows.append({"label": obj.label, "step": len(obj.clicks), "positive": obj.clicks[-1].positive,
                     "size": int(gt.sum()), "prev": dice(gt, prev), "expert": dice(gt, expert),
                     "after_rule": dice(gt, after), "expert_added": int((expert & ~prev).sum()),
                     "expert_removed": int((prev & ~expert).sum()), "rule_added": int((after & ~expert).sum()),
                     "rule_removed": int((expert & ~after).sum()),
                     "rule_added_outside": int((after & ~expert & ~gt).sum())})
        return out

    predictor_module.honour_clicks = traced
    cases = split_cases(Path(args.cases), args.split)[0]
    predict = InProcessPredictor(variant_predictor(load_config(args.config, tuple(args.overrides)), args.weights, {}))
    table: List[Dict[str, Any]] = []
    for path in cases:
        case = load_case(path)
        gts["now"] = case.gts
        rows.clear()
        segs: List[np.ndarray] = []
        with tempfile.TemporaryDirectory() as work:
            evaluate_case(case, predict, Path(work), all_segs=segs)
        for r in rows:
            r["case"] = path.stem
            r["written_prev"] = dice(case.gts == r["label"], segs[r["step"] - 1] == r["label"])
            r["written"] = dice(case.gts == r["label"], segs[r["step"]] == r["label"])
            if r["step"] >= 2 and r["written_prev"] - r["written"] > 0.1:
                print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
        table += [dict(r) for r in rows]
    if not table:
        print(f"{args.cases}: no click steps traced", file=sys.stderr)
        return 2
    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    print(f"wrote {args.csv} ({len(table)} object-steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
