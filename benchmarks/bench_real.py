"""The real-image benchmark: every policy on real anatomy, with and without the engine's click rule.

    python -m dcm.data.realsets --out runs/realsets                      # once (needs mricron-data)
    python benchmarks/bench_real.py --cases runs/realsets --split test --out runs/bench_real \
        [--config dcm_small] [--weights W] [--policies box-fill,global_only,local_only,released,dual] \
        [--figure figs/real.png] [--resume]

For each policy (``box-fill``: the rectangle-and-balls baseline, no model) the evaluator runs the challenge's
6-step protocol in-process with the organisers' click rule, once with ``engine.honour_clicks: true`` and
once with ``false`` (the experts' own answers). Results per run go to ``OUT/<policy>[-rule-off]/`` as
``dcm.evaluate`` writes them; ``--resume`` reuses a run whose metrics cover every case. It prints, and writes
to ``OUT/report.md``:

- per policy: mean DSC / NSD AUC, DSC_Final, DSC at steps 2 and 6, clicks honoured with and without the rule;
- per dataset (image and atlas, from the folder's ``splits.json``) and per case: DSC AUC and DSC_Final;
- the issue's targets as pass / fail lines (``dual`` DSC_Final >= box-fill + 0.10, ``dual`` DSC AUC >= each
  single expert, DSC step 6 > step 2 for every policy, ``dual`` without the rule honouring >= 60 % of clicks).

``--figure`` draws ``figs/real.png`` like the demo's figure (image, ground truth, ``dual`` after steps 1, 3, 6).
One CSV row per run and case goes to ``benchmarks/results/bench_real.csv``.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from machine import write_csv  # benchmarks/machine.py (scripts run from their folder)

from dcm.tables import markdown_table

POLICIES = ("box-fill", "global_only", "local_only", "released", "dual")
STEP_METRICS = ("DSC_AUC", "NSD_AUC", "DSC_Final", "DSC_2", "DSC_6")
CSV_COLUMNS = ["date", "machine", "run", "case", "dataset", "DSC_AUC", "NSD_AUC", "DSC_Final", "DSC_2", "DSC_6",
               "clicks", "clicks_honoured", "seconds"]


def case_stem(name: str) -> str:
    """A case name with or without the ``.npz`` suffix the organisers' CSV carries."""
    return name[:-4] if name.endswith(".npz") else name


def select_cases(cases: Path, split: Optional[str], out: Path, limit: Optional[int]) -> Tuple[Path, Dict[str, str]]:
    """A folder holding exactly the cases to run and each case's dataset name (``image/atlas`` from
    ``splits.json``, else the name's modality prefix).

    With a split or a limit the folder is a new ``OUT/cases-*`` of symbolic links, one per run (two runs that
    share ``--out`` do not relink each other's cases), which :func:`main` removes when the run ends.
    """
    from dcm.data.realsets import split_cases

    try:
        files, info = split_cases(cases, split)
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    files = files[:limit]
    if not files:
        raise SystemExit(f"{cases}: no .npz cases" + (f" in split {split!r}" if split else ""))
    folder = cases
    if split or limit:
        folder = Path(tempfile.mkdtemp(prefix="cases-", dir=out))
        for f in files:
            (folder / f.name).symlink_to(f.resolve())
    datasets = {}
    for f in files:
        entry = info.get(f.stem)
        datasets[f.stem] = f"{entry['source_image']}/{entry['atlas']}" if entry else f.stem.split("_")[0]
    return folder, datasets


def read_run(run_dir: Path) -> Tuple[List[Dict[str, str]], Dict[str, Tuple[int, int]]]:
    """``metrics.csv`` rows and ``{case: (clicks honoured, clicks)}`` from ``clicks.csv`` of one run."""
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    kept: Dict[str, Tuple[int, int]] = {}
    if (run_dir / "clicks.csv").is_file():
        with open(run_dir / "clicks.csv", newline="") as f:
            kept = {case_stem(r["CaseName"]): (int(r["Kept"]), int(r["Clicks"])) for r in csv.DictReader(f)}
    return rows, kept


def run_complete(run_dir: Path, cases: Sequence[str]) -> bool:
    if not (run_dir / "metrics.csv").is_file():
        return False
    rows, _ = read_run(run_dir)
    return {case_stem(r["CaseName"]) for r in rows} >= set(cases)


def case_metrics(row: Dict[str, str]) -> Dict[str, float]:
    """The benchmark's numbers of one ``metrics.csv`` row (DSC at step 2 and 6 from the per-step columns)."""
    return {"DSC_AUC": float(row["DSC_AUC"]), "NSD_AUC": float(row["NSD_AUC"]), "DSC_Final": float(row["DSC_Final"]),
            "DSC_2": float(row["DSC_2"]), "DSC_6": float(row["DSC_6"])}


def evaluate_run(name: str, policy: str, rule: bool, cases_dir: Path, out: Path, config: str,
                 weights: Optional[str], experts: Dict[str, Any], save_all_segs: bool,
                 overrides: Sequence[str] = ()) -> float:
    """Run one policy (with or without the click rule) over the cases; returns its seconds."""
    from dcm.config import load_config
    from dcm.evaluate import InProcessPredictor, evaluate_folder, resolve_predictor

    if policy == "box-fill":
        predict = resolve_predictor("box-fill", cases_dir)
    else:
        from dcm.engine.predictor import variant_predictor

        cfg = load_config(config, [*overrides, f"engine.policy={policy}", f"engine.honour_clicks={str(rule).lower()}"])
        predict = variant_predictor(cfg, weights, experts)
    t0 = time.perf_counter()
    evaluate_folder(cases_dir, out / name, InProcessPredictor(predict), save_all_segs=save_all_segs, progress=True)
    return time.perf_counter() - t0


def mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def honoured_text(kept: Dict[str, Tuple[int, int]]) -> str:
    k, n = sum(a for a, _ in kept.values()), sum(b for _, b in kept.values())
    return f"{k}/{n} ({100.0 * k / n:.1f} %)" if n else "-"


def report(runs: Dict[str, Tuple[List[Dict[str, str]], Dict[str, Tuple[int, int]]]], policies: Sequence[str],
           datasets: Dict[str, str]) -> Tuple[str, List[Tuple[str, bool]]]:
    """The markdown report (three tables) and the targets as (line, passed)."""
    by_case = {name: {case_stem(r["CaseName"]): case_metrics(r) for r in rows} for name, (rows, _) in runs.items()}
    overall = []
    for policy in policies:
        if policy not in runs:
            continue
        metrics = list(by_case[policy].values())
        off = runs.get(f"{policy}-rule-off")
        overall.append([policy, len(metrics)] + [mean([m[k] for m in metrics]) for k in STEP_METRICS]
                       + [honoured_text(runs[policy][1]), honoured_text(off[1]) if off else "-"])
    text = ["## Per policy (means over cases)", "",
            markdown_table(["policy", "cases", "DSC AUC", "NSD AUC", "DSC_Final", "DSC step 2", "DSC step 6",
                   "clicks honoured (rule on)", "clicks honoured (rule off)"], overall, digits=3), ""]
    names = sorted(set(datasets.values()))
    per_dataset = []
    for dataset in names:
        members = [c for c, d in datasets.items() if d == dataset]
        row: List[Any] = [dataset, len(members)]
        for policy in policies:
            if policy in by_case:
                ms = [by_case[policy][c] for c in members if c in by_case[policy]]
                row.append(f"{mean([m['DSC_AUC'] for m in ms]):.3f} / {mean([m['DSC_Final'] for m in ms]):.3f}")
        per_dataset.append(row)
    shown = [p for p in policies if p in by_case]
    text += ["## Per dataset: DSC AUC / DSC_Final", "",
             markdown_table(["dataset", "cases"] + shown, per_dataset, digits=3), ""]
    per_case = []
    for case in sorted(datasets):
        per_case.append([case, datasets[case]] + [
            f"{by_case[p][case]['DSC_AUC']:.3f} / {by_case[p][case]['DSC_Final']:.3f}" if case in by_case[p] else "-"
            for p in shown])
    text += ["## Per case: DSC AUC / DSC_Final", "",
             markdown_table(["case", "dataset"] + shown, per_case, digits=3), ""]

    targets: List[Tuple[str, bool]] = []
    means = {p: {k: mean([m[k] for m in by_case[p].values()]) for k in STEP_METRICS} for p in shown}
    if "dual" in means and "box-fill" in means:
        d, b = means["dual"]["DSC_Final"], means["box-fill"]["DSC_Final"]
        targets.append((f"dual DSC_Final {d:.3f} >= box-fill {b:.3f} + 0.10", d >= b + 0.10))
    for single in ("global_only", "local_only"):
        if "dual" in means and single in means:
            d, s = means["dual"]["DSC_AUC"], means[single]["DSC_AUC"]
            targets.append((f"dual DSC AUC {d:.3f} >= {single} {s:.3f}", d >= s))
    for p in shown:
        targets.append((f"{p}: DSC step 6 {means[p]['DSC_6']:.3f} > step 2 {means[p]['DSC_2']:.3f}",
                        means[p]["DSC_6"] > means[p]["DSC_2"]))
    if "dual-rule-off" in runs:
        kept = runs["dual-rule-off"][1]
        k, n = sum(a for a, _ in kept.values()), sum(b for _, b in kept.values())
        targets.append((f"dual without the rule honours {k}/{n} clicks >= 60 %", n > 0 and k >= 0.6 * n))
    text += ["## Targets", ""] + [f"- {'PASS' if ok else 'FAIL'}: {line}" for line, ok in targets]
    return "\n".join(text) + "\n", targets


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", required=True, help="folder of source cases (.npz with gts), e.g. runs/realsets")
    parser.add_argument("--split", help="only this split of the folder's splits.json (train, val, test)")
    parser.add_argument("--out", required=True, help="results folder")
    parser.add_argument("--config", default="dcm_small")
    parser.add_argument("--weights", help="combined checkpoint (default: the config's)")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every policy (repeat), e.g. --set engine.local_margin=[0.1,0.45]")
    parser.add_argument("--no-rule-off", action="store_true", help="skip the runs without the click rule")
    parser.add_argument("--limit", type=int, help="at most this many cases (sorted by name)")
    parser.add_argument("--figure", help="write the figure here (e.g. figs/real.png)")
    parser.add_argument("--resume", action="store_true", help="reuse runs whose metrics.csv covers every case")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--csv", default=str(Path(__file__).resolve().parent / "results" / "bench_real.csv"))
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cases_dir, datasets = select_cases(Path(args.cases), args.split, out, args.limit)
    try:
        return run_benchmark(args, out, cases_dir, datasets)
    finally:
        if cases_dir != Path(args.cases):
            shutil.rmtree(cases_dir, ignore_errors=True)


def run_benchmark(args: argparse.Namespace, out: Path, cases_dir: Path, datasets: Dict[str, str]) -> int:
    """Every planned run (policy, with and without the rule), the report, the CSV and the figure; the exit status."""
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = sorted(set(policies) - set(POLICIES))
    if unknown:
        raise SystemExit(f"--policies: unknown {unknown}; choose from {', '.join(POLICIES)}")
    plan = [(p, p, True) for p in policies]
    if not args.no_rule_off:
        plan += [(f"{p}-rule-off", p, False) for p in policies if p != "box-fill"]
    experts: Dict[str, Any] = {}
    runs: Dict[str, Tuple[List[Dict[str, str]], Dict[str, Tuple[int, int]]]] = {}
    seconds: Dict[str, float] = {}
    for name, policy, rule in plan:
        if args.resume and run_complete(out / name, list(datasets)):
            print(f"{name}: reusing {out / name}", flush=True)
        else:
            print(f"{name}: running {len(datasets)} cases", flush=True)
            seconds[name] = evaluate_run(name, policy, rule, cases_dir, out, args.config, args.weights, experts,
                                         save_all_segs=bool(args.figure) and name == "dual", overrides=args.set)
        runs[name] = read_run(out / name)
    text, targets = report(runs, policies, datasets)
    header = (f"Cases: {args.cases} (split {args.split or 'all'}, {len(datasets)} cases); config {args.config} "
              f"{' '.join(args.set)}; "
              f"weights {args.weights or 'named by the config'}; organisers' click rule.\n\n")
    (out / "report.md").write_text(header + text)
    print(header + text)
    csv_rows = []
    for name, (rows, kept) in runs.items():
        for r in rows:
            case = case_stem(r["CaseName"])
            m = case_metrics(r)
            k, n = kept.get(case, (0, 0))
            csv_rows.append([name, case, datasets.get(case, ""), *[m[c] for c in STEP_METRICS], n, k,
                             float(r.get("TotalRunningTime", "nan"))])
    write_csv(Path(args.csv), CSV_COLUMNS, csv_rows)
    if args.figure and "dual" in runs:
        from dcm.cli.demo import make_figure

        results = {p: {"rows": runs[p][0]} for p in ("dual", "global_only", "local_only", "box-fill") if p in runs}
        make_figure(results, cases_dir, out, Path(args.figure), policy="dual",
                    kind_of=lambda path: datasets.get(path.stem, "other"),
                    suptitle=f"DCM on real anatomy ({args.split or 'all'} split, {args.config}): axial slice through "
                          f"each object's last click")
        print(f"wrote {args.figure}")
    return 0 if all(ok for _, ok in targets) else 1


if __name__ == "__main__":
    sys.exit(main())
