"""Offline crops for the global-RoI trainer: one 64^3 file per object of every training case.

    python train_global_roi/preprocess.py --cases DIR --out DIR [--workers N] [--size 64] [--scale 1.8]
                                          [--min-size 8] [--pattern '*.npz']

For each challenge case ``<case>.npz`` (``imgs``, ``gts``, ``spacing``; ``boxes`` by the organisers' rule
from ``gts`` when the file has none) and each of its objects, the object's global RoI (the box rule of
inference, :func:`dcm.experts.roi.roi_from_box`) is resampled with the same code as inference
(:func:`dcm.experts.roi.crop_and_resize`) and written atomically to ``<out>/<case>_obj<label:03d>.npz``:

* ``image``: float32 (S, S, S) resampled intensities (trilinear), *not* normalised (the trainer z-normalises
  after augmentation);
* ``label``: uint8 (S, S, S) binary mask of the object (nearest);
* ``spacing_zyx``: float64 (3,) spacing of the case in mm;
* ``roi_center``: float64 (3,) and ``roi_size``: int64 (3,): the RoI (image voxels, (z, y, x)).

An object whose label is absent from ``gts`` or whose box is invalid is skipped with a warning. A case that
cannot be read or is inconsistent is reported on one line (file and problem) and skipped; the exit status is 1
if any case failed, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from dcm.data.cases import Box, atomic_savez, case_from_arrays, load_npz
from dcm.errors import CaseError

__all__ = ["preprocess_case", "preprocess_folder", "object_file_name", "main"]

#: (case file, number of files written, warnings, error line or None)
CaseResult = Tuple[str, int, List[str], Optional[str]]


def object_file_name(case_name: str, label: int) -> str:
    """``<case>_obj<label:03d>.npz``."""
    return f"{case_name}_obj{int(label):03d}.npz"


def _objects(case, gts: np.ndarray, file_has_boxes: bool) -> List[Tuple[int, Box]]:
    """(label, box) of every object: the file's boxes (object i = label i + 1), else boxes from ``gts``."""
    from dcm.protocol import boxes_from_labels

    if file_has_boxes:
        return [(o.label, o.box) for o in case.objects if o.box is not None and not o.problem]
    labels = [int(v) for v in np.unique(gts) if v != 0]
    return [(lab, Box.from_dict(b)) for lab, b in zip(labels, boxes_from_labels(gts))]


def preprocess_case(path: Path, out_dir: Path, size: int = 64, scale: float = 1.8, min_size: int = 8) -> CaseResult:
    """Write the crops of every object of one case; never raises (errors come back as one line).

    Returns:
        ``(case file, files written, warnings, error line or None)``.
    """
    from dcm.experts.roi import crop_and_resize, roi_from_box

    path = Path(path)
    warnings: List[str] = []
    try:
        arrays = load_npz(path)
        if "gts" not in arrays:
            raise CaseError(path, "gts", "missing (training cases need ground truth)")
        case = case_from_arrays(arrays, name=path.stem, path=path, strict=False)
        gts = case.gts
        warnings += [f"{path}: object {o.label}: {o.problem}, skipped" for o in case.objects if o.problem]
        spacing = np.asarray(case.spacing_zyx, dtype=np.float64)
        written = 0
        # With boxes in the file every object has a box or a "boxes[i]: ..." problem.
        has_boxes = any(o.box is not None or (o.problem or "").startswith("boxes") for o in case.objects)
        present = set(int(v) for v in np.unique(gts))
        for label, box in _objects(case, gts, has_boxes):
            if label not in present:
                warnings.append(f"{path}: object {label}: label absent from gts, skipped")
                continue
            roi = roi_from_box(box, scale=scale, min_size=min_size, out_size=size)
            image = crop_and_resize(case.image, roi, mode="trilinear").astype(np.float32, copy=False)
            # Nearest-resampling labels then comparing = comparing then resampling, without a full-size mask.
            label_crop = (crop_and_resize(gts, roi, mode="nearest") == label).astype(np.uint8)
            atomic_savez(
                out_dir / object_file_name(case.name, label),
                image=image,
                label=label_crop,
                spacing_zyx=spacing,
                roi_center=np.asarray(roi.center, dtype=np.float64),
                roi_size=np.asarray(roi.size, dtype=np.int64),
            )
            written += 1
        return str(path), written, warnings, None
    except CaseError as e:
        return str(path), 0, warnings, str(e)
    except Exception as e:  # a bad case must not stop the others
        return str(path), 0, warnings, f"{path}: {type(e).__name__}: {e}"


def _init_worker() -> None:
    # One thread per worker process: the processes are the parallelism.
    import torch

    torch.set_num_threads(1)


def preprocess_folder(
    cases: Sequence[Path],
    out_dir: Path,
    workers: int = 1,
    size: int = 64,
    scale: float = 1.8,
    min_size: int = 8,
    progress: bool = True,
) -> List[CaseResult]:
    """Preprocess ``cases`` (in parallel over cases when ``workers > 1``); results in completion order."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: List[CaseResult] = []
    bar = tqdm(total=len(cases), desc="global-RoI crops", unit="case", disable=not progress)
    try:
        if workers <= 1:
            for p in cases:
                results.append(preprocess_case(p, out_dir, size, scale, min_size))
                bar.update(1)
        else:
            with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker) as pool:
                futures = [pool.submit(preprocess_case, p, out_dir, size, scale, min_size) for p in cases]
                for fut in as_completed(futures):
                    results.append(fut.result())
                    bar.update(1)
    finally:
        bar.close()
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", required=True, help="folder of training cases (.npz with imgs, gts, spacing)")
    parser.add_argument("--out", required=True, help="output folder for <case>_obj<label>.npz")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="processes (default: min(8, CPUs))")
    parser.add_argument("--size", type=int, default=64, help="frame size S of the crops (default 64)")
    parser.add_argument("--scale", type=float, default=1.8, help="box enlargement factor (default 1.8)")
    parser.add_argument("--min-size", type=int, default=8, help="smallest RoI extent in voxels (default 8)")
    parser.add_argument("--pattern", default="*.npz", help="case file pattern (default *.npz)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    cases_dir = Path(args.cases)
    if not cases_dir.is_dir():
        print(f"{cases_dir}: no such folder", file=sys.stderr)
        return 2
    if args.size < 1 or args.scale <= 0 or args.min_size < 1 or args.workers < 1:
        print("--size, --min-size and --workers must be >= 1 and --scale > 0", file=sys.stderr)
        return 2
    cases = sorted(cases_dir.glob(args.pattern))
    if not cases:
        print(f"{cases_dir}: no case files matching {args.pattern}", file=sys.stderr)
        return 2
    results = preprocess_folder(cases, Path(args.out), args.workers, args.size, args.scale, args.min_size,
                                progress=not args.no_progress)
    failed = 0
    written = 0
    for _, n, warnings, error in sorted(results):
        for w in warnings:
            print(f"warning: {w}", file=sys.stderr)
        if error is not None:
            failed += 1
            print(f"skipped {error}", file=sys.stderr)
        written += n
    print(f"{written} object crops from {len(results) - failed} of {len(results)} cases -> {args.out}"
          + (f"; {failed} case(s) failed" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
