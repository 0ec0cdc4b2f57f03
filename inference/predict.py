"""DCM inference over a folder of challenge cases: what ``predict.sh`` runs at every protocol step.

    python inference/predict.py [--inputs DIR] [--outputs DIR] [--config FILE] [--weights FILE]
                                [--device auto|cpu|cuda] [--seed N] [--timings] [key=value ...]

Each ``inputs/*.npz`` becomes ``outputs/<same name>.npz`` (``segs``). Nothing is kept between calls: every
input carries its whole state (boxes, clicks, previous prediction). Environment variables ``DCM_INPUT_DIR``,
``DCM_OUTPUT_DIR``, ``DCM_CONFIG``, ``DCM_WEIGHTS``, ``DCM_DEVICE``, ``DCM_SEED``, ``DCM_TIMINGS`` supply defaults for
the flags. With neither a config nor weights the small CPU preset runs (configs/dcm_small.yaml with the bundled
weights/dcm_small.pt; one stderr line says so); --config configs/dcm.yaml --weights FILE for the full size.

Exit status: 0 when every case was written; 1 when a case failed (one line on stderr names the file and the
field; the other cases are still written, and a failed case has no output file); 2 when nothing could run
(bad config, weights, device or seed; an output folder that cannot be written or is the input folder); 143 on
SIGTERM (outputs already written stay complete, no temporary file is left).
"""

import time

PROCESS_START = time.perf_counter()  # the challenge budget counts start-up and model loading

import argparse  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

from dcm.errors import CheckpointError, DCMError  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", help="input folder (default /workspace/inputs if it exists, else ./inputs)")
    parser.add_argument("--outputs", help="output folder (default /workspace/outputs or ./outputs)")
    parser.add_argument("--config", default=os.environ.get("DCM_CONFIG"),
                        help="YAML config path or preset name (default: configs/dcm.yaml with --weights, else the "
                             "small CPU preset configs/dcm_small.yaml)")
    parser.add_argument("--weights", default=os.environ.get("DCM_WEIGHTS"), help="combined checkpoint of both experts")
    parser.add_argument("--device", default=os.environ.get("DCM_DEVICE"), help="auto (default), cpu or cuda")
    parser.add_argument("--trust-checkpoint", action="store_true", help="allow arbitrary pickled objects in --weights")
    parser.add_argument("--random-init", action="store_true", help="no weights: random models (tests, benchmarks)")
    parser.add_argument("--seed", default=os.environ.get("DCM_SEED", "0"),
                        help="torch seed (random-init weights; any sampling): same inputs + seed = same outputs")
    parser.add_argument("--timings", action="store_true", default=os.environ.get("DCM_TIMINGS", "") not in ("", "0"),
                        help="print where the time goes on stderr (start-up, model loading, per case read / "
                             "predict / write); also DCM_TIMINGS=1")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = parser.parse_args(argv)

    # SIGTERM (docker stop, a runner's timeout) unwinds like Ctrl-C, so the output being written is
    # removed instead of left as a temporary file.
    signal.signal(signal.SIGTERM, _terminate)
    import torch

    from dcm.startup import import_monai_networks

    import_monai_networks()  # ~4 s less start-up per call (DCM_LEAN_IMPORTS=0: the plain import)
    from dcm.cli import check_device, parse_seed
    from dcm.config import load_config, pick_config, resolve_repo_path
    from dcm.engine.predictor import DCMPredictor
    from dcm.experts import build_experts
    from dcm.runner import check_io_dirs, default_io_dirs, predict_folder

    imported = time.perf_counter()
    inputs, outputs = default_io_dirs(args.inputs, args.outputs)
    weights = args.weights
    try:  # every setting is checked before the models are built and loaded
        seed = parse_seed(args.seed)
        check_io_dirs(inputs, outputs)
        config = pick_config(args.config, args.weights, args.random_init,
                             "--config configs/dcm.yaml --weights FILE (or DCM_CONFIG / DCM_WEIGHTS)")
        cfg = load_config(config, tuple(args.overrides))  # every section checked here
        check_device(args.device or cfg.get("device"), "--device / DCM_DEVICE" if args.device else "device")
        weights = None if args.random_init else resolve_repo_path(args.weights or cfg.get("weights"))
        torch.manual_seed(seed)
        experts = build_experts(cfg, args.weights, args.device, trusted=args.trust_checkpoint,
                                random_init=args.random_init, config_name=str(config))
    except CheckpointError as e:
        print(f"predict: {e.naming(weights)}", file=sys.stderr)
        return 2
    except DCMError as e:
        print(" ".join(f"predict: {e}".split()), file=sys.stderr)
        return 2
    predictor = DCMPredictor(experts, cfg["engine"], process_start=PROCESS_START)
    if args.timings:
        print(f"timing start-up: imports {imported - PROCESS_START:.2f} s, models "
              f"{time.perf_counter() - imported:.2f} s", file=sys.stderr, flush=True)
    result = predict_folder(inputs, outputs, predictor, timings=args.timings)
    return 0 if result.ok else 1


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    code = main()
    # Every output is written, closed and renamed by now: skip the interpreter's teardown (freeing torch,
    # MONAI and the arrays takes ~0.7 s, paid at each of the 6 calls of a case).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
