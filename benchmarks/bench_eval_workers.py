"""Benchmark the evaluator on 1 vs 2 (or more) workers: cases per minute and speed-up.

Writes ``--cases`` synthetic cases (CT, MR, Microscopy, ... in turn) and runs ``python -m dcm.evaluate``'s
whole 6-step protocol over them with the in-process DCM predictor (``--predictor dcm``; default the small
presets with the bundled weights, ``configs/dcm_small.yaml``) once per worker count: ``--workers 1`` in
this process, more as spawned local processes (``dcm.evaluate.parallel``), each with the CPUs shared evenly. The wall
time counts everything a user waits for, worker start-up and model loading included. Each run's
``metrics.csv`` must equal the 1-worker run's apart from the time columns (checked, and printed).

Usage::

    python benchmarks/bench_eval_workers.py [--cases 8] [--shape 32 64 64] [--config dcm_small]
                                            [--weights FILE] [--random-init] [--workers 1 2] [--append]

Results: a table on stdout and ``benchmarks/results/bench_eval_workers.csv``. Run it on a quiet machine:
on a shared, busy one the speed-up says more about the neighbours than about the evaluator.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Sequence

from machine import machine_description, write_csv  # benchmarks/machine.py (scripts run from their folder)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "bench_eval_workers.csv"
COLUMNS = ["date", "machine", "config", "cases", "shape", "workers", "threads_per_worker", "seconds",
           "cases_per_minute", "speed_up", "same_metrics"]
FLAVOURS = ("CT", "MR", "Microscopy", "PET", "US")


def write_cases(folder: Path, count: int, shape: Sequence[int], seed: int) -> None:
    """``count`` synthetic cases with ground truth, flavours in turn."""
    from dcm.data.cases import atomic_savez
    from dcm.data.synthetic import generate_case

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        flavour = FLAVOURS[i % len(FLAVOURS)]
        arrays = generate_case(flavour, seed=seed + i, shape=tuple(shape), max_objects=3)
        atomic_savez(folder / f"{flavour}_bench_{i:03d}.npz", **arrays)


def untimed_metrics(out: Path) -> List[Dict[str, str]]:
    """``metrics.csv`` without its time columns."""
    with open(out / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if "Time" not in k} for row in csv.DictReader(f)]


def main(argv: Sequence[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--shape", type=int, nargs=3, default=[32, 64, 64])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", default="dcm_small")
    ap.add_argument("--weights")
    ap.add_argument("--random-init", action="store_true")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--csv", type=Path, default=RESULTS)
    ap.add_argument("--append", action="store_true")
    args = ap.parse_args(argv)

    from dcm.evaluate import main as evaluate_main
    from dcm.evaluate.parallel import cpu_count, default_threads

    machine = machine_description()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    predictor = ["--predictor", "dcm", "--config", args.config]
    predictor += ["--weights", args.weights] if args.weights else []
    predictor += ["--random-init"] if args.random_init else []
    rows = []
    with tempfile.TemporaryDirectory(prefix="dcm-bench-eval-workers-") as tmp:
        cases = Path(tmp) / "cases"
        write_cases(cases, args.cases, args.shape, args.seed)
        reference = None
        base_seconds = None
        for workers in args.workers:
            out = Path(tmp) / f"out_{workers}"
            threads = default_threads(workers)
            print(f"{workers} worker(s), {threads} thread(s) each ...", flush=True)
            start = time.perf_counter()
            code = evaluate_main(["--cases", str(cases), "--out", str(out), *predictor, "--workers", str(workers),
                                  "--threads", str(threads), "--no-progress"])
            seconds = time.perf_counter() - start
            if code not in (0, 1):
                print(f"evaluate failed (exit status {code})", file=sys.stderr)
                return code
            metrics = untimed_metrics(out)
            reference = metrics if reference is None else reference
            base_seconds = seconds if base_seconds is None else base_seconds
            rows.append({"workers": workers, "threads": threads, "seconds": seconds,
                         "per_minute": 60.0 * args.cases / seconds, "speed_up": base_seconds / seconds,
                         "same": metrics == reference})

    config = args.config + (" (random init)" if args.random_init else "")
    print(f"\nmachine: {machine}; {cpu_count()} CPUs usable; load average {load:.1f} at start")
    print(f"config: {config}; {args.cases} cases of {tuple(args.shape)}; whole 6-step protocol per case\n")
    print(f"{'workers':>8}{'threads':>9}{'seconds':>9}{'cases/min':>11}{'speed-up':>10}  same metrics.csv")
    for r in rows:
        print(f"{r['workers']:>8}{r['threads']:>9}{r['seconds']:>9.1f}{r['per_minute']:>11.2f}{r['speed_up']:>10.2f}"
              f"  {'yes' if r['same'] else 'NO'}")
    write_csv(args.csv, COLUMNS, ([config, args.cases, "x".join(map(str, args.shape)), r["workers"], r["threads"],
                                   f"{r['seconds']:.2f}", f"{r['per_minute']:.3f}", f"{r['speed_up']:.3f}",
                                   r["same"]] for r in rows), append=args.append, machine=machine)
    return 0 if all(r["same"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
