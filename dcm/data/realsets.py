"""Real MRI challenge cases built from what installed packages ship: brain templates and their atlases.

    python -m dcm.data.realsets --out runs/realsets [--splits train val test] [--max-cases-per-split N]

Sources (read from the installed packages at run time; nothing here is committed):

* ``nilearn`` wheel (``pip install nilearn==0.14.1``): the MNI152 2009a symmetric T1 template (1 mm,
  skull-stripped) with grey / white matter from its probability maps (> 0.5);
* Debian ``mricron-data`` (``apt-get install mricron-data``), ``/usr/share/mricron/templates/``:
  atlases on the MNI grid, resampled (nearest neighbour, by their sform affines) onto the template grid
  and used only when at least :data:`MIN_ATLAS_FIT` of their labelled voxels fall in the template's brain
  (dilated by 2 voxels): HarvardOxford cortical maxprob (FSL licence: non-commercial use), JHU white matter
  labels (1 mm; FSL), AICHA (``AICHAmc``), ``jhu189``, ``natbrainlab`` (white-matter tracts);
  the rhesus macaque template ``inia19-t1-brain`` with its 724-label ``inia19-NeuroMaps`` atlas (0.5 mm);
  Colin27 (``ch2`` with skull, ``ch2bet`` skull-stripped) with ``brodmann``: **test split only**.
* Never used: ``aal.nii.gz`` (AAL) and the pyradiomics test data (held out for independent evaluation).

A case is a crop (at most :data:`MAX_SIDE` voxels per side, the objects' union box plus a margin of
:data:`CROP_MARGIN`) of one image with 3-8 objects of one atlas and one split: nearby regions grouped
greedily by centroid distance. Every region is split into its left and right hemisphere part (by the
sign of the world x coordinate); a part is one object. Objects under :data:`MIN_REGION_VOXELS` voxels are
dropped; the rest span a few dozen voxels (macaque nuclei) to tens of thousands (cortical gyri), with
elongated ones (white-matter tracts). Images are mapped to 0..255 with the 0.5 / 99.5 percentiles of the
crop's positive voxels (:func:`dcm.data.convert.convert_arrays`, as ``dcm.data.convert`` does for MR);
arrays are (z, y, x) (the NIfTI voxel order reversed, as SimpleITK reads it), ``spacing`` is stored (x, y,
z) from the NIfTI header, boxes by the organisers' rule (seed 2025). Case names start with ``MR_``.

Split rule (fixed, deterministic, recorded in ``DIR/splits.json``):

* MNI grid (one symmetric template shared by several overlapping atlases): splitting by hemisphere would
  put mirror images in two splits, and splitting each atlas by region id would put the same voxels in two
  splits under two atlases. So the split is by **zone**: the validation zone is the anterior (MNI y >=
  :data:`MNI_VAL_ZONE_MM` [1]) and posterior (y <= [0]) ends of the brain, training the middle. A region
  (of any atlas) goes to the split of the zone holding at least :data:`ZONE_MAJORITY` of its voxels;
  regions straddling the border are dropped. The grey / white matter cases are the tissue inside one zone
  (the crop is that zone's box). No MNI test cases.
* Macaque: by structure, ``s = label % 1000`` (left and right share it): ``s % 10 == 3`` validation,
  ``s % 10 == 7`` test, else training.
* Colin27: every case in the test split (alternately on ``ch2bet`` and ``ch2``).

So no region is in two splits, no MNI voxel is labelled in both training and validation beyond the
straddling margin (``1 - ZONE_MAJORITY`` of a region), and Colin27 is in test only.

``splits.json``: per case its split, source image, atlas (with its terms), crop, shape, spacing and the
objects (label, atlas id, name, hemisphere, voxel count); per atlas its fit to the grid and whether it was
used. A missing package gives one line naming it and the command that installs it (exit code 2).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from dcm.data.cases import atomic_savez
from dcm.data.convert import Intensity, convert_arrays
from dcm.data.nifti import NILEARN_REQUIREMENT, find_mni_files

__all__ = [
    "SPLITS",
    "SOURCES",
    "MRICRON_DIR",
    "MissingPackage",
    "RegionPart",
    "CasePlan",
    "find_mricron_dir",
    "plan_cases",
    "build_realsets",
    "split_cases",
    "main",
]

SPLITS: Tuple[str, ...] = ("train", "val", "test")
#: source families: the MNI152 template (tissue + MNI-grid atlases), the macaque, Colin27.
SOURCES: Tuple[str, ...] = ("mni152", "inia19", "colin27")
MRICRON_DIR = Path("/usr/share/mricron/templates")
MRICRON_INSTALL = "apt-get install mricron-data"
#: files that must never be read (held out for independent evaluation).
FORBIDDEN_FILES = ("aal.nii.gz",)

MAX_SIDE = 160
CROP_MARGIN = 6
MIN_REGION_VOXELS = 50
#: objects per case, in turn (a pool's last case may have fewer, at least 2).
OBJECTS_CYCLE: Tuple[int, ...] = (5, 3, 8, 4, 7, 6)
MIN_ATLAS_FIT = 0.85
ZONE_MAJORITY = 0.9
#: (posterior, anterior) MNI y limits of the validation zone, mm.
MNI_VAL_ZONE_MM: Tuple[float, float] = (-72.0, 32.0)

SPLIT_RULE = (
    f"MNI152 grid (tissue and every MNI-grid atlas): by zone; validation = MNI y <= {MNI_VAL_ZONE_MM[0]:g} mm "
    f"or >= {MNI_VAL_ZONE_MM[1]:g} mm, training = between; a region goes to the zone holding >= "
    f"{ZONE_MAJORITY:.0%} of its voxels, else it is dropped; tissue = grey / white matter inside one zone. "
    "Macaque (inia19-NeuroMaps): by structure s = label % 1000: s % 10 == 3 validation, s % 10 == 7 test, "
    "else training. Colin27 (ch2, ch2bet; brodmann): test only. Never used: AAL, pyradiomics test data."
)

_FSL_TERMS = "FSL licence (non-commercial use only); load from mricron-data at run time, never redistribute"
_ATLAS_TERMS = "upstream atlas terms (see its publication / distributor); load from mricron-data at run time"


@dataclass(frozen=True)
class AtlasSpec:
    """A label atlas on the grid of one of the templates.

    Attributes:
        key: short name used in case names and ``splits.json``.
        file: file name under :data:`MRICRON_DIR`.
        names_file: optional ``<id> <name>`` text file next to it.
        terms: the atlas's terms, recorded per case.
    """

    key: str
    file: str
    names_file: Optional[str]
    terms: str


MNI_ATLASES: Tuple[AtlasSpec, ...] = (
    AtlasSpec("harvardoxford", "HarvardOxford-cort-maxprob-thr0-1mm.nii.gz", None, _FSL_TERMS),
    AtlasSpec("jhuwm", "JHU-WhiteMatter-labels-1mm.nii.gz", "JHU-WhiteMatter-labels-1mm.nii.txt", _FSL_TERMS),
    AtlasSpec("aicha", "AICHAmc.nii.gz", "AICHAmc.nii.txt", _ATLAS_TERMS),
    AtlasSpec("jhu189", "jhu189.nii.gz", None, _ATLAS_TERMS),
    AtlasSpec("natbrainlab", "natbrainlab.nii.gz", None, _ATLAS_TERMS),
)
INIA19_IMAGE, INIA19_ATLAS = "inia19-t1-brain.nii.gz", AtlasSpec(
    "neuromaps", "inia19-NeuroMaps.nii.gz", None, _ATLAS_TERMS)
COLIN27_IMAGES = ("ch2bet.nii.gz", "ch2.nii.gz")
COLIN27_ATLAS = AtlasSpec("brodmann", "brodmann.nii.gz", None, _ATLAS_TERMS)
TISSUE_TERMS = "nilearn (BSD) ships the MNI152 2009a template: ICBM terms (free use with attribution)"

#: HarvardOxford cortical labels 1..48 (the FSL atlas's standard order).
HARVARD_OXFORD_CORTICAL = (
    "Frontal Pole", "Insular Cortex", "Superior Frontal Gyrus", "Middle Frontal Gyrus",
    "Inferior Frontal Gyrus, pars triangularis", "Inferior Frontal Gyrus, pars opercularis", "Precentral Gyrus",
    "Temporal Pole", "Superior Temporal Gyrus, anterior division", "Superior Temporal Gyrus, posterior division",
    "Middle Temporal Gyrus, anterior division", "Middle Temporal Gyrus, posterior division",
    "Middle Temporal Gyrus, temporooccipital part", "Inferior Temporal Gyrus, anterior division",
    "Inferior Temporal Gyrus, posterior division", "Inferior Temporal Gyrus, temporooccipital part",
    "Postcentral Gyrus", "Superior Parietal Lobule", "Supramarginal Gyrus, anterior division",
    "Supramarginal Gyrus, posterior division", "Angular Gyrus", "Lateral Occipital Cortex, superior division",
    "Lateral Occipital Cortex, inferior division", "Intracalcarine Cortex", "Frontal Medial Cortex",
    "Juxtapositional Lobule Cortex", "Subcallosal Cortex", "Paracingulate Gyrus",
    "Cingulate Gyrus, anterior division", "Cingulate Gyrus, posterior division", "Precuneous Cortex",
    "Cuneal Cortex", "Frontal Orbital Cortex", "Parahippocampal Gyrus, anterior division",
    "Parahippocampal Gyrus, posterior division", "Lingual Gyrus", "Temporal Fusiform Cortex, anterior division",
    "Temporal Fusiform Cortex, posterior division", "Temporal Occipital Fusiform Cortex",
    "Occipital Fusiform Gyrus", "Frontal Operculum Cortex", "Central Opercular Cortex",
    "Parietal Operculum Cortex", "Planum Polare", "Heschl's Gyrus", "Planum Temporale", "Supracalcarine Cortex",
    "Occipital Pole",
)

Bounds = Tuple[Tuple[int, int], Tuple[int, int], Tuple[int, int]]


class MissingPackage(RuntimeError):
    """A package that ships the source files is not installed (the message names the install command)."""


# ------------------------------------------------------------------------------------------ reading


def find_mricron_dir() -> Optional[Path]:
    """:data:`MRICRON_DIR` when the ``mricron-data`` templates are installed, else None."""
    return MRICRON_DIR if (MRICRON_DIR / INIA19_IMAGE).is_file() else None


def _read_zyx(path: Path) -> Tuple[np.ndarray, np.ndarray, Tuple[float, float, float]]:
    """A NIfTI volume as ``(array (z, y, x), 4 x 4 voxel-(x, y, z) -> RAS mm affine, spacing_xyz)``.

    nibabel, not :func:`dcm.data.nifti.read_nifti`: several of these atlases carry a wrong qform (zero
    offsets) beside a correct sform, and SimpleITK takes the qform; nibabel's ``affine`` is the sform.
    The array is the file's voxel order reversed, exactly what SimpleITK would give.
    """
    import nibabel as nib

    if path.name in FORBIDDEN_FILES:
        raise ValueError(f"{path} is held out and must not be read")
    image = nib.load(str(path))
    data = np.asanyarray(image.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    spacing = tuple(float(v) for v in image.header.get_zooms()[:3])
    return np.ascontiguousarray(data.transpose(2, 1, 0)), np.asarray(image.affine, dtype=np.float64), spacing


def _resample_labels(labels_zyx: np.ndarray, affine: np.ndarray, shape_zyx: Sequence[int],
                     target_affine: np.ndarray) -> np.ndarray:
    """Nearest-neighbour resampling of a (z, y, x) label map onto another grid, through world coordinates."""
    voxel_map = np.linalg.inv(affine) @ target_affine  # target voxel (x, y, z) -> source voxel (x, y, z)
    reverse = np.eye(3)[::-1]  # (x, y, z) <-> (z, y, x)
    matrix = reverse @ voxel_map[:3, :3] @ reverse
    offset = reverse @ voxel_map[:3, 3]
    return ndimage.affine_transform(labels_zyx, matrix, offset=offset, output_shape=tuple(shape_zyx), order=0,
                                    mode="constant", cval=0)


def _world_coordinate(affine: np.ndarray, shape_zyx: Sequence[int], axis: int) -> np.ndarray:
    """(z, y, x) float32 map of one world (RAS mm) coordinate: ``axis`` 0 = x (right +), 1 = y (anterior +)."""
    z, y, x = (np.arange(n, dtype=np.float32) for n in shape_zyx)
    row = affine[axis].astype(np.float32)
    return row[0] * x[None, None, :] + row[1] * y[None, :, None] + row[2] * z[:, None, None] + row[3]


def _read_names(path: Optional[Path]) -> Dict[int, str]:
    """``id -> name`` from an atlas's ``<id> <name> ...`` text file ({} when there is none)."""
    names: Dict[int, str] = {}
    if path is None or not path.is_file():
        return names
    for line in path.read_text(errors="replace").splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit() and int(parts[0]) > 0:
            names[int(parts[0])] = parts[1].replace("_", " ")
    return names


# ------------------------------------------------------------------------------------------ regions


@dataclass(frozen=True)
class RegionPart:
    """One hemisphere part of one atlas region on one image grid: an object of a case.

    Attributes:
        atlas: atlas key (``aicha``, ``neuromaps``, ``mni152-tissue``, ...).
        atlas_id: the label value in the atlas (a tissue class: 1 = grey, 2 = white matter).
        name: readable name.
        hemisphere: ``"left"`` or ``"right"``.
        split: ``train`` / ``val`` / ``test``.
        voxels: voxel count on the grid.
        bounds: inclusive (z, y, x) voxel bounds on the grid.
        centroid: (z, y, x) voxel centroid.
        zone: the MNI zone (``anterior`` / ``middle`` / ``posterior``), else "".
    """

    atlas: str
    atlas_id: int
    name: str
    hemisphere: str
    split: str
    voxels: int
    bounds: Bounds
    centroid: Tuple[float, float, float]
    zone: str = ""

    @property
    def region_key(self) -> str:
        """What must not appear in two splits: the atlas region (both hemispheres; a tissue class per zone)."""
        return f"{self.atlas}:{self.atlas_id}" + (f"@{self.zone}" if self.atlas == "tissue" else "")


@dataclass
class _Grid:
    """One image with the label maps on its grid.

    Attributes:
        key: source image key (``mni152``, ``inia19``, ``colin27bet``, ``colin27``).
        image_file: path of the image.
        image: (z, y, x) intensities.
        affine: voxel (x, y, z) -> RAS mm.
        spacing_xyz: voxel size, (x, y, z).
        label_maps: atlas key -> (z, y, x) label map on this grid (0 outside the image's foreground).
        left: (z, y, x) bool, world x < 0.
        zone_map: MNI grid only: (z, y, x) uint8 zone (0 posterior, 1 middle, 2 anterior).
    """

    key: str
    image_file: Path
    image: np.ndarray
    affine: np.ndarray
    spacing_xyz: Tuple[float, float, float]
    label_maps: Dict[str, np.ndarray] = field(default_factory=dict)
    left: Optional[np.ndarray] = None
    zone_map: Optional[np.ndarray] = None


def _region_parts(labels: np.ndarray, left: np.ndarray, atlas: str, names: Dict[int, str],
                  split_of: Any) -> List[RegionPart]:
    """Every hemisphere part of every label of a (z, y, x) map with at least :data:`MIN_REGION_VOXELS` voxels.

    ``split_of(atlas_id, zyx)`` gives ``(split, zone)`` or None (the part is dropped); ``zyx`` are the
    part's voxel coordinates (three index arrays, as ``np.nonzero`` gives them).
    """
    keys = labels.astype(np.int32) * 2 + left  # id * 2 + (1 if left); 0 and 1 are background
    keys[labels == 0] = 0
    counts = np.bincount(keys.ravel())
    values = np.flatnonzero(counts[2:]) + 2
    lut = np.zeros(counts.size, dtype=np.int32)
    lut[values] = np.arange(1, values.size + 1)
    compact = lut[keys]  # 1..K in increasing key order
    parts: List[RegionPart] = []
    for c, (value, sl) in enumerate(zip(values, ndimage.find_objects(compact)), start=1):
        if counts[value] < MIN_REGION_VOXELS:
            continue
        atlas_id, is_left = int(value) // 2, bool(value % 2)
        local = np.nonzero(compact[sl] == c)
        zyx = tuple(a + s.start for a, s in zip(local, sl))
        decision = split_of(atlas_id, zyx)
        if decision is None:
            continue
        split, zone = decision
        parts.append(RegionPart(
            atlas=atlas, atlas_id=atlas_id, name=names.get(atlas_id, f"{atlas} {atlas_id}"),
            hemisphere="left" if is_left else "right", split=split, voxels=int(counts[value]),
            bounds=tuple((int(s.start), int(s.stop) - 1) for s in sl),  # type: ignore[arg-type]
            centroid=tuple(float(np.mean(a)) for a in zyx), zone=zone))  # type: ignore[arg-type]
    return parts


def _mni_zone_map(grid: _Grid) -> np.ndarray:
    """(z, y, x) uint8 zone of every voxel: 0 posterior, 1 middle, 2 anterior (MNI y, mm)."""
    y_mm = _world_coordinate(grid.affine, grid.image.shape, axis=1)
    zone = np.ones(grid.image.shape, dtype=np.uint8)
    zone[y_mm <= MNI_VAL_ZONE_MM[0]] = 0
    zone[y_mm >= MNI_VAL_ZONE_MM[1]] = 2
    return zone


_ZONE_NAMES = ("posterior", "middle", "anterior")


def _zone_split(zone_map: np.ndarray) -> Any:
    """``split_of`` for the MNI grid: the zone holding >= :data:`ZONE_MAJORITY` of a part's voxels."""

    def split_of(atlas_id: int, zyx: Tuple[np.ndarray, ...]) -> Optional[Tuple[str, str]]:
        counts = np.bincount(zone_map[zyx], minlength=3)
        zone = int(np.argmax(counts))
        if counts[zone] < ZONE_MAJORITY * zyx[0].size:
            return None
        return ("train" if zone == 1 else "val"), _ZONE_NAMES[zone]

    return split_of


def _structure_split(atlas_id: int, zyx: Tuple[np.ndarray, ...]) -> Tuple[str, str]:
    """``split_of`` for the macaque: by structure ``label % 1000`` (both hemispheres share it)."""
    digit = (atlas_id % 1000) % 10
    return ("val" if digit == 3 else "test" if digit == 7 else "train"), ""


# ------------------------------------------------------------------------------------------ planning


@dataclass
class CasePlan:
    """One case to write: a crop of one grid with some region parts as objects 1..N (in list order).

    Attributes:
        name: case file stem (``MR_...``).
        split: its split.
        grid_key: which image (``mni152``, ``inia19``, ``colin27bet``, ``colin27``).
        atlas: atlas key.
        parts: its objects, label ``i + 1`` = ``parts[i]``.
        crop: ``((z0, z1), (y0, y1), (x0, x1))`` half-open voxel ranges on the grid.
    """

    name: str
    split: str
    grid_key: str
    atlas: str
    parts: List[RegionPart]
    crop: Bounds


def _crop_around(bounds: Bounds, shape: Sequence[int]) -> Optional[Bounds]:
    """Half-open crop ranges: ``bounds`` plus :data:`CROP_MARGIN`, clipped to ``shape``; None over :data:`MAX_SIDE`."""
    out = []
    for (lo, hi), n in zip(bounds, shape):
        a, b = max(0, lo - CROP_MARGIN), min(int(n), hi + 1 + CROP_MARGIN)
        if b - a > MAX_SIDE:
            return None
        out.append((a, b))
    return tuple(out)  # type: ignore[return-value]


def _union(a: Bounds, b: Bounds) -> Bounds:
    return tuple((min(x[0], y[0]), max(x[1], y[1])) for x, y in zip(a, b))  # type: ignore[return-value]


def _group_parts(parts: List[RegionPart], shape: Sequence[int]) -> List[Tuple[List[RegionPart], Bounds]]:
    """Partition region parts into cases of nearby parts whose crop fits :data:`MAX_SIDE`.

    Deterministic: seeds in (atlas id, hemisphere) order; each seed takes the nearest unused parts (centroid
    distance) while the crop fits, up to the next size of :data:`OBJECTS_CYCLE`. Groups of one are dropped.
    """
    pool = sorted((p for p in parts if _crop_around(p.bounds, shape) is not None),
                  key=lambda p: (p.atlas_id, p.hemisphere))
    centroids = np.array([p.centroid for p in pool]).reshape(-1, 3)
    used = np.zeros(len(pool), dtype=bool)
    groups: List[Tuple[List[RegionPart], Bounds]] = []
    for seed in range(len(pool)):
        if used[seed]:
            continue
        target = OBJECTS_CYCLE[len(groups) % len(OBJECTS_CYCLE)]
        members, bounds = [seed], pool[seed].bounds
        used[seed] = True
        for j in np.argsort(np.linalg.norm(centroids - centroids[seed], axis=1), kind="stable"):
            if len(members) == target:
                break
            if used[j]:
                continue
            merged = _union(bounds, pool[j].bounds)
            if _crop_around(merged, shape) is not None:
                members.append(int(j))
                bounds = merged
                used[j] = True
        if len(members) >= 2:
            crop = _crop_around(bounds, shape)
            groups.append(([pool[i] for i in members], crop))  # type: ignore[arg-type]
    return groups


def _check_fit(labels: np.ndarray, brain: np.ndarray) -> float:
    """Fraction of labelled voxels inside ``brain`` (both (z, y, x))."""
    labelled = labels > 0
    return float(np.count_nonzero(labelled & brain)) / max(1, int(np.count_nonzero(labelled)))


def _load_mni(mricron: Optional[Path], atlas_report: Dict[str, Any]) -> Tuple[_Grid, List[RegionPart]]:
    """The MNI152 grid, its tissue parts and every fitting MNI-grid atlas's parts."""
    files = find_mni_files()
    if files is None:
        raise MissingPackage(f"nilearn is not installed (its MNI152 template is the source): "
                             f"pip install {NILEARN_REQUIREMENT}")
    t1, affine, spacing = _read_zyx(files["t1"])
    grid = _Grid("mni152", files["t1"], t1.astype(np.float32), affine, spacing)
    grid.left = _world_coordinate(affine, t1.shape, axis=0) < 0
    zone_map = grid.zone_map = _mni_zone_map(grid)
    split_of = _zone_split(zone_map)
    head = t1 > 0
    gm, wm = (_read_zyx(files[k])[0].astype(np.float32) for k in ("gm", "wm"))
    scale = 1.0 if max(float(gm.max()), float(wm.max())) <= 1.0 else 255.0  # maps stored 0..1 or 0..255
    tissue = np.zeros(t1.shape, dtype=np.uint8)
    tissue[gm > 0.5 * scale] = 1
    tissue[wm > 0.5 * scale] = 2
    brain = ndimage.binary_dilation((gm + wm) > 0.5 * scale, iterations=2)
    # Tissue: one object per class, hemisphere and zone (the class map cut at the zone borders).
    zone_tissue = tissue.astype(np.int64) + 10 * zone_map.astype(np.int64)
    zone_tissue[tissue == 0] = 0
    names = {10 * z + c: f"{'grey' if c == 1 else 'white'} matter ({_ZONE_NAMES[z]} zone)"
             for z in range(3) for c in (1, 2)}
    parts = _region_parts(zone_tissue, grid.left, "tissue", names, split_of)
    parts = [replace(p, atlas_id=p.atlas_id % 10) for p in parts]
    grid.label_maps["tissue"] = tissue
    atlas_report["tissue"] = {"file": str(files["gm"].parent), "used": True, "fit": 1.0,
                                     "terms": TISSUE_TERMS}
    if mricron is None:
        return grid, parts
    for spec in MNI_ATLASES:
        labels, atlas_affine, _ = _read_zyx(mricron / spec.file)
        on_grid = _resample_labels(labels, atlas_affine, t1.shape, affine)
        fit = _check_fit(on_grid, brain)
        used = fit >= MIN_ATLAS_FIT
        atlas_report[spec.key] = {"file": str(mricron / spec.file), "used": used, "fit": round(fit, 4),
                                  "terms": spec.terms}
        if not used:
            atlas_report[spec.key]["reason"] = (f"only {fit:.1%} of its labelled voxels lie in the template's "
                                                f"brain (< {MIN_ATLAS_FIT:.0%})")
            continue
        on_grid[~head] = 0
        names = (dict(enumerate(HARVARD_OXFORD_CORTICAL, start=1)) if spec.key == "harvardoxford"
                 else _read_names(mricron / spec.names_file if spec.names_file else None))
        grid.label_maps[spec.key] = on_grid
        parts += _region_parts(on_grid, grid.left, spec.key, names, split_of)
    return grid, parts


def _load_inia19(mricron: Path, atlas_report: Dict[str, Any]) -> Tuple[_Grid, List[RegionPart]]:
    image, affine, spacing = _read_zyx(mricron / INIA19_IMAGE)
    labels, _, _ = _read_zyx(mricron / INIA19_ATLAS.file)
    labels = np.where(image > 0, labels, 0)
    grid = _Grid("inia19", mricron / INIA19_IMAGE, image.astype(np.float32), affine, spacing)
    grid.left = _world_coordinate(affine, image.shape, axis=0) < 0
    grid.label_maps[INIA19_ATLAS.key] = labels
    atlas_report[INIA19_ATLAS.key] = {"file": str(mricron / INIA19_ATLAS.file), "used": True,
                                      "fit": round(_check_fit(labels, image > 0), 4), "terms": INIA19_ATLAS.terms}
    return grid, _region_parts(labels, grid.left, INIA19_ATLAS.key, {}, _structure_split)


def _load_colin27(mricron: Path, atlas_report: Dict[str, Any]) -> Tuple[List[_Grid], List[RegionPart]]:
    grids = []
    brain = None
    for file in COLIN27_IMAGES:
        image, affine, spacing = _read_zyx(mricron / file)
        key = "colin27bet" if "bet" in file else "colin27"
        grids.append(_Grid(key, mricron / file, image.astype(np.float32), affine, spacing))
        if brain is None:
            brain = image > 0  # ch2bet: the skull-stripped brain
    labels, _, _ = _read_zyx(mricron / COLIN27_ATLAS.file)
    atlas_report[COLIN27_ATLAS.key] = {"file": str(mricron / COLIN27_ATLAS.file), "used": True,
                                       "fit": round(_check_fit(labels, brain), 4), "terms": COLIN27_ATLAS.terms,
                                       "note": "Colin27: test split only"}
    labels = np.where(brain, labels, 0)
    left = _world_coordinate(grids[0].affine, labels.shape, axis=0) < 0
    for g in grids:
        g.label_maps[COLIN27_ATLAS.key] = labels
        g.left = left
    names = {i: f"Brodmann area {i}" for i in range(1, 256)}
    return grids, _region_parts(labels, left, COLIN27_ATLAS.key, names, lambda atlas_id, zyx: ("test", ""))


def plan_cases(sources: Sequence[str] = SOURCES, splits: Sequence[str] = SPLITS,
               max_cases_per_split: Optional[int] = None
               ) -> Tuple[List[CasePlan], Dict[str, "_Grid"], Dict[str, Any]]:
    """Decide every case (no file written).

    Args:
        sources: which of :data:`SOURCES` to read (``mni152`` alone needs only nilearn).
        splits: which splits to keep.
        max_cases_per_split: keep the first N of each split, taken in turn from each (image, atlas) pool.

    Returns:
        ``(plans, grids by key, atlas report)``.

    Raises:
        MissingPackage: nilearn (for ``mni152``) or mricron-data (for the others) is not installed.
    """
    unknown = sorted(set(sources) - set(SOURCES)) + sorted(set(splits) - set(SPLITS))
    if unknown:
        raise ValueError(f"unknown source / split {unknown}; sources: {SOURCES}, splits: {SPLITS}")
    mricron = find_mricron_dir()
    if mricron is None and any(s != "mni152" for s in sources):
        raise MissingPackage(f"mricron-data is not installed (templates under {MRICRON_DIR}): {MRICRON_INSTALL}")
    atlas_report: Dict[str, Any] = {}
    grids: Dict[str, _Grid] = {}
    pools: List[Tuple[Tuple[str, ...], str, List[RegionPart]]] = []  # (grid keys used in turn, atlas, parts)
    if "mni152" in sources:
        grid, parts = _load_mni(mricron, atlas_report)
        grids[grid.key] = grid
        for atlas in grid.label_maps:
            pools.append(((grid.key,), atlas, [p for p in parts if p.atlas == atlas]))
    if "inia19" in sources:
        grid, parts = _load_inia19(mricron, atlas_report)  # type: ignore[arg-type]
        grids[grid.key] = grid
        pools.append(((grid.key,), INIA19_ATLAS.key, parts))
    if "colin27" in sources:
        colin_grids, parts = _load_colin27(mricron, atlas_report)  # type: ignore[arg-type]
        grids.update({g.key: g for g in colin_grids})
        pools.append((tuple(g.key for g in colin_grids), COLIN27_ATLAS.key, parts))

    per_split: Dict[str, List[List[CasePlan]]] = {s: [] for s in splits}
    for grid_keys, atlas, parts in pools:
        for split in splits:
            chosen = [p for p in parts if p.split == split]
            plans = []
            if atlas == "tissue":  # the crop is the zone's box: one case per zone
                for zone in _ZONE_NAMES:
                    zone_parts = [p for p in chosen if p.zone == zone]
                    if zone_parts:
                        bounds = zone_parts[0].bounds
                        for p in zone_parts[1:]:
                            bounds = _union(bounds, p.bounds)
                        crop = tuple((lo, hi + 1) for lo, hi in bounds)
                        crop = tuple((a, min(b, a + MAX_SIDE)) for a, b in crop)
                        plans.append((zone_parts, crop, grid_keys[0]))
            else:
                shape = grids[grid_keys[0]].image.shape
                for i, (group, crop) in enumerate(_group_parts(chosen, shape)):
                    plans.append((group, crop, grid_keys[i % len(grid_keys)]))
            per_split[split].append([
                CasePlan(f"MR_{key}_{atlas}_{split}_{i:03d}", split, key, atlas, group, crop)
                for i, (group, crop, key) in enumerate(plans)])
    out: List[CasePlan] = []
    for split in splits:
        interleaved = [p for layer in _round_robin(per_split[split]) for p in layer]
        out += interleaved[:max_cases_per_split] if max_cases_per_split is not None else interleaved
    return out, grids, atlas_report


def _round_robin(pools: List[List[CasePlan]]) -> List[List[CasePlan]]:
    """Layers of one case per pool: the first case of each pool, then the second, ..."""
    depth = max((len(p) for p in pools), default=0)
    return [[p[i] for p in pools if i < len(p)] for i in range(depth)]


# ------------------------------------------------------------------------------------------ writing


def _case_arrays(plan: CasePlan, grid: _Grid) -> Dict[str, Any]:
    """The challenge arrays of one planned case: objects 1..N, MR percentile mapping, organisers' boxes."""
    sl = tuple(slice(a, b) for a, b in plan.crop)
    labels = grid.label_maps[plan.atlas][sl]
    left = grid.left[sl]  # type: ignore[index]
    gts = np.zeros(labels.shape, dtype=np.uint8)
    for i, part in enumerate(plan.parts, start=1):
        mask = (labels == part.atlas_id) & (left if part.hemisphere == "left" else ~left)
        if plan.atlas == "tissue":
            mask &= grid.zone_map[sl] == _ZONE_NAMES.index(part.zone)  # type: ignore[index]
        gts[mask] = i
    arrays, _ = convert_arrays(grid.image[sl], gts, grid.spacing_xyz, Intensity.for_modality("MR"), boxes=True,
                               where=plan.name)
    return arrays


def build_realsets(out_dir: Path, splits: Sequence[str] = SPLITS, max_cases_per_split: Optional[int] = None,
                   sources: Sequence[str] = SOURCES, progress: bool = True) -> Dict[str, Any]:
    """Write the planned cases as ``<out_dir>/<name>.npz`` and ``<out_dir>/splits.json``.

    Returns:
        The ``splits.json`` content.
    """
    from tqdm import tqdm

    start = time.time()
    plans, grids, atlas_report = plan_cases(sources, splits, max_cases_per_split)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cases: Dict[str, Any] = {}
    for plan in tqdm(plans, desc="real cases", unit="case", disable=not progress):
        grid = grids[plan.grid_key]
        arrays = _case_arrays(plan, grid)
        atomic_savez(out_dir / f"{plan.name}.npz", **arrays)
        counts = np.bincount(arrays["gts"].ravel(), minlength=len(plan.parts) + 1)[1:]
        cases[plan.name] = {
            "split": plan.split,
            "source_image": grid.key,
            "image_file": str(grid.image_file),
            "atlas": plan.atlas,
            "atlas_terms": atlas_report[plan.atlas]["terms"],
            "crop_zyx": [list(c) for c in plan.crop],
            "shape_zyx": list(arrays["imgs"].shape),
            "spacing_xyz": list(grid.spacing_xyz),
            "objects": [{"label": i + 1, "atlas_id": p.atlas_id, "region": p.region_key, "name": p.name,
                         "hemisphere": p.hemisphere, "zone": p.zone, "voxels": int(counts[i])}
                        for i, p in enumerate(plan.parts)],
        }
    summary = {
        "rule": SPLIT_RULE,
        "counts": {s: sum(1 for c in cases.values() if c["split"] == s) for s in splits},
        "atlases": atlas_report,
        "never_used": list(FORBIDDEN_FILES) + ["pyradiomics test data"],
        "build_seconds": round(time.time() - start, 1),
        "cases": cases,
    }
    tmp = out_dir / ".splits.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(out_dir / "splits.json")
    return summary


def split_cases(folder: Path, split: Optional[str] = None) -> Tuple[List[Path], Dict[str, Dict[str, Any]]]:
    """The ``.npz`` cases of a case folder, sorted by name, and each case's entry of the folder's ``splits.json``
    (empty without the file); with ``split`` only the cases :func:`build_realsets` put in that split.

    Raises:
        FileNotFoundError: ``split`` is given and the folder has no ``splits.json``.
    """
    folder = Path(folder)
    files = sorted(folder.glob("*.npz"))
    index = folder / "splits.json"
    info: Dict[str, Dict[str, Any]] = json.loads(index.read_text())["cases"] if index.is_file() else {}
    if split:
        if not info:
            raise FileNotFoundError(f"{folder}: no splits.json for --split {split} (build it with python -m "
                                    f"dcm.data.realsets)")
        files = [f for f in files if info.get(f.stem, {}).get("split") == split]
    return files, info


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dcm.data.realsets", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output folder (cases and splits.json)")
    p.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS)
    p.add_argument("--max-cases-per-split", type=int, default=None, metavar="N")
    p.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES,
                   help="which templates to read (default: all; mni152 alone needs only nilearn)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        summary = build_realsets(args.out, args.splits, args.max_cases_per_split, args.sources,
                                 progress=not args.no_progress)
    except MissingPackage as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{s} {n}" for s, n in summary["counts"].items())
    print(f"wrote {sum(summary['counts'].values())} cases ({counts}) and splits.json to {args.out} "
          f"in {summary['build_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
