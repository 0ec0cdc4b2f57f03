"""Benchmark one large case through the DCM engine: time and memory, box step and click step.

Builds a synthetic (z, y, x) uint8 case (default 1500 x 600 x 600, 30 ellipsoid objects on a grid, with
challenge boxes), runs it through :class:`dcm.engine.predictor.DCMPredictor` with the reduced experts of
``configs/dcm_reduced.yaml`` (random weights: the cost of the engine and of the experts' pre / post
processing, not of the full-size networks), first the box step, then a click step (one positive click per
object at its centre, ``prev_pred`` = the box step's output), and writes the output as ``predict.sh`` would.

Per phase it reports wall seconds, the numpy peak traced by ``tracemalloc`` above what was held when the
phase began (``numpy_extra_mb``; torch's CPU allocator is not traced), that peak as a multiple of one uint8
volume (``extra_x_volume``), and the process peak RSS so far (``resource.getrusage``, monotonic).

The engine works on per-object crops: a phase may hold a few whole-volume maps (the uint8 output; with
``engine.overlap=highest_prob`` the float16 winning probabilities where objects won voxels, at most two uint8
volumes), never one per object. The script checks
that the predict phases stay within ``--max-extra`` uint8 volumes of extra numpy memory (default 4) and
exits 1 otherwise (a check for volumes much larger than an RoI: on small ones the RoI crops dominate).

Usage::

    python benchmarks/bench_large_case.py [--shape 1500 600 600] [--objects 30] [--threads N] [--append]
                                          [key=value ...]

Results: a table on stdout and ``benchmarks/results/bench_large_case.csv`` (``--append`` adds rows).
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from machine import cpu_name, machine_description  # benchmarks/machine.py (scripts run from their folder)

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "benchmarks" / "results" / "bench_large_case.csv"
COLUMNS = ["date", "machine", "shape", "objects", "settings", "phase", "seconds", "numpy_extra_mb", "extra_x_volume",
           "rss_peak_mb"]
MB = 1024.0 * 1024.0


def _rss_peak_mb() -> float:
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (MB if sys.platform == "darwin" else 1024.0)


def _grid(n: int, shape: Sequence[int]) -> Tuple[int, int, int]:
    """Cells per axis holding at least ``n`` objects: the most cube-like cells, then the fewest spare ones."""
    candidates = []
    for gz in range(1, n + 1):
        for gy in range(1, n + 1):
            cells = (gz, gy, -(-n // (gz * gy)))
            sizes = [s / g for s, g in zip(shape, cells)]
            candidates.append(((max(sizes) / min(sizes), gz * gy * cells[2] - n), cells))
    return min(candidates)[1]


def make_case(shape: Sequence[int], n_objects: int, seed: int = 0) -> Tuple[Dict[str, Any], List[Tuple[int, int, int]]]:
    """A box-step case (``imgs``, ``spacing``, ``boxes``, ``gts``) and each object's centre voxel.

    Objects are ellipsoids filling about 60% of their grid cell, painted on their own bounding box only.
    """
    from dcm.data.cases import case_to_arrays

    rng = np.random.default_rng(seed)
    image = rng.integers(0, 40, size=tuple(shape), dtype=np.uint8)
    gts = np.zeros(tuple(shape), dtype=np.uint8)
    grid = _grid(n_objects, shape)
    cell = [s // g for s, g in zip(shape, grid)]
    boxes, centres = [], []
    for k in range(n_objects):
        idx = np.unravel_index(k, grid)
        centre = tuple(int(i * c + c // 2) for i, c in zip(idx, cell))
        radii = [max(1.0, 0.3 * c * rng.uniform(0.8, 1.0)) for c in cell]
        bounds = [(max(int(np.floor(c - r)), 0), min(int(np.ceil(c + r)) + 1, s))
                  for c, r, s in zip(centre, radii, shape)]
        region = tuple(slice(a, b) for a, b in bounds)
        grids = np.ogrid[region]
        inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii)) <= 1.0
        gts[region][inside] = k + 1
        image[region][inside] += np.uint8(110)
        (z0, _), (y0, _), (x0, _) = bounds
        zs, ys, xs = np.nonzero(inside)
        z_mid = centre[0]
        ys, xs = ys[zs == z_mid - z0], xs[zs == z_mid - z0]  # the x / y box is drawn on the middle slice
        boxes.append(dict(z_min=int(zs.min()) + z0, z_max=int(zs.max()) + z0, z_mid=z_mid,
                          z_mid_x_min=int(xs.min()) + x0, z_mid_y_min=int(ys.min()) + y0,
                          z_mid_x_max=int(xs.max()) + x0, z_mid_y_max=int(ys.max()) + y0))
        centres.append(centre)
    return case_to_arrays(image, (0.8, 0.8, 2.5), boxes=boxes, gts=gts), centres


class Meter:
    """Times phases and measures their numpy peak (tracemalloc) above what was held when they began."""

    def __init__(self, volume_bytes: int):
        self.volume_bytes = volume_bytes
        self.rows: List[Dict[str, Any]] = []

    def run(self, phase: str, fn: Callable[[], Any]) -> Any:
        held = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        t0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t0
        extra = max(tracemalloc.get_traced_memory()[1] - held, 0)
        self.rows.append({"phase": phase, "seconds": seconds, "numpy_extra_mb": extra / MB,
                          "extra_x_volume": extra / self.volume_bytes, "rss_peak_mb": _rss_peak_mb()})
        row = self.rows[-1]
        print(f"  {phase:<22}{seconds:>9.1f} s{row['numpy_extra_mb']:>11.0f} MB{row['extra_x_volume']:>7.2f}x"
              f"{row['rss_peak_mb']:>10.0f} MB", flush=True)
        return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[1500, 600, 600], metavar=("Z", "Y", "X"))
    ap.add_argument("--objects", type=int, default=30)
    ap.add_argument("--config", default="dcm_reduced", help="DCM config (its experts get random weights)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-extra", type=float, default=4.0,
                    help="allowed extra numpy peak of a predict phase, in uint8 volumes")
    ap.add_argument("--csv", type=Path, default=RESULTS)
    ap.add_argument("--append", action="store_true", help="add rows to the CSV instead of replacing it")
    ap.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. engine.overlap=highest_prob")
    args = ap.parse_args(argv)

    import torch

    from dcm.config import load_config
    from dcm.data.cases import case_from_arrays, save_segmentation
    from dcm.engine.predictor import DCMPredictor
    from dcm.experts import build_experts

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    shape = tuple(args.shape)
    volume = int(np.prod(shape))
    print(f"case {shape[0]} x {shape[1]} x {shape[2]} ({volume / 1e6:.0f} M voxels, {volume / MB:.0f} MB as uint8), "
          f"{args.objects} objects; {args.config} experts, random weights {' '.join(args.overrides)}; "
          f"{torch.get_num_threads()} torch threads, "
          f"{os.cpu_count()} CPUs: {cpu_name()}", flush=True)
    cfg = load_config(args.config, args.overrides)
    experts = build_experts(cfg, random_init=True)
    predictor = DCMPredictor(experts, cfg.get("engine"))

    t0 = time.perf_counter()
    arrays, centres = make_case(shape, args.objects, args.seed)
    print(f"  generated the case in {time.perf_counter() - t0:.1f} s (not counted below)", flush=True)
    arrays.pop("gts")  # inference never reads it

    tracemalloc.start()
    meter = Meter(volume)
    print(f"  {'phase':<22}{'seconds':>11}{'numpy extra':>14}{'':>8}{'peak RSS':>10}")
    case = meter.run("validate (box step)", lambda: case_from_arrays(arrays, name="CT_large"))
    segs = meter.run("predict box step", lambda: predictor(case))
    clicks = [{"fg": [list(c)], "bg": []} for c in centres]
    click_arrays = dict(arrays, clicks=np.array(clicks, dtype=object),
                        clicks_order=np.array([["fg"]] * len(centres), dtype="<U2"), prev_pred=segs)
    del case
    case = meter.run("validate (click step)", lambda: case_from_arrays(click_arrays, name="CT_large"))
    segs2 = meter.run("predict click step", lambda: predictor(case))
    with tempfile.TemporaryDirectory(prefix="dcm-bench-") as tmp:
        meter.run("save output", lambda: save_segmentation(Path(tmp) / "CT_large.npz", segs2, shape=case.shape))
    tracemalloc.stop()
    assert segs2.shape == shape and segs2.dtype == np.uint8

    predict_rows = [r for r in meter.rows if r["phase"].startswith("predict")]
    total = sum(r["seconds"] for r in predict_rows)
    ok = all(r["extra_x_volume"] <= args.max_extra for r in predict_rows)
    print(f"\npredict total {total:.1f} s; labels written: {len(np.unique(segs2)) - 1} of {args.objects}; "
          f"extra numpy memory <= {args.max_extra:g} volumes in every predict phase: {'met' if ok else 'NOT met'}")

    args.csv.parent.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().isoformat(timespec="seconds")
    machine = machine_description()
    append = args.append and args.csv.is_file()
    with open(args.csv, "a" if append else "w", newline="") as f:
        w = csv.writer(f)
        if not append:
            w.writerow(COLUMNS)
        for r in meter.rows:
            w.writerow([stamp, machine, "x".join(map(str, shape)), args.objects, " ".join(args.overrides) or "default",
                        r["phase"], f"{r['seconds']:.2f}",
                        f"{r['numpy_extra_mb']:.1f}", f"{r['extra_x_volume']:.2f}", f"{r['rss_peak_mb']:.0f}"])
    print(f"wrote {args.csv.relative_to(ROOT) if args.csv.is_relative_to(ROOT) else args.csv}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
