"""Turn every case file of an input folder into an output file: what ``predict.sh`` does per call.

One implementation serves the reference baselines and DCM's own predictor, so error handling is the same
everywhere: a bad file gets one line naming the file and the field, the other files are still predicted,
outputs are written atomically, and the exit status says whether every file succeeded.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np

from dcm.data.cases import Case, load_case, save_segmentation
from dcm.errors import DCMError

__all__ = ["PredictFn", "FolderResult", "default_io_dirs", "predict_folder"]

logger = logging.getLogger("dcm")

#: ``predict_fn(case) -> segs``: (z, y, x) uint8 labels, object i as label i + 1.
PredictFn = Callable[[Case], np.ndarray]


@dataclass
class FolderResult:
    written: List[Path] = field(default_factory=list)
    failed: List[Tuple[str, str]] = field(default_factory=list)  # (file, one-line reason)
    skipped: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed


def default_io_dirs(inputs: Optional[str] = None, outputs: Optional[str] = None) -> Tuple[Path, Path]:
    """Input / output folders: explicit values, else ``$DCM_INPUT_DIR`` / ``$DCM_OUTPUT_DIR``, else
    ``/workspace/inputs`` and ``/workspace/outputs`` when ``/workspace/inputs`` exists (the organisers'
    container), else ``./inputs`` and ``./outputs``."""
    in_dir = inputs or os.environ.get("DCM_INPUT_DIR")
    out_dir = outputs or os.environ.get("DCM_OUTPUT_DIR")
    workspace = Path("/workspace/inputs").is_dir()
    if not in_dir:
        in_dir = "/workspace/inputs" if workspace else "inputs"
    if not out_dir:
        out_dir = "/workspace/outputs" if workspace else "outputs"
    return Path(in_dir), Path(out_dir)


def _say(line: str) -> None:
    """One stderr line, whatever newlines the message carries."""
    print(" ".join(line.split()), file=sys.stderr, flush=True)


def predict_folder(
    inputs: Path, outputs: Path, predict_fn: PredictFn, strict_objects: bool = False, timings: bool = False
) -> FolderResult:
    """Predict every ``*.npz`` of ``inputs`` into ``outputs/<same name>.npz`` (key ``segs``).

    Every problem is one stderr line naming the file (and the field). An output is written atomically or not
    at all: a failed case has no output file (one left by an earlier call is removed), and temporaries that a
    killed earlier call left in ``outputs`` are deleted first. No ``.npz`` file at all is a failure too.

    Args:
        inputs: folder of challenge case files; other files are reported and skipped.
        outputs: created if missing; not cleared (the organisers never clear it).
        predict_fn: the predictor.
        strict_objects: fail the whole file on a per-object problem instead of leaving that object's
            previous mask (the default, handled by ``predict_fn`` through ``ObjectPrompts.problem``).
        timings: one stderr line per case, ``timing <file>: read R s, predict P s, write W s``.
    """
    inputs, outputs = Path(inputs), Path(outputs)
    result = FolderResult()
    if not inputs.is_dir():
        result.failed.append((str(inputs), "input folder does not exist"))
        _say(f"{inputs}: input folder does not exist")
        return result
    outputs.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(outputs)
    for path in sorted(inputs.iterdir()):
        if path.name.startswith("."):
            continue
        if path.suffix != ".npz" or not path.is_file():
            result.skipped.append(str(path))
            _say(f"{path}: skipped (not a .npz case file)")
            continue
        try:
            t0 = time.perf_counter()
            case = load_case(path, strict=strict_objects, with_gts=False)
            for w in case.warnings:
                _say(w)
            for obj in case.objects:
                if obj.problem:
                    _say(f"{path}: object {obj.label}: {obj.problem}; its previous mask is kept")
            t1 = time.perf_counter()
            segs = predict_fn(case)
            t2 = time.perf_counter()
            save_segmentation(outputs / path.name, segs, shape=case.shape)
            result.written.append(outputs / path.name)
            if timings:
                _say(f"timing {path.name}: read {t1 - t0:.2f} s, predict {t2 - t1:.2f} s, "
                     f"write {time.perf_counter() - t2:.2f} s ({len(case.objects)} objects)")
        except DCMError as e:
            _fail(result, outputs / path.name, str(path), str(e), str(e))
        except MemoryError:
            _fail(result, outputs / path.name, str(path), "out of memory", f"{path}: out of memory")
        except Exception as e:  # a predictor bug must not stop the other files
            logger.debug("prediction failed", exc_info=True)
            reason = f"prediction failed ({type(e).__name__}: {e})"
            _fail(result, outputs / path.name, str(path), reason, f"{path}: {reason}")
    if not result.written and not result.failed:
        result.failed.append((str(inputs), "no .npz case file"))
        _say(f"{inputs}: no .npz case file to predict")
    return result


def _fail(result: FolderResult, output: Path, path: str, reason: str, line: str) -> None:
    """Record a failed file; an output left by an earlier call must not pass for this call's answer."""
    if output.resolve() != Path(path).resolve():  # inputs and outputs may be one folder
        output.unlink(missing_ok=True)
    result.failed.append((path, reason))
    _say(line)


def _remove_stale_temporaries(outputs: Path) -> None:
    """Delete the temporary files of output writes that a killed earlier call left behind.

    :func:`dcm.atomic.atomic_path` names them ``.<name>.<random>.tmp``; a SIGKILL gives no chance to clean up.
    """
    for tmp in outputs.glob(".*.npz.*.tmp"):
        try:
            tmp.unlink()
        except OSError:
            pass
