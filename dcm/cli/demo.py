"""The main job out of the box: the bundled small experts on fresh cases, in one command.

    python -m dcm.demo                 # ~3 min on a 2-core CPU; writes runs/demo/ and figs/demo.png
    python -m dcm.demo --cases 1 --no-mri --out runs/demo_quick

What it does:

1. generates fresh synthetic cases of all five flavours (``--cases`` per flavour, seed ``--seed``, not the
   training seed) and, unless ``--no-mri``, one real MRI case: the superior slab of the MNI152 2009a T1
   template at 2 mm with its grey / white matter maps thresholded at 0.5 (labels 1 = GM, 2 = WM), read from
   the installed ``nilearn`` package (located without importing it; skipped with one line when absent);
2. builds the experts of ``--config`` (default ``configs/dcm_small.yaml``, weights ``weights/dcm_small.pt``)
   once and runs the challenge protocol (box, then 5 clicks) in-process with :mod:`dcm.evaluate` for the
   DCM ``dual`` policy and each single expert (``global_only``, ``local_only``), reusing the experts;
3. prints each policy's per-modality table (DSC / NSD AUC and Final) and a comparison, and writes
   ``<out>/<policy>/`` (the evaluator's files, ``all_segs/``), ``<out>/comparison.md`` and the figure
   (``--figure``, default ``figs/demo.png``): for a few objects, the axial slice through the last click with
   the image, the ground truth and the DCM prediction with its clicks after steps 1, 3 and 6, and the mean
   DSC per step of the three policies.

The bundled weights are for demonstration only (see ``weights/README.md``), not for clinical use.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from dcm.data.nifti import NILEARN_REQUIREMENT, find_mni_files
from dcm.regions import mask_bbox

__all__ = ["find_mni_files", "mni_volume", "write_mni_cases", "MNI_TRAIN_CROPS", "MNI_DEMO_CROPS",
           "run_demo", "main"]

POLICIES = ("dual", "global_only", "local_only")
#: the training cases used seed 100 (weights/README.md); the demo draws from another stream.
DEFAULT_SEED = 2026
DEFAULT_SHAPE = (48, 96, 96)


def _block_mean(a: np.ndarray, f: int) -> np.ndarray:
    z, y, x = (s // f * f for s in a.shape)
    a = a[:z, :y, :x].astype(np.float32)
    return a.reshape(z // f, f, y // f, f, x // f, f).mean(axis=(1, 3, 5))


def mni_volume(files: Dict[str, Path], factor: int = 2) -> Tuple[np.ndarray, np.ndarray, Tuple[float, float, float]]:
    """The template downsampled ``factor`` x (block mean; 2 -> 2 mm) and cropped to the brain:
    ``(T1 float32 (z, y, x), labels uint8 (1 = grey matter, 2 = white matter; probability > 0.5),
    spacing_xyz)``."""
    from dcm.data.nifti import read_nifti

    t1, geometry = read_nifti(files["t1"])
    gm, _ = read_nifti(files["gm"])
    wm, _ = read_nifti(files["wm"])
    scale = 1.0 if max(float(gm.max()), float(wm.max())) <= 1.0 else 255.0  # maps stored 0..1 or 0..255
    gm_p, wm_p = _block_mean(gm, factor) / scale, _block_mean(wm, factor) / scale
    labels = np.zeros(gm_p.shape, dtype=np.uint8)
    labels[gm_p > 0.5] = 1
    labels[wm_p > 0.5] = 2
    image = _block_mean(t1, factor)
    sl = mask_bbox(labels > 0, margin=2)
    spacing_xyz = tuple(float(s) * factor for s in geometry.spacing_xyz)
    return image[sl], labels[sl], spacing_xyz


#: (z, y, x) crops of the 2 mm brain volume (79 x 94 x 76): training uses the inferior part (z < 50),
#: the demo the superior slab (z >= 45), so the demo case is mostly anatomy the experts never saw.
MNI_TRAIN_CROPS = {
    "MR_mni_train_z00": (slice(0, 36), slice(None), slice(None)),
    "MR_mni_train_z07": (slice(7, 43), slice(None), slice(None)),
    "MR_mni_train_z14": (slice(14, 50), slice(None), slice(None)),
    "MR_mni_train_ant": (slice(0, 50), slice(0, 56), slice(None)),
    "MR_mni_train_post": (slice(0, 50), slice(38, None), slice(None)),
}
MNI_DEMO_CROPS = {"MR_mni_demo_superior": (slice(45, None), slice(None), slice(None))}


def write_mni_cases(out_dir, crops=None, files: Optional[Dict[str, Path]] = None) -> List[Path]:
    """Write MNI152 crops (T1; labels 1 = GM, 2 = WM) as challenge cases with :func:`dcm.data.convert.convert_arrays`
    (MR percentile mapping, organisers' boxes). Returns the written files; [] when nilearn is absent."""
    from dcm.data.cases import atomic_savez
    from dcm.data.convert import Intensity, convert_arrays

    files = files or find_mni_files()
    if files is None:
        return []
    image, labels, spacing_xyz = mni_volume(files)
    out = []
    for name, sl in (crops or MNI_DEMO_CROPS).items():
        arrays, _ = convert_arrays(image[sl], labels[sl], spacing_xyz, Intensity.for_modality("MR"), boxes=True,
                                   where=name)
        out.append(atomic_savez(Path(out_dir) / f"{name}.npz", **arrays))
    return out


# ---------------------------------------------------------------------------------------------- running


def make_cases(out_dir: Path, cases_per_flavour: int, seed: int, shape: Sequence[int], flavours: Sequence[str],
               mri: bool, progress: bool = False) -> List[Path]:
    """Fresh synthetic cases (``cases_per_flavour`` of each flavour) plus, when ``mri``, the MNI152 demo case."""
    from dcm.data.synthetic import generate_dataset

    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.npz"):
        old.unlink()
    paths = generate_dataset(out_dir, cases_per_flavour * len(flavours), seed=seed, shape=tuple(shape),
                             flavours=flavours, progress=progress)
    if mri:
        files = find_mni_files()
        if files is None:
            print(f"MRI case skipped: nilearn is not installed (pip install {NILEARN_REQUIREMENT}; "
                  "only its bundled MNI152 template is read)")
        else:
            paths += write_mni_cases(out_dir, MNI_DEMO_CROPS, files)
    return paths


def _step_means(rows: Sequence[Dict[str, Any]], metric: str = "DSC") -> np.ndarray:
    return np.array([[float(r[f"{metric}_{s}"]) for s in range(1, 7)] for r in rows]).mean(axis=0)


def run_demo(cases_dir: Path, out_dir: Path, config: str, weights: Optional[str] = None,
             policies: Sequence[str] = POLICIES, random_init: bool = False, progress: bool = True,
             overrides: Sequence[str] = ()) -> Dict[str, Dict[str, Any]]:
    """Evaluate every policy on ``cases_dir`` with one set of built experts.

    Returns:
        ``{policy: {"rows": metric rows, "summary": per-modality summary, "failures": [...], "seconds": s}}``.
    """
    from dcm.config import apply_overrides, load_config, resolve_repo_path
    from dcm.engine.predictor import DCMPredictor
    from dcm.evaluate import InProcessPredictor, evaluate_folder, summarise
    from dcm.experts import build_experts
    from dcm.experts.base import policy_roles

    cfg = load_config(str(resolve_repo_path(config)), overrides)
    weights_path = None if random_init else resolve_repo_path(weights or cfg.get("weights"))
    if random_init:
        cfg = apply_overrides(cfg, ["weights=null"])
    # Build both experts once (the dual policy needs both) and hand each policy the ones it uses.
    experts = build_experts(apply_overrides(cfg, ["engine.policy=dual"]), weights_path, random_init=random_init)
    results: Dict[str, Dict[str, Any]] = {}
    for policy in policies:
        pcfg = apply_overrides(cfg, [f"engine.policy={policy}"])
        used = {r: e for r, e in experts.items() if r in policy_roles(policy)}
        runner = InProcessPredictor(DCMPredictor(used, pcfg["engine"]))
        t0 = time.perf_counter()
        rows, failures = evaluate_folder(cases_dir, out_dir / policy, runner, save_all_segs=True, progress=progress)
        results[policy] = {"rows": rows, "summary": summarise(rows), "failures": failures,
                           "seconds": time.perf_counter() - t0}
    return results


def comparison_table(results: Dict[str, Dict[str, Any]]) -> str:
    """One line per policy: means over all cases of the AUCs, finals and the DSC at steps 1, 2 and 6."""
    cols = ["Policy", "Cases", "DSC_AUC", "NSD_AUC", "DSC_Final", "NSD_Final", "DSC_1", "DSC_2", "DSC_6"]
    from dcm.tables import markdown_table

    table_rows = []
    for policy, res in results.items():
        rows = res["rows"]
        if rows:
            table_rows.append([policy, len(rows)] + [float(np.mean([float(r[c]) for r in rows])) for c in cols[2:]])
    return markdown_table(cols, table_rows)


def checks(results: Dict[str, Dict[str, Any]]) -> List[Tuple[str, bool]]:
    """The demo's claims: clicks help (mean DSC step 6 > step 2) and DCM >= each single expert (DSC AUC)."""
    out: List[Tuple[str, bool]] = []
    auc = {p: float(np.mean([float(r["DSC_AUC"]) for r in res["rows"]])) for p, res in results.items() if res["rows"]}
    for policy, res in results.items():
        if res["rows"]:
            dsc = _step_means(res["rows"])
            out.append((f"{policy}: mean DSC step 6 {dsc[5]:.4f} > step 2 {dsc[1]:.4f}", bool(dsc[5] > dsc[1])))
    if "dual" in auc:
        for single in ("global_only", "local_only"):
            if single in auc:
                out.append((f"dual DSC AUC {auc['dual']:.4f} >= {single} {auc[single]:.4f}",
                            bool(auc["dual"] >= auc[single] - 1e-12)))
    return out


# ---------------------------------------------------------------------------------------------- figure


def _clicks(gt_mask: np.ndarray, step_segs: np.ndarray, label: int) -> List[Optional[Tuple[Tuple[int, int, int], str]]]:
    """The protocol's clicks of steps 2..6 for one object, recomputed from the saved outputs exactly as the
    evaluator computed them (click of step s from the output of step s - 1)."""
    from dcm.protocol import next_click

    return [None if c is None else (c.zyx, c.kind) for c in (next_click(gt_mask, step_segs[s - 2] == label)
                                                              for s in range(2, 7))]


def _demo_kind(path: Path) -> str:
    """The demo's kinds of case: the modality, the real MRI apart."""
    from dcm.data.cases import modality_of

    return "MR (real, MNI152)" if "_mni" in path.stem else modality_of(path.stem)


def _pick_objects(cases_dir: Path, max_objects: int,
                  kind_of: Callable[[Path], str] = _demo_kind) -> List[Tuple[Path, int]]:
    """One object per kind of case (``kind_of``; default the modality, the real MRI apart): the largest object
    of the first case of each kind."""
    picked: Dict[str, Tuple[Path, int]] = {}
    for path in sorted(cases_dir.glob("*.npz")):
        kind = kind_of(path)
        if kind in picked:
            continue
        with np.load(path) as f:  # gts is a plain array: no unpickling needed
            gts = f["gts"]
        counts = np.bincount(gts.ravel())
        counts[0] = 0
        if counts.max() > 0:
            picked[kind] = (path, int(np.argmax(counts)))
    order = sorted(picked, key=lambda k: (k.startswith("MR (real"), k))  # the real MRI last
    return [picked[k] for k in order][:max_objects]


def make_figure(results: Dict[str, Dict[str, Any]], cases_dir: Path, out_dir: Path, figure: Path,
                policy: str = "dual", max_objects: int = 6, kind_of: Callable[[Path], str] = _demo_kind,
                suptitle: str = ("DCM demo (bundled small weights): "
                                 "axial slice through each object's last click")) -> Path:
    """Rows of panels (image | ground truth | ``policy`` after steps 1, 3, 6 with its clicks) for one object
    per kind of case (``kind_of``), and the mean DSC per step of every policy in ``results``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    from dcm.data.cases import load_case
    from dcm.metrics import dice

    objects = _pick_objects(cases_dir, max_objects, kind_of)
    n = len(objects)
    steps_shown = (1, 3, 6)
    height = 2.5 * n + 3.6
    fig = plt.figure(figsize=(12.5, height))
    grid = fig.add_gridspec(n + 1, 5, height_ratios=[1.0] * n + [1.25], hspace=0.42, wspace=0.06,
                            top=1.0 - 0.75 / height, bottom=0.35 / height)
    for row, (path, label) in enumerate(objects):
        case = load_case(path, strict=False)
        gt = case.gts == label
        with np.load(out_dir / policy / "all_segs" / f"{path.stem}.npz") as f:
            step_segs = f["all_segs"]
        clicks = _clicks(gt, step_segs, label)
        # The slice of the last click; when the object is absent there (a background click beside it), the
        # slice of the last foreground click; without clicks, the object's centre slice.
        z = None
        for kinds in (("fg", "bg"), ("fg",)):
            last = next((c for c in reversed(clicks) if c is not None and c[1] in kinds), None)
            if last is not None and gt[int(last[0][0])].any():
                z = int(last[0][0])
                break
        if z is None:
            z = int(np.round(np.argwhere(gt).mean(axis=0)[0]))
        # In-plane view: the object's extent on this slice with a margin, at least 40 voxels.
        in_plane = mask_bbox(gt[z])
        lo, hi = np.array([s.start for s in in_plane]), np.array([s.stop for s in in_plane])
        centre, half = (lo + hi) / 2.0, np.maximum((hi - lo) * 1.5, 40) / 2.0
        y0, x0 = np.maximum(np.floor(centre - half).astype(int), 0)
        y1, x1 = np.minimum(np.ceil(centre + half).astype(int), gt.shape[1:])
        sy, sx = case.spacing_zyx[1], case.spacing_zyx[2]
        extent = (x0 - 0.5, x1 - 0.5, y1 - 0.5, y0 - 0.5)
        image = case.image[z, y0:y1, x0:x1]
        obj = case.objects[label - 1] if label - 1 < len(case.objects) else None
        panels = [("image", None, 0), ("ground truth", gt, 0)] + [
            (f"step {s}", step_segs[s - 1] == label, s) for s in steps_shown]
        for col, (title, mask, step) in enumerate(panels):
            ax = fig.add_subplot(grid[row, col])
            ax.imshow(image, cmap="gray", extent=extent, aspect=sy / sx, interpolation="nearest")
            if mask is not None:
                m = mask[z, y0:y1, x0:x1]
                colour = (0.1, 0.8, 0.2) if step == 0 else (1.0, 0.45, 0.0)
                rgba = np.zeros(m.shape + (4,))
                rgba[m] = colour + (0.45,)
                ax.imshow(rgba, extent=extent, aspect=sy / sx, interpolation="nearest")
                if step:
                    ax.contour(np.arange(x0, x1), np.arange(y0, y1), gt[z, y0:y1, x0:x1].astype(float),
                               levels=[0.5], colors=[(0.1, 0.8, 0.2)], linewidths=0.9)
                    title += f"  DSC {dice(gt, step_segs[step - 1] == label):.2f}"
            if step >= 1 and obj is not None and obj.box is not None and obj.box.z_min <= z <= obj.box.z_max:
                _, (by0, by1), (bx0, bx1) = obj.box.bounds_zyx
                ax.add_patch(Rectangle((bx0 - 0.5, by0 - 0.5), bx1 - bx0 + 1, by1 - by0 + 1,
                                       fill=False, ec="yellow", ls="--", lw=1.0))
            if step >= 2:
                for click in clicks[: step - 1]:
                    if click is None:
                        continue
                    (cz, cy, cx), kind = click
                    on = cz == z
                    colour = "lime" if kind == "fg" else "red"
                    ax.plot(cx, cy, marker="o", ms=7 if on else 5, mfc=colour if on else "none", mec=colour,
                            mew=1.3, ls="none")
            ax.set_xlim(x0 - 0.5, x1 - 0.5)
            ax.set_ylim(y1 - 0.5, y0 - 0.5)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(title, fontsize=9)
            if col == 0:
                kind = kind_of(path)
                ax.set_ylabel(f"{kind}\n{path.stem}\nobject {label}, z = {z}", fontsize=7.5)
    ax = fig.add_subplot(grid[n, 1:4])
    styles = {"dual": ("tab:orange", "o", "DCM (dual)"), "global_only": ("tab:blue", "s", "global expert only"),
              "local_only": ("tab:green", "^", "local expert only")}
    for p, res in results.items():
        if not res["rows"]:
            continue
        colour, marker, name = styles.get(p, ("gray", "x", p))
        # dual on top, dashed: where it equals a single expert both lines stay visible
        on_top = dict(ls="--", zorder=3) if p == "dual" else {}
        ax.plot(range(1, 7), _step_means(res["rows"]), color=colour, marker=marker, label=name, **on_top)
    ax.set_xticks(range(1, 7), ["1\nbox"] + [f"{s}\nclick {s - 1}" for s in range(2, 7)])
    ax.set_ylabel("mean DSC")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    n_cases = len(next(iter(results.values()))["rows"])
    ax.set_title(f"mean DSC per step over {n_cases} cases (cases without boxes score 0 at step 1)", fontsize=9)
    handles = [Line2D([], [], color=(0.1, 0.8, 0.2), lw=4, alpha=0.6, label="ground truth (contour on predictions)"),
               Line2D([], [], color=(1.0, 0.45, 0.0), lw=4, alpha=0.6, label=f"prediction ({policy})"),
               Line2D([], [], color="yellow", ls="--", label="box (step 1)"),
               Line2D([], [], marker="o", color="lime", ls="none", label="fg click (filled: on this slice)"),
               Line2D([], [], marker="o", color="red", ls="none", label="bg click")]
    fig.legend(handles=handles, loc="upper center", ncol=5, fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 1.0 - 0.3 / height))
    fig.suptitle(suptitle, y=1.0, fontsize=11)
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return figure


# ---------------------------------------------------------------------------------------------- CLI


def main(argv: Optional[Sequence[str]] = None) -> int:
    from dcm.data.synthetic import FLAVOURS, canonical_flavour
    from dcm.errors import DCMError
    from dcm.evaluate import markdown_table

    p = argparse.ArgumentParser(prog="python -m dcm.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/demo", help="output folder (default %(default)s)")
    p.add_argument("--cases", type=int, default=3, help="synthetic cases per flavour (default %(default)s)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="synthetic case seed (default %(default)s; "
                   "training used 100)")
    p.add_argument("--shape", type=int, nargs=3, default=list(DEFAULT_SHAPE), metavar=("D", "H", "W"),
                   help="(z, y, x) size of the synthetic cases (default %(default)s)")
    p.add_argument("--flavours", default=",".join(FLAVOURS), help="comma-separated (default: all five)")
    p.add_argument("--no-mri", action="store_true", help="skip the real MRI case (MNI152 from nilearn)")
    p.add_argument("--config", default="configs/dcm_small.yaml", help="DCM config (default %(default)s)")
    p.add_argument("--weights", default=None, help="combined checkpoint (default: the config's, weights/dcm_small.pt)")
    p.add_argument("--policies", default=",".join(POLICIES), help="engine policies to compare (default %(default)s)")
    p.add_argument("--figure", default="figs/demo.png", help="figure path (default %(default)s)")
    p.add_argument("--random-init", action="store_true", help="no weights: check the pipeline only")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--cases-only", action="store_true",
                   help="write the cases to OUT/cases and stop (e.g. a synthetic validation set for "
                        "benchmarks/bench_clicks.py)")
    p.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. engine.fusion=average)")
    args = p.parse_args(argv)

    start = time.perf_counter()
    try:
        flavours = [canonical_flavour(f) for f in args.flavours.split(",") if f.strip()]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    policies = [x.strip() for x in args.policies.split(",") if x.strip()]
    out = Path(args.out)
    cases_dir = out / "cases"
    paths = make_cases(cases_dir, args.cases, args.seed, args.shape, flavours, mri=not args.no_mri,
                       progress=not args.no_progress)
    print(f"{len(paths)} demo cases in {cases_dir} (synthetic seed {args.seed}, shape {tuple(args.shape)})")
    if args.cases_only:
        unused = [name for name, given in (("--policies", args.policies != ",".join(POLICIES)),
                                           ("--weights", args.weights is not None),
                                           ("config overrides", bool(args.overrides))) if given]
        if unused:
            print(f"--cases-only: nothing is run, so {', '.join(unused)} had no effect")
        return 0
    try:
        results = run_demo(cases_dir, out, args.config, args.weights, policies, random_init=args.random_init,
                           progress=not args.no_progress, overrides=args.overrides)
    except DCMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report: List[str] = []
    for policy, res in results.items():
        report += [f"\n### {policy} ({res['seconds']:.0f} s)\n", markdown_table(res["summary"])]
        report += [f"FAILED {name}: {err}" for name, err in res["failures"]]
        for row in res["rows"]:
            if "_mni" in str(row["CaseName"]):
                report.append(f"real MRI {row['CaseName']}: DSC per step "
                              + " ".join(f"{float(row[f'DSC_{s}']):.3f}" for s in range(1, 7))
                              + f", DSC_AUC {float(row['DSC_AUC']):.3f}, NSD_AUC {float(row['NSD_AUC']):.3f}")
    report += ["\n### comparison (means over all cases)\n", comparison_table(results), ""]
    report += [f"[{'ok' if ok else 'NO'}] {line}" for line, ok in checks(results)]
    text = "\n".join(report)
    print(text)
    (out / "comparison.md").write_text(text.lstrip() + "\n")
    if any(res["rows"] for res in results.values()):
        fig_policy = "dual" if "dual" in results else next(iter(results))
        figure = make_figure(results, cases_dir, out, Path(args.figure), policy=fig_policy)
        print(f"figure: {figure}")
    print(f"demo done in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
