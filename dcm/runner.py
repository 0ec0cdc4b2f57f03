"""Turn every case file of an input folder into an output file: what ``predict.sh`` does per call.

One implementation serves the reference baselines and DCM's own predictor, so error handling is the same
everywhere: a bad file gets one line naming the file and the field, the other files are still predicted,
outputs are written atomically, and the exit status says whether every file succeeded.
"""

from __future__ import annotations

import logging
import os
import sys
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
    print(line, file=sys.stderr, flush=True)


def predict_folder(inputs: Path, outputs: Path, predict_fn: PredictFn, strict_objects: bool = False) -> FolderResult:
    """Predict every ``*.npz`` of ``inputs`` into ``outputs/<same name>.npz`` (key ``segs``).

    Args:
        inputs: folder of challenge case files; other files are reported and skipped.
        outputs: created if missing; not cleared (the organisers never clear it).
        predict_fn: the predictor.
        strict_objects: fail the whole file on a per-object problem instead of leaving that object's
            previous mask (the default, handled by ``predict_fn`` through ``ObjectPrompts.problem``).
    """
    inputs, outputs = Path(inputs), Path(outputs)
    result = FolderResult()
    if not inputs.is_dir():
        result.failed.append((str(inputs), "input folder does not exist"))
        _say(f"{inputs}: input folder does not exist")
        return result
    outputs.mkdir(parents=True, exist_ok=True)
    for path in sorted(inputs.iterdir()):
        if path.name.startswith("."):
            continue
        if path.suffix != ".npz" or not path.is_file():
            result.skipped.append(str(path))
            _say(f"{path}: skipped (not a .npz case file)")
            continue
        try:
            case = load_case(path, strict=strict_objects, with_gts=False)
            for w in case.warnings:
                _say(w)
            for obj in case.objects:
                if obj.problem:
                    _say(f"{path}: object {obj.label}: {obj.problem}; its previous mask is kept")
            segs = predict_fn(case)
            save_segmentation(outputs / path.name, segs, shape=case.shape)
            result.written.append(outputs / path.name)
        except DCMError as e:
            result.failed.append((str(path), str(e)))
            _say(str(e))
        except MemoryError:
            result.failed.append((str(path), "out of memory"))
            _say(f"{path}: out of memory")
        except Exception as e:  # a predictor bug must not stop the other files
            logger.debug("prediction failed", exc_info=True)
            reason = f"prediction failed ({type(e).__name__}: {e})"
            result.failed.append((str(path), reason))
            _say(f"{path}: {reason}")
    return result
