"""The evaluator's command line: ``python -m dcm.evaluate`` (also ``dcm evaluate``) and its ``merge`` subcommand.

The library it drives is :mod:`dcm.evaluate.core` (one case's protocol, the result files) and
:mod:`dcm.evaluate.parallel` (workers, Ray, parts); this module only parses arguments and picks the path.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

from dcm.errors import ConfigError, DCMError
from dcm.evaluate import core
from dcm.evaluate.core import (case_file_name, _names_path, absolutise_command, PredictorSpec, check_predictor_spec,
                               build_step_runner, load_records, select_case_files, write_results, evaluate_folder,
                               write_manifest)


def build_parser() -> argparse.ArgumentParser:
    """The evaluator's command line (``merge`` is a subcommand of its own: :func:`merge_main`)."""
    parser = argparse.ArgumentParser(prog="python -m dcm.evaluate", description=core.__doc__.split("\n\n")[0],
                                     epilog="python -m dcm.evaluate merge PART_DIR... --out DIR: merge the "
                                            "folders of a run split with --num-parts / --part-id")
    parser.add_argument("--cases", required=True, help="folder of source cases (.npz with gts)")
    parser.add_argument("--out", required=True, help="folder for metrics.csv, summary.md, ...")
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--predict-cmd", help='external command run per step, e.g. "sh predict.sh"')
    who.add_argument("--predictor", help="in-process: oracle, box-fill, dcm or module:callable")
    dcm_args = parser.add_argument_group("--predictor dcm (built as predict.sh builds it)")
    dcm_args.add_argument("--config", help="config file or preset name (default configs/dcm.yaml)")
    dcm_args.add_argument("--weights", help="combined checkpoint (default: the config's)")
    dcm_args.add_argument("--random-init", action="store_true", help="random models (pipeline checks only)")
    dcm_args.add_argument("--device", help="auto (default), cpu or cuda")
    dcm_args.add_argument("--seed", type=int, default=0, help="torch seed, as predict.sh's --seed")
    dcm_args.add_argument("--trust-checkpoint", action="store_true", help="allow pickled objects in --weights")
    dcm_args.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="config override (repeatable)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per external call")
    parser.add_argument("--nsd-spacing", choices=["stored", "physical"], default="stored",
                        help="stored = organisers' x-y-z spacing on z-y-x axes (official numbers); physical = z-y-x")
    parser.add_argument("--save-all-segs", action="store_true", help="write all_segs/<case>.npz (6, z, y, x)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N cases")
    parser.add_argument("--verbose", action="store_true", help="print the external command's output")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    run = parser.add_argument_group("parallel and resumable runs")
    run.add_argument("--resume", action="store_true", help="keep the cases an earlier run into --out finished")
    run.add_argument("--workers", type=int, default=1, help="cases evaluated at once (worker processes or actors)")
    run.add_argument("--ray", nargs="?", const="default", metavar="ADDRESS|local",
                     help="workers as Ray actors: a cluster address, 'local' (a Ray of this machine's own), or "
                          "nothing (RAY_ADDRESS / a Ray running here)")
    run.add_argument("--threads", type=int, default=None,
                     help="CPU threads per worker (default: the CPUs shared evenly between workers)")
    run.add_argument("--retries", type=int, default=2, help="tries again for a case whose worker died")
    run.add_argument("--num-parts", type=int, default=1, help="split the sorted cases into K parts ...")
    run.add_argument("--part-id", type=int, default=0, help="... and evaluate part I (0-based), then merge")
    return parser


def _spec_from_args(args: argparse.Namespace) -> PredictorSpec:
    """The predictor the arguments name, with paths made absolute (workers may run elsewhere)."""
    def absolute(path: Optional[str]) -> Optional[str]:
        return str(Path(path).resolve()) if path and _names_path(path) else path

    if args.predict_cmd:
        return PredictorSpec(command=absolutise_command(args.predict_cmd), timeout=args.timeout,
                             verbose=args.verbose)
    return PredictorSpec(predictor=args.predictor, cases_dir=str(Path(args.cases).resolve()),
                         config=absolute(args.config), overrides=tuple(args.overrides),
                         weights=absolute(args.weights), device=args.device, random_init=args.random_init,
                         trusted=args.trust_checkpoint, seed=args.seed)


def _check_run_args(args: argparse.Namespace) -> None:
    """Refuse bad numbers before anything runs (one line)."""
    if args.workers < 1:
        raise ConfigError(f"--workers {args.workers}: need at least 1")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads {args.threads}: need at least 1")
    if args.retries < 0:
        raise ConfigError(f"--retries {args.retries}: need 0 or more")
    if args.predictor != "dcm" and (args.config or args.weights or args.random_init or args.overrides):
        raise ConfigError("--config / --weights / --random-init / --set go with --predictor dcm")


def _finish(out: Path, rows: Sequence[Dict[str, object]], failures: Sequence[Tuple[str, str]]) -> int:
    print((out / "summary.md").read_text(), end="")
    print(f"\n{len(rows)} cases evaluated, {len(failures)} failed; results in {out}")
    return 1 if failures or not rows else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["merge"]:
        return merge_main(argv[1:])
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    try:
        _check_run_args(args)
        spec = _spec_from_args(args)
        files = select_case_files(Path(args.cases), args.limit, args.num_parts, args.part_id)
        names = [case_file_name(p.name) for p in files]
        done = ({k for k, r in load_records(out, names, args.save_all_segs).items() if r.finished}
                if args.resume else set())
        if len(done) == len(files) and files:  # nothing left: no predictor built, no worker started
            write_manifest(out, files, args.num_parts, args.part_id)
            return _finish(out, *write_results(out, list(load_records(out, names).values())))
        check_predictor_spec(spec)
        write_manifest(out, files, args.num_parts, args.part_id)
        if args.workers > 1 or args.ray is not None:
            from dcm.evaluate.parallel import evaluate_parallel

            rows, failures = evaluate_parallel(files, out, spec, args.nsd_spacing, args.save_all_segs,
                                               args.workers, args.ray, args.threads, args.retries, args.resume,
                                               progress=not args.no_progress)
        else:
            if args.threads is not None:
                from dcm.evaluate.parallel import configure_threads

                configure_threads(args.threads)
            runner = build_step_runner(spec)
            if args.threads is not None:
                configure_threads(args.threads)
            rows, failures = evaluate_folder(Path(args.cases), out, runner, args.nsd_spacing, args.save_all_segs,
                                             progress=not args.no_progress, resume=args.resume, files=files)
    except DCMError as e:
        print(" ".join(f"evaluate: {e}".split()), file=sys.stderr)
        return 2
    except (ImportError, AttributeError) as e:  # --predictor module:callable that is not there
        print(f"evaluate: --predictor {args.predictor}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return _finish(out, rows, failures)


def merge_main(argv: Sequence[str]) -> int:
    """``python -m dcm.evaluate merge PART_DIR... --out DIR``."""
    parser = argparse.ArgumentParser(prog="python -m dcm.evaluate merge",
                                     description="Merge the run folders of a split run (--num-parts / --part-id) "
                                                 "into one, as a single run writes it.")
    parser.add_argument("parts", nargs="+", help="run folders of the parts")
    parser.add_argument("--out", required=True, help="folder for the merged results")
    args = parser.parse_args(argv)
    from dcm.evaluate.parallel import merge_runs

    try:
        rows, failures, warnings = merge_runs([Path(p) for p in args.parts], Path(args.out))
    except DCMError as e:
        print(" ".join(f"evaluate merge: {e}".split()), file=sys.stderr)
        return 2
    for warning in warnings:
        print(f"evaluate merge: {warning}", file=sys.stderr)
    code = _finish(Path(args.out), rows, failures)
    return code or (1 if warnings else 0)
