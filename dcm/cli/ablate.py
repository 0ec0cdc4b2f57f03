"""Run several variants of a DCM config through the evaluator and write one comparison table.

    python -m dcm.ablate --ablation configs/ablations/policies.yaml --cases CASES_DIR --out RESULTS_DIR \\
        [--base CONFIG] [--weights FILE | --random-init] [--workers N] [--ray [ADDRESS]] [--resume] [key=value ...]

An ablation file names a base config and its variants, each a list of overrides of the base, or a
mapping naming its own config (and optionally overrides and a weights file)::

    base: dcm_small
    variants:
      dual: [engine.policy=dual]
      released: [engine.policy=released]
      card_pairing: {config: dcm_card_pairing.yaml, weights: weights/dcm_card.pt}

Experts are built once and reused by every variant whose expert sections are unchanged (policies and
fusion rules only change the engine), so weights load once. Results: ``RESULTS_DIR/<variant>/`` as
written by ``dcm.evaluate`` and ``RESULTS_DIR/comparison.md`` / ``comparison.csv``.

With ``--workers N`` (local processes) or ``--ray``, every (variant, case) pair is one task of the evaluator's
worker pool (``dcm.evaluate.parallel``): each worker builds a variant's experts once and shares them with the variants
that have the same expert sections. ``--resume`` keeps the cases each variant finished before. The results
are the same as a sequential run's, apart from the time columns.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from dcm.atomic import atomic_path
from dcm.config import apply_overrides, load_config, resolve_config_path
from dcm.engine.predictor import variant_predictor
from dcm.errors import DCMError
from dcm.evaluate import summarise
from dcm.tables import markdown_table

__all__ = ["variant_configs", "run_ablation", "main"]

COLUMNS = ["Variant", "Cases", "DSC_AUC", "NSD_AUC", "DSC_Final", "NSD_Final", "Clicks_kept", "Seconds_per_case"]


def variant_configs(ablation: Dict[str, Any], overrides: Sequence[str] = (),
                    weights: Optional[str] = None) -> Dict[str, Tuple[Dict[str, Any], Optional[str]]]:
    """Each variant's full config and weights file.

    A variant is a list of overrides of the base, or ``{config: FILE, overrides: [...], weights: FILE}``.
    """
    base = load_config(ablation["base"], overrides)
    out: Dict[str, Tuple[Dict[str, Any], Optional[str]]] = {}
    for name, variant in (ablation.get("variants") or {}).items():
        if isinstance(variant, dict):
            start = load_config(variant["config"], overrides) if variant.get("config") else base
            out[name] = (apply_overrides(start, variant.get("overrides") or []), variant.get("weights", weights))
        else:
            out[name] = (apply_overrides(base, variant or []), weights)
    return out


def run_ablation(ablation: Dict[str, Any], cases: Path, out: Path, weights: Optional[str] = None,
                 random_init: bool = False, overrides: Sequence[str] = (), device: Optional[str] = None,
                 progress: bool = True, workers: int = 1, ray_address: Optional[str] = None,
                 threads: Optional[int] = None, retries: int = 2, resume: bool = False) -> List[Dict[str, Any]]:
    """Evaluate every variant (in this process, or with ``workers`` / ``ray_address`` on the evaluator's
    worker pool, one task per variant and case); returns the comparison rows (means over all cases)."""
    from dcm.evaluate import (InProcessPredictor, PredictorSpec, case_file_name, evaluate_folder, load_records,
                              select_case_files, write_results)

    variants = variant_configs(ablation, overrides, weights)
    files = select_case_files(Path(cases))
    names = [case_file_name(p.name) for p in files]
    finished = {name: ({k for k, r in load_records(out / name, names).items() if r.finished} if resume else set())
                for name in variants}
    if workers > 1 or ray_address is not None:
        from dcm.evaluate.parallel import CaseTask, execute

        tasks = [CaseTask(str(p.resolve()), str(out / name), PredictorSpec(variant_config=cfg, weights=w,
                                                                             device=device, random_init=random_init))
                 for name, (cfg, w) in variants.items() for p in files if case_file_name(p.name) not in finished[name]]
        try:
            execute(tasks, workers, ray_address, threads, retries, len(files) * len(variants),
                    sum(map(len, finished.values())), progress, desc="ablate")
        finally:
            for name in variants:
                write_results(out / name, list(load_records(out / name, names).values()))
    else:
        built: Dict[str, Any] = {}
        for name, (cfg, variant_weights) in variants.items():
            if len(finished[name]) == len(files):  # nothing left: no experts built
                write_results(out / name, list(load_records(out / name, names).values()))
                continue
            runner = InProcessPredictor(variant_predictor(cfg, variant_weights, built, device, random_init))
            evaluate_folder(cases, out / name, runner, progress=progress, resume=resume, files=files)
    rows: List[Dict[str, Any]] = []
    for name in variants:
        with open(out / name / "metrics.csv", newline="") as f:
            metric_rows = list(csv.DictReader(f))
        with open(out / name / "clicks.csv", newline="") as f:
            click_rows = list(csv.DictReader(f))
        overall = summarise(metric_rows, click_rows)[-1] if metric_rows else {}
        seconds = (sum(float(r["TotalRunningTime"]) for r in metric_rows) / len(metric_rows)) if metric_rows else 0.0
        rows.append({"Variant": name, "Cases": overall.get("Cases", 0),
                     **{k: overall.get(k, float("nan")) for k in COLUMNS[2:7]}, "Seconds_per_case": seconds})
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "comparison.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    with atomic_path(out / "comparison.md") as tmp:
        tmp.write_text(markdown_table(COLUMNS, ([r[c] for c in COLUMNS] for r in rows)) + "\n")
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dcm.ablate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ablation", required=True, help="ablation YAML (base + variants)")
    parser.add_argument("--base", help="base config instead of the ablation file's (e.g. dcm_reduced)")
    parser.add_argument("--cases", required=True, help="folder of source cases with gts")
    parser.add_argument("--out", required=True)
    parser.add_argument("--weights", help="combined checkpoint")
    parser.add_argument("--random-init", action="store_true", help="random models (pipeline checks only)")
    parser.add_argument("--device")
    parser.add_argument("--workers", type=int, default=1, help="(variant, case) tasks run at once")
    parser.add_argument("--ray", nargs="?", const="default", metavar="ADDRESS|local",
                        help="workers as Ray actors (see python -m dcm.evaluate --help)")
    parser.add_argument("--threads", type=int, help="CPU threads per worker (default: CPUs / workers)")
    parser.add_argument("--retries", type=int, default=2, help="tries again for a case whose worker died")
    parser.add_argument("--resume", action="store_true", help="keep the cases each variant finished before")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("overrides", nargs="*", help="overrides applied to the base config")
    args = parser.parse_args(argv)
    if args.workers < 1 or (args.threads is not None and args.threads < 1) or args.retries < 0:
        print("ablate: --workers and --threads need at least 1, --retries 0 or more", file=sys.stderr)
        return 2
    ablation = yaml.safe_load(resolve_config_path(args.ablation).read_text())
    if args.base:
        ablation["base"] = args.base
    try:
        rows = run_ablation(ablation, Path(args.cases), Path(args.out), args.weights, args.random_init,
                            args.overrides, args.device, not args.no_progress, args.workers, args.ray, args.threads,
                            args.retries, args.resume)
    except DCMError as e:
        print(" ".join(f"ablate: {e}".split()), file=sys.stderr)
        return 2
    print((Path(args.out) / "comparison.md").read_text())
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
