"""Benchmark VISTA3D's point head per further click, component by component: MONAI's ``PointMappingSAM.forward``
(before) against DCM's :class:`dcm.models.vista3d.FastPointHead` (after).

A further click in the same local window: the image encoder's output is cached, so the click costs the point
head (and pasting its logits back). Random weights and a random encoder output (the cost does not depend on
their values); the window's prompts are ``--clicks`` clicks, positive and negative.

* before: MONAI's forward taken apart (the same calls, timed one by one; their output is checked to be MONAI's
  bit for bit), and the forward itself;
* after: the per-click part of ``FastPointHead`` (``point_head: fast``, the local expert's default) step by
  step, and the call itself; ``prepare`` (once per window, with the encoder) on its own row; the largest
  difference to MONAI's logits, relative to their largest magnitude;
* both: pasting the logits back (sigmoid, padding cut, to NumPy) and the whole further click through
  ``LocalRoIExpert.predict`` with the window's encoder output already cached (``point_head``: ``monai``;
  ``cached``: MONAI's code on the cached part, bit-equal; ``fast``).

Each time is the median of ``--repeats`` runs: wall-clock seconds, or with ``--clock cpu`` the process's CPU
seconds (all its threads together; with ``--threads 1`` the work itself, hardly changed by other jobs on the
machine). Wall-clock timings depend on what else runs: the load average is printed before and after.

Usage::

    python benchmarks/bench_point_head.py [--model vista3d132] [--window 128] [--threads 2] [--repeats 3]
                                          [--clicks 3] [--clock wall|cpu] [--csv PATH] [--append]

Target (2-core CPU, fp32, 2 threads, vista3d132 at 128^3): a further click <= 3 s.
Results: a table on stdout and ``benchmarks/results/bench_point_head.csv``.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

from machine import machine_description, write_csv  # benchmarks/machine.py (scripts run from their folder)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "bench_point_head.csv"
COLUMNS = ["date", "machine", "model", "window", "clicks", "clock", "component", "monai_s", "fast_s", "note"]
TARGET_S = 3.0

#: The clock every time is read from (``--clock``): wall-clock or this process's CPU time.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter


def _median_time(fn: Callable[[], object], repeats: int) -> Tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = clock()
        out = fn()
        times.append(clock() - t0)
    return statistics.median(times), out


def _timed(times: Dict[str, List[float]], name: str, fn):
    """``fn()``, its duration appended to ``times[name]``."""
    t0 = clock()
    out = fn()
    times.setdefault(name, []).append(clock() - t0)
    return out


def monai_breakdown(ph, embedding, coords, labels, repeats: int) -> Tuple[Dict[str, float], object]:
    """``PointMappingSAM.forward`` (one prompt, ``class_vector=None``) as MONAI 1.4-1.6 writes it, each part timed."""
    import torch

    t: Dict[str, List[float]] = {}

    step = functools.partial(_timed, t)

    out = None
    for _ in range(repeats):
        out_low = step("features", lambda: ph.feat_downsample(embedding))
        out_shape = tuple(embedding.shape[-3:])
        pe = step("dense_pe", lambda: torch.repeat_interleave(ph.pe_layer(out_low.shape[-3:]).unsqueeze(0), 1, dim=0))

        def tokens():
            pts = ph.pe_layer.forward_with_coords(coords + 0.5, out_shape)
            pts[labels == 0] += ph.point_embeddings[0].weight
            pts[labels == 1] += ph.point_embeddings[1].weight
            return torch.cat((ph.mask_tokens.weight[None], pts, ph.supported_embed.weight[None]), dim=1)

        tok = step("tokens", tokens)
        tr = ph.transformer
        src = torch.repeat_interleave(out_low, 1, dim=0)
        b, c, h, w, d = src.shape
        keys, key_pe = src.flatten(2).permute(0, 2, 1), pe.flatten(2).permute(0, 2, 1)
        queries = tok
        for i, layer in enumerate(tr.layers):
            queries, keys = step(f"block{i}", lambda: layer(queries=queries, keys=keys, query_pe=tok, key_pe=key_pe))

        def final():
            attn = tr.final_attn_token_to_image(q=queries + tok, k=keys + key_pe, v=keys)
            return ph.output_hypernetworks_mlps(tr.norm_final_attn(queries + attn)[:, :1, :])

        hyper = step("final", final)
        up = ph.output_upscaling
        y = step("convt", lambda: up[0](keys.transpose(1, 2).view(b, c, h, w, d)))
        y = step("norm_gelu", lambda: up[2](up[1](y)))
        y = step("conv", lambda: up[3](y))
        _, c2, zz, yy, xx = y.shape
        out = step("product", lambda: (hyper @ y.view(1, c2, -1)).view(-1, 1, zz, yy, xx))
        del y, out_low, pe, src, keys, key_pe
    return {k: statistics.median(v) for k, v in t.items()}, out


def fast_breakdown(head, state, coords, labels, repeats: int) -> Dict[str, float]:
    """The per-click part of ``FastPointHead.__call__`` (``exact=False``), each part timed."""
    from dcm.models.vista3d import instance_norm_gelu_, folded_conv, upscaling_convt

    ph = head.point_head
    t: Dict[str, List[float]] = {}

    step = functools.partial(_timed, t)

    for _ in range(repeats):
        tok = step("tokens", lambda: head.tokens(coords, labels, state.out_shape))
        queries, keys = tok, state.keys
        for i in range(len(ph.transformer.layers)):
            queries, keys = step(f"block{i}", lambda: head.block(i, state, queries, keys, tok))
        hyper = step("final", lambda: ph.output_hypernetworks_mlps(
            head.final_attention(state, queries, keys, tok)[:, :1, :]))
        h, w, d = state.grid
        src = keys.transpose(1, 2).view(1, keys.shape[-1], h, w, d)
        y = step("convt", lambda: upscaling_convt(ph.output_upscaling[0], src))
        flat = y.permute(0, 2, 3, 4, 1).reshape(-1, y.shape[1])
        step("norm_gelu", lambda: instance_norm_gelu_(flat, ph.output_upscaling[1]))
        step("conv", lambda: folded_conv(ph.output_upscaling[3], flat, tuple(y.shape[-3:]), hyper))
        del y, flat
    return {k: statistics.median(v) for k, v in t.items()}


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="vista3d132", help="VISTA3D preset (configs/models) or YAML path")
    ap.add_argument("--window", type=int, default=128, help="cubic window side (the local expert's frame)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (0: torch default)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--clicks", type=int, default=3, help="clicks in the window (alternately positive, negative)")
    ap.add_argument("--clock", default="wall", choices=sorted(CLOCKS), help="wall-clock or process CPU time")
    ap.add_argument("--csv", type=Path, default=RESULTS)
    ap.add_argument("--append", action="store_true", help="append to the CSV instead of replacing it")
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from dcm.data.cases import Click, ObjectPrompts
    from dcm.experts.local_roi import LocalRoIExpert
    from dcm.models.vista3d import FastPointHead, build_vista3d, load_vista3d_config

    global clock
    clock = CLOCKS[args.clock]
    unit = "s" if args.clock == "wall" else "CPU s"
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_vista3d(load_vista3d_config(args.model)).eval()
    ph = model.point_head
    c = ph.feat_downsample[0].in_channels
    n = args.window
    machine = machine_description()
    print(f"machine: {machine}\nmodel {args.model}, window {n}^3, {args.clicks} clicks, {args.clock} clock; "
          f"load average before: {os.getloadavg()[0]:.2f}\n", flush=True)

    rng = np.random.default_rng(0)
    zyx = [(int(n // 2), int(n // 2), int(n // 2))] + [tuple(int(v) for v in rng.integers(0, n, 3))
                                                        for _ in range(args.clicks - 1)]
    labels_np = np.array([1 - k % 2 for k in range(args.clicks)])
    coords = torch.tensor([zyx], dtype=torch.float32)
    labels = torch.as_tensor(labels_np)[None]
    embedding = torch.randn((1, c, n, n, n), generator=torch.Generator().manual_seed(1))

    with torch.inference_mode():
        ref = ph(embedding, coords, labels)  # warm-up, and the reference
        before, ours = monai_breakdown(ph, embedding, coords, labels, args.repeats)
        assert torch.equal(ours, ref), "the timed parts of MONAI's forward do not give its output"
        before["call"], _ = _median_time(lambda: ph(embedding, coords, labels), args.repeats)

        head = FastPointHead(ph)
        prepare_s, state = _median_time(lambda: head.prepare(embedding), args.repeats)
        head(state, coords, labels)  # warm-up
        after = fast_breakdown(head, state, coords, labels, args.repeats)

        def fresh_call():
            state.last = None
            return head(state, coords, labels)

        after["call"], fast = _median_time(fresh_call, args.repeats)
        rel_diff = float((fast - ref).abs().max() / ref.abs().max())
        exact = FastPointHead(ph, exact=True)
        state.last = None
        bit_equal = torch.equal(exact(state, coords, labels), ref)

    # Pasting back and the whole further click through the local expert (its window's encoder output cached).
    image = rng.normal(0.0, 1.0, size=(n, n, n)).astype(np.float32)  # one window, wherever the click
    expert = LocalRoIExpert(model, {"window_size": n, "reuse_window_margin": 0})
    expert.set_image(image)
    obj = ObjectPrompts(label=1, clicks=[Click(p, bool(lab)) for p, lab in zip(zyx, labels_np)])
    window = expert.window_of(obj)
    paste_s, _ = _median_time(lambda: window.paste(ref[0, 0], image.shape), args.repeats)
    further: Dict[str, float] = {}
    for mode in ("monai", "cached", "fast"):
        expert.backbone.set_point_head(mode)
        expert.clear_cache()
        with torch.inference_mode():
            expert.embeddings.put(window.key,
                                  embedding if mode == "monai" else expert.backbone.fast_head.prepare(embedding))
        runs, times = expert.encoder_runs, []
        for k in range(args.repeats + 1):  # a new click each time (the same prompts again would cost nothing)
            p = (n // 2 + 8, n // 2 - 8 + k, n // 2 + k)
            obj.clicks.append(Click(p, k % 2 == 0))
            t0 = clock()
            expert.predict(obj)
            times.append(clock() - t0)
            obj.clicks.pop()
        further[mode] = statistics.median(times[1:])
        assert expert.encoder_runs == runs  # the primed encoder output was used
    del expert

    names = [
        ("features", "image features: feat_downsample", "fast: once per window"),
        ("dense_pe", "dense positional encoding", "fast: once per window"),
        ("tokens", "prompt tokens", ""),
        ("block0", "two-way block 0", "fast: image-side projections once per window; image -> token attention "
                                      "folded (softmax along the long axis, value and output projections merged)"),
        ("block1", "two-way block 1", "fast: both attentions folded, the image tokens never projected"),
        ("final", "final attention + hypernetwork MLP", "fast: folded, the mask token only"),
        ("convt", f"ConvTranspose3d {c}->{c} to {n}^3", "fast: channels-last oneDNN, same values"),
        ("norm_gelu", "InstanceNorm + GELU", "fast: in place"),
        ("conv", f"Conv3d {c}->{c} at {n}^3 (+ mask product)", f"fast: folded with the hypernetwork vector, {c}->1"),
    ]
    rows = []
    for key, label, note in names:
        rows.append((label, before.get(key, 0.0) + (before["product"] if key == "conv" else 0.0),
                     after.get(key, 0.0), note))
    rows.append(("sum of the parts", sum(r[1] for r in rows), sum(r[2] for r in rows), ""))
    rows.append(("point head call, measured", before["call"], after["call"],
                 f"largest difference to MONAI: {rel_diff:.1e} of the largest logit; "
                 f"cached mode bit-equal: {bit_equal}"))
    rows.append(("paste (sigmoid, crop, to NumPy)", paste_s, paste_s, "unchanged"))
    rows.append(("further click, LocalRoIExpert.predict", further["monai"], further["fast"],
                 f"point_head: cached (bit-equal): {further['cached']:.2f} {unit}"))
    state_mb = state.nbytes() / 2**20
    rows.append(("once per window: prepare", 0.0, prepare_s,
                 f"cached per window: {state_mb:.1f} MB instead of the encoder output's "
                 f"{embedding.numel() * 4 / 2**20:.1f} MB"))

    from dcm.tables import markdown_table

    print(markdown_table(["component", f"MONAI {unit}", f"DCM fast {unit}", "note"],
                         [(label, f"{b:.3f}", f"{a:.3f}", note) for label, b, a, note in rows]))
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    met = further["fast"] <= TARGET_S
    if load_vista3d_config(args.model).get("variant") == "full" and n == 128 and args.clock == "wall":
        print(f"target further click <= {TARGET_S} s: {further['fast']:.2f} s {'met' if met else 'NOT met'}")
    write_csv(args.csv, COLUMNS, ([args.model, n, args.clicks, args.clock, label, f"{b:.4f}", f"{a:.4f}", note]
                                  for label, b, a, note in rows), args.append, machine)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
