"""Benchmark training throughput of both experts' reduced configs: 1 vs N processes with torchrun.

Makes a small synthetic training set (default 12 cases of 32 x 64 x 64; the global expert's 64^3 crops are
preprocessed from it), then for each expert and each process count runs

    torchrun --standalone --nproc_per_node=P train_<expert>/train.py --config configs/train_<expert>_reduced.yaml
             ... +train.max_steps=S

with ``OMP_NUM_THREADS`` = CPUs / P (so every run uses the whole machine), and reads the trainer's
``summary.json``: samples per second over the whole run and after the first optimizer step (``steady``).
With P processes the per-process batch stays that of the config, so a step trains P times more samples.

Usage::

    python benchmarks/bench_training.py [--procs 1 2] [--steps 12] [--experts global local] [--append]

Results: a table on stdout and ``benchmarks/results/bench_training.csv``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List

from machine import machine_description, write_csv  # benchmarks/machine.py (scripts run from their folder)

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "benchmarks" / "results" / "bench_training.csv"
COLUMNS = ["date", "machine", "expert", "config", "procs", "threads_per_proc", "steps", "samples_per_step",
           "wall_s", "samples_per_s", "steady_samples_per_s", "speedup_vs_1"]
CONFIGS = {"global": "configs/train_global_roi_reduced.yaml", "local": "configs/train_local_roi_reduced.yaml"}


def prepare_data(tmp: Path, cases: int, shape: List[int]) -> dict:
    """Synthetic cases (local expert) and their 64^3 object crops (global expert)."""
    from dcm.data.synthetic import generate_dataset

    cases_dir = tmp / "cases"
    generate_dataset(cases_dir, cases, seed=7, shape=shape, max_objects=4, progress=False)
    crops = tmp / "crops"
    subprocess.run([sys.executable, str(ROOT / "train_global_roi" / "preprocess.py"), "--cases", str(cases_dir),
                    "--out", str(crops), "--workers", "1", "--no-progress"], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    return {"local": cases_dir, "global": crops}


def run(expert: str, procs: int, threads: int, steps: int, data_dir: Path, work: Path) -> dict:
    from dcm.config import load_config

    cfg = load_config(str(ROOT / CONFIGS[expert]))
    batch = int(cfg["train"].get("batch_size", 1)) * int(cfg["train"].get("accumulation_steps", 1))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
           str(ROOT / f"train_{expert}_roi" / "train.py"), "--config", CONFIGS[expert],
           f"data.data_dir={data_dir}", f"train.work_dir={work}", "train.epochs=1000", "train.device=cpu",
           "train.num_workers=0", "train.checkpoint_every_steps=0", "train.figure_every_epochs=0",
           f"+train.max_steps={steps}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{expert} with {procs} processes failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((work / "summary.json").read_text())
    return {"steps": summary["steps"], "samples_per_step": batch * procs, "wall_s": wall,
            "samples_per_s": summary["samples_per_second"],
            "steady_samples_per_s": summary.get("steady_samples_per_second") or float("nan")}


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    ap.add_argument("--experts", nargs="+", default=["global", "local"], choices=["global", "local"])
    ap.add_argument("--cases", type=int, default=12)
    ap.add_argument("--shape", type=int, nargs=3, default=[32, 64, 64], metavar=("Z", "Y", "X"))
    ap.add_argument("--csv", type=Path, default=RESULTS)
    ap.add_argument("--append", action="store_true", help="append to the CSV instead of replacing it")
    args = ap.parse_args(argv)

    cpus = os.cpu_count() or 1
    machine = machine_description()
    rows = []
    with tempfile.TemporaryDirectory(prefix="dcm-bench-training-") as tmp:
        data = prepare_data(Path(tmp), args.cases, args.shape)
        print(f"machine: {machine}\ndata: {args.cases} synthetic cases {tuple(args.shape)}; "
              f"{args.steps} steps per run\n")
        print(f"{'expert':<8}{'procs':>6}{'threads':>8}{'samples/step':>13}{'wall s':>8}{'samples/s':>10}"
              f"{'steady':>8}{'speedup':>9}")
        for expert in args.experts:
            base = None
            for procs in args.procs:
                threads = max(cpus // procs, 1)
                out = run(expert, procs, threads, args.steps, data[expert], Path(tmp) / f"work_{expert}_{procs}")
                steady = out["steady_samples_per_s"]
                base = steady if base is None else base
                row = {"expert": expert, "config": CONFIGS[expert], "procs": procs, "threads_per_proc": threads,
                       **out, "speedup_vs_1": steady / base if base else float("nan")}
                rows.append(row)
                print(f"{expert:<8}{procs:>6}{threads:>8}{out['samples_per_step']:>13}{out['wall_s']:>8.1f}"
                      f"{out['samples_per_s']:>10.2f}{steady:>8.2f}{row['speedup_vs_1']:>8.2f}x", flush=True)

    write_csv(args.csv, COLUMNS, ([f"{r[k]:.4g}" if isinstance(r[k], float) else r[k] for k in COLUMNS[2:]]
                                  for r in rows), args.append)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
