"""Clicks kept and segmentation quality per engine variant, over the 6-step protocol on source cases.

    python benchmarks/bench_clicks.py --cases runs/realsets/val --config dcm_small \
        --variant "rule off=engine.honour_clicks=false" --variant "rule on="

Each variant is ``name=override override ...`` (config overrides, space-separated) on ``--config``; the experts
are built once per distinct expert config. For every case the evaluator runs the protocol in-process
(``dcm.evaluate.evaluate_case``, the organisers' click rule); after each click step the output is checked
against every click given so far (the evaluator's ``clicks.csv`` count, ``dcm.engine.clicks.clicks_kept``).
Per variant it prints: clicks kept,
mean DSC AUC / NSD AUC / DSC_Final, mean DSC at steps 2 and 6, the largest DSC loss of one object between
two consecutive click steps and how many objects lost more than 0.1, and seconds per case. A CSV per case
goes to ``--csv`` (default ``benchmarks/results/bench_clicks.csv``).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from machine import write_csv  # benchmarks/machine.py (scripts run from their folder)

COLUMNS = ["date", "machine", "variant", "case", "clicks_kept", "clicks", "kept_by_reference", "DSC_AUC", "NSD_AUC",
           "DSC_Final", "DSC_2", "DSC_6", "worst_drop", "drops_over_0.1", "seconds"]


def parse_variant(text: str) -> Tuple[str, List[str]]:
    name, _, overrides = text.partition("=")
    return name.strip(), shlex.split(overrides)


def object_dice(gts: np.ndarray, segs: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    from dcm.metrics import dice

    return np.array([dice(gts == label, segs == label) for label in labels])


def run_variant(cases: Sequence[Path], config: str, overrides: Sequence[str], weights: Optional[str],
                experts_cache: Dict[str, object]) -> List[Dict[str, object]]:
    from dcm.ablate import variant_predictor
    from dcm.config import load_config
    from dcm.data.cases import load_case
    from dcm.evaluate import InProcessPredictor, evaluate_case
    from dcm.metrics import click_auc

    cfg = load_config(config, tuple(overrides))
    predictor = InProcessPredictor(variant_predictor(cfg, weights, experts_cache))
    rows = []
    for path in cases:
        case = load_case(path)
        labels = list(range(1, int(case.gts.max()) + 1))
        all_segs: List[np.ndarray] = []
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as work:
            result = evaluate_case(case, predictor, Path(work), all_segs=all_segs)
        seconds = time.perf_counter() - t0
        per_step = np.stack([object_dice(case.gts, s, labels) for s in all_segs[1:]])  # steps 2..6
        drops = per_step[:-1] - per_step[1:]
        rows.append({"case": case.name, "clicks_kept": sum(result.clicks_kept), "clicks": sum(result.clicks),
                     "kept_by_reference": sum(result.clicks_kept_by_reference),
                     "DSC_AUC": click_auc(result.dsc), "NSD_AUC": click_auc(result.nsd),
                     "DSC_Final": result.dsc[-1], "DSC_2": result.dsc[1], "DSC_6": result.dsc[-1],
                     "worst_drop": float(drops.max()) if drops.size else 0.0,
                     "drops_over_0.1": int((drops > 0.1).sum()), "seconds": seconds})
    return rows


def summary_line(name: str, rows: Sequence[Dict[str, object]]) -> Dict[str, object]:
    kept = sum(int(r["clicks_kept"]) for r in rows)
    total = sum(int(r["clicks"]) for r in rows)
    mean = {k: float(np.mean([float(r[k]) for r in rows])) for k in ("DSC_AUC", "NSD_AUC", "DSC_Final", "DSC_2",
                                                                      "DSC_6", "seconds")}
    reference = sum(int(r["kept_by_reference"]) for r in rows)
    return {"variant": name, "cases": len(rows), "kept": f"{kept}/{total} ({100.0 * kept / max(total, 1):.1f} %)",
            "reference": f"{reference}/{total} ({100.0 * reference / max(total, 1):.1f} %)",
            **mean, "worst_drop": max(float(r["worst_drop"]) for r in rows),
            "drops_over_0.1": sum(int(r["drops_over_0.1"]) for r in rows)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", required=True, help="folder of source cases (.npz with gts)")
    parser.add_argument("--config", default="dcm_small")
    parser.add_argument("--weights")
    parser.add_argument("--variant", action="append", default=[],
                        help='"name=override override ..." (repeat); default: the rule off and on')
    parser.add_argument("--split", help="only the cases of this split in the folder's splits.json "
                                        "(python -m dcm.data.realsets), e.g. val")
    parser.add_argument("--limit", type=int, help="at most this many cases (sorted by name)")
    parser.add_argument("--csv", default=str(Path(__file__).resolve().parent / "results" / "bench_clicks.csv"))
    parser.add_argument("--append", action="store_true")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    import torch

    from dcm.tables import markdown_table

    if args.threads:
        torch.set_num_threads(args.threads)
    from dcm.data.realsets import split_cases

    cases = split_cases(Path(args.cases), args.split)[0][: args.limit]
    if not cases:
        print(f"{args.cases}: no .npz cases", file=sys.stderr)
        return 2
    variants = [parse_variant(v) for v in args.variant] or [("rule off", ["engine.honour_clicks=false"]),
                                                            ("rule on", [])]
    cache: Dict[str, object] = {}
    lines, csv_rows = [], []
    for name, overrides in variants:
        rows = run_variant(cases, args.config, overrides, args.weights, cache)
        csv_rows += [[name] + [r[c] for c in COLUMNS[3:]] for r in rows]
        lines.append(summary_line(name, rows))
        s = lines[-1]
        print(f"{name}: kept {s['kept']}, DSC AUC {s['DSC_AUC']:.3f}, DSC_Final {s['DSC_Final']:.3f}", flush=True)
    header = ["variant", "cases", "clicks kept", "kept by the reference", "DSC AUC", "NSD AUC", "DSC_Final",
              "DSC step 2", "DSC step 6", "worst drop", "drops > 0.1", "s / case"]
    keys = ["variant", "cases", "kept", "reference", "DSC_AUC", "NSD_AUC", "DSC_Final", "DSC_2", "DSC_6",
            "worst_drop", "drops_over_0.1"]
    print(markdown_table(header, ([s[k] for k in keys] + [f"{s['seconds']:.1f}"] for s in lines), digits=3))
    write_csv(Path(args.csv), COLUMNS, csv_rows, append=args.append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
