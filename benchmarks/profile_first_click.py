"""Where the global expert's first click goes: cProfile of one cold-cache ``predict`` of full-size SAM-Med3D-64.

    python benchmarks/profile_first_click.py [--path bf16|fp32] [--threads 2] [--repeats 5] [--top 25]
                                             [--model sam_med3d_64] [--shape 160 256 256]
    python benchmarks/profile_first_click.py --ab-linear --repeats 10
    python benchmarks/profile_first_click.py --ops --repeats 5

Random weights, the CT-like 160 x 256 x 256 image of ``bench_experts.py`` (one ellipsoid and its box; ``--model``
and ``--shape`` choose another model of ``configs/models`` and image size, e.g. the small one for a quick check). Prints
the first-click and encoder-only times (sorted, seconds) and the cProfile table by cumulative time.

``--ab-linear`` (bf16): first clicks alternating between the image encoder's linear layers on weights packed
for oneDNN (:class:`dcm.models.onednn.OneDNNLinear`, the default without AMX) and plain ``F.linear``, in one process, so
that the machine's drift from run to run (often larger than the difference) cancels; prints min and median
of each and whether the two answers are bit for bit equal.

``--ops``: ``torch.profiler`` over ``--repeats`` first clicks instead of cProfile: the operators by self time
per click (ms), each operator and input shape on its own row.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time

import numpy as np
import torch

from bench_experts import expert_settings, make_image  # benchmarks/ (scripts run from their folder)


def ab_linear(expert, obj, prev, repeats: int) -> int:
    """Interleaved first clicks, packed oneDNN linear layers vs plain F.linear (see the module docstring)."""
    from torch import nn

    from dcm.models.onednn import OneDNNLinear, onednn_linear_available, use_onednn_linear

    encoder = expert.backbone.model.image_encoder
    if onednn_linear_available() and expert.backbone.autocast_dtype is not None:
        use_onednn_linear(encoder)  # also where the default leaves them plain (a processor with AMX)
    layers = [m for m in encoder.modules() if isinstance(m, OneDNNLinear)]
    if not layers:
        print("the image encoder has no packed linear layers here (no oneDNN linear kernels, or not bfloat16)")
        return 1
    classes = {"packed oneDNN": OneDNNLinear, "F.linear": nn.Linear}  # the packed weights stay cached
    expert.clear_cache()
    expert.predict(obj, prev)  # untimed: packs every layer's weight once (the one-off cost is not a click's)
    times = {name: [] for name in classes}
    answers = {}
    for _ in range(repeats):
        for name, cls in classes.items():
            for layer in layers:
                layer.__class__ = cls
            expert.clear_cache()
            t0 = time.perf_counter()
            answers[name] = expert.predict(obj, prev).prob
            times[name].append(time.perf_counter() - t0)
    for layer in layers:
        layer.__class__ = OneDNNLinear
    for name, values in times.items():
        values.sort()
        print(f"{name:14s} first click s: min {values[0]:.3f}  median {values[len(values) // 2]:.3f}")
    a, b = answers.values()
    print("answers bit for bit equal:", bool(np.array_equal(a, b)))
    return 0


def ops_table(expert, obj, prev, repeats: int, top: int) -> int:
    """``--ops``: operator self time per first click, by operator and input shapes (see the module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(repeats):
            expert.clear_cache()
            expert.predict(obj, prev)
    rows = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in rows) / repeats / 1e3
    print(f"self CPU time per first click: {total:.1f} ms (profiler overhead included)")
    print(f"{'ms / click':>10}  {'calls':>5}  operator  input shapes")
    for e in rows[:top]:
        print(f"{e.self_cpu_time_total / repeats / 1e3:10.1f}  {e.count // repeats:5d}  {e.key}  {e.input_shapes}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--ab-linear", action="store_true", help="interleaved A/B: packed oneDNN linear vs F.linear")
    parser.add_argument("--ops", action="store_true", help="torch.profiler operator table instead of cProfile")
    parser.add_argument("--model", default="sam_med3d_64", help="global model config (configs/models)")
    parser.add_argument("--shape", type=int, nargs=3, default=[160, 256, 256], metavar=("D", "H", "W"),
                        help="(z, y, x) size of the image")
    args = parser.parse_args(argv)
    if args.ab_linear and args.path != "bf16":
        parser.error("--ab-linear compares bfloat16 paths (--path bf16)")
    from dcm.data.cases import ObjectPrompts
    from dcm.experts.global_roi import GlobalRoIExpert
    from dcm.models import load_model_config

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    image, _, box, _, _ = make_image(tuple(args.shape))
    expert = GlobalRoIExpert.from_config({"model": {**load_model_config(args.model), "attention": "fast"},
                                          "device": "cpu", **expert_settings(args.path, False, True, "cpu")})
    expert.set_image(image, (2.5, 0.8, 0.8))
    print(f"{args.model} on a {tuple(args.shape)} image, {args.path}, {args.threads} threads")
    prev = np.zeros(image.shape, np.uint8)
    obj = ObjectPrompts(label=1, box=box)
    expert.predict(obj, prev)  # warm-up
    if args.ab_linear:
        return ab_linear(expert, obj, prev, args.repeats)
    if args.ops:
        return ops_table(expert, obj, prev, args.repeats, args.top)
    first, encode = [], []
    side = int(expert.backbone.model.image_encoder.img_size)
    x = torch.randn(1, 1, side, side, side)
    for _ in range(args.repeats):
        expert.clear_cache()
        t0 = time.perf_counter()
        expert.predict(obj, prev)
        first.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        expert.backbone.encode(x)
        encode.append(time.perf_counter() - t0)
    print("first click s:", " ".join(f"{v:.3f}" for v in sorted(first)))
    print("encoder alone s:", " ".join(f"{v:.3f}" for v in sorted(encode)))
    expert.clear_cache()
    profile = cProfile.Profile()
    profile.enable()
    expert.predict(obj, prev)
    profile.disable()
    pstats.Stats(profile).sort_stats("cumulative").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
