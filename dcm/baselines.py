"""Reference predictors that need no model: ``oracle`` (checks) and ``box-fill`` (a naive baseline).

Both follow the challenge I/O contract, so they can be run by the evaluator in-process
(``--predictor oracle`` / ``--predictor box-fill``) or as an external command, like a container::

    python -m dcm.baselines box-fill [--inputs DIR] [--outputs DIR]
    python -m dcm.baselines oracle --gt-dir CASES_DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from dcm.data.cases import Case, load_npz
from dcm.errors import CaseError
from dcm.regions import union_region
from dcm.runner import default_io_dirs, predict_folder

__all__ = ["box_fill", "BoxFillPredictor", "OraclePredictor", "main"]


def _ball_slices(center, radius: int, shape):
    return tuple(slice(max(c - radius, 0), min(c + radius + 1, n)) for c, n in zip(center, shape))


def _paint_ball(mask: np.ndarray, center, radius: int, value: bool) -> None:
    sl = _ball_slices(center, radius, mask.shape)
    grids = np.ogrid[sl]
    dist2 = sum((g - c) ** 2 for g, c in zip(grids, center))
    mask[sl][dist2 <= radius * radius] = value


def box_fill(case: Case, ball_radius: int = 3) -> np.ndarray:
    """The ``box-fill`` baseline: a prism from each box, then a ball added / removed at each click.

    Each object's mask is the rectangle of its box (drawn on ``z_mid``) repeated from ``z_min`` to
    ``z_max``; each fg click then adds, each bg click removes, a ball of ``ball_radius`` voxels, in click
    order. Stateless: recomputed from the prompts at every step, so it needs no ``prev_pred`` except for
    objects whose prompts are unusable: they keep exactly their previous mask. Otherwise later objects win
    overlaps.

    Returns:
        (z, y, x) uint8 labels.
    """
    segs = np.zeros(case.shape, dtype=np.uint8)
    for obj in case.objects:
        if obj.problem:
            continue
        # The object's mask lives on the bounding region of its box and click balls only.
        parts = [] if obj.box is None else [tuple(slice(lo, hi + 1) for lo, hi in obj.box.bounds_zyx)]
        parts += [_ball_slices(c.zyx, ball_radius, case.shape) for c in obj.clicks]
        if not parts:
            continue
        region = union_region(parts)
        lo = np.array([s.start for s in region])
        hi = np.array([s.stop for s in region])
        mask = np.zeros(tuple(hi - lo), dtype=bool)
        if obj.box is not None:
            mask[tuple(slice(a - o, b + 1 - o) for (a, b), o in zip(obj.box.bounds_zyx, lo))] = True
        for click in obj.clicks:
            _paint_ball(mask, tuple(int(c - o) for c, o in zip(click.zyx, lo)), ball_radius, click.positive)
        segs[region][mask] = obj.label
    # Objects with unusable prompts keep exactly their previous mask (as DCMPredictor does).
    problems = [obj.label for obj in case.objects if obj.problem]
    if problems and case.prev_pred is not None:
        kept = np.isin(case.prev_pred, problems)
        segs[kept] = case.prev_pred[kept]
    return segs


class BoxFillPredictor:
    """Callable form of :func:`box_fill` for the evaluator's in-process mode."""

    def __init__(self, ball_radius: int = 3):
        self.ball_radius = ball_radius

    def __call__(self, case: Case) -> np.ndarray:
        return box_fill(case, self.ball_radius)


class OraclePredictor:
    """Returns the ground truth of the case of the same name from ``gt_dir`` (DSC 1: a check, not a model)."""

    def __init__(self, gt_dir: str):
        self.gt_dir = Path(gt_dir)

    def __call__(self, case: Case) -> np.ndarray:
        path = self.gt_dir / f"{case.name}.npz"
        arrays = load_npz(path)
        if "gts" not in arrays:
            raise CaseError(path, "gts", "missing (the oracle needs ground truth)")
        gts = np.asarray(arrays["gts"])
        if gts.shape != case.shape:
            raise CaseError(path, "gts", f"shape {gts.shape} differs from the case image {case.shape}")
        return gts.astype(np.uint8)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dcm.baselines", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=["box-fill", "oracle"])
    parser.add_argument("--inputs", help="folder of case files (default: /workspace/inputs or ./inputs)")
    parser.add_argument("--outputs", help="output folder (default: /workspace/outputs or ./outputs)")
    parser.add_argument("--gt-dir", help="oracle: folder with the source cases holding 'gts'")
    parser.add_argument("--ball-radius", type=int, default=3, help="box-fill: click ball radius (voxels)")
    args = parser.parse_args(argv)
    if args.name == "oracle":
        if not args.gt_dir:
            parser.error("oracle needs --gt-dir")
        predict = OraclePredictor(args.gt_dir)
    else:
        predict = BoxFillPredictor(args.ball_radius)
    inputs, outputs = default_io_dirs(args.inputs, args.outputs)
    result = predict_folder(inputs, outputs, predict)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
