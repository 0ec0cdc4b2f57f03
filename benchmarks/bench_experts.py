"""Benchmark each expert per interaction: latency and peak memory, first click vs further clicks.

Rows (random weights; the cost does not depend on their values):

* ``global``: the global-RoI expert over SAM-Med3D-64 at full size (``sam_med3d_64``: ViT-B, 64^3, patch 8)
  with the fast and with the padded window attention, and the small demo preset (``sam_med3d_64_small``);
* ``local``: the local-RoI expert over VISTA3D at full size (``vista3d132``, 128^3 window) and the small demo
  preset (``vista3d_small``, 32^3 window).

Each row runs in its own process (so that its peak memory is its own) on a CT-like (z, y, x) int16 image
(default 160 x 256 x 256) with one ellipsoid object and its challenge box, and times:

* ``set_image``: the per-image work (VISTA3D: the whole image's percentiles);
* ``warm-up``: the very first prediction of the process (one-off costs: memory for the activations, oneDNN
  kernel set-up, and compiling with ``--compile``), on another RoI;
* ``first``: the first interaction with the object (global: the box, local: one click), encoder included;
* ``further``: a further click whose network input is unchanged (global: a click inside the RoI; local: a
  click within ``reuse_window_margin`` of the window centre), the encoder output comes from the cache
  (median of ``--repeats``);
* ``new window`` (local only): a further click elsewhere, the window centred on it, as DCM does at every
  click by default (``reuse_window_margin: null``: the encoder runs again; median of ``--repeats``).

Memory: the process's peak RSS (CPU) or ``torch.cuda.max_memory_allocated`` (CUDA), and that peak above
what the process held once the model was built (``extra``).

On CUDA (``--device cuda``, or ``auto`` with a GPU) every row also runs under bf16 and fp16 autocast, and
with ``--compile`` once more with ``torch.compile`` on the encoder (the warm-up then includes compiling).

Usage::

    python benchmarks/bench_experts.py [--rows full small] [--device auto] [--repeats 3] [--threads N]
                                       [--shape 160 256 256] [--compile] [--append]

Targets (2-core CPU): global expert at full size, first click <= 4 s, further click <= 0.3 s.
Results: a table on stdout and ``benchmarks/results/bench_experts.csv``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

from machine import machine_description, write_csv  # benchmarks/machine.py (scripts run from their folder)

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "benchmarks" / "results" / "bench_experts.csv"
COLUMNS = ["date", "machine", "device", "expert", "model", "input", "attention", "precision", "compiled",
           "set_image_s", "warmup_s", "first_s", "further_s", "new_window_s", "peak_mb", "extra_mb"]

#: (expert, model preset, network input, attention, group)
ROWS = [
    ("global", "sam_med3d_64", "64^3", "fast", "full"),
    ("global", "sam_med3d_64", "64^3", "padded", "full"),
    ("local", "vista3d132", "128^3", "", "full"),
    ("global", "sam_med3d_64_small", "64^3", "fast", "small"),
    ("local", "vista3d_small", "32^3", "", "small"),
]
TARGETS = {"first_s": 4.0, "further_s": 0.3}  # global expert, full size, fast attention, CPU


def _peak_mb(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**20 if sys.platform == "darwin" else 1024.0)


def _current_mb(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.memory_allocated() / 2**20
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return _peak_mb(device)


def make_image(shape, seed: int = 0):
    """A CT-like int16 (z, y, x) image with one ellipsoid object (HU-like values) and its box."""
    import numpy as np

    from dcm.data.cases import Box

    rng = np.random.default_rng(seed)
    z, y, x = shape
    image = rng.normal(-100, 40, size=shape).astype(np.int16)
    zz, yy, xx = np.ogrid[:z, :y, :x]
    c = (z // 2, y // 2, x // 2)
    r = (max(z // 8, 4), max(y // 6, 4), max(x // 5, 4))
    inside = ((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2 <= 1
    image[inside] += 180
    zs, ys, xs = np.nonzero(inside)
    box = Box(z_min=int(zs.min()), z_max=int(zs.max()), z_mid=int(c[0]),
              z_mid_x_min=int(xs.min()), z_mid_x_max=int(xs.max()), z_mid_y_min=int(ys.min()), z_mid_y_max=int(ys.max()))
    return image, inside, box, c, r


def run_row(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Time one (expert, model, precision, compile) row in this process; returns the CSV fields it fills."""
    import numpy as np
    import torch

    from dcm.data.cases import Click, ObjectPrompts
    from dcm.experts.global_roi import GlobalRoIExpert
    from dcm.experts.local_roi import LocalRoIExpert
    from dcm.models import load_model_config

    if spec["threads"] > 0:
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    device = spec["device"]
    image, inside, box, c, r = make_image(tuple(spec["shape"]))
    precision = spec["precision"]
    amp = precision != "fp32"
    common = {"device": device, "amp": amp, "amp_dtype": {"bf16": "bfloat16", "fp16": "float16"}.get(precision, "float16"),
              "compile": spec["compile"]}
    if spec["expert"] == "global":
        model = {**load_model_config(spec["model"]), "attention": spec["attention"]}
        expert = GlobalRoIExpert.from_config({"model": model, **common})
    else:
        window = int(spec["input"].split("^")[0])
        expert = LocalRoIExpert.from_config({"model": spec["model"], "window_size": window,
                                             "reuse_window_margin": max(window // 8, 1), **common})
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base_mb = _current_mb(device)

    def timed(fn):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        return time.perf_counter() - t0, out

    set_image_s, _ = timed(lambda: expert.set_image(image, (2.5, 0.8, 0.8)))
    prev = np.zeros(image.shape, dtype=np.uint8)

    def predict(obj):
        pred = expert.predict(obj, prev)
        assert pred is not None and pred.prob.size
        return pred

    centre = tuple(int(v) for v in c)
    if spec["expert"] == "global":
        obj = ObjectPrompts(label=1, box=box)
        warmup_s, _ = timed(lambda: predict(obj))
        expert.backbone.clear_cache()
        first_s, _ = timed(lambda: predict(obj))
        further: List[float] = []
        for k in range(spec["repeats"]):
            zyx = (centre[0], centre[1] + (k % 3) - 1, centre[2] + k)
            obj.clicks.append(Click(zyx, bool(inside[zyx])))
            further.append(timed(lambda: predict(obj))[0])
        new_window = []
    else:
        def click_obj(zyx):
            return ObjectPrompts(label=1, clicks=[Click(zyx, bool(inside[zyx]))])

        # warm-up on the window of a click 3 voxels away, then a cold cache for the timed first click
        warmup_s, _ = timed(lambda: predict(click_obj((centre[0], centre[1] - 3, centre[2]))))
        expert.backbone.clear_cache()
        obj = click_obj(centre)
        first_s, _ = timed(lambda: predict(obj))
        further = []
        for k in range(spec["repeats"]):
            zyx = (centre[0], centre[1], centre[2] + 1 + k % 2)  # within the reuse margin: cached
            obj.clicks.append(Click(zyx, bool(inside[zyx])))
            further.append(timed(lambda: predict(obj))[0])
        new_window = []
        step = max(r[2] // 2, 8)
        expert.cfg["reuse_window_margin"] = None  # DCM's default: every click centres a new window
        for k in range(spec["repeats"]):
            zyx = (centre[0], centre[1], min(centre[2] + (k + 1) * step, image.shape[2] - 1))
            obj.clicks.append(Click(zyx, bool(inside[zyx])))
            new_window.append(timed(lambda: predict(obj))[0])
    peak = _peak_mb(device)
    return {
        "set_image_s": set_image_s, "warmup_s": warmup_s, "first_s": first_s,
        "further_s": statistics.median(further),
        "new_window_s": statistics.median(new_window) if new_window else float("nan"),
        "peak_mb": peak, "extra_mb": max(peak - base_mb, 0.0),
    }


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "-" if v != v else f"{v:.3f}"
    return str(v)


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", nargs="+", default=["full", "small"], choices=["full", "small"])
    ap.add_argument("--device", default="auto", help="cpu | cuda | auto")
    ap.add_argument("--precision", nargs="+", default=None, choices=["fp32", "bf16", "fp16"],
                    help="default: fp32 on CPU; fp32, bf16 and fp16 on CUDA")
    ap.add_argument("--compile", action="store_true", help="also rows with torch.compile on the encoder")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--shape", type=int, nargs=3, default=[160, 256, 256], metavar=("Z", "Y", "X"))
    ap.add_argument("--csv", type=Path, default=RESULTS)
    ap.add_argument("--append", action="store_true", help="append to the CSV instead of replacing it")
    ap.add_argument("--row", help=argparse.SUPPRESS)  # internal: one row as JSON, in a child process
    args = ap.parse_args(argv)

    if args.row:
        print("ROW " + json.dumps(run_row(json.loads(args.row))), flush=True)
        return 0

    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    precisions = args.precision or (["fp32", "bf16", "fp16"] if device == "cuda" else ["fp32"])
    compiles = [False, True] if args.compile else [False]
    machine = machine_description() + (f"; {torch.cuda.get_device_name()}" if device == "cuda" else "")
    print(f"machine: {machine}\nimage: {tuple(args.shape)} int16, device {device}\n", flush=True)

    results = []
    header = f"{'expert':<7}{'model':<20}{'input':<7}{'attn':<7}{'prec':<5}{'comp':<5}" \
             f"{'set_img s':>10}{'warm-up s':>10}{'first s':>9}{'further s':>10}{'new win s':>10}{'peak MB':>9}{'extra MB':>9}"
    print(header, flush=True)
    for expert, model, size, attention, group in ROWS:
        if group not in args.rows:
            continue
        for precision in precisions:
            for comp in compiles:
                spec = {"expert": expert, "model": model, "input": size, "attention": attention or "fast",
                        "precision": precision, "compile": comp, "device": device, "repeats": args.repeats,
                        "threads": args.threads, "shape": args.shape}
                proc = subprocess.run([sys.executable, __file__, "--row", json.dumps(spec)], capture_output=True,
                                      text=True, cwd=str(Path(__file__).parent))
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
                if proc.returncode != 0 or not lines:
                    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                    print(f"{expert:<7}{model:<20}{size:<7}{attention:<7}{precision:<5}{str(comp):<5} FAILED: "
                          f"{' | '.join(tail)}", flush=True)
                    continue
                out = json.loads(lines[-1][4:])
                row = {"expert": expert, "model": model, "input": size, "attention": attention, "precision": precision,
                       "compiled": comp, **out}
                results.append(row)
                print(f"{expert:<7}{model:<20}{size:<7}{attention:<7}{precision:<5}{'yes' if comp else 'no':<5}"
                      f"{_fmt(out['set_image_s']):>10}{_fmt(out['warmup_s']):>10}{_fmt(out['first_s']):>9}"
                      f"{_fmt(out['further_s']):>10}{_fmt(out['new_window_s']):>10}{out['peak_mb']:>9.0f}"
                      f"{out['extra_mb']:>9.0f}", flush=True)

    ok = True
    for row in results:
        if (device == "cpu" and row["expert"] == "global" and row["model"] == "sam_med3d_64"
                and row["attention"] == "fast" and row["precision"] == "fp32" and not row["compiled"]):
            for key, limit in TARGETS.items():
                met = row[key] <= limit
                ok &= met
                print(f"target global full-size {key.replace('_s', '')} <= {limit} s: {row[key]:.3f} s "
                      f"{'met' if met else 'NOT met'}")

    write_csv(args.csv, COLUMNS, ([device] + [_fmt(row[k]) if isinstance(row[k], float) else row[k]
                                             for k in COLUMNS[3:]] for row in results), args.append, machine)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
