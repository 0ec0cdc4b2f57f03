"""Challenge case files (``.npz``) <-> one typed :class:`Case`.

Conventions used everywhere in DCM:

* arrays are ``(z, y, x)``; voxel coordinates are integer ``(z, y, x)`` indices;
* ``spacing_xyz`` is the spacing exactly as the challenge stores it (x, y, z order) and
  ``spacing_zyx`` the same numbers in array-axis order (the physically correct one);
* object ``i`` of ``boxes`` / ``clicks`` is label ``i + 1``.

The challenge file has these keys (see README, "Case format"): ``imgs`` (D, H, W), ``spacing`` (3,),
optional ``gts``, optional ``boxes`` (list of dicts), and at click steps ``clicks`` (list of
``{'fg': [[z, y, x], ...], 'bg': [...]}``), ``clicks_order`` (per object ``'fg'`` / ``'bg'`` / ``None``
per step) and ``prev_pred`` (D, H, W) uint8.

The prompt types (:class:`Box`, :class:`Click`, :class:`ObjectPrompts`, :data:`BOX_KEYS`, :func:`parse_voxel`)
live in :mod:`dcm.prompts` and are re-exported here. :func:`case_from_arrays` reads a case's prompts into
:class:`ObjectPrompts`; :func:`prompts_to_arrays` writes them back in the challenge's layout.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from dcm.atomic import atomic_path
from dcm.errors import CaseError
from dcm.prompts import BOX_KEYS, ZYX, Box, Click, ObjectPrompts, parse_voxel
from dcm.safe_pickle import unpickle_plain

__all__ = [
    "BOX_KEYS",
    "MAX_OBJECTS",
    "Box",
    "Click",
    "ObjectPrompts",
    "Case",
    "case_from_arrays",
    "load_case",
    "validate_image",
    "validate_spacing",
    "parse_voxel",
    "load_npz",
    "atomic_savez",
    "save_segmentation",
    "case_to_arrays",
    "prompts_to_arrays",
]

#: ``segs`` is uint8 with label ``i + 1`` for object ``i``.
MAX_OBJECTS = 255

PathLike = Union[str, os.PathLike]


@dataclass
class Case:
    """One challenge case at one step of the protocol.

    Attributes:
        name: file stem (``CT_abdomen_0001``); its prefix up to the first ``_`` names the modality.
        image: (z, y, x) intensities as stored (0..255 in challenge files).
        spacing_xyz: voxel spacing as stored in the file: (x, y, z) order.
        objects: one :class:`ObjectPrompts` per object, label order.
        prev_pred: (z, y, x) uint8 previous output, or None at the box step / for a fresh case.
        gts: (z, y, x) ground truth labels when the file has them, else None.
        path: the file it came from, if any.
        warnings: non-fatal findings (one line each).
    """

    name: str
    image: np.ndarray
    spacing_xyz: Tuple[float, float, float]
    objects: List[ObjectPrompts]
    prev_pred: Optional[np.ndarray] = None
    gts: Optional[np.ndarray] = None
    path: Optional[str] = None
    warnings: List[str] = field(default_factory=list)

    @property
    def shape(self) -> Tuple[int, int, int]:
        return tuple(int(s) for s in self.image.shape)  # type: ignore[return-value]

    @property
    def spacing_zyx(self) -> Tuple[float, float, float]:
        """Spacing in array-axis order (z, y, x): the physically correct order."""
        return tuple(self.spacing_xyz[::-1])  # type: ignore[return-value]

    @property
    def modality(self) -> str:
        return modality_of(self.name)

    @property
    def has_boxes(self) -> bool:
        return any(o.box is not None for o in self.objects)

    @property
    def num_objects(self) -> int:
        return len(self.objects)

    def prev_mask(self, label: int) -> np.ndarray:
        """Binary (z, y, x) previous mask of ``label`` (all False when there is no previous output)."""
        if self.prev_pred is None:
            return np.zeros(self.shape, dtype=bool)
        return self.prev_pred == label


def modality_of(case_name: str) -> str:
    """The modality prefix of a challenge case name (``CT``, ``MR``, ``PET``, ``US``, ``Microscopy``)."""
    return Path(case_name).name.split("_", 1)[0]


# ---------------------------------------------------------------------------------------------- reading


#: An object member (``boxes``, ``clicks``, ``clicks_order``) larger than this is refused: the organisers'
#: files hold a few hundred bytes per object.
MAX_OBJECT_MEMBER_BYTES = 64 << 20


def _read_object_member(f: Any, dtype: np.dtype, shape: Tuple[int, ...], size: int) -> np.ndarray:
    """The rest of an ``.npy`` member holding an object array, decoded by :func:`dcm.safe_pickle.unpickle_plain`
    (plain Python items only; NumPy never rebuilds anything from the file's bytes)."""
    if dtype != np.dtype(object):
        raise ValueError(f"dtype {dtype} mixes objects into a structured array (not read)")
    if size > MAX_OBJECT_MEMBER_BYTES:
        raise ValueError(f"object array of {size} bytes (at most {MAX_OBJECT_MEMBER_BYTES} are read)")
    array = unpickle_plain(f.read(MAX_OBJECT_MEMBER_BYTES + 1))
    if not isinstance(array, np.ndarray) or array.dtype != object or array.shape != tuple(shape):
        raise ValueError("the pickled array does not match its header")
    return array


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    """One ``.npy`` member; its header must not declare more data than the member holds."""
    fmt = np.lib.format
    with zf.open(info) as f:
        version = fmt.read_magic(f)
        if version not in ((1, 0), (2, 0), (3, 0)):
            raise ValueError(f"unknown .npy format version {version}")
        read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        if dtype.hasobject:
            return _read_object_member(f, dtype, shape, info.file_size)
        declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
        if declared > info.file_size:
            raise ValueError(f"header declares {declared} bytes of data, the member holds {info.file_size}")
    with zf.open(info) as f:
        return fmt.read_array(f, allow_pickle=False)


def load_npz(path: PathLike, skip: Sequence[str] = ()) -> Dict[str, Any]:
    """Read every array of an ``.npz`` into a dict, turning any read failure into one :class:`CaseError`.

    Object arrays (the challenge's ``boxes``, ``clicks``, ``clicks_order``) are decoded into plain Python
    items and NumPy arrays of numbers / strings without NumPy's unpickling, so a crafted case file can neither
    run code nor make NumPy read its bytes as pointers; structured arrays holding objects are refused.

    Args:
        path: the file.
        skip: keys not to read (e.g. ``gts`` at inference: a large array nobody needs).

    Raises:
        CaseError: the file is absent or not a zip archive (no field), or one member cannot be read (its
            key as the field).
    """
    path = Path(path)
    if not path.is_file():
        raise CaseError(path, None, "no such file")
    try:
        zf = zipfile.ZipFile(path)
    except Exception as e:  # BadZipFile, OSError, ...
        raise CaseError(path, None, f"not a readable .npz file ({_one_line(e)})") from None
    arrays: Dict[str, Any] = {}
    with zf:
        for info in zf.infolist():
            key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            if key in skip:
                continue
            try:
                arrays[key] = _read_member(zf, info)
            except Exception as e:  # a corrupt member: CRC / zlib / header / refused or broken pickle
                raise CaseError(path, key, f"not a readable .npz member ({_one_line(e)})") from None
    return arrays


def _one_line(e: BaseException) -> str:
    """``Type: message`` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(f"{type(e).__name__}: {e}".split())


def load_case(path: PathLike, strict: bool = True, with_gts: bool = True) -> Case:
    """Read and validate one challenge case file.

    Args:
        path: the ``.npz`` file.
        strict: raise :class:`CaseError` on a per-object problem too; when False, the problem is stored on
            the object (``ObjectPrompts.problem``) and the rest of the case stays usable.
        with_gts: keep ``gts`` if present (the evaluator's source cases); inference ignores it.
    """
    path = Path(path)
    arrays = load_npz(path, skip=() if with_gts else ("gts",))
    return case_from_arrays(arrays, name=path.stem, path=path, strict=strict)


def _as_scalar_obj(a: Any) -> Any:
    if isinstance(a, np.ndarray) and a.dtype == object and a.shape == ():
        return a.item()
    return a


def validate_image(image: Any, where: Optional[PathLike] = None, field_name: str = "imgs") -> np.ndarray:
    """The image as a 3D, non-empty, real, finite numeric array whose values fit float32.

    A boolean image (a binary volume) is returned as uint8 0 / 255, the challenge's intensity range.

    Raises:
        CaseError: naming ``where`` (a file, or None) and ``field_name``.
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise CaseError(where, field_name, f"must be a 3D (z, y, x) array, got shape {image.shape}")
    if min(image.shape) < 1:
        raise CaseError(where, field_name, f"empty array of shape {image.shape}")
    if image.dtype == object or not (np.issubdtype(image.dtype, np.number) or image.dtype == bool):
        raise CaseError(where, field_name, f"must be numeric, got dtype {image.dtype}")
    if np.iscomplexobj(image):
        raise CaseError(where, field_name, "complex values are not supported")
    if np.issubdtype(image.dtype, np.floating):
        bad = _count_slabs(image, lambda a: a.size - np.count_nonzero(np.isfinite(a)))
        if bad:
            raise CaseError(where, field_name, f"{bad} non-finite (NaN/inf) values")
        if image.dtype.itemsize > 4:  # the experts compute in float32: larger values would become inf
            limit = float(np.finfo(np.float32).max)
            big = _count_slabs(image, lambda a: np.count_nonzero(np.abs(a) > limit))
            if big:
                raise CaseError(where, field_name, f"{big} values beyond the float32 range (|v| > {limit:.3g}, "
                                                   f"up to {float(np.abs(image).max()):.3g}); rescale the image")
    if image.dtype == bool:
        return image.astype(np.uint8) * np.uint8(255)
    return image


def _count_slabs(array: np.ndarray, count: Any, voxels: int = 1 << 22) -> int:
    """``sum(count(slab))`` over z-slabs of about ``voxels`` voxels: a full-volume check with slab-sized
    temporaries (a 1500 x 600 x 600 float image must not get a same-sized boolean copy)."""
    step = max(1, voxels // max(1, int(np.prod(array.shape[1:]))))
    return int(sum(int(count(array[z:z + step])) for z in range(0, array.shape[0], step)))


def validate_spacing(spacing: Any, where: Optional[PathLike] = None, field_name: str = "spacing",
                     order: str = "x, y, z") -> Tuple[float, float, float]:
    """Three finite voxel sizes > 0, as floats in the order given.

    Raises:
        CaseError: naming ``where`` (a file, or None) and ``field_name``.
    """
    try:
        sp = np.asarray(spacing, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise CaseError(where, field_name, f"must be 3 numbers, got {spacing!r}") from None
    if sp.size != 3:
        raise CaseError(where, field_name, f"must have 3 values ({order}), got {sp.size}")
    if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise CaseError(where, field_name, f"values must be finite and > 0, got {sp.tolist()}")
    return tuple(float(s) for s in sp)  # type: ignore[return-value]


def _order_rows(clicks_order: Any, n: int) -> List[List[Optional[str]]]:
    rows: List[List[Optional[str]]] = []
    co = _as_scalar_obj(clicks_order)
    if isinstance(co, np.ndarray) and co.ndim == 1 and co.dtype != object and n > 0:
        co = co.reshape(n, -1) if co.size % max(n, 1) == 0 else [co]
    for row in list(co):
        if row is None:
            rows.append([])
            continue
        if isinstance(row, (str, np.str_)):
            row = [row]
        rows.append([None if e is None else str(e) for e in list(row)])
    return rows


def case_from_arrays(
    arrays: Mapping[str, Any],
    name: str = "case",
    path: Optional[PathLike] = None,
    strict: bool = True,
) -> Case:
    """Validate the arrays of a challenge case (as loaded from its ``.npz``) and build a :class:`Case`.

    Raises:
        CaseError: naming the file and the field for any case-level problem (and, when ``strict``, for
            per-object problems too).
    """
    where = path if path is not None else name
    if "imgs" not in arrays:
        raise CaseError(where, "imgs", "missing (the case has no image)")
    image = validate_image(arrays["imgs"], where)
    shape = image.shape
    if "spacing" not in arrays:
        raise CaseError(where, "spacing", "missing")
    spacing_xyz = validate_spacing(arrays["spacing"], where)
    warnings: List[str] = []

    boxes_raw = _as_scalar_obj(arrays.get("boxes"))
    boxes: Optional[List[Any]] = None
    if boxes_raw is not None:
        boxes = list(boxes_raw) if not isinstance(boxes_raw, dict) else [boxes_raw]

    clicks_raw = _as_scalar_obj(arrays.get("clicks"))
    clicks_list: Optional[List[Any]] = None
    if clicks_raw is not None:
        clicks_list = list(clicks_raw) if not isinstance(clicks_raw, dict) else [clicks_raw]

    if boxes is not None and clicks_list is not None and len(clicks_list) != len(boxes):
        raise CaseError(
            where, "clicks", f"{len(clicks_list)} click lists for {len(boxes)} boxes (one per object expected)"
        )
    n_objects = len(boxes) if boxes is not None else (len(clicks_list) if clicks_list is not None else 0)
    if n_objects > MAX_OBJECTS:
        raise CaseError(where, "boxes" if boxes is not None else "clicks",
                        f"{n_objects} objects, but uint8 output holds at most {MAX_OBJECTS}")
    if n_objects == 0:
        given = [k for k, v in (("boxes", boxes), ("clicks", clicks_list)) if v is not None]
        what = f"{' and '.join(given)}: empty" if given else "no boxes and no clicks"
        warnings.append(f"{where}: {what}: no objects; the output will be empty")

    order_rows: Optional[List[List[Optional[str]]]] = None
    if _as_scalar_obj(arrays.get("clicks_order")) is not None and clicks_list is not None:
        try:
            order_rows = _order_rows(arrays["clicks_order"], n_objects)
        except TypeError:
            raise CaseError(where, "clicks_order", "not a per-object list") from None
        if len(order_rows) != n_objects:
            raise CaseError(where, "clicks_order", f"{len(order_rows)} rows for {n_objects} objects")

    objects: List[ObjectPrompts] = []
    for i in range(n_objects):
        obj = ObjectPrompts(label=i + 1)
        problems: List[str] = []
        if boxes is not None:
            field_name = f"boxes[{i}]"
            try:
                if not isinstance(boxes[i], Mapping):
                    raise ValueError(f"must be a dict with keys {list(BOX_KEYS)}, got {type(boxes[i]).__name__}")
                box = Box.from_dict(boxes[i])
                bad = box.problem(shape)
                if bad:
                    raise ValueError(bad)
                obj.box = box
            except ValueError as e:
                problems.append(f"{field_name}: {e}")
        if clicks_list is not None:
            field_name = f"clicks[{i}]"
            entry = clicks_list[i]
            try:
                if entry is None:
                    entry = {"fg": [], "bg": []}
                if not isinstance(entry, Mapping):
                    raise ValueError(f"must be a dict with 'fg' and 'bg' lists, got {type(entry).__name__}")
                fg = [parse_voxel(p, shape) for p in _point_list(entry.get("fg"))]
                bg = [parse_voxel(p, shape) for p in _point_list(entry.get("bg"))]
            except (TypeError, ValueError) as e:
                problems.append(f"{field_name}: {e}")
            else:
                try:
                    obj.clicks = _ordered_clicks(fg, bg, None if order_rows is None else order_rows[i], warnings,
                                                 f"{where}: clicks_order[{i}]")
                except ValueError as e:
                    problems.append(f"clicks_order[{i}]: {e}")
        if problems:
            obj.problem = "; ".join(problems)
            if strict:
                field_name, _, msg = problems[0].partition(": ")
                raise CaseError(where, field_name, msg)
            obj.box = obj.box if obj.box is not None and not any(p.startswith("boxes") for p in problems) else None
        objects.append(obj)

    prev_pred = None
    if "prev_pred" in arrays and arrays["prev_pred"] is not None and _as_scalar_obj(arrays["prev_pred"]) is not None:
        prev_pred = _check_label_map(where, "prev_pred", arrays["prev_pred"], shape, n_objects, strict, warnings)
    gts = None
    if "gts" in arrays:
        gts = _check_label_map(where, "gts", arrays["gts"], shape, None, True, warnings)

    return Case(
        name=name,
        image=image,
        spacing_xyz=spacing_xyz,
        objects=objects,
        prev_pred=prev_pred,
        gts=gts,
        path=None if path is None else str(path),
        warnings=warnings,
    )


def _point_list(v: Any) -> List[Any]:
    if v is None:
        return []
    if isinstance(v, (str, bytes, Mapping)) or np.ndim(v) == 0:
        raise ValueError(f"'fg' / 'bg' must be lists of [z, y, x] points, got {type(v).__name__}")
    arr = np.asarray(v, dtype=object) if not isinstance(v, np.ndarray) else v
    if arr.size == 0:
        return []
    if isinstance(v, np.ndarray) and v.dtype != object:
        return list(v.reshape(-1, v.shape[-1]))
    return list(v)


def _ordered_clicks(fg: List[ZYX], bg: List[ZYX], order: Optional[List[Optional[str]]],
                    warnings: List[str], where: str) -> List[Click]:
    """Interleave fg / bg clicks in the order ``clicks_order`` gives (None entries = no click that step)."""
    if order is not None:
        kinds = [k for k in order if k is not None]
        if any(k not in ("fg", "bg") for k in kinds):
            raise ValueError(f"clicks_order entries must be 'fg', 'bg' or None, got {sorted(set(kinds))}")
        if kinds.count("fg") == len(fg) and kinds.count("bg") == len(bg):
            it = {"fg": iter(fg), "bg": iter(bg)}
            return [Click(next(it[k]), k == "fg") for k in kinds]
        warnings.append(f"{where}: order does not match the click counts; fg clicks are taken first")
    elif fg and bg:
        warnings.append(f"{where.split(':')[0]}: no clicks_order; fg clicks are taken before bg clicks")
    return [Click(p, True) for p in fg] + [Click(p, False) for p in bg]


def _check_label_map(where, field_name: str, arr: Any, shape, n_objects: Optional[int], strict: bool,
                     warnings: List[str]) -> np.ndarray:
    """Validate a (z, y, x) label map (``prev_pred``, ``gts``): shape, integer labels >= 0, at most
    ``n_objects`` (labels above are an error when ``strict``, else set to 0 with a warning)."""
    arr = np.asarray(arr)
    if arr.shape != tuple(shape):
        raise CaseError(where, field_name, f"shape {arr.shape} differs from imgs {tuple(shape)}")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.issubdtype(arr.dtype, np.floating):
            raise CaseError(where, field_name, f"must hold integer labels, got dtype {arr.dtype}")
        bad = _count_slabs(arr, lambda a: a.size - np.count_nonzero(np.isfinite(a) & (a == np.round(a))))
        if bad:
            raise CaseError(where, field_name, f"must hold integer labels, got dtype {arr.dtype} with {bad} "
                                               f"non-integer values")
    lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
    if lo < 0:
        raise CaseError(where, field_name, f"negative label {lo}")
    if n_objects is not None and hi > n_objects:
        if strict:
            raise CaseError(where, field_name, f"label {hi} but the case has {n_objects} objects")
        warnings.append(f"{where}: {field_name}: labels above {n_objects} (up to {hi}) set to 0")
        arr = arr.copy()
        arr[arr > n_objects] = 0
        hi = n_objects
    if field_name == "prev_pred" or hi <= 255:
        return arr.astype(np.uint8, copy=False)
    return arr if np.issubdtype(arr.dtype, np.integer) else arr.astype(np.int64)


# ---------------------------------------------------------------------------------------------- writing


def atomic_savez(path: PathLike, compress: bool = True, level: Optional[int] = None, **arrays: Any) -> Path:
    """Write ``arrays`` to ``path`` as an ``.npz`` so that ``path`` is either absent or complete.

    The data goes to a temporary file in the same folder first and is renamed over ``path``. ``level``: the
    zlib level (1 fastest .. 9 smallest; None: numpy's default, 6); the file is what ``np.savez_compressed``
    writes either way and ``np.load`` reads it.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        if level is None or not compress:
            with open(tmp, "wb") as f:
                (np.savez_compressed if compress else np.savez)(f, **arrays)
        else:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=int(level)) as zf:
                for key, value in arrays.items():
                    with zf.open(f"{key}.npy", "w", force_zip64=True) as f:
                        np.lib.format.write_array(f, np.asanyarray(value), allow_pickle=True)
    return path


def save_segmentation(path: PathLike, segs: np.ndarray, shape: Optional[Sequence[int]] = None) -> Path:
    """Write a challenge output file (key ``segs``, uint8, (z, y, x)) atomically.

    Raises:
        CaseError: when ``segs`` has the wrong shape or labels that do not fit uint8.
    """
    segs = np.asarray(segs)
    if shape is not None and tuple(segs.shape) != tuple(shape):
        raise CaseError(path, "segs", f"shape {segs.shape} differs from the image {tuple(shape)}")
    if segs.size and (segs.min() < 0 or segs.max() > MAX_OBJECTS):
        raise CaseError(path, "segs", f"labels must be 0..{MAX_OBJECTS}")
    # zlib level 1: 4x faster than the default on a 300 x 512 x 512 label map (0.23 vs 1.04 s), ~2x larger
    # file (1.6 vs 0.9 MB); predict.sh writes one per call.
    return atomic_savez(path, level=1, segs=segs.astype(np.uint8, copy=False))


def _object_array(items: Sequence[Any]) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    for i, it in enumerate(items):
        out[i] = it
    return out


def case_to_arrays(
    image: np.ndarray,
    spacing_xyz: Sequence[float],
    boxes: Optional[Sequence[Mapping[str, int]]] = None,
    clicks: Optional[Sequence[Mapping[str, Sequence[Sequence[int]]]]] = None,
    clicks_order: Optional[Sequence[Sequence[Optional[str]]]] = None,
    prev_pred: Optional[np.ndarray] = None,
    gts: Optional[np.ndarray] = None,
) -> Dict[str, Any]:
    """The arrays of a challenge case file in the organisers' layout (what :func:`atomic_savez` writes).

    ``clicks`` becomes an object array of dicts; ``clicks_order`` a 2D ``<U2`` array when it holds no None
    and an object array otherwise, as the organisers' evaluator writes them.
    """
    out: Dict[str, Any] = {"imgs": image, "spacing": np.asarray(spacing_xyz, dtype=np.float64)}
    if gts is not None:
        out["gts"] = gts
    if boxes is not None:
        out["boxes"] = _object_array([dict(b) for b in boxes])
    if clicks is not None:
        out["clicks"] = _object_array(
            [{"fg": [list(map(int, p)) for p in c.get("fg", [])], "bg": [list(map(int, p)) for p in c.get("bg", [])]}
             for c in clicks]
        )
    if clicks_order is not None:
        rows = [list(r) for r in clicks_order]
        if rows and all(e is not None for r in rows for e in r) and len({len(r) for r in rows}) == 1:
            out["clicks_order"] = np.array(rows, dtype="<U2")
        else:
            width = max((len(r) for r in rows), default=0)
            arr = np.empty((len(rows), width), dtype=object)
            for i, r in enumerate(rows):
                for j, e in enumerate(r):
                    arr[i, j] = e
            out["clicks_order"] = arr
    if prev_pred is not None:
        out["prev_pred"] = np.asarray(prev_pred, dtype=np.uint8)
    return out


def prompts_to_arrays(
    image: np.ndarray,
    spacing_xyz: Sequence[float],
    objects: Sequence[ObjectPrompts],
    with_clicks: bool = True,
    clicked: Optional[Sequence[Sequence[bool]]] = None,
    prev_pred: Optional[np.ndarray] = None,
    gts: Optional[np.ndarray] = None,
) -> Dict[str, Any]:
    """The arrays of a challenge case file holding ``objects``' prompts: the mirror of :func:`case_from_arrays`.

    ``case_from_arrays(prompts_to_arrays(image, spacing_xyz, objects, ...)).objects == objects`` for objects
    labelled ``1..N`` in order, without ``problem``, whose clicks lie inside the image.

    Args:
        image: (z, y, x) intensities (``imgs``).
        spacing_xyz: the spacing as the challenge stores it, (x, y, z).
        objects: one per object, label order (object ``i`` is label ``i + 1``). ``boxes`` is written when
            any object has a box (then every object must have one).
        with_clicks: write ``clicks`` and ``clicks_order`` (a click step; the box step has neither).
        clicked: per object, one entry per click step so far: whether that step gave the object a click
            (False: it was already perfect; the organisers write None in its ``clicks_order``). The True
            entries take the object's clicks in order, so each row must hold ``len(obj.clicks)`` of them.
            Default: one step per click.
        prev_pred: (z, y, x) previous output (written as uint8), or None.
        gts: (z, y, x) ground truth, or None.

    Returns:
        What :func:`case_to_arrays` returns for the same case: ``boxes`` / ``clicks`` object arrays of dicts,
        ``clicks_order`` a ``<U2`` or object array.

    Raises:
        ValueError: only some objects have a box, or a row of ``clicked`` disagrees with its object's clicks.
    """
    boxes: Optional[List[Dict[str, int]]] = None
    with_box = [o.box is not None for o in objects]
    if any(with_box):
        if not all(with_box):
            raise ValueError(f"objects {[o.label for o, b in zip(objects, with_box) if not b]} have no box while "
                             f"others have one: a case file has boxes for every object or for none")
        boxes = [o.box.to_dict() for o in objects]  # type: ignore[union-attr]
    clicks: Optional[List[Dict[str, List[List[int]]]]] = None
    clicks_order: Optional[List[List[Optional[str]]]] = None
    if with_clicks:
        clicks = [{"fg": [list(zyx) for zyx in o.fg_clicks], "bg": [list(zyx) for zyx in o.bg_clicks]}
                  for o in objects]
        if clicked is None:
            clicked = [[True] * len(o.clicks) for o in objects]
        if len(clicked) != len(objects):
            raise ValueError(f"clicked has {len(clicked)} rows for {len(objects)} objects")
        clicks_order = []
        for obj, steps in zip(objects, clicked):
            if sum(bool(s) for s in steps) != len(obj.clicks):
                raise ValueError(f"object {obj.label}: {sum(bool(s) for s in steps)} click steps for "
                                 f"{len(obj.clicks)} clicks")
            given = iter(obj.clicks)
            clicks_order.append([next(given).kind if s else None for s in steps])
    return case_to_arrays(image, spacing_xyz, boxes=boxes, clicks=clicks, clicks_order=clicks_order,
                          prev_pred=prev_pred, gts=gts)
