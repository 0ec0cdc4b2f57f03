"""Bounding boxes of voxels as half-open slices: the one place they are computed.

Ground floor of DCM (numpy only). A *region* is a tuple of half-open ``slice(start, stop)`` per array axis,
``(z, y, x)`` for volumes, so ``array[region]`` is the crop; the experts' ``RoISlices`` are regions.
The challenge's inclusive box of a prompt is :class:`dcm.prompts.Box`, not a region.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

__all__ = ["Region", "mask_bbox", "points_bbox", "union_region", "within"]

#: Half-open slices, one per array axis.
Region = Tuple[slice, ...]


def mask_bbox(mask: np.ndarray, margin: int = 0) -> Optional[Region]:
    """The tight bounding region of the True (non-zero) voxels of ``mask``, or None when there are none.

    Args:
        mask: an array of any dimension (truth-tested per voxel).
        margin: voxels added on every side, clipped to the array (0: the tight box).
    """
    mask = np.asarray(mask)
    out = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        if hits.size == 0:
            return None
        out.append(slice(max(int(hits[0]) - margin, 0), min(int(hits[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(out)


def points_bbox(points: np.ndarray) -> Optional[Region]:
    """The tight bounding region of integer points ``(n, ndim)``, or None when there are none."""
    points = np.asarray(points)
    if len(points) == 0:
        return None
    lo, hi = points.min(axis=0), points.max(axis=0) + 1
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def union_region(regions: Sequence[Region]) -> Region:
    """The bounding region of ``regions`` (at least one; all of the same dimension)."""
    return tuple(slice(min(r[a].start for r in regions), max(r[a].stop for r in regions))
                 for a in range(len(regions[0])))


def within(region: Region, outer: Region) -> Region:
    """``region`` in the coordinates of the enclosing ``outer`` region."""
    return tuple(slice(r.start - o.start, r.stop - o.start) for r, o in zip(region, outer))
