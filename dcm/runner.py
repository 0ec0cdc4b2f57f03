"""Turn every case file of an input folder into an output file: what ``predict.sh`` does per call.

One implementation serves the reference baselines and DCM's own predictor, so error handling is the same
everywhere: a bad file gets one line naming the file and the field, the other files are still predicted,
outputs are written atomically, and the exit status says whether every file succeeded.
"""

from __future__ import annotations

import logging
import os
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from dcm.atomic import check_writable, stale_temporaries
from dcm.data.cases import Case, load_case, save_segmentation
from dcm.errors import DCMError, OutputError

__all__ = ["PredictFn", "FolderResult", "default_io_dirs", "check_io_dirs", "predict_folder"]

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


def check_io_dirs(inputs: Path, outputs: Path) -> None:
    """Refuse, before any work, an output folder that cannot be written or that is the input folder.

    Raises:
        OutputError: one line naming the folder.
    """
    check_writable(outputs, folder=True)
    if Path(inputs).is_dir() and Path(outputs).is_dir() and Path(inputs).resolve() == Path(outputs).resolve():
        raise OutputError(f"{outputs}: the output folder is the input folder ({inputs}); outputs would "
                          f"overwrite the cases: give another --outputs")


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
    try:
        check_io_dirs(inputs, outputs)
        outputs.mkdir(parents=True, exist_ok=True)
    except (DCMError, OSError) as e:
        result.failed.append((str(outputs), str(e)))
        _say(str(e) if isinstance(e, DCMError) else f"{outputs}: cannot be written ({e.strerror or e})")
        return result
    _remove_stale_temporaries(outputs)
    earlier = _earlier_outputs(outputs)
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
            out = outputs / path.name
            if out.exists() and not out.is_file():
                raise OutputError(f"{out}: cannot be written: "
                                  f"it is {'a folder' if out.is_dir() else 'not a regular file'}")
            segs = predict_fn(case)
            t2 = time.perf_counter()
            save_segmentation(out, segs, shape=case.shape)
            result.written.append(outputs / path.name)
            if timings:
                _say(f"timing {path.name}: read {t1 - t0:.2f} s, predict {t2 - t1:.2f} s, "
                     f"write {time.perf_counter() - t2:.2f} s ({len(case.objects)} objects)")
        except DCMError as e:
            _fail(result, outputs / path.name, earlier, str(path), str(e), str(e))
        except MemoryError:
            _fail(result, outputs / path.name, earlier, str(path), "out of memory", f"{path}: out of memory")
        except OSError as e:  # the output cannot be written
            reason = f"cannot write {outputs / path.name} ({e.strerror or type(e).__name__})"
            _fail(result, outputs / path.name, earlier, str(path), reason, f"{path}: {reason}")
        except Exception as e:  # a predictor bug must not stop the other files
            logger.debug("prediction failed", exc_info=True)
            reason = f"prediction failed ({type(e).__name__}: {e})"
            _fail(result, outputs / path.name, earlier, str(path), reason, f"{path}: {reason}")
    if not result.written and not result.failed:
        result.failed.append((str(inputs), "no .npz case file"))
        _say(f"{inputs}: no .npz case file to predict")
    return result


def _earlier_outputs(outputs: Path) -> Dict[str, Tuple[int, int, int]]:
    """``{name: (device, inode, mtime_ns)}`` of the ``.npz`` files (not folders) in ``outputs`` before this call
    wrote any."""
    found = {}
    for p in outputs.glob("*.npz"):
        try:
            st = p.lstat()
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode):
            found[p.name] = (st.st_dev, st.st_ino, st.st_mtime_ns)
    return found


def _fail(result: FolderResult, output: Path, earlier: Dict[str, Tuple[int, int, int]], path: str, reason: str,
          line: str) -> None:
    """Record a failed file and remove its output if an earlier call left it there (it must not pass for
    this call's answer); an output written since this call started (by another call on the same folder)
    is that call's and stays."""
    try:
        st = output.lstat()
    except OSError:
        st = None
    if st is not None and earlier.get(output.name) == (st.st_dev, st.st_ino, st.st_mtime_ns):
        try:
            output.unlink()
        except OSError as e:
            _say(f"{output}: stale output not removed ({e.strerror or e})")
    result.failed.append((path, reason))
    _say(line)


def _remove_stale_temporaries(outputs: Path) -> None:
    """Delete the temporary files of output writes that a killed earlier call left behind.

    :func:`dcm.atomic.atomic_path` names them ``.<name>.<pid>.<random>.tmp``; a SIGKILL gives no chance to
    clean up. Those of a process that still runs (another call writing to this folder) are left alone.
    """
    for tmp in stale_temporaries(outputs, "*.npz"):
        try:
            tmp.unlink()
        except OSError:
            pass
