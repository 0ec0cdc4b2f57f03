"""Benchmark each expert per interaction: latency and peak memory, first click vs further clicks, per precision path.

Rows (random weights; the cost does not depend on their values):

* ``global``: the global-RoI expert over SAM-Med3D-64 at full size (``sam_med3d_64``: ViT-B, 64^3, patch 8)
  with the fast and with the padded window attention (padded: float32, oneDNN on only: the reference), and
  the small demo preset (``sam_med3d_64_small``);
* ``local``: the local-RoI expert over VISTA3D at full size (``vista3d132``, 128^3 window) and the small demo
  preset (``vista3d_small``, 32^3 window).

Each row runs once per *path* (``--paths``): the precision and layout of the network (the expert keys
``amp`` / ``amp_dtype`` / ``channels_last``, README "Speed settings of both experts"):

* ``fp32``: float32 (``amp: false``);
* ``bf16``: bfloat16 autocast (``amp: true, amp_dtype: bfloat16``, forced with ``amp_device`` = the device,
  so that a CPU without native bfloat16 measures its emulation), ``channels_last: false``;
* ``bf16-cl``: the same with channels-last 3D (``channels_last: true``);
* ``fp32-cl``, ``fp16``, ``fp16-cl`` likewise; ``all``: ``fp32 bf16 bf16-cl``;

and once per oneDNN setting (``--onednn on off``: the expert key ``onednn``, DCM's oneDNN 3D convolutions
for CPU float32 or PyTorch's own choice). Default: ``fp32``, oneDNN on (CPU); ``fp32 bf16 fp16`` on CUDA.

Each row runs in its own process (so that its peak memory is its own) on a CT-like (z, y, x) int16 image
(default 160 x 256 x 256) with one ellipsoid object and its challenge box, and times:

* ``set_image``: the per-image work (VISTA3D: the whole image's percentiles);
* ``warm-up``: the very first prediction of the process (one-off costs: memory for the activations, oneDNN
  kernel set-up, and compiling with ``--compile``), on another RoI;
* ``first``: the first interaction with the object (global: the box, local: one click), encoder included
  (cache cleared before each of ``--repeats``);
* ``further``: a further click whose network input is unchanged (global: a click inside the RoI; local: a
  click within ``reuse_window_margin`` of the window centre), the encoder output comes from the cache;
* ``new window`` (local only): a further click elsewhere, the window centred on it, as DCM does at every
  click by default (``reuse_window_margin: null``: the encoder runs again).

Each of the last three is the median (``--stat min``: the minimum) of ``--repeats`` timings.

Memory: the process's peak RSS (CPU) or ``torch.cuda.max_memory_allocated`` (CUDA), and that peak above
what the process held once the model was built (``extra``). A second table gives each path's speed-up over
``fp32`` (oneDNN on) of the same row: first and further click, and new window.

``--step``: also one whole ``sh predict.sh`` click step of the local expert per path (a fresh process:
imports, random-init model building, reading the case, one 128^3 (full) / 32^3 (small) window, the click
rule, writing), on a case of ``--shape`` with one object, its box and one click: ``--config dcm``
(full) / ``dcm_small`` (small) with ``engine.policy=local_only``, wall-clock seconds of the call and its
``--timings`` split.

On CUDA (``--device cuda``, or ``auto`` with a GPU) ``--compile`` adds rows with ``torch.compile`` on the
encoder (the warm-up then includes compiling).

Usage::

    python benchmarks/bench_experts.py [--rows full small] [--experts global local] [--paths fp32 bf16 bf16-cl | all]
                                       [--onednn on off] [--step] [--step-repeats 1] [--device auto] [--repeats 3]
                                       [--stat median|min] [--threads N] [--shape 160 256 256] [--no-padded]
                                       [--compile] [--append]

Targets (2-core CPU): global expert at full size, float32: first click <= 4 s, further click <= 0.3 s;
bfloat16 (best path): global first click <= 0.45 s, VISTA3D new window <= 20 s, a whole predict.sh click
step of the local expert >= 1.6x faster than fp32 in the same run.
Results: tables on stdout, ``benchmarks/results/bench_experts.csv`` (and ``bench_experts_step.csv`` with
``--step``).
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
COLUMNS = ["date", "machine", "device", "expert", "model", "input", "attention", "precision", "channels_last",
           "onednn", "compiled", "set_image_s", "warmup_s", "first_s", "further_s", "new_window_s", "peak_mb",
           "extra_mb"]
STEP_COLUMNS = ["date", "machine", "device", "config", "precision", "channels_last", "onednn", "call_s", "imports_s",
                "models_s", "predict_s", "speedup"]

#: (expert, model preset, network input, attention, group)
ROWS = [
    ("global", "sam_med3d_64", "64^3", "fast", "full"),
    ("global", "sam_med3d_64", "64^3", "padded", "full"),
    ("local", "vista3d132", "128^3", "", "full"),
    ("global", "sam_med3d_64_small", "64^3", "fast", "small"),
    ("local", "vista3d_small", "32^3", "", "small"),
]
#: path name -> (precision, channels-last)
PATHS = {"fp32": ("fp32", False), "fp32-cl": ("fp32", True), "bf16": ("bf16", False), "bf16-cl": ("bf16", True),
         "fp16": ("fp16", False), "fp16-cl": ("fp16", True)}
ALL_PATHS = ["fp32", "bf16", "bf16-cl"]
AMP_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}
TARGETS = {"first_s": 4.0, "further_s": 0.3}  # global expert, full size, fast attention, CPU, float32
#: reduced precision, CPU: (expert, model, key, limit)
AMP_TARGETS = [("global", "sam_med3d_64", "first_s", 0.45), ("local", "vista3d132", "new_window_s", 20.0)]
STEP_TARGET = 1.6  # a whole predict.sh click step of the local expert, bf16 vs fp32, same run
#: the predict.sh click step: config per group
STEP_CONFIGS = {"full": "dcm", "small": "dcm_small"}


def path_name(precision: str, channels_last: bool) -> str:
    return precision + ("-cl" if channels_last else "")


def expert_settings(precision: str, channels_last: bool, onednn: bool, device: str) -> Dict[str, Any]:
    """The expert keys of one path (autocast forced on ``device`` for a reduced precision)."""
    amp = precision != "fp32"
    return {"amp": amp, "amp_dtype": AMP_DTYPES.get(precision, "float16"),
            "amp_device": device if amp else "auto", "channels_last": channels_last, "onednn": onednn}


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
              z_mid_x_min=int(xs.min()), z_mid_x_max=int(xs.max()),
              z_mid_y_min=int(ys.min()), z_mid_y_max=int(ys.max()))
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
    common = {"device": device, "compile": spec["compile"],
              **expert_settings(spec["precision"], spec["channels_last"], spec["onednn"], device)}
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
        first = []
        for _ in range(spec["repeats"]):
            expert.clear_cache()
            first.append(timed(lambda: predict(obj))[0])
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
        obj = click_obj(centre)
        first = []
        for _ in range(spec["repeats"]):
            expert.clear_cache()
            first.append(timed(lambda: predict(obj))[0])
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
    stat = min if spec.get("stat") == "min" else statistics.median
    return {
        "set_image_s": set_image_s, "warmup_s": warmup_s, "first_s": stat(first),
        "further_s": stat(further),
        "new_window_s": stat(new_window) if new_window else float("nan"),
        "peak_mb": peak, "extra_mb": max(peak - base_mb, 0.0),
    }


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "-" if v != v else f"{v:.3f}"
    return str(v)


def write_step_case(folder: Path, shape) -> Path:
    """A click-step case: the CT-like image as uint8, one object with its box, one positive click at its
    centre and the box-step mask as the previous prediction."""
    import numpy as np

    from dcm.data.cases import Click, ObjectPrompts, atomic_savez, prompts_to_arrays

    image, inside, box, c, _ = make_image(tuple(shape))
    image = np.clip((image.astype(np.float32) + 300.0) / 2.0, 0, 255).astype(np.uint8)
    obj = ObjectPrompts(1, box=box, clicks=[Click(tuple(int(v) for v in c), True)])
    arrays = prompts_to_arrays(image, (0.8, 0.8, 2.5), [obj], clicked=[[True]], prev_pred=inside.astype(np.uint8))
    folder.mkdir(parents=True, exist_ok=True)
    return atomic_savez(folder / "CT_bench_step.npz", compress=False, **arrays)


def run_step(config: str, precision: str, channels_last: bool, onednn: bool, shape, threads: int) -> Dict[str, Any]:
    """One whole ``sh predict.sh`` click step of the local expert (``local_only``) in a fresh process."""
    import shlex
    import tempfile

    from bench_protocol import parse_log  # benchmarks/bench_protocol.py
    from dcm.evaluate import CommandPredictor

    settings = expert_settings(precision, channels_last, onednn, "cpu")
    overrides = ["engine.policy=local_only", "engine.budget.seconds_per_object=1000000"]
    overrides += [f"local_expert.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in settings.items()]
    command = ["sh", str(ROOT / "predict.sh"), "--config", config, "--random-init", "--timings", *overrides]
    if threads > 0:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    with tempfile.TemporaryDirectory(prefix="dcm-bench-step-") as tmp:
        work = Path(tmp)
        write_step_case(work / "inputs", shape)
        (work / "outputs").mkdir()
        seconds, log = CommandPredictor(" ".join(shlex.quote(c) for c in command))(work / "inputs", work)
        if "[exit status" in log or not (work / "outputs" / "CT_bench_step.npz").exists():
            raise RuntimeError(" | ".join(log.strip().splitlines()[-3:]))
    return {"call_s": seconds, **parse_log(log)}


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", nargs="+", default=["full", "small"], choices=["full", "small"])
    ap.add_argument("--device", default="auto", help="cpu | cuda | auto")
    ap.add_argument("--paths", nargs="+", default=None, choices=sorted(PATHS) + ["all"],
                    help="precision / layout paths (default: fp32 on CPU; fp32, bf16 and fp16 on CUDA); "
                         f"all: {' '.join(ALL_PATHS)}")
    ap.add_argument("--onednn", nargs="+", default=["on"], choices=["on", "off"],
                    help="the experts' onednn setting(s): DCM's oneDNN 3D convolutions for CPU float32 or PyTorch's")
    ap.add_argument("--step", action="store_true",
                    help="also time one whole predict.sh click step of the local expert per path")
    ap.add_argument("--step-repeats", type=int, default=1, help="predict.sh calls per path (--stat of them)")
    ap.add_argument("--compile", action="store_true", help="also rows with torch.compile on the encoder")
    ap.add_argument("--repeats", type=int, default=3, help="timings per first / further click and new window")
    ap.add_argument("--stat", default="median", choices=["median", "min"],
                    help="of the repeats (min: the least disturbed run, on a machine shared with other jobs)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the whole list of rows this many times, interleaved in time, and report the --stat "
                         "of each row over the rounds (for a machine shared with other jobs)")
    ap.add_argument("--experts", nargs="+", default=["global", "local"], choices=["global", "local"])
    ap.add_argument("--no-padded", action="store_true", help="skip the padded-attention reference row")
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
    paths = args.paths or (["fp32", "bf16", "fp16"] if device == "cuda" else ["fp32"])
    paths = list(dict.fromkeys(p for name in paths for p in (ALL_PATHS if name == "all" else [name])))
    onednns = [v == "on" for v in dict.fromkeys(args.onednn)]
    compiles = [False, True] if args.compile else [False]
    machine = machine_description() + (f"; {torch.cuda.get_device_name()}" if device == "cuda" else "")
    from dcm.models.precision import cpu_native

    native = cpu_native(torch.bfloat16)[1]
    print(f"machine: {machine}; bfloat16: {native}\nimage: {tuple(args.shape)} int16, device {device}\n", flush=True)

    specs = []
    for expert, model, size, attention, group in ROWS:
        if group not in args.rows or expert not in args.experts or (attention == "padded" and args.no_padded):
            continue
        for name in paths:
            precision, channels_last = PATHS[name]
            for onednn in onednns:
                if attention == "padded" and (precision != "fp32" or channels_last or not onednn):
                    continue  # the reference computation: float32 only
                for comp in compiles:
                    specs.append({"expert": expert, "model": model, "input": size, "attention": attention or "fast",
                                  "precision": precision, "channels_last": channels_last, "onednn": onednn,
                                  "compile": comp, "device": device, "repeats": args.repeats,
                                  "threads": args.threads, "shape": args.shape, "stat": args.stat, "path": name})
    header = f"{'expert':<7}{'model':<20}{'input':<7}{'attn':<7}{'path':<9}{'oneDNN':<7}{'comp':<5}" \
             f"{'set_img s':>10}{'warm-up s':>10}{'first s':>9}{'further s':>10}{'new win s':>10}" \
             f"{'peak MB':>9}{'extra MB':>9}"
    runs: List[List[Dict[str, Any]]] = [[] for _ in specs]
    for k in range(max(args.rounds, 1)):
        if args.rounds > 1:
            print(f"round {k + 1} of {args.rounds}", flush=True)
        print(header, flush=True)
        for spec, measured in zip(specs, runs):  # every row once per round: the rows interleave in time
            label = _label(spec)
            proc = subprocess.run([sys.executable, __file__, "--row", json.dumps(spec)], capture_output=True,
                                  text=True, cwd=str(Path(__file__).parent))
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
            if proc.returncode != 0 or not lines:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                print(f"{label} FAILED: {' | '.join(tail)}", flush=True)
                continue
            out = json.loads(lines[-1][4:])
            measured.append(out)
            print(_row_line(label, out), flush=True)
    results = []
    for spec, measured in zip(specs, runs):
        if not measured:
            continue
        out = {key: _combine([m[key] for m in measured], args.stat) for key in measured[0]}
        results.append({**{k: spec[k] for k in ("expert", "model", "input", "precision", "channels_last", "onednn",
                                                "path")},
                        "attention": spec["attention"] if spec["attention"] == "padded" or spec["expert"] == "global"
                        else "", "compiled": spec["compile"], **out})
    if args.rounds > 1 and results:
        print(f"\n{args.stat} over {args.rounds} rounds:\n{header}")
        for row in results:
            print(_row_line(_label({**row, "compile": row["compiled"]}), row))

    ok = True
    speedups = _speedups(results)
    if speedups:
        print(f"\nspeed-up over fp32 with oneDNN on (same row, same run):\n"
              f"{'expert':<7}{'model':<20}{'attn':<7}{'path':<9}{'oneDNN':<7}{'first':>8}{'further':>9}{'new win':>9}")
        for row, first, further, new_window in speedups:
            print(f"{row['expert']:<7}{row['model']:<20}{row['attention']:<7}{row['path']:<9}"
                  f"{'on' if row['onednn'] else 'off':<7}{first:>7.2f}x{further:>8.2f}x"
                  f"{'' if new_window != new_window else f'{new_window:.2f}x':>9}")
    for row in results:
        if row["compiled"] or row["attention"] == "padded":
            continue
        if (device == "cpu" and row["expert"] == "global" and row["model"] == "sam_med3d_64"
                and row["precision"] == "fp32" and not row["channels_last"] and row["onednn"]):
            for key, limit in TARGETS.items():
                met = row[key] <= limit
                ok &= met
                print(f"target global full-size fp32 {key.replace('_s', '')} <= {limit} s: {row[key]:.3f} s "
                      f"{'met' if met else 'NOT met'}")
    if device == "cpu":
        for expert, model, key, limit in AMP_TARGETS:
            best = [r for r in results
                    if (r["expert"], r["model"], r["precision"], r["compiled"]) == (expert, model, "bf16", False)
                    and r["attention"] != "padded"]
            if best:
                row = min(best, key=lambda r: r[key])
                met = row[key] <= limit
                print(f"target {expert} {model} bf16 {key.replace('_s', '')} <= {limit} s: {row[key]:.3f} s "
                      f"({row['path']}, oneDNN {'on' if row['onednn'] else 'off'}) {'met' if met else 'NOT met'}")

    write_csv(args.csv, COLUMNS, ([device] + [_fmt(row[k]) if isinstance(row[k], float) else row[k]
                                             for k in COLUMNS[3:]] for row in results), args.append, machine)

    if args.step:
        if device != "cpu":
            print("--step: the predict.sh click step is measured on the CPU only")
        else:
            ok &= _steps(args, paths, onednns, machine)
    return 0 if ok else 1


def _label(spec: Dict[str, Any]) -> str:
    attention = spec["attention"] if spec["expert"] == "global" else ""
    return (f"{spec['expert']:<7}{spec['model']:<20}{spec['input']:<7}{attention:<7}{spec['path']:<9}"
            f"{'on' if spec['onednn'] else 'off':<7}{'yes' if spec['compile'] else 'no':<5}")


def _row_line(label: str, out: Dict[str, Any]) -> str:
    return (f"{label}{_fmt(out['set_image_s']):>10}{_fmt(out['warmup_s']):>10}{_fmt(out['first_s']):>9}"
            f"{_fmt(out['further_s']):>10}{_fmt(out['new_window_s']):>10}{out['peak_mb']:>9.0f}{out['extra_mb']:>9.0f}")


def _combine(values: List[float], stat: str) -> float:
    """One value of a row over rounds: the minimum or the median (NaN stays NaN)."""
    values = [v for v in values if v == v]
    if not values:
        return float("nan")
    return min(values) if stat == "min" else statistics.median(values)


def _speedups(results: List[Dict[str, Any]]) -> List[Any]:
    """(row, first, further, new window) speed-ups of each non-reference row over fp32 / oneDNN on."""
    out = []
    for row in results:
        base = [r for r in results if (r["expert"], r["model"], r["attention"], r["compiled"]) ==
                (row["expert"], row["model"], row["attention"], row["compiled"])
                and r["path"] == "fp32" and r["onednn"]]
        if not base or base[0] is row:
            continue
        b = base[0]
        out.append((row, b["first_s"] / row["first_s"], b["further_s"] / row["further_s"],
                    b["new_window_s"] / row["new_window_s"] if row["new_window_s"] == row["new_window_s"]
                    else float("nan")))
    return out


def _steps(args: argparse.Namespace, paths: List[str], onednns: List[bool], machine: str) -> bool:
    """Time one predict.sh click step of the local expert per path (``--step-repeats`` rounds, interleaved);
    print the table and the target."""
    plan = [(STEP_CONFIGS[group], name, onednn) for group in args.rows for name in paths for onednn in onednns]
    calls: Dict[Any, List[Dict[str, float]]] = {key: [] for key in plan}
    head = f"{'config':<11}{'path':<9}{'oneDNN':<7}{'call s':>8}{'imports':>9}{'models':>8}{'predict':>9}"
    print(f"\npredict.sh click step, local expert (local_only), one object, {tuple(args.shape)} uint8, random init:",
          flush=True)
    for k in range(max(args.step_repeats, 1)):
        print(("" if args.step_repeats <= 1 else f"round {k + 1} of {args.step_repeats}\n") + head, flush=True)
        for key in plan:
            config, name, onednn = key
            precision, channels_last = PATHS[name]
            try:
                out = run_step(config, precision, channels_last, onednn, args.shape, args.threads)
            except RuntimeError as e:
                print(f"{config:<11}{name:<9}{'on' if onednn else 'off':<7} FAILED: {e}", flush=True)
                continue
            calls[key].append(out)
            print(f"{config:<11}{name:<9}{'on' if onednn else 'off':<7}{out['call_s']:>8.2f}{out['imports_s']:>9.2f}"
                  f"{out['models_s']:>8.2f}{out['predict_s']:>9.2f}", flush=True)
    rows = []
    for key in plan:
        if not calls[key]:
            continue
        config, name, onednn = key
        precision, channels_last = PATHS[name]
        out = {m: _combine([c[m] for c in calls[key]], args.stat) for m in calls[key][0]}
        rows.append({"config": config, "precision": precision, "channels_last": channels_last, "onednn": onednn,
                     "path": name, **out})
    ok = True
    if args.step_repeats > 1:
        print(f"\n{args.stat} over {args.step_repeats} rounds:")
    print(head + f"{'vs fp32':>9}")
    for row in rows:
        base = [r for r in rows if r["config"] == row["config"] and r["path"] == "fp32" and r["onednn"]]
        row["speedup"] = base[0]["call_s"] / row["call_s"] if base else float("nan")
        speedup = "" if row["speedup"] != row["speedup"] else f"{row['speedup']:.2f}x"
        print(f"{row['config']:<11}{row['path']:<9}{'on' if row['onednn'] else 'off':<7}{row['call_s']:>8.2f}"
              f"{row['imports_s']:>9.2f}{row['models_s']:>8.2f}{row['predict_s']:>9.2f}"
              f"{speedup:>9}")
    best = [r for r in rows if r["config"] == STEP_CONFIGS["full"] and r["precision"] == "bf16"
            and r["speedup"] == r["speedup"]]
    if best:
        row = max(best, key=lambda r: r["speedup"])
        met = row["speedup"] >= STEP_TARGET
        ok &= met
        print(f"target full-size local click step bf16 >= {STEP_TARGET}x fp32: {row['speedup']:.2f}x "
              f"({row['path']}, oneDNN {'on' if row['onednn'] else 'off'}) {'met' if met else 'NOT met'}")
    step_csv = args.csv.with_name(args.csv.stem + "_step" + args.csv.suffix)
    write_csv(step_csv, STEP_COLUMNS, (["cpu"] + [_fmt(r[k]) if isinstance(r[k], float) else r[k]
                                                 for k in STEP_COLUMNS[3:]] for r in rows), args.append, machine)
    return ok


if __name__ == "__main__":
    raise SystemExit(main())
