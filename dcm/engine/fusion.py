"""The RoI update: fusing expert predictions into an object's mask, and writing objects into ``segs``.

An expert's answer covers its RoI only; outside every RoI the object keeps its previous mask. Inside, the
fusion rule decides between the global and the local answer where both cover a voxel:

* ``local_overrides``: the local window replaces the global answer (the paper's "RoI update");
* ``average``: mean of the two probabilities;
* ``confidence``: probabilities weighted by their confidence ``|p - 0.5|``.

Objects are written one after another into a uint8 label map; where two objects claim a voxel, the
overlap rule decides: ``later_wins`` (the released behaviour), ``highest_prob``, or ``keep_others`` (other
objects' masks act as constraints: an object only takes free voxels).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

from dcm.experts.base import RoIPrediction, RoISlices

__all__ = ["FUSION_RULES", "OVERLAP_RULES", "FusedPrediction", "fuse_predictions", "LabelWriter"]

FUSION_RULES = ("local_overrides", "average", "confidence")
OVERLAP_RULES = ("later_wins", "highest_prob", "keep_others")


@dataclass
class FusedPrediction:
    """The fused answer for one object on the bounding region of all its expert RoIs.

    Attributes:
        region: (z, y, x) slices of the image.
        prob: float32 probability on ``region``; NaN where no expert covered the voxel.
    """

    region: RoISlices
    prob: np.ndarray

    @property
    def covered(self) -> np.ndarray:
        return ~np.isnan(self.prob)

    def mask(self, threshold: float = 0.5) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            return self.prob > threshold


def _union_region(rois: Sequence[RoISlices]) -> RoISlices:
    return tuple(slice(min(r[a].start for r in rois), max(r[a].stop for r in rois)) for a in range(3))  # type: ignore


def _local(roi: RoISlices, region: RoISlices) -> RoISlices:
    return tuple(slice(r.start - g.start, r.stop - g.start) for r, g in zip(roi, region))  # type: ignore


def fuse_predictions(predictions: Sequence[RoIPrediction], rule: str = "local_overrides") -> Optional[FusedPrediction]:
    """Fuse expert predictions of one object, in the order given (global first, then local).

    Args:
        predictions: 0, 1 or more RoI predictions (None entries are ignored by the caller).
        rule: one of :data:`FUSION_RULES`; with ``local_overrides`` a later prediction replaces an earlier
            one where they overlap.
    """
    predictions = [p for p in predictions if p is not None]
    if not predictions:
        return None
    if rule not in FUSION_RULES:
        raise ValueError(f"unknown fusion rule {rule!r}; choose from {FUSION_RULES}")
    region = _union_region([p.roi for p in predictions])
    shape = tuple(s.stop - s.start for s in region)
    prob = np.full(shape, np.nan, dtype=np.float32)
    if rule == "local_overrides":
        for p in predictions:
            prob[_local(p.roi, region)] = p.prob
        return FusedPrediction(region, prob)
    weight_sum = np.zeros(shape, dtype=np.float32)
    acc = np.zeros(shape, dtype=np.float32)
    for p in predictions:
        sl = _local(p.roi, region)
        w = np.ones_like(p.prob) if rule == "average" else np.abs(p.prob - 0.5) * 2 + 1e-3
        acc[sl] += w * p.prob
        weight_sum[sl] += w
    covered = weight_sum > 0
    prob[covered] = acc[covered] / weight_sum[covered]
    return FusedPrediction(region, prob)


class LabelWriter:
    """Writes objects' fused predictions into a (z, y, x) uint8 label map, RoI by RoI.

    Args:
        segs: the label map to update in place (start from the previous output so that objects that are not
            re-predicted keep their masks).
        overlap: one of :data:`OVERLAP_RULES`.
    """

    def __init__(self, segs: np.ndarray, overlap: str = "later_wins"):
        if overlap not in OVERLAP_RULES:
            raise ValueError(f"unknown overlap rule {overlap!r}; choose from {OVERLAP_RULES}")
        self.segs = segs
        self.overlap = overlap
        # Only the highest_prob rule needs the winning probability; kept in float16 to bound memory.
        self._owner_prob = np.zeros(segs.shape, dtype=np.float16) if overlap == "highest_prob" else None

    def write(self, label: int, fused: FusedPrediction, threshold: float = 0.5) -> None:
        """RoI update of object ``label``: inside the covered voxels, its mask becomes the fused answer."""
        view = self.segs[fused.region]
        covered = fused.covered
        fg = fused.mask(threshold)
        view[covered & ~fg & (view == label)] = 0
        if self.overlap == "keep_others":
            view[fg & (view == 0)] = label
            return
        if self._owner_prob is None:
            view[fg] = label
            return
        owner = self._owner_prob[fused.region]
        p = np.nan_to_num(fused.prob).astype(np.float16)
        win = fg & ((view == 0) | (view == label) | (p > owner))
        view[win] = label
        owner[win] = p[win]
        owner[covered & ~fg & (view == 0)] = 0
