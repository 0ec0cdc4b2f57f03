"""Run several variants of a DCM config through the evaluator and write one comparison table.

    python -m dcm.ablate --ablation configs/ablations/policies.yaml --cases CASES_DIR --out RESULTS_DIR \\
        [--base CONFIG] [--weights FILE | --random-init] [key=value ...]

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
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from dcm.atomic import atomic_path
from dcm.config import apply_overrides, load_config, resolve_config_path
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


def variant_predictor(cfg: Dict[str, Any], weights: Optional[str], built: Dict[str, Any],
                      device: Optional[str] = None, random_init: bool = False) -> Any:
    """A ``DCMPredictor`` for one variant's config, over the experts its policy calls.

    Experts are built once per distinct expert config and weights and kept in ``built`` for the next
    variants; a role an earlier variant did not need (``global_only`` before ``dual``) is built then.
    """
    from dcm.engine.predictor import DCMPredictor
    from dcm.experts import build_experts, needed_roles

    key = json.dumps({k: cfg.get(k) for k in ("global_expert", "local_expert", "weights", "device")},
                     sort_keys=True, default=str) + str(weights)
    experts = built.setdefault(key, {})
    roles = needed_roles(cfg)
    missing = [r for r in roles if r not in experts]
    if missing:
        fresh = build_experts(cfg, weights, device, random_init=random_init)
        experts.update({r: fresh[r] for r in missing})
    return DCMPredictor({r: experts[r] for r in roles}, cfg["engine"])


def run_ablation(ablation: Dict[str, Any], cases: Path, out: Path, weights: Optional[str] = None,
                 random_init: bool = False, overrides: Sequence[str] = (), device: Optional[str] = None,
                 progress: bool = True) -> List[Dict[str, Any]]:
    """Evaluate every variant; returns the comparison rows (means over all cases)."""
    from dcm.evaluate import InProcessPredictor, evaluate_folder, summarise

    rows: List[Dict[str, Any]] = []
    built: Dict[str, Any] = {}
    for name, (cfg, variant_weights) in variant_configs(ablation, overrides, weights).items():
        predictor = variant_predictor(cfg, variant_weights, built, device, random_init)
        runner = InProcessPredictor(predictor)
        metric_rows, _ = evaluate_folder(cases, out / name, runner, progress=progress)
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
    parser.add_argument("overrides", nargs="*", help="overrides applied to the base config")
    args = parser.parse_args(argv)
    ablation = yaml.safe_load(resolve_config_path(args.ablation).read_text())
    if args.base:
        ablation["base"] = args.base
    rows = run_ablation(ablation, Path(args.cases), Path(args.out), args.weights, args.random_init,
                        args.overrides, args.device)
    print((Path(args.out) / "comparison.md").read_text())
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
