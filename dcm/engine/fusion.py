"""The RoI update: fusing expert predictions into an object's mask, and writing objects into ``segs``.

An expert's answer covers its RoI only; outside every RoI the object keeps its previous mask. Inside, the
fusion rule decides between the global and the local answer where both cover a voxel:

* ``local_overrides``: the local window replaces the global answer (the paper's "RoI update");
* ``average``: mean of the two probabilities;
* ``confidence``: probabilities weighted by their confidence ``|p - 0.5|``;
* ``click_region``: the local answer replaces the global one only on the region the last click is about:
  for a foreground click, the 26-connected region around it that the local expert adds (local foreground,
  global background); for a background click, the region around it that the local expert removes. At the
  box step the box centre counts as a foreground click. Elsewhere the global answer stands. The protocol
  puts each click in the middle of an error, so this is the correction the click asks for, and a local
  expert that sees too little of a large object cannot spoil the rest of its window.

After any rule, ``engine.local_click_radius`` r > 0 lets the local expert decide near the clicks: within r
voxels of each of the object's clicks inside the local window the local answer stands
(:func:`take_local_near_clicks`): the expert that sees the image at native resolution answers where the user
pointed, the global answer stands elsewhere.

Objects are written one after another into a uint8 label map; where two objects claim a voxel, the
overlap rule decides: ``later_wins`` (the released behaviour), ``highest_prob``, or ``keep_others`` (other
objects' masks act as constraints: an object only takes free voxels).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple, Union

import numpy as np

from dcm.experts.base import RoIPrediction, RoISlices
from dcm.config_schema import FUSION_RULES, OVERLAP_RULES, click_margins
from dcm.data.intensity import value_counts
from dcm.prompts import ball_offsets
from dcm.regions import union_region, within

__all__ = ["FUSION_RULES", "OVERLAP_RULES", "FusedPrediction", "fuse_predictions", "click_margins",
           "take_local_near_clicks", "LabelWriter", "label_counts", "nearest_first"]



@dataclass
class FusedPrediction:
    """The fused answer for one object on the bounding region of all its expert RoIs.

    Attributes:
        region: (z, y, x) slices of the image.
        prob: float32 probability on ``region``; NaN where no expert covered the voxel.
        complete: an expert covered every voxel of ``region`` (``prob`` has no NaN).
    """

    region: RoISlices
    prob: np.ndarray
    complete: bool = False

    @property
    def covered(self) -> np.ndarray:
        return ~np.isnan(self.prob)

    def mask(self, threshold: float = 0.5) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            return self.prob > threshold


def fuse_predictions(
    predictions: Sequence[RoIPrediction],
    rule: str = "local_overrides",
    click_zyx: Optional[Sequence[int]] = None,
    click_positive: bool = True,
    threshold: float = 0.5,
    margin: Union[float, Sequence[float]] = 0.0,
    copy: bool = True,
) -> Optional[FusedPrediction]:
    """Fuse expert predictions of one object, in the order given (global first, then local).

    Args:
        predictions: 0, 1 or more RoI predictions (None entries are ignored by the caller).
        rule: one of :data:`FUSION_RULES`; with ``local_overrides`` a later prediction replaces an earlier
            one where they overlap.
        click_zyx: ``click_region``: the (z, y, x) image voxel of the last click (None: the centre of the
            last prediction's RoI).
        click_positive: ``click_region``: whether that click is a foreground click.
        margin: ``click_region``: the local expert's change counts only where it is confident: foreground
            ``prob > threshold + margin``, background ``prob < threshold - margin``; a pair ``(add, remove)``
            sets the margin of foreground clicks (what the local expert adds) and of background clicks
            (what it removes) apart.
        threshold: ``click_region``: the masks compared are ``prob > threshold``.
        copy: False lets the result reuse (and change) the first prediction's array (the engine, which
            discards the predictions, saves a copy of the largest array).
    """
    predictions = [p for p in predictions if p is not None]
    if not predictions:
        return None
    if rule not in FUSION_RULES:
        raise ValueError(f"unknown fusion rule {rule!r}; choose from {FUSION_RULES}")
    region = union_region([p.roi for p in predictions])
    shape = tuple(s.stop - s.start for s in region)
    # Usually the first (global) RoI holds the others: start from a copy of its answer, nothing is uncovered.
    complete = tuple(predictions[0].roi) == tuple(region)
    if complete:
        first = predictions[0].prob
        prob = np.array(first, dtype=np.float32) if copy else np.asarray(first, dtype=np.float32)
    else:
        prob = np.full(shape, np.nan, dtype=np.float32)
    if rule == "local_overrides":
        for p in predictions[1:] if complete else predictions:
            prob[within(p.roi, region)] = p.prob
        return FusedPrediction(region, prob, complete)
    if rule == "click_region":
        if not complete:
            for p in predictions[:-1] if len(predictions) > 1 else predictions:
                prob[within(p.roi, region)] = p.prob
        if len(predictions) > 1:
            last = predictions[-1]
            sl = within(last.roi, region)
            anchor = click_zyx if click_zyx is not None else [(s.start + s.stop - 1) // 2 for s in last.roi]
            add_margin, remove_margin = click_margins(margin)
            take = _click_component(prob[sl], last.prob, [int(a) - s.start for a, s in zip(anchor, last.roi)],
                                    click_positive, threshold, add_margin if click_positive else remove_margin)
            if take is not None:
                prob[sl][take] = last.prob[take]
        return FusedPrediction(region, prob, complete)
    weight_sum = np.zeros(shape, dtype=np.float32)
    acc = np.zeros(shape, dtype=np.float32)
    for p in predictions:
        sl = within(p.roi, region)
        w = np.ones_like(p.prob) if rule == "average" else np.abs(p.prob - 0.5) * 2 + 1e-3
        acc[sl] += w * p.prob
        weight_sum[sl] += w
    covered = weight_sum > 0
    prob[covered] = acc[covered] / weight_sum[covered]
    return FusedPrediction(region, prob, complete)


def take_local_near_clicks(
    fused: FusedPrediction, local: RoIPrediction, clicks_zyx: Sequence[Sequence[int]], radius: float
) -> FusedPrediction:
    """Let the local answer stand within ``radius`` voxels (a Euclidean ball) of each click inside its window.

    Args:
        fused: the fused answer (its region holds ``local.roi``); changed in place and returned.
        local: the local expert's prediction (window ``roi``, float32 ``prob``).
        clicks_zyx: (z, y, x) image voxels of the object's clicks; those outside the window are ignored.
        radius: ball radius in voxels (0: nothing changes).
    """
    if radius <= 0:
        return fused
    ball = ball_offsets(radius)
    lo = np.array([s.start for s in local.roi])
    shape = np.array(local.prob.shape)
    near = np.zeros(local.prob.shape, dtype=bool)
    for zyx in clicks_zyx:
        at = np.asarray(zyx, dtype=np.int64) - lo
        if np.any(at < 0) or np.any(at >= shape):
            continue
        voxels = at + ball
        voxels = voxels[np.all((voxels >= 0) & (voxels < shape), axis=1)]
        near[tuple(voxels.T)] = True
    if near.any():
        fused.prob[within(local.roi, fused.region)][near] = local.prob[near]
    return fused


def _click_component(
    current: np.ndarray, local: np.ndarray, anchor: Sequence[int], positive: bool, threshold: float,
    margin: float = 0.0,
) -> Optional[np.ndarray]:
    """The 26-connected region around ``anchor`` (window coordinates) that ``local`` adds to (``positive``)
    or removes from (not ``positive``) the ``current`` mask at ``threshold`` (``current`` NaN: no answer,
    counts as background); None when there is no such change at the anchor or it lies outside the window."""
    if any(not 0 <= a < n for a, n in zip(anchor, local.shape)):
        return None
    with np.errstate(invalid="ignore"):
        current_fg = current > threshold
        if positive:
            disagree = (local > threshold + margin) & ~current_fg
        else:
            disagree = (local < threshold - margin) & current_fg
    return component_at(disagree, anchor)


def component_at(mask: np.ndarray, at: Sequence[int]) -> Optional[np.ndarray]:
    """The 26-connected component of ``mask`` holding voxel ``at`` (None when ``mask[at]`` is False)."""
    at = tuple(int(a) for a in at)
    if not mask[at]:
        return None
    import cc3d

    components = cc3d.connected_components(np.ascontiguousarray(mask, dtype=np.uint8), connectivity=26)
    return components == components[at]


class _BlockMap:
    """A float16 (z, y, x) map kept in cubic blocks that are allocated on the first non-zero write.

    Unallocated blocks read as 0, so memory follows the voxels objects actually won, never more than the
    dense map.
    """

    def __init__(self, shape: Sequence[int], block: int = 32):
        self.shape = tuple(int(n) for n in shape)
        self.block = int(block)
        self.blocks: Dict[Tuple[int, int, int], np.ndarray] = {}

    def _pieces(self, region: RoISlices) -> Iterator[Tuple[Tuple[int, int, int], RoISlices, RoISlices]]:
        """(block key, slices inside the block, slices inside ``region``) for every block ``region`` touches."""
        b = self.block
        ranges = [range(s.start // b, (s.stop - 1) // b + 1) for s in region]
        for key in itertools.product(*ranges):
            inner, local = [], []
            for k, s in zip(key, region):
                lo, hi = max(s.start, k * b), min(s.stop, (k + 1) * b)
                inner.append(slice(lo - k * b, hi - k * b))
                local.append(slice(lo - s.start, hi - s.start))
            yield key, tuple(inner), tuple(local)  # type: ignore[misc]

    def read(self, region: RoISlices) -> np.ndarray:
        out = np.zeros(tuple(s.stop - s.start for s in region), dtype=np.float16)
        for key, inner, local in self._pieces(region):
            block = self.blocks.get(key)
            if block is not None:
                out[local] = block[inner]
        return out

    def write(self, region: RoISlices, values: np.ndarray, where: np.ndarray) -> None:
        """``map[region][where] = values[where]``; a block is allocated only to hold a non-zero value."""
        for key, inner, local in self._pieces(region):
            sel = where[local]
            block = self.blocks.get(key)
            if block is None:
                if not np.any(values[local], where=sel):
                    continue
                shape = tuple(min(self.block, n - k * self.block) for k, n in zip(key, self.shape))
                block = self.blocks[key] = np.zeros(shape, dtype=np.float16)
            np.copyto(block[inner], values[local], where=sel)


class LabelWriter:
    """Writes objects' fused predictions into a (z, y, x) uint8 label map, RoI by RoI.

    Args:
        segs: the label map to update in place (start from the previous output so that objects that are not
            re-predicted keep their masks).
        overlap: one of :data:`OVERLAP_RULES`.
        protection: the objects' positive click neighbourhoods (:class:`dcm.engine.clicks.ClickProtection`):
            an object always gets its own, and never takes another object's, whatever the overlap rule.
        max_taken: ``engine.max_taken`` (with ``honour_clicks``; 0: no limit): in one writer's pass (one
            click step) the other objects' answers take at most this fraction of an object's previous mask
            (an object's own positive click neighbourhoods are always written, and count towards it); of a
            larger claim the voxels nearest the taking object's newest click (``anchor_zyx`` of :meth:`write`,
            in mm) are taken and the others stay with their object.
        prev_pred: the (z, y, x) label map before this pass (what "previous mask" means above); None: no
            previous masks (the box step), nothing is capped.
        spacing_zyx: voxel size in mm, for "nearest".
        prev_counts: :func:`label_counts` of ``prev_pred`` when the caller has it (counted here otherwise, once).

    ``highest_prob`` keeps the probability with which each voxel was won (float16) in 32^3 blocks allocated
    where objects win voxels, not as a map of the whole volume.
    """

    def __init__(self, segs: np.ndarray, overlap: str = "later_wins", protection: Optional[Any] = None,
                 max_taken: float = 0.0, prev_pred: Optional[np.ndarray] = None,
                 spacing_zyx: Sequence[float] = (1.0, 1.0, 1.0), prev_counts: Optional[np.ndarray] = None):
        if overlap not in OVERLAP_RULES:
            raise ValueError(f"unknown overlap rule {overlap!r}; choose from {OVERLAP_RULES}")
        self.segs = segs
        self.overlap = overlap
        self.protection = protection
        self._owner_prob = _BlockMap(segs.shape) if overlap == "highest_prob" else None
        self.max_taken = float(max_taken) if prev_pred is not None else 0.0
        self._prev = prev_pred
        self.spacing_zyx = tuple(float(s) for s in spacing_zyx)
        self._prev_counts = prev_counts
        self._taken: Dict[int, int] = {}

    def write(self, label: int, fused: FusedPrediction, threshold: float = 0.5,
              anchor_zyx: Optional[Sequence[int]] = None) -> None:
        """RoI update of object ``label``: inside the covered voxels, its mask becomes the fused answer.

        ``anchor_zyx``: the object's newest click (the voxels it takes from others under ``max_taken`` are the
        nearest to it); None: the centre of the answer's region.
        """
        view = self.segs[fused.region]
        fg = fused.mask(threshold)
        own, others = self._protected(label, fused.region)
        if others is not None:
            fg[others] = False
        cleared = np.greater(view == label, fg)  # label and not fg, in one pass
        if not fused.complete:
            cleared &= fused.covered
        np.copyto(view, np.uint8(0), where=cleared)  # copyto: ~3x faster than putmask
        if self.overlap == "keep_others":
            fg &= view == 0
            if own is not None:
                fg[own] = True
            np.copyto(view, np.uint8(label), where=fg)
            return
        if self._owner_prob is None:
            if own is not None:
                fg[own] = True
            if self.max_taken > 0:
                self._limit_taking(label, fused.region, view, fg, own, anchor_zyx)
            np.copyto(view, np.uint8(label), where=fg)
            return
        owner = self._owner_prob.read(fused.region)
        p = np.nan_to_num(fused.prob).astype(np.float16)
        win = fg & ((view == 0) | (view == label) | (p > owner))
        if own is not None:
            win[own] = True
        if self.max_taken > 0:
            self._limit_taking(label, fused.region, view, win, own, anchor_zyx)
        view[win] = label
        cleared = np.greater(view == 0, fg)  # free and not fg
        if not fused.complete:
            cleared &= fused.covered
        self._owner_prob.write(fused.region, np.where(win, p, np.float16(0)), win | cleared)

    def _limit_taking(self, label: int, region: RoISlices, view: np.ndarray, win: np.ndarray,
                      own: Optional[Tuple[np.ndarray, ...]], anchor_zyx: Optional[Sequence[int]]) -> None:
        """``max_taken``: drop from ``win`` (in place) the other objects' previous voxels beyond each one's
        allowance, farthest from the anchor first; ``own`` (the object's protected voxels) are never dropped
        but count."""
        # others' voxels held since the last pass: in place, one region-sized array (objects' RoIs are large)
        taken = np.equal(view, self._prev[region])
        taken &= win
        np.logical_and(taken, view, out=taken)  # view != 0
        taken &= view != label
        if not taken.any():
            return
        if anchor_zyx is None:
            anchor_zyx = [(s.start + s.stop - 1) / 2 for s in region]
        origin = np.array([s.start for s in region])
        claimed = np.argwhere(taken)
        owners = view[tuple(claimed.T)]
        if own is not None:  # a few voxels per click: compared by flat index, no region-sized array
            is_forced = np.isin(np.ravel_multi_index(tuple(claimed.T), view.shape),
                                np.ravel_multi_index(own, view.shape))
        else:
            is_forced = np.zeros(len(claimed), dtype=bool)
        if self._prev_counts is None:
            self._prev_counts = label_counts(self._prev)
        for other in np.flatnonzero(np.bincount(owners, minlength=256)):  # the owners, ascending (no hashing)
            other = int(other)
            allowed = max(0, int(self.max_taken * self._prev_counts[other]) - self._taken.get(other, 0))
            mine = owners == other
            must = int(np.count_nonzero(mine & is_forced))
            free = claimed[mine & ~is_forced]
            room = max(0, allowed - must)
            if len(free) > room:
                farthest = free[nearest_first(free + origin, anchor_zyx, self.spacing_zyx)[room:]]
                win[tuple(farthest.T)] = False
            self._taken[other] = self._taken.get(other, 0) + must + min(len(free), room)

    def _protected(self, label: int, region: RoISlices) -> Tuple[Optional[Tuple[np.ndarray, ...]],
                                                                 Optional[Tuple[np.ndarray, ...]]]:
        """Index tuples (relative to ``region``) of ``label``'s own and of other objects' protected voxels."""
        if self.protection is None:
            return None, None
        voxels, labels = self.protection.in_region(region)
        if not len(voxels):
            return None, None
        mine = labels == label
        return tuple(voxels[mine].T), tuple(voxels[~mine].T)


def label_counts(label_map: np.ndarray, chunk_voxels: int = 1 << 17) -> np.ndarray:
    """Voxels of every label value 0..255 of a (z, y, x) uint8 label map, in one pass over chunks of
    ``chunk_voxels`` (:func:`dcm.data.intensity.value_counts`: 1 MB of int64 at a time, not a full-size
    temporary; the engine's memory stays per object). Returns (256,) int64."""
    if label_map.dtype != np.uint8:
        raise TypeError(f"label_counts needs a uint8 label map, got {label_map.dtype}")
    return value_counts(label_map, chunk_voxels)


def nearest_first(voxels_zyx: np.ndarray, anchor_zyx: Sequence[float], spacing_zyx: Sequence[float]) -> np.ndarray:
    """Order (indices) of the (n, 3) ``voxels_zyx`` by distance in mm to ``anchor_zyx``, nearest first (stable)."""
    offset = (np.asarray(voxels_zyx) - np.asarray(anchor_zyx, dtype=np.float64)) * np.asarray(spacing_zyx, np.float64)
    return np.argsort((offset * offset).sum(axis=1), kind="stable")
