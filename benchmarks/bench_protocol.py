"""Benchmark the challenge protocol end to end: 6 calls of ``predict.sh`` on one large CT-like case.

Writes one synthetic CT-like case (default 300 x 512 x 512, 10 objects with challenge boxes, uint8 as the
challenge stores it) and evaluates it with ``python -m dcm.evaluate``'s machinery driving ``sh predict.sh``
once per step (box, then 5 clicks), in a fresh process each time, as the organisers count it: start-up,
imports and model loading are inside every call. ``--timings`` of ``inference/predict.py`` splits each call
into imports, model loading, reading the case, predicting and writing the output.

Default model: the small demo presets with the bundled weights (``configs/dcm_small.yaml``). Other configs:
``--config dcm_reduced --random-init`` (random weights), ``--config dcm --weights FILE`` (full size; for a
GPU).

Usage::

    python benchmarks/bench_protocol.py [--shape 300 512 512] [--objects 10] [--config dcm_small]
                                        [--weights FILE] [--random-init] [--threads N] [--append] [key=value ...]

Target (2-core CPU, small presets): at most 5 s per object for the whole protocol (the budget is 90 s).
Results: a table on stdout and ``benchmarks/results/bench_protocol.csv``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

from machine import machine_description, write_csv  # benchmarks/machine.py (scripts run from their folder)

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "benchmarks" / "results" / "bench_protocol.csv"
COLUMNS = ["date", "machine", "config", "shape", "objects", "step", "call_s", "imports_s", "models_s", "read_s",
           "predict_s", "write_s", "dsc"]
TARGET_S_PER_OBJECT = 5.0
_TIMING = re.compile(r"timing start-up: imports ([\d.]+) s, models ([\d.]+) s")
_CASE = re.compile(r"timing \S+: read ([\d.]+) s, predict ([\d.]+) s, write ([\d.]+) s")


def write_case(folder: Path, shape, objects: int, seed: int) -> Path:
    """One CT-like case with exactly ``objects`` objects and boxes (seeds tried in turn until none vanished)."""
    from dcm.data.cases import atomic_savez
    from dcm.data.synthetic import generate_case

    for attempt in range(20):
        arrays = generate_case("CT", seed + attempt, shape=shape, n_objects=objects, with_tube=False)
        if int(arrays["gts"].max()) == objects and "boxes" in arrays:
            return atomic_savez(folder / "CT_benchmark_0001.npz", **arrays)
    raise SystemExit(f"could not draw a case with {objects} separate objects in {tuple(shape)}")


def parse_log(log: str) -> Dict[str, float]:
    """The ``--timings`` lines of one call."""
    out = {k: float("nan") for k in ("imports_s", "models_s", "read_s", "predict_s", "write_s")}
    m = _TIMING.search(log)
    if m:
        out["imports_s"], out["models_s"] = float(m.group(1)), float(m.group(2))
    m = _CASE.search(log)
    if m:
        out["read_s"], out["predict_s"], out["write_s"] = (float(g) for g in m.groups())
    return out


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[300, 512, 512], metavar=("Z", "Y", "X"))
    ap.add_argument("--objects", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", default="dcm_small", help="DCM config (name in configs/ or path)")
    ap.add_argument("--weights", default=None, help="combined checkpoint (default: the config's)")
    ap.add_argument("--random-init", action="store_true", help="random weights (no checkpoint)")
    ap.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of the predict.sh calls (0: default)")
    ap.add_argument("--csv", type=Path, default=RESULTS)
    ap.add_argument("--append", action="store_true", help="append to the CSV instead of replacing it")
    ap.add_argument("overrides", nargs="*", help="config overrides key=value, passed to predict.sh")
    args = ap.parse_args(argv)

    import shlex

    from dcm.data.cases import load_case
    from dcm.evaluate import CommandPredictor, evaluate_case

    command = ["sh", str(ROOT / "predict.sh"), "--config", args.config, "--timings"]
    if args.weights:
        command += ["--weights", str(Path(args.weights).resolve())]
    if args.random_init:
        command.append("--random-init")
    command += list(args.overrides)
    if args.threads > 0:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    machine = machine_description()
    logs: List[str] = []
    runner = CommandPredictor(" ".join(shlex.quote(c) for c in command))

    def run_step(case_file: Path, workdir: Path):
        seconds, log = runner(case_file, workdir)
        logs.append(log)
        print(f"  step {len(logs)}: {seconds:.1f} s", flush=True)
        return seconds, log

    with tempfile.TemporaryDirectory(prefix="dcm-bench-protocol-") as tmp:
        tmp_path = Path(tmp)
        t0 = time.perf_counter()
        path = write_case(tmp_path / "cases", args.shape, args.objects, args.seed)
        print(f"case: {path.name}, {tuple(args.shape)} uint8, {args.objects} objects with boxes "
              f"({time.perf_counter() - t0:.0f} s to generate)", flush=True)
        print(f"command per step: {' '.join(command)}", flush=True)
        case = load_case(path, strict=True)
        work = tmp_path / "work"
        work.mkdir()
        result = evaluate_case(case, run_step, work, "stored", None)

    failed = [i + 1 for i, log in enumerate(logs) if "[exit status" in log or "[timed out" in log]
    for i in failed:
        print(f"step {i} failed:\n{logs[i - 1][-2000:]}", file=sys.stderr)
    rows = []
    for i, (seconds, log) in enumerate(zip(result.seconds, logs)):
        rows.append({"step": i + 1, "call_s": seconds, **parse_log(log), "dsc": result.dsc[i]})
    total = result.total_seconds
    per_object = total / args.objects

    print(f"\nmachine: {machine}\nconfig: {args.config}{' (random init)' if args.random_init else ''}; "
          f"{tuple(args.shape)}, {args.objects} objects\n")
    print(f"{'step':<6}{'call s':>8}{'imports':>9}{'models':>8}{'read':>7}{'predict':>9}{'write':>7}{'DSC':>7}")
    for r in rows:
        print(f"{r['step']:<6}{r['call_s']:>8.2f}{r['imports_s']:>9.2f}{r['models_s']:>8.2f}{r['read_s']:>7.2f}"
              f"{r['predict_s']:>9.2f}{r['write_s']:>7.2f}{r['dsc']:>7.3f}")
    print(f"\ntotal {total:.1f} s for {args.objects} objects: {per_object:.2f} s per object "
          f"(challenge budget 90 s per object; {result.runtime_upperbound:.0f} s for this case)")
    ok = not failed and per_object <= TARGET_S_PER_OBJECT
    print(f"target <= {TARGET_S_PER_OBJECT} s per object (small presets): {'met' if ok else 'NOT met'}")

    config = args.config + (" (random init)" if args.random_init else "")
    write_csv(args.csv, COLUMNS, ([config, "x".join(map(str, args.shape)), args.objects, r["step"]]
                                  + [f"{r.get(k, float('nan')):.3f}" for k in COLUMNS[6:]]
                                  for r in rows + [{"step": "total", "call_s": total, "dsc": result.dsc[-1]}]),
              args.append)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
