"""Benchmark the SAM-Med3D-64 image encoder: padded vs fast (exact) windowed attention.

Builds the full-size DCM global-expert encoder (``configs/models/sam_med3d_64.yaml``: ViT-B, 64^3,
patch 8, window 14 -> each windowed block attends over a zero-padded 14^3 window) with random weights
(non-zero relative-position tables and projection biases, so every term of the exact fast path matters),
runs one 64^3 volume through both attention paths and prints seconds per pass, speed-up and the largest
absolute difference of the embeddings. Also times one windowed block alone. Writes a CSV to
``benchmarks/results/bench_global_attention.csv``.

Usage::

    python benchmarks/bench_global_attention.py [--repeats 3] [--padded-repeats 1] [--threads N]

Targets: fast >= 5x faster than padded, max |diff| <= 1e-4 (float32).
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import statistics
import time
from pathlib import Path
from typing import Callable, List

import torch

from machine import cpu_name, machine_description  # benchmarks/machine.py (scripts run from their folder)

from dcm.models import build_sam_med3d, load_model_config

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "benchmarks" / "results" / "bench_global_attention.csv"


def _time(fn: Callable[[], torch.Tensor], repeats: int, warmup: int) -> List[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="timed passes of the fast path (after 1 warm-up)")
    ap.add_argument("--padded-repeats", type=int, default=1, help="timed passes of the padded path")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--csv", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    cfg = load_model_config("sam_med3d_64")
    enc = build_sam_med3d(cfg).image_encoder.eval()
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if "rel_pos" in name:
                p.normal_(0.0, 0.1)
            elif name.endswith("qkv.bias"):
                p.normal_(0.0, 0.1)
            elif name == "pos_embed":
                p.normal_(0.0, 0.02)
    image = torch.randn(1, 1, 64, 64, 64)

    def run(mode: str) -> torch.Tensor:
        enc.attention = mode
        with torch.inference_mode():
            return enc(image)

    print(f"SAM-Med3D-64 encoder (ViT-B 768/12/12, 64^3, patch 8, window 14), float32, "
          f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs: {cpu_name()}", flush=True)
    fast_times = _time(lambda: run("fast"), args.repeats, warmup=1)
    fast_out = run("fast")
    print(f"  fast:   {statistics.median(fast_times):.3f} s/pass ({len(fast_times)} runs)", flush=True)
    padded_runs: List[torch.Tensor] = []
    padded_times = _time(lambda: padded_runs.append(run("padded")), max(args.padded_repeats, 1), warmup=0)
    padded_out = padded_runs[-1]
    print(f"  padded: {statistics.median(padded_times):.3f} s/pass ({len(padded_times)} runs)", flush=True)
    diff = float((fast_out - padded_out).abs().max())
    scale = float(padded_out.abs().max())

    # one windowed block (block 0) alone
    blk = enc.blocks[0]
    with torch.inference_mode():
        x = enc.patch_embed(image) + enc.pos_embed

        def block(mode: str) -> torch.Tensor:
            blk.attention = mode
            with torch.inference_mode():
                return blk(x)

        blk_fast = statistics.median(_time(lambda: block("fast"), max(args.repeats, 3), warmup=1))
        blk_pad = statistics.median(_time(lambda: block("padded"), 1, warmup=0))
        blk_diff = float((block("fast") - block("padded")).abs().max())
    enc.attention = "fast"

    t_pad, t_fast = statistics.median(padded_times), statistics.median(fast_times)
    rows = [
        ("encoder pass", t_pad, t_fast, t_pad / t_fast, diff, scale),
        ("windowed block", blk_pad, blk_fast, blk_pad / blk_fast, blk_diff, float(x.abs().max())),
    ]
    print()
    print(f"{'what':<16}{'padded s':>10}{'fast s':>10}{'speedup':>9}{'max|diff|':>12}{'max|out|':>10}")
    for what, p, f, s, d, m in rows:
        print(f"{what:<16}{p:>10.3f}{f:>10.3f}{s:>8.1f}x{d:>12.2e}{m:>10.2f}")
    ok = rows[0][3] >= 5.0 and diff <= 1e-4
    print(f"\ntarget fast >= 5x and max|diff| <= 1e-4: {'met' if ok else 'NOT met'}")

    args.csv.parent.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().isoformat(timespec="seconds")
    machine = machine_description()
    with open(args.csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["date", "machine", "what", "dtype", "padded_s", "fast_s", "speedup", "max_abs_diff",
                    "max_abs_output"])
        for what, p, fs, s, d, m in rows:
            w.writerow([stamp, machine, what, "float32", f"{p:.4f}", f"{fs:.4f}", f"{s:.2f}", f"{d:.3e}", f"{m:.4f}"])
    print(f"wrote {args.csv.relative_to(ROOT) if args.csv.is_relative_to(ROOT) else args.csv}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
