"""How the viewers' prompts become DCM prompts (pure functions; no model, no HTTP).

Axes: the client sends arrays as ``(c, a0, a1, a2)`` and coordinates as ``(a0, a1, a2)``; DCM reads
``a0 -> z``, ``a1 -> y``, ``a2 -> x`` (array index order kept, nothing is transposed), so DCM's slice axis is
the client's first spatial axis. Spacing is ``image_properties["spacing"]`` in the same order.

=================  ===========================================================================================
viewer prompt      DCM prompt
=================  ===========================================================================================
3D box             the object's box: z range = a0 range, in-plane box = (a1, a2) ranges on the middle slice
2D box (one axis   the same, its missing extent grown around the drawn slice to the box's smaller drawn side
of size 1)         (in mm, so roughly as deep as it is wide; :func:`thickness_of_flat_axis`), clipped to the image
include / exclude  a positive / negative click (coordinates rounded to the nearest voxel)
point
scribble           clicks on the stroke: one per 15 mm of the stroke's extent, 1 to 4, the first at the stroke
                   voxel nearest its centroid, the others by farthest-point sampling along the stroke
include lasso      its filled region becomes the previous mask and its bounding box (2D rule above) the box
exclude lasso      its filled region is erased from the mask (no model call)
initial seg        the previous mask (``run_prediction``: refined with its bounding box as the box)
exclude box        not supported (DCM has no negative box): 400
=================  ===========================================================================================
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from dcm.regions import mask_bbox

__all__ = ["PromptError", "box_from_half_open", "box_from_mask", "point_voxel", "scribble_clicks",
           "fill_lasso", "thickness_of_flat_axis", "SCRIBBLE_MM_PER_CLICK", "SCRIBBLE_MAX_CLICKS"]

#: one scribble click per this many mm of the stroke's extent
SCRIBBLE_MM_PER_CLICK = 15.0
#: at most this many clicks per scribble (each one is a model call)
SCRIBBLE_MAX_CLICKS = 4

Range = Tuple[int, int]  # inclusive


class PromptError(ValueError):
    """A prompt DCM cannot use; the message is one line (the server answers 400)."""


def _round(v: float) -> int:
    """Nearest integer, halves up (napari sends float coordinates)."""
    return int(math.floor(float(v) + 0.5))


def _finite_numbers(values: Sequence, what: str, n: int) -> List[float]:
    if not isinstance(values, (list, tuple)) or len(values) != n:
        raise PromptError(f"{what} must be a list of {n} numbers, got {values!r}"[:200])
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise PromptError(f"{what} must hold finite numbers, got {values!r}"[:200])
        out.append(float(v))
    return out


def thickness_of_flat_axis(sides_mm: Sequence[float], spacing_flat_mm: float) -> int:
    """Voxels along the missing axis of a 2D box: its smaller drawn side in mm, at least one voxel."""
    return max(1, _round(min(sides_mm) / spacing_flat_mm))


def _grow(center: int, n: int, size: int) -> Range:
    """``n`` voxels centred on ``center`` (inclusive range), clipped to ``[0, size)``."""
    lo = center - (n - 1) // 2
    return max(0, lo), min(size - 1, lo + n - 1)


def _to_box(ranges: Sequence[Range], z_mid: int) -> Dict[str, int]:
    (z0, z1), (y0, y1), (x0, x1) = ranges
    return {"z_min": z0, "z_max": z1, "z_mid": z_mid, "z_mid_y_min": y0, "z_mid_y_max": y1,
            "z_mid_x_min": x0, "z_mid_x_max": x1}


def _complete_flat_axes(ranges: List[Range], flat: List[int], shape: Sequence[int],
                        spacing: Sequence[float]) -> Tuple[List[Range], Optional[int]]:
    """Grow the (single) flat axis of a 2D box by the thickness rule; returns the ranges and the drawn slice
    along a0 when a0 is the flat axis (it becomes ``z_mid``)."""
    if len(flat) > 1:
        raise PromptError("a box needs at least two drawn axes (it has size 1 along "
                          f"{len(flat)} axes)")
    if not flat:
        return ranges, None
    axis = flat[0]
    sides_mm = [(ranges[a][1] - ranges[a][0] + 1) * spacing[a] for a in range(3) if a != axis]
    drawn = ranges[axis][0]
    ranges[axis] = _grow(drawn, thickness_of_flat_axis(sides_mm, spacing[axis]), shape[axis])
    return ranges, drawn if axis == 0 else None


def box_from_half_open(coords: Sequence, shape: Sequence[int], spacing: Sequence[float]) -> Dict[str, int]:
    """DCM box (challenge keys) of the client's ``[[lo, hi], [lo, hi], [lo, hi]]`` box (half-open, a0/a1/a2).

    Coordinates are rounded, the box is clipped to the image; one axis of size 1 makes it a 2D box.
    """
    if not isinstance(coords, (list, tuple)) or len(coords) != 3:
        raise PromptError(f"bbox_coords must be 3 [lo, hi] pairs, got {coords!r}"[:200])
    ranges: List[Range] = []
    flat: List[int] = []
    for axis, pair in enumerate(coords):
        lo_f, hi_f = _finite_numbers(pair, f"bbox_coords[{axis}]", 2)
        lo, hi = _round(lo_f), _round(hi_f)
        if hi <= lo:
            raise PromptError(f"bbox_coords[{axis}] = [{lo_f}, {hi_f}] is empty or inverted")
        lo, hi = max(lo, 0), min(hi, int(shape[axis]))
        if hi <= lo:
            raise PromptError(f"bbox_coords[{axis}] = [{lo_f}, {hi_f}] is outside the image (size {shape[axis]})")
        ranges.append((lo, hi - 1))
        if hi - lo == 1:
            flat.append(axis)
    ranges, z_drawn = _complete_flat_axes(ranges, flat, shape, spacing)
    z_mid = z_drawn if z_drawn is not None else (ranges[0][0] + ranges[0][1]) // 2
    return _to_box(ranges, z_mid)


def box_from_mask(mask: np.ndarray, spacing: Sequence[float]) -> Dict[str, int]:
    """DCM box of a non-empty (a0, a1, a2) mask: its bounding box, a flat mask (one voxel thick along an
    axis) grown by the 2D rule; ``z_mid`` is the middle a0 slice of the mask (the nearest non-empty one)."""
    nz = [np.flatnonzero(np.any(mask, axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    if not len(nz[0]):
        raise PromptError("the mask is empty")
    ranges = [(int(i[0]), int(i[-1])) for i in nz]
    flat = [a for a, (lo, hi) in enumerate(ranges) if lo == hi]
    if len(flat) > 1:  # a line: no box; the caller keeps the mask alone
        raise PromptError("the region is a line or a point (one voxel thick along two axes)")
    ranges, z_drawn = _complete_flat_axes(list(ranges), flat, mask.shape, spacing)
    if z_drawn is None:
        middle = (ranges[0][0] + ranges[0][1]) / 2
        z_drawn = int(nz[0][np.argmin(np.abs(nz[0] - middle))])
    plane = mask[z_drawn]
    rows, cols = np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))
    ranges[1] = (int(rows[0]), int(rows[-1])) if 1 not in flat else ranges[1]
    ranges[2] = (int(cols[0]), int(cols[-1])) if 2 not in flat else ranges[2]
    return _to_box(ranges, z_drawn)


def point_voxel(coordinates: Sequence, shape: Sequence[int]) -> Tuple[int, int, int]:
    """The voxel (a0, a1, a2) of the client's point (rounded); PromptError when outside the image."""
    values = _finite_numbers(coordinates, "coordinates", 3)
    voxel = tuple(_round(v) for v in values)
    if any(not 0 <= v < n for v, n in zip(voxel, shape)):
        raise PromptError(f"point {list(values)} is outside the image (shape {list(shape)})")
    return voxel  # type: ignore[return-value]


def scribble_clicks(scribble: np.ndarray, spacing: Sequence[float]) -> List[Tuple[int, int, int]]:
    """Voxels of the stroke to click, in order (see the module table): one per ``SCRIBBLE_MM_PER_CLICK`` mm of
    the stroke's bounding-box diagonal, 1 to ``SCRIBBLE_MAX_CLICKS``; the first nearest the centroid, the rest
    by farthest-point sampling (in mm), so they spread along the stroke."""
    voxels = np.argwhere(scribble)
    if not len(voxels):
        raise PromptError("the scribble is empty")
    mm = voxels * np.asarray(spacing, dtype=np.float64)
    extent = float(np.linalg.norm(mm.max(axis=0) - mm.min(axis=0)))
    count = int(min(SCRIBBLE_MAX_CLICKS, max(1, math.ceil(extent / SCRIBBLE_MM_PER_CLICK))))
    chosen = [int(np.argmin(np.linalg.norm(mm - mm.mean(axis=0), axis=1)))]
    distance = np.linalg.norm(mm - mm[chosen[0]], axis=1)
    while len(chosen) < min(count, len(voxels)):
        nxt = int(np.argmax(distance))
        if distance[nxt] <= 0:
            break
        chosen.append(nxt)
        distance = np.minimum(distance, np.linalg.norm(mm - mm[nxt], axis=1))
    return [tuple(int(c) for c in voxels[i]) for i in chosen]  # type: ignore[misc]


def fill_lasso(region: np.ndarray) -> np.ndarray:
    """The lasso's filled region: holes filled in each plane of its thinnest axis (a viewer may send the
    outline or the filled polygon)."""
    region = region != 0
    if not region.any():
        raise PromptError("the lasso is empty")
    extents = [s.stop - s.start for s in mask_bbox(region)]  # type: ignore[union-attr]
    axis = int(np.argmin(extents))
    moved = np.moveaxis(region, axis, 0)
    filled = np.stack([ndimage.binary_fill_holes(plane) for plane in moved])
    return np.moveaxis(filled, 0, axis)
