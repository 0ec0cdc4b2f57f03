"""Convert NIfTI image / label pairs (or a whole nnU-Net dataset) into challenge ``.npz`` cases.

Each case gets what the challenge files hold: ``imgs`` (z, y, x) uint8 0..255, ``gts`` (z, y, x) uint8
labels relabelled ``1..N``, ``spacing`` in (x, y, z) order and, unless disabled, ``boxes`` by the
organisers' rule (:func:`dcm.protocol.boxes_from_labels` with seed 2025).

Intensities follow the challenge's data preparation: CT is clipped to a window (default soft tissue,
level 40 / width 400 HU); other modalities are clipped to the 0.5 / 99.5 percentiles of their positive
voxels; both are then mapped linearly to 0..255 and truncated to uint8.

Usage::

    python -m dcm.data.convert --image ct.nii.gz --label seg.nii.gz --out cases/ --name CT_liver_001
    python -m dcm.data.convert --nnunet nnUNet_raw/Dataset003_Liver --out cases/
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from dcm.data.cases import MAX_OBJECTS, atomic_savez, case_to_arrays, modality_of
from dcm.data.nifti import Geometry, read_nifti
from dcm.errors import CaseError
from dcm.protocol import BOX_SEED, boxes_from_labels

__all__ = [
    "SOFT_TISSUE_WINDOW",
    "DEFAULT_PERCENTILES",
    "Intensity",
    "window_to_uint8",
    "percentile_to_uint8",
    "relabel_sequential",
    "modality_prefix",
    "convert_arrays",
    "convert_pair",
    "convert_nnunet",
    "main",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

#: (level, width) in HU.
SOFT_TISSUE_WINDOW: Tuple[float, float] = (40.0, 400.0)
#: (lower, upper) percentiles for non-CT images.
DEFAULT_PERCENTILES: Tuple[float, float] = (0.5, 99.5)

_MR_NAMES = {"mr", "mri", "t1", "t2", "t1w", "t2w", "t1c", "t1ce", "t1gd", "t1km", "flair", "t2flair", "adc",
             "dwi", "pd", "pdw", "swi", "bold", "cine", "lge", "dce", "mprage"}
_CT_NAMES = {"ct", "cect", "ncct", "cta", "ctpa", "lowdosect", "cbct"}
_PET_NAMES = {"pet", "fdg", "petct", "suv"}
_US_NAMES = {"us", "ultrasound", "echo", "3dus"}
_MICROSCOPY_NAMES = {"microscopy", "em", "fluorescence", "lightsheet", "confocal", "nuclei"}


@dataclass(frozen=True)
class Intensity:
    """How intensities become 0..255: a CT window or a percentile clip.

    Attributes:
        method: ``"window"`` or ``"percentile"``.
        low, high: window level and width (``window``) or lower and upper percentiles (``percentile``).
    """

    method: str
    low: float
    high: float

    @classmethod
    def for_modality(cls, prefix: Optional[str], window: Optional[Sequence[float]] = None,
                     percentiles: Optional[Sequence[float]] = None) -> "Intensity":
        """An explicit ``window`` / ``percentiles`` wins; otherwise a soft-tissue window for CT, percentiles else."""
        if window is not None and percentiles is not None:
            raise ValueError("give either a window or percentiles, not both")
        if window is not None:
            return cls("window", float(window[0]), float(window[1]))
        if percentiles is not None:
            return cls("percentile", float(percentiles[0]), float(percentiles[1]))
        if prefix == "CT":
            return cls("window", *SOFT_TISSUE_WINDOW)
        return cls("percentile", *DEFAULT_PERCENTILES)

    def apply(self, image: np.ndarray) -> np.ndarray:
        if self.method == "window":
            return window_to_uint8(image, self.low, self.high)
        return percentile_to_uint8(image, self.low, self.high)


def _linear_uint8(image: np.ndarray, lower: float, upper: float) -> np.ndarray:
    if not upper > lower:
        return np.zeros(image.shape, dtype=np.uint8)
    out = np.clip(image.astype(np.float32, copy=True), lower, upper)
    out -= np.float32(lower)
    out *= np.float32(255.0 / (upper - lower))
    return out.astype(np.uint8)  # truncation, as the challenge's preparation scripts do


def window_to_uint8(image: np.ndarray, level: float = SOFT_TISSUE_WINDOW[0],
                    width: float = SOFT_TISSUE_WINDOW[1]) -> np.ndarray:
    """Clip a (z, y, x) CT image to ``[level - width / 2, level + width / 2]`` and map it to 0..255 uint8."""
    if not width > 0:
        raise ValueError(f"window width must be > 0, got {width}")
    return _linear_uint8(image, level - width / 2.0, level + width / 2.0)


def percentile_to_uint8(image: np.ndarray, lower: float = DEFAULT_PERCENTILES[0],
                        upper: float = DEFAULT_PERCENTILES[1]) -> np.ndarray:
    """Clip a (z, y, x) image to its ``lower`` / ``upper`` percentiles and map it to 0..255 uint8.

    The percentiles are taken over the positive voxels (all voxels when none is positive), so a large
    zero background does not pull the lower bound down.
    """
    if not 0 <= lower < upper <= 100:
        raise ValueError(f"percentiles must satisfy 0 <= lower < upper <= 100, got {lower}, {upper}")
    values = image[image > 0]
    if values.size == 0:
        values = image.ravel()
    lo, hi = np.percentile(values.astype(np.float64, copy=False), [lower, upper])
    return _linear_uint8(image, float(lo), float(hi))


def relabel_sequential(labels: np.ndarray, where: Optional[PathLike] = None) -> Tuple[np.ndarray, List[int]]:
    """Map the labels present in a (z, y, x) label map to ``1..N`` in increasing order (0 stays 0).

    Returns:
        ``(uint8 label map, source values)``: new label ``i + 1`` was ``source[i]``.

    Raises:
        CaseError: non-integer or negative labels, or more than 255 objects.
    """
    labels = np.asarray(labels)
    if labels.dtype == bool:
        labels = labels.astype(np.uint8)
    if not np.issubdtype(labels.dtype, np.integer):
        if not (np.issubdtype(labels.dtype, np.floating) and np.all(np.isfinite(labels))
                and np.all(labels == np.round(labels))):
            raise CaseError(where, "labels", f"must hold integer labels, got non-integer {labels.dtype} values")
        labels = labels.astype(np.int64)
    values = np.unique(labels)
    if values.size and values[0] < 0:
        raise CaseError(where, "labels", f"negative label {int(values[0])}")
    source = [int(v) for v in values if v != 0]
    if len(source) > MAX_OBJECTS:
        raise CaseError(where, "labels", f"{len(source)} labels; the challenge format holds at most {MAX_OBJECTS}")
    if source == list(range(1, len(source) + 1)):
        return labels.astype(np.uint8), source
    lut_values = np.zeros(len(values), dtype=np.uint8)
    lut_values[values != 0] = np.arange(1, len(source) + 1)
    return lut_values[np.searchsorted(values, labels)], source


def modality_prefix(channel_name: str) -> Optional[str]:
    """The challenge case-name prefix for an nnU-Net channel name (``CT``, ``MR``, ``PET``, ``US``,
    ``Microscopy``), or None when the name is not recognised."""
    key = "".join(ch for ch in channel_name.lower() if ch.isalnum())
    if key in _PET_NAMES or key.startswith("pet"):
        return "PET"
    if key in _CT_NAMES or key.startswith("ct"):
        return "CT"
    if key in _MR_NAMES or key.startswith(("mr", "t1", "t2")):
        return "MR"
    if key in _US_NAMES or key.startswith("ultrasound"):
        return "US"
    if key in _MICROSCOPY_NAMES or "microscop" in key:
        return "Microscopy"
    return None


def _grid_text(shape: Sequence[int], g: Geometry) -> str:
    return (f"shape (z, y, x) {tuple(int(s) for s in shape)}, spacing {tuple(round(v, 6) for v in g.spacing_xyz)}, "
            f"origin {tuple(round(v, 4) for v in g.origin)}")


def convert_arrays(
    image: np.ndarray,
    labels: np.ndarray,
    spacing_xyz: Sequence[float],
    intensity: Intensity,
    boxes: bool = True,
    where: Optional[PathLike] = None,
) -> Tuple[Dict[str, Any], List[int]]:
    """Challenge arrays from a (z, y, x) image and label map on the same grid.

    Returns:
        ``(arrays, source_labels)``: what :func:`dcm.data.cases.atomic_savez` takes (``imgs``, ``spacing``,
        ``gts`` and ``boxes`` unless ``boxes=False``), and the source value of each new label.

    Raises:
        CaseError: bad labels (see :func:`relabel_sequential`) or no foreground at all.
    """
    gts, source = relabel_sequential(labels, where)
    if not source:
        raise CaseError(where, "labels", "no foreground labels (nothing to segment)")
    imgs = intensity.apply(np.asarray(image))
    box_list = boxes_from_labels(gts, seed=BOX_SEED) if boxes else None
    return case_to_arrays(imgs, spacing_xyz, boxes=box_list, gts=gts), source


def convert_pair(
    image_path: PathLike,
    label_path: PathLike,
    out_dir: PathLike,
    name: Optional[str] = None,
    modality: Optional[str] = None,
    window: Optional[Sequence[float]] = None,
    percentiles: Optional[Sequence[float]] = None,
    boxes: bool = True,
    label_names: Optional[Dict[int, str]] = None,
    save_meta: bool = False,
) -> Path:
    """Convert one image / label pair to ``<out_dir>/<name>.npz``.

    Args:
        image_path, label_path: 3D images on the same grid.
        name: case name; default ``<modality>_<image stem>`` (or the stem when no modality is known). Its
            prefix up to the first ``_`` is the modality the evaluator reports.
        modality: ``CT``, ``MR``, ... ; default: the prefix of ``name``. Decides the intensity mapping when
            neither ``window`` (level, width) nor ``percentiles`` (lower, upper) is given.
        boxes: add the organisers' boxes (seed 2025).
        label_names: source label value -> name, only for the metadata file.
        save_meta: also write ``<name>.json`` with the source files, geometry, intensity mapping and which
            source label each new label was.

    Raises:
        CaseError: unreadable files, label grid different from the image grid (naming both files), bad labels.
    """
    image_path, label_path = Path(image_path), Path(label_path)
    stem = _strip_image_suffix(image_path.name)
    if name is None:
        name = f"{modality}_{stem}" if modality and not stem.startswith(f"{modality}_") else stem
    if modality is None:
        modality = modality_of(name)
    image, geometry = read_nifti(image_path)
    labels, label_geometry = read_nifti(label_path)
    if labels.shape != image.shape or not label_geometry.matches(geometry):
        raise CaseError(label_path, "grid", f"label grid ({_grid_text(labels.shape, label_geometry)}) differs "
                        f"from the image {image_path} ({_grid_text(image.shape, geometry)})")
    intensity = Intensity.for_modality(modality, window, percentiles)
    arrays, source = convert_arrays(image, labels, geometry.spacing_xyz, intensity, boxes=boxes, where=label_path)
    out = atomic_savez(Path(out_dir) / f"{name}.npz", **arrays)
    if save_meta:
        meta = {
            "name": name,
            "image": str(image_path),
            "label": str(label_path),
            "spacing_xyz": list(geometry.spacing_xyz),
            "origin": list(geometry.origin),
            "direction": list(geometry.direction),
            "intensity": {"method": intensity.method, "low": intensity.low, "high": intensity.high},
            "labels": [{"label": i + 1, "source_value": v,
                        **({"name": label_names[v]} if label_names and v in label_names else {})}
                       for i, v in enumerate(source)],
        }
        _atomic_write_text(Path(out_dir) / f"{name}.json", json.dumps(meta, indent=2))
    return out


def _strip_image_suffix(filename: str) -> str:
    for ending in (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd"):
        if filename.endswith(ending):
            return filename[: -len(ending)]
    return Path(filename).stem


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _nnunet_label_names(labels: Any) -> Dict[int, str]:
    """value -> name from dataset.json ``labels`` (v2: ``{name: value}``, v1: ``{"value": name}``)."""
    if not isinstance(labels, dict):
        return {}
    if labels and all(str(k).isdigit() for k in labels):
        return {int(k): str(v) for k, v in labels.items()}
    return {int(v): str(k) for k, v in labels.items() if isinstance(v, int)}


def convert_nnunet(
    dataset_dir: PathLike,
    out_dir: PathLike,
    modality: Optional[str] = None,
    window: Optional[Sequence[float]] = None,
    percentiles: Optional[Sequence[float]] = None,
    boxes: bool = True,
    channel: int = 0,
    save_meta: bool = False,
    keep_going: bool = False,
    progress: bool = True,
) -> List[Path]:
    """Convert every training case of an nnU-Net raw dataset.

    Expects ``dataset.json`` (``channel_names`` or v1 ``modality``, ``labels``, optional ``file_ending``,
    default ``.nii.gz``), ``labelsTr/<case><ending>`` and ``imagesTr/<case>_<channel:04d><ending>``. Cases are
    named ``<prefix>_<case>``; the prefix is ``modality`` when given, else derived from the channel name
    (:func:`modality_prefix`).

    Args:
        keep_going: log and skip cases that fail instead of raising.

    Returns:
        The written case files, sorted by case name.

    Raises:
        CaseError: missing or unreadable ``dataset.json``, an unrecognised channel name without
            ``modality``, a missing image, or (unless ``keep_going``) any case that fails.
    """
    from tqdm import tqdm

    root = Path(dataset_dir)
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        raise CaseError(meta_path, None, "no such file (not an nnU-Net raw dataset folder?)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise CaseError(meta_path, None, f"not readable JSON ({e})") from None
    channels = meta.get("channel_names") or meta.get("modality") or {}
    channel_name = str(channels.get(str(channel), "")) if isinstance(channels, dict) else ""
    prefix = modality or modality_prefix(channel_name)
    if prefix is None:
        raise CaseError(meta_path, "channel_names", f"channel {channel} is {channel_name!r}, not a known modality; "
                        "pass the case-name prefix (--modality-prefix)")
    ending = str(meta.get("file_ending", ".nii.gz"))
    names = _nnunet_label_names(meta.get("labels"))
    label_dir = root / "labelsTr"
    if not label_dir.is_dir():
        raise CaseError(label_dir, None, "no such folder")
    label_files = sorted(p for p in label_dir.iterdir() if p.name.endswith(ending) and not p.name.startswith("."))
    out: List[Path] = []
    failures: List[str] = []
    for label_path in tqdm(label_files, desc="converting", unit="case", disable=not progress):
        case = label_path.name[: -len(ending)]
        image_path = root / "imagesTr" / f"{case}_{channel:04d}{ending}"
        name = case if case.startswith(f"{prefix}_") else f"{prefix}_{case}"
        try:
            if not image_path.is_file():
                raise CaseError(image_path, None, f"no such file (the image of {label_path})")
            out.append(convert_pair(image_path, label_path, out_dir, name=name, modality=prefix, window=window,
                                    percentiles=percentiles, boxes=boxes, label_names=names, save_meta=save_meta))
        except CaseError as e:
            if not keep_going:
                raise
            failures.append(str(e))
            logger.warning("skipped %s: %s", case, e)
    if failures:
        logger.warning("%d of %d cases failed", len(failures), len(label_files))
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dcm.data.convert", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", type=Path, help="image file (with --label)")
    src.add_argument("--nnunet", type=Path, metavar="DATASET_DIR", help="nnU-Net raw dataset folder")
    p.add_argument("--label", type=Path, help="label file on the image's grid")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--name", help="case name for --image (default <prefix>_<image stem>)")
    p.add_argument("--modality-prefix", help="case-name prefix: CT, MR, PET, US, Microscopy (overrides the "
                   "nnU-Net channel name)")
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--window", type=float, nargs=2, metavar=("LEVEL", "WIDTH"),
                       help=f"CT window (default for CT: {SOFT_TISSUE_WINDOW[0]:g} {SOFT_TISSUE_WINDOW[1]:g})")
    scale.add_argument("--percentile", type=float, nargs=2, metavar=("LOW", "HIGH"),
                       help=f"percentile clip (default for non-CT: {DEFAULT_PERCENTILES[0]} {DEFAULT_PERCENTILES[1]})")
    p.add_argument("--no-boxes", action="store_true", help="do not add boxes (e.g. vessels, instances)")
    p.add_argument("--channel", type=int, default=0, help="nnU-Net input channel (default 0)")
    p.add_argument("--save-meta", action="store_true", help="also write <name>.json with the label mapping")
    p.add_argument("--keep-going", action="store_true", help="nnU-Net: skip failing cases")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        if args.image is not None:
            if args.label is None:
                p.error("--image needs --label")
            path = convert_pair(args.image, args.label, args.out, name=args.name, modality=args.modality_prefix,
                                window=args.window, percentiles=args.percentile, boxes=not args.no_boxes,
                                save_meta=args.save_meta)
            print(f"wrote {path}")
        else:
            paths = convert_nnunet(args.nnunet, args.out, modality=args.modality_prefix, window=args.window,
                                   percentiles=args.percentile, boxes=not args.no_boxes, channel=args.channel,
                                   save_meta=args.save_meta, keep_going=args.keep_going,
                                   progress=not args.no_progress)
            print(f"wrote {len(paths)} cases to {args.out}")
    except (CaseError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
