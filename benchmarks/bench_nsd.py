"""Benchmark the evaluator's NSD against the plain whole-volume computation.

``dcm.metrics.nsd`` computes the normalised surface Dice (DeepMind ``surface-distance`` method: sub-voxel
surfels, distance transforms, 2 mm tolerance) with MONAI's ``compute_surface_dice(use_subvoxels=True)`` on
the bounding box of both masks plus 2 voxels; the distances between surface points do not depend on
anything outside that box. The plain implementation runs the same computation with surfaces and distance
transforms over the whole volume. Per object size this prints both times, their ratio and both values (which
must be equal).

Masks: (z, y, x) = 300 x 512 x 512 by default, a ground-truth ellipsoid of the given radius (voxels) at the
centre and a prediction shifted by 2 voxels with a bump, at the challenge's anisotropic spacing
(x, y, z) = (0.8, 0.8, 2.5) mm passed in the stored order, as the organisers do.

Usage::

    python benchmarks/bench_nsd.py [--shape 300 512 512] [--radii 8 32 96] [--repeats 3] [--append]

Target: the evaluator's NSD at least 5x faster than the plain one, same values (to 1e-9).
Results: a table on stdout and ``benchmarks/results/bench_nsd.csv``.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path
from typing import List, Sequence

import numpy as np

from machine import machine_description, write_csv  # benchmarks/machine.py (scripts run from their folder)

from dcm.metrics import NSD_TOLERANCE_MM, nsd

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "benchmarks" / "results" / "bench_nsd.csv"
COLUMNS = ["date", "machine", "shape", "radius_vox", "object_voxels", "crop_s", "whole_s", "speedup", "nsd_crop",
           "nsd_whole", "abs_diff"]
TARGET_SPEEDUP = 5.0


def plain_nsd(gt: np.ndarray, pred: np.ndarray, spacing: Sequence[float],
              tolerance_mm: float = NSD_TOLERANCE_MM) -> float:
    """The same sub-voxel surface Dice with surfaces and distance transforms over the whole volume.

    MONAI's building blocks without any crop (an all-true mask turns MONAI's own bounding-box crop off):
    the surfel areas of both masks, the Euclidean distance transform of each surface over the whole volume
    (MONAI's dense path; on CPU it otherwise queries a KD-tree of surface points), and
    ``(matched area of both surfaces) / (total area)`` as ``compute_surface_dice`` sums them.
    """
    import monai.metrics.utils as mu
    import torch

    everywhere = torch.ones(tuple(n - 1 for n in gt.shape), dtype=torch.bool)  # sub-voxel surfels lie between voxels
    kdtree = mu.has_scipy_kdtree
    mu.has_scipy_kdtree = False  # MONAI's dense distance transform of each surface instead of its KD-tree
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            (edges_pred, edges_gt), (d_pred_gt, d_gt_pred), (areas_pred, areas_gt) = mu.get_edge_surface_distance(
                torch.from_numpy(pred), torch.from_numpy(gt), spacing=[float(s) for s in spacing],
                use_subvoxels=True, symmetric=True, mask=everywhere)
    finally:
        mu.has_scipy_kdtree = kdtree
    areas_gt, areas_pred = areas_gt[edges_gt], areas_pred[edges_pred]
    matched = areas_gt[d_gt_pred <= tolerance_mm].sum() + areas_pred[d_pred_gt <= tolerance_mm].sum()
    return float(matched / (areas_gt.sum() + areas_pred.sum()))


def make_masks(shape: Sequence[int], radius: int):
    """A ground-truth ellipsoid (radius voxels in-plane, a third of it along z) and a shifted, bumped prediction."""
    z, y, x = shape
    c = np.array([z // 2, y // 2, x // 2])
    r = np.array([max(radius // 3, 2), radius, radius])
    lo = np.maximum(c - r - 8, 0)
    hi = np.minimum(c + r + 8, shape)
    zz, yy, xx = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]

    def ellipsoid(centre, radii):
        return (((zz - centre[0]) / radii[0]) ** 2 + ((yy - centre[1]) / radii[1]) ** 2
                + ((xx - centre[2]) / radii[2]) ** 2 <= 1)

    gt = np.zeros(shape, dtype=bool)
    pred = np.zeros(shape, dtype=bool)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    gt[box] = ellipsoid(c, r)
    bump = ellipsoid(c + np.array([0, r[1] // 2 + 2, 0]), np.maximum(r // 3, 1))
    pred[box] = ellipsoid(c + np.array([0, 2, 2]), r) | bump
    return gt, pred


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[300, 512, 512], metavar=("Z", "Y", "X"))
    ap.add_argument("--radii", type=int, nargs="+", default=[8, 32, 96], help="in-plane object radii (voxels)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of the evaluator's NSD (median)")
    ap.add_argument("--csv", type=Path, default=RESULTS)
    ap.add_argument("--append", action="store_true", help="append to the CSV instead of replacing it")
    args = ap.parse_args(argv)

    spacing_stored = (0.8, 0.8, 2.5)  # (x, y, z) as stored, applied to (z, y, x) axes: the official call
    machine = machine_description()
    print(f"machine: {machine}\nmasks: {tuple(args.shape)} bool, spacing {spacing_stored} (stored order), "
          f"tolerance {NSD_TOLERANCE_MM} mm\n")
    print(f"{'radius':>7}{'voxels':>11}{'crop s':>9}{'whole s':>9}{'speedup':>9}{'NSD crop':>12}{'NSD whole':>12}")
    warm = np.zeros((8, 8, 8), dtype=bool)
    warm[2:5, 2:5, 2:5] = True
    nsd(warm, warm, spacing_stored)  # imports MONAI outside the timings
    rows = []
    for radius in args.radii:
        gt, pred = make_masks(args.shape, radius)
        times = []
        for _ in range(max(args.repeats, 1)):
            t0 = time.perf_counter()
            value = nsd(gt, pred, spacing_stored)
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        value_whole = plain_nsd(gt, pred, spacing_stored)
        whole = time.perf_counter() - t0
        crop = statistics.median(times)
        row = {"radius_vox": radius, "object_voxels": int(gt.sum()), "crop_s": crop, "whole_s": whole,
               "speedup": whole / crop, "nsd_crop": value, "nsd_whole": value_whole,
               "abs_diff": abs(value - value_whole)}
        rows.append(row)
        print(f"{radius:>7}{row['object_voxels']:>11}{crop:>9.3f}{whole:>9.2f}{row['speedup']:>8.1f}x"
              f"{value:>12.6f}{value_whole:>12.6f}", flush=True)

    ok = all(r["speedup"] >= TARGET_SPEEDUP and r["abs_diff"] <= 1e-9 for r in rows)
    print(f"\ntarget >= {TARGET_SPEEDUP}x faster with equal values: {'met' if ok else 'NOT met'} "
          f"(max |diff| {max(r['abs_diff'] for r in rows):.1e})")
    write_csv(args.csv, COLUMNS, (["x".join(map(str, args.shape))]
                                  + [r[k] if isinstance(r[k], int) else f"{r[k]:.6g}" for k in COLUMNS[3:]]
                                  for r in rows), args.append)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
