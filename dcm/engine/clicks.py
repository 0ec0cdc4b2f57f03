"""The click promise: a click the user gave is kept in every later answer.

**What is promised** (per object, after every step of ``predict.sh``, the evaluator and the session): the
*neighbourhood* of each click, that is its voxel and the 6 face neighbours of it that lie inside the image,
is inside the object's mask for a positive click and outside it for a negative one. Two exceptions, both
about clicks that contradict each other:

* two clicks of one object claiming the same voxel with opposite signs: the later click wins there;
* two objects' positive clicks claiming the same voxel: the object written first (lower label) keeps it;
  the other object's promise leaves that voxel out.

Not promised: anything beyond the neighbourhoods. An expert's answer elsewhere is the expert's.

**How the engine keeps it** (``engine.honour_clicks: true``; :func:`honour_clicks` on each object's fused
answer, :class:`ClickProtection` in the label writer):

0. *Scope* (``engine.update_scope``, optional): a click step changes the mask only the way its newest click
   asks: ``click_sign`` takes only additions after a positive click and only removals after a negative one;
   ``click_part`` takes, of those, only the connected parts touching the click. ``whole`` takes the answer
   as it is. The rest keeps the previous mask, so a click cannot wreck the object away from where it was given.
   *Removal cap* (``engine.max_removal``, 0.25 by default, 0 turns it off): in a click step the experts'
   answer removes at most that fraction of the object's previous mask; of a larger removal only the voxels
   nearest the newest click (in mm) are taken (``trim``; but see ``reject`` below). *Addition cap*
   (``engine.max_addition``, 2 by default, 0 turns it off): likewise the answer adds at most that multiple of
   the larger of the object's previous mask and ``engine.addition_floor`` (0.25) times its box's volume (not
   capped when the previous mask is empty), the voxels nearest the newest click: a small mask in a large box
   may still grow to the object at once. Both act on the experts' answer only: the corrections and
   neighbourhoods of steps 2-3 come on top (with ``engine.click_correction.within_step_caps`` each
   correction is held to the same cap, on its own).
   With ``engine.removal_beyond_cap`` (``addition_beyond_cap``) ``reject`` instead of ``trim``, a removal (an
   addition) beyond its cap is not taken at all: the answer is treated as a collapse (a jump), and a click
   it leaves unkept is corrected by step 2; ``reject_without_box`` does so for objects without a box only
   (``configs/dcm_small.yaml``).
   *Taking cap* (``engine.max_taken``, 0.01 by default, 0 turns it off): in one click step of predict.sh /
   the evaluator (not the box step, which has no previous masks) the other objects' answers take at most
   that fraction of an object's previous mask (the label writer keeps the claimed voxels farthest from the
   taking object's newest click with their object; its own positive neighbourhoods are written whatever, and
   count). Not in the interactive session, where each write is one action on one object that the user sees
   and can undo: there it would make an object's mask depend on whether another object's step was undone.

1. *Reject*: an expert's update that would flip a promised voxel the previous mask had right is rejected on
   the connected part of that change (the 26-connected component of the voxels it removes, or adds, that
   holds the voxel): the previous mask stays there. So an update cannot remove the part of the mask that
   holds a positive click, nor paint over a negative click.
2. *Correct*: a click that no expert kept (typically the newest click, on an error the experts do not fix)
   gets a correction that follows the image, tried method by method (``engine.click_correction``):
   ``probability`` takes the connected region around the click of the experts' probability at a lowered
   threshold (for a negative click: the region around it where the probability stays below a raised one),
   ``random_walker`` runs scikit-image's random walker on a crop around the click seeded by the object's
   clicks, its current mask and the crop's border (the region the walker gives the click's side, connected
   to the click, is added or removed).
3. *Enforce*: whatever the methods gave, the neighbourhoods are then set (later clicks last).
4. *Protect across objects*: when objects are written into the label map, a voxel of one object's positive
   neighbourhood is never taken by another object, and an object's own positive neighbourhood is written
   whatever the overlap rule (``later_wins``, ``highest_prob``, ``keep_others``).

Coordinates are (z, y, x) voxel indices throughout.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from dcm.config_schema import CORRECTION_METHODS, ClickCorrectionConfig
from dcm.engine.fusion import FusedPrediction, component_at, label_counts, nearest_first
from dcm.experts.base import RoISlices as Region
from dcm.prompts import ZYX, ObjectPrompts
from dcm.regions import points_bbox, union_region, within

__all__ = [
    "CORRECTION_METHODS",
    "ClickPromise",
    "ClickProtection",
    "click_neighbourhood",
    "promises_of",
    "honour_clicks",
    "check_click_correction",
    "clicks_kept",
]

_FACE_OFFSETS = np.array([[0, 0, 0], [-1, 0, 0], [1, 0, 0], [0, -1, 0], [0, 1, 0], [0, 0, -1], [0, 0, 1]])


def click_neighbourhood(zyx: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """The click voxel and its 6 face neighbours that lie inside an image of ``shape``: (k, 3) int, k <= 7."""
    voxels = np.asarray(zyx, dtype=np.int64)[None, :] + _FACE_OFFSETS
    inside = np.all((voxels >= 0) & (voxels < np.asarray(shape)[None, :]), axis=1)
    return voxels[inside]


@dataclass
class ClickPromise:
    """The voxels one object's clicks promise, after the contradiction rules.

    Attributes:
        voxels: (n, 3) int (z, y, x) voxel indices.
        positive: (n,) bool, the sign each voxel is promised with.
        click: (n,) int, the index (in ``ObjectPrompts.clicks``) of the click that owns the voxel.
        num_clicks: the object's number of clicks.
        claims: (m, 2) int pairs (row of :attr:`voxels`, click index): every click whose neighbourhood holds
            the voxel with the sign it is promised with (the owner and earlier clicks of the same sign).
    """

    voxels: np.ndarray
    positive: np.ndarray
    click: np.ndarray
    num_clicks: int
    claims: np.ndarray

    @property
    def empty(self) -> bool:
        return len(self.voxels) == 0

    def bbox(self) -> Optional[Region]:
        """The bounding region of the voxels the clicks own, or None when they own none."""
        return points_bbox(self.voxels)  # type: ignore[return-value]

    def kept(self, mask_at: np.ndarray) -> np.ndarray:
        """(num_clicks,) bool: click i is kept when every voxel it owns has its sign in ``mask_at``.

        Args:
            mask_at: (n,) bool, the object's mask at :attr:`voxels`.
        """
        wrong = np.asarray(mask_at, dtype=bool) != self.positive
        kept = np.ones(self.num_clicks, dtype=bool)
        kept[np.unique(self.click[wrong])] = False
        return kept

    def honoured(self, mask_at: np.ndarray) -> np.ndarray:
        """(num_clicks,) bool: what the user sees, for the clicks-kept count: click i is honoured when every
        voxel it claims has its sign in ``mask_at``.

        Unlike :meth:`kept` (which clicks own the wrong voxels: those the engine corrects) a click repeated
        at the same place, as the organisers' rule repeats a click an answer ignored, is honoured only when
        the later one is: the earlier click owns none of its voxels, so :meth:`kept` would pass it unseen.
        Voxels a later click of the other sign took stay excused.

        Args:
            mask_at: (n,) bool, the object's mask at :attr:`voxels`.
        """
        wrong = np.asarray(mask_at, dtype=bool) != self.positive
        honoured = np.ones(self.num_clicks, dtype=bool)
        honoured[np.unique(self.claims[wrong[self.claims[:, 0]], 1])] = False
        return honoured


def promises_of(objects: Sequence[ObjectPrompts], shape: Sequence[int]) -> Dict[int, ClickPromise]:
    """Each object's promise (by label), with both contradiction rules applied (see the module docstring).

    ``objects`` in writing order (label order): an earlier object's positive voxels are left out of later
    objects' positive promises.
    """
    taken: set = set()
    promises: Dict[int, ClickPromise] = {}
    for obj in objects:
        owner: Dict[ZYX, Tuple[bool, int]] = {}
        claimants: Dict[ZYX, List[int]] = {}  # the clicks of the owner's sign holding the voxel
        for index, click in enumerate(obj.clicks):
            sign = bool(click.positive)
            for v in click_neighbourhood(click.zyx, shape):
                key = (int(v[0]), int(v[1]), int(v[2]))
                same = key in owner and owner[key][0] == sign
                owner[key] = (sign, index)
                claimants[key] = claimants[key] + [index] if same else [index]
        items = [(v, sign, index) for v, (sign, index) in owner.items() if not (sign and v in taken)]
        taken.update(v for v, sign, _ in items if sign)
        claims = [(row, i) for row, (v, _, _) in enumerate(items) for i in claimants[v]]
        promises[obj.label] = ClickPromise(
            voxels=np.array([v for v, _, _ in items], dtype=np.int64).reshape(-1, 3),
            positive=np.array([s for _, s, _ in items], dtype=bool),
            click=np.array([i for _, _, i in items], dtype=np.int64),
            num_clicks=len(obj.clicks),
            claims=np.array(claims, dtype=np.int64).reshape(-1, 2),
        )
    return promises


def clicks_kept(labels: np.ndarray, objects: Sequence[ObjectPrompts],
                promises: Optional[Mapping[int, ClickPromise]] = None) -> Tuple[int, int]:
    """``(kept, total)`` clicks of ``objects`` that the (z, y, x) label map ``labels`` keeps
    (:meth:`ClickPromise.honoured`: a repeated click counts once per time it was given, kept or not).

    ``promises``: :func:`promises_of` ``(objects, labels.shape)`` when the caller already has it (checking
    several label maps against the same clicks builds them once)."""
    kept = total = 0
    if promises is None:
        promises = promises_of(objects, labels.shape)
    for label, promise in promises.items():
        if promise.num_clicks == 0:
            continue
        at = labels[tuple(promise.voxels.T)] == label if not promise.empty else np.zeros(0, bool)
        flags = promise.honoured(at)
        kept += int(flags.sum())
        total += promise.num_clicks
    return kept, total


# ------------------------------------------------------------------------------------------ engine side
#: ``engine.click_correction`` defaults: :class:`dcm.config_schema.ClickCorrectionConfig`, where they are written.
CORRECTION_DEFAULTS: Dict[str, Any] = ClickCorrectionConfig().to_dict()


def check_click_correction(cfg: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """The ``engine.click_correction`` section with defaults filled in, checked by
    :class:`dcm.config_schema.ClickCorrectionConfig`; ConfigError (a ValueError) naming the key otherwise."""
    return ClickCorrectionConfig.from_mapping(cfg, "click_correction").to_dict()


@dataclass
class _Work:
    """An object's arrays on one region of the image while its clicks are honoured.

    ``mask`` is kept equal to what writing ``prob`` now would give: the answer where there is one
    (``prob > threshold``), the previous mask where ``prob`` is NaN.
    """

    region: Region
    prob: np.ndarray  # float32; NaN: no expert answer, the label map keeps what it has
    prev: np.ndarray  # bool: the previous mask
    others: np.ndarray  # bool: other objects' voxels in the previous label map
    mask: np.ndarray  # bool
    threshold: float = 0.5

    @classmethod
    def start(cls, region: Region, prob: np.ndarray, label: int, prev_pred: Optional[np.ndarray],
              threshold: float) -> "_Work":
        prev, others = _previous(prev_pred, region, label, prob.shape)
        with np.errstate(invalid="ignore"):
            mask = prob > threshold  # NaN: False, then the previous mask there (whole-array passes, no gathers)
        np.copyto(mask, prev, where=np.isnan(prob))
        return cls(region, prob, prev, others, mask, threshold)

    def keep_previous(self, part: np.ndarray) -> None:
        self.prob[part] = np.nan
        self.mask[part] = self.prev[part]

    def set(self, part: np.ndarray, positive: bool, within: Region) -> None:
        """Voxels ``part`` (a mask on the sub-region ``within`` of :attr:`region`) become ``positive``."""
        self.prob[within][part] = 1.0 if positive else 0.0
        self.mask[within][part] = positive

    def grow(self, region: Region, label: int, prev_pred: Optional[np.ndarray]) -> "_Work":
        """The same arrays on a larger ``region`` (NaN / the previous label map outside the old one)."""
        if tuple(region) == tuple(self.region):
            return self
        prob = np.full(tuple(s.stop - s.start for s in region), np.nan, dtype=np.float32)
        inner = within(self.region, region)
        prob[inner] = self.prob
        grown = _Work.start(region, prob, label, prev_pred, self.threshold)
        grown.mask[inner] = self.mask
        return grown


def _previous(prev_pred: Optional[np.ndarray], region: Region, label: int, shape) -> Tuple[np.ndarray, np.ndarray]:
    if prev_pred is None:
        return np.zeros(shape, bool), np.zeros(shape, bool)
    view = prev_pred[region]
    mine = view == label
    others = view != 0
    others ^= mine  # labelled and not this label (label > 0)
    return mine, others


def honour_clicks(
    fused: Optional[FusedPrediction],
    obj: ObjectPrompts,
    promise: ClickPromise,
    image: np.ndarray,
    spacing_zyx: Sequence[float],
    prev_pred: Optional[np.ndarray],
    threshold: float = 0.5,
    correction: Optional[Mapping[str, Any]] = None,
    update_scope: str = "whole",
    max_removal: float = 0.0,
    max_addition: float = 0.0,
    addition_floor: float = 0.0,
    prev_counts: Optional[np.ndarray] = None,
    removal_beyond_cap: str = "trim",
    addition_beyond_cap: str = "trim",
) -> Optional[FusedPrediction]:
    """One object's fused answer, changed so that it keeps the object's clicks (module docstring, 0-3).

    Args:
        fused: the :class:`~dcm.engine.fusion.FusedPrediction` of the experts, or None (no expert answered).
        obj: the object's prompts (clicks in the order given).
        promise: its :class:`ClickPromise` (from :func:`promises_of` over all objects of the image).
        image: (z, y, x) intensities (the correction follows them).
        spacing_zyx: voxel size in mm, (z, y, x).
        prev_pred: (z, y, x) uint8 previous label map (None at a fresh start).
        threshold: the engine's mask threshold.
        correction: ``engine.click_correction`` (checked by :func:`check_click_correction`).
        update_scope: ``engine.update_scope``: ``whole`` | ``click_sign`` | ``click_part`` (step 0).
        max_removal: ``engine.max_removal``: the removal cap of step 0 (0: none).
        max_addition: ``engine.max_addition``: the addition cap of step 0 (0: none), a multiple of the larger of
            the object's previous mask and ``addition_floor`` (``engine.addition_floor``) times its box's volume.
        prev_counts: :func:`~dcm.engine.fusion.label_counts` of ``prev_pred`` when the caller has it (one pass
            per click step for all objects); counted here otherwise.
        removal_beyond_cap, addition_beyond_cap: ``engine.removal_beyond_cap`` / ``addition_beyond_cap``: of a
            change beyond its cap, ``trim`` takes the voxels nearest the newest click up to the cap, ``reject``
            takes none of it, ``reject_without_box`` rejects for an object without a box and trims otherwise
            (step 0).

    Returns:
        A ``FusedPrediction`` on a region that holds the expert RoIs and the promised voxels: NaN where the
        previous mask is kept (no answer, or a rejected change), 1 / 0 on corrected and promised voxels. None
        when there was no answer and no click.
    """
    if promise.empty:
        return fused
    cfg = check_click_correction(correction)
    region = union_region([r for r in (fused.region if fused is not None else None, promise.bbox()) if r])
    if fused is not None and tuple(region) == tuple(fused.region):
        prob = fused.prob  # the engine's own array: changed in place
    else:
        prob = np.full(tuple(s.stop - s.start for s in region), np.nan, dtype=np.float32)
        if fused is not None:
            prob[within(fused.region, region)] = fused.prob
    work = _Work.start(region, prob, obj.label, prev_pred, threshold)

    click_step = prev_pred is not None and obj.last_click is not None
    if click_step and update_scope != "whole":
        _limit_update(work, obj.last_click.zyx, bool(obj.last_click.positive), update_scope == "click_part")
    size = 0  # the object's whole previous mask, not only the part on this region (which depends on the policy)
    if click_step and (max_removal > 0 or max_addition > 0 or cfg["max_mask_fraction"] > 0):
        size = int((label_counts(prev_pred) if prev_counts is None else prev_counts)[obj.label])
    removal_cap = addition_cap = float("inf")  # voxels the experts' answer may remove / add in this step
    if click_step and max_removal > 0:
        removal_cap = int(max_removal * size)
        _cap_change(work, obj.last_click.zyx, removal_cap, spacing_zyx, added=False,
                    reject=_rejects(removal_beyond_cap, obj))
    if click_step and max_addition > 0 and size:
        addition_cap = int(max_addition * max(size, addition_floor * _box_volume(obj)))
        _cap_change(work, obj.last_click.zyx, addition_cap, spacing_zyx, added=True,
                    reject=_rejects(addition_beyond_cap, obj))
    correction_caps = (float("inf"), float("inf"))  # (removal, addition) voxels each correction may change
    if cfg["within_step_caps"]:
        correction_caps = (removal_cap, addition_cap)
    if cfg["max_mask_fraction"] > 0 and size > 0:
        correction_caps = tuple(min(c, int(cfg["max_mask_fraction"] * size)) for c in correction_caps)  # type: ignore
    _reject_flips(work, promise)
    kept = promise.kept(work.mask[tuple(_local_voxels(work, promise).T)])
    for index in np.flatnonzero(~kept):
        work = _correct(work, obj, promise, int(index), image, spacing_zyx, prev_pred, cfg, correction_caps)
    _enforce(work, promise)
    complete = not bool(np.isnan(work.prob).any())
    return FusedPrediction(work.region, work.prob, complete)


def _local_voxels(work: _Work, promise: ClickPromise) -> np.ndarray:
    return promise.voxels - np.array([s.start for s in work.region])


def _limit_update(work: _Work, click_zyx: Sequence[int], positive: bool, connected: bool) -> None:
    """Step 0 (``engine.update_scope``): a click step changes the mask the way its newest click asks.

    A positive click only adds (the answer's removals are rejected), a negative one only removes; with
    ``connected`` only the 26-connected parts of that change touching the click's neighbourhood are taken.
    Whatever is rejected keeps the previous mask.
    """
    if positive:
        work.keep_previous(work.prev & ~work.mask)
        change = work.mask & ~work.prev
    else:
        work.keep_previous(work.mask & ~work.prev)
        change = work.prev & ~work.mask
    if not connected or not change.any():
        return
    import cc3d

    components = cc3d.connected_components(np.ascontiguousarray(change, dtype=np.uint8), connectivity=26)
    origin = np.array([s.start for s in work.region])
    near = click_neighbourhood(click_zyx, [s.stop for s in work.region]) - origin
    near = near[np.all((near >= 0) & (near < np.array(change.shape)), axis=1)]
    touching = np.unique(components[tuple(near.T)]) if len(near) else np.zeros(0, components.dtype)
    touching = touching[touching > 0]
    work.keep_previous(change & ~np.isin(components, touching))


def _rejects(beyond_cap: str, obj: ObjectPrompts) -> bool:
    """Whether ``engine.removal_beyond_cap`` / ``addition_beyond_cap`` rejects an over-cap change of ``obj``."""
    return beyond_cap == "reject" or (beyond_cap == "reject_without_box" and obj.box is None)


def _cap_change(work: _Work, click_zyx: Sequence[int], limit: int, spacing_zyx: Sequence[float],
                added: bool, reject: bool = False) -> None:
    """Step 0, the removal cap (``added`` False) or the addition cap: of the voxels the answer removes from
    (adds to) the previous mask, take at most ``limit``, the ones nearest the click in mm (with ``reject``:
    none when there are more than ``limit``); the others keep the previous mask."""
    change = work.mask & ~work.prev if added else work.prev & ~work.mask
    if reject:
        if np.count_nonzero(change) > limit:
            work.keep_previous(change)
        return
    if np.count_nonzero(change) <= limit:  # the common case: no coordinates needed
        return
    changed = np.argwhere(change)
    origin = np.array([s.start for s in work.region])
    farthest = changed[nearest_first(changed + origin, click_zyx, spacing_zyx)[limit:]]
    part = np.zeros(work.mask.shape, dtype=bool)
    part[tuple(farthest.T)] = True
    work.keep_previous(part)


def _reject_flips(work: _Work, promise: ClickPromise) -> None:
    """Step 1: where the answer flips a promised voxel that the previous mask had right, keep the previous
    mask on the connected part of that change."""
    for v, sign in zip(_local_voxels(work, promise), promise.positive):
        at = tuple(int(a) for a in v)
        if work.mask[at] == sign or work.prev[at] != sign:
            continue
        change = (work.prev & ~work.mask) if sign else (work.mask & ~work.prev)
        part = component_at(change, at)
        if part is not None:
            work.keep_previous(part)


def _enforce(work: _Work, promise: ClickPromise) -> None:
    """Step 3: the promised voxels themselves (later clicks already won in the promise)."""
    index = tuple(_local_voxels(work, promise).T)
    work.prob[index] = promise.positive.astype(np.float32)
    work.mask[index] = promise.positive


def _object_radius_mm(obj: ObjectPrompts, work: _Work, spacing_zyx: Sequence[float]) -> float:
    """The object's size as a radius in mm: half the box's largest extent, else the radius of the ball as
    large as its current mask; infinite when neither is known (the crop is then ``radius_mm``)."""
    mm = np.asarray(spacing_zyx, dtype=np.float64)
    if obj.box is not None:
        extent = np.array(obj.box.size_zyx, dtype=np.float64) * mm
        return float(extent.max()) / 2.0
    voxels = int(np.count_nonzero(work.mask))
    if voxels == 0:
        return float("inf")
    return float((3.0 * voxels * float(np.prod(mm)) / (4.0 * np.pi)) ** (1.0 / 3.0))


def _crop_around(zyx: Sequence[int], shape: Sequence[int], spacing_zyx: Sequence[float], radius_mm: float) -> Region:
    half = [max(2, int(round(radius_mm / max(float(s), 1e-6)))) for s in spacing_zyx]
    return tuple(slice(max(int(c) - h, 0), min(int(c) + h + 1, int(n)))  # type: ignore[return-value]
                 for c, h, n in zip(zyx, half, shape))


def _correct(work: _Work, obj: ObjectPrompts, promise: ClickPromise, index: int, image: np.ndarray,
             spacing_zyx: Sequence[float], prev_pred: Optional[np.ndarray], cfg: Mapping[str, Any],
             caps: Tuple[float, float] = (float("inf"), float("inf"))) -> _Work:
    """Step 2 for click ``index``: the first method that gives a region containing the click is applied.

    With ``max_box_fraction`` a region larger than that fraction of the object's box volume (or, for a
    negative / positive click, than ``caps``' removal / addition voxels) is refused and the methods are
    tried again on a crop of half the radius (three times at most); then the click keeps its neighbourhood
    alone (step 3)."""
    if not cfg["methods"]:
        return work
    click = obj.clicks[index]
    radius = min(cfg["radius_mm"], cfg["radius_object_factor"] * _object_radius_mm(obj, work, spacing_zyx))
    cap = min(_correction_cap(obj, cfg["max_box_fraction"]), caps[1] if click.positive else caps[0])
    if cap <= 0:
        return work
    for _ in range(4 if np.isfinite(cap) else 1):
        crop = _crop_around(click.zyx, image.shape, spacing_zyx, radius)
        work = work.grow(union_region([work.region, crop]), obj.label, prev_pred)
        in_work = within(crop, work.region)
        at = tuple(int(c) - s.start for c, s in zip(click.zyx, crop))
        mask = work.mask[in_work]
        part = None
        for method in cfg["methods"]:
            if method == "probability":
                part = _probability_region(work.prob[in_work], at, click.positive, mask, cfg["probability_levels"])
            else:
                part = _random_walker_region(image[crop], at, click.positive, mask, work.others[in_work],
                                             promise, crop, spacing_zyx, cfg["random_walker_beta"],
                                             cfg["random_walker_depth_factor"])
            if part is not None:
                break
        if part is None:
            return work
        if np.count_nonzero(part) <= cap:
            work.set(part, click.positive, in_work)
            return work
        radius /= 2.0
    return work


def _box_volume(obj: ObjectPrompts) -> float:
    """Voxels of the object's box (0 without one)."""
    if obj.box is None:
        return 0.0
    return float(np.prod(obj.box.size_zyx))


def _correction_cap(obj: ObjectPrompts, fraction: float) -> float:
    """Voxels a correction may change: ``fraction`` of the object's box volume (infinite without a box or
    with ``fraction`` 0)."""
    if fraction <= 0 or obj.box is None:
        return float("inf")
    return fraction * _box_volume(obj)


def _probability_region(prob: np.ndarray, at: Tuple[int, ...], positive: bool, mask: np.ndarray,
                        levels: Sequence[float]) -> Optional[np.ndarray]:
    """The region around ``at`` where the experts' probability passes a lowered threshold (positive click:
    ``prob > level``; negative: ``prob < 1 - level``), for the highest level that takes the click in; only
    voxels that change the mask. None when no expert answered at the click or no level takes it."""
    if np.isnan(prob[at]):
        return None
    with np.errstate(invalid="ignore"):
        for level in levels:
            side = (prob > level) if positive else (prob < 1.0 - level)
            side &= ~mask if positive else mask
            part = component_at(side, at)
            if part is not None:
                return part
    return None


def _random_walker_region(crop_image: np.ndarray, at: Tuple[int, ...], positive: bool, mask: np.ndarray,
                          others: np.ndarray, promise: ClickPromise, crop: Region,
                          spacing_zyx: Sequence[float], beta: float, depth_factor: float) -> Optional[np.ndarray]:
    """The region around ``at`` that a random walker on the crop gives the click's side.

    Seeds (1 = object, 2 = not the object): a positive click's side is seeded by the click's own promised
    voxels and every other click's, the current mask, and, as background, the crop border outside the mask
    and other objects' voxels; a negative click's by its promised voxels, everything outside the mask, and,
    as object, the positive clicks and the mask on the crop border and farther from the click than
    ``depth_factor`` times the click's depth in the mask (the protocol clicks the middle of an error, so the
    error around a negative click reaches about that depth). Only voxels that change the mask, connected to
    the click.
    """
    from skimage.segmentation import random_walker

    seeds = np.zeros(crop_image.shape, dtype=np.int32)
    border = np.ones(crop_image.shape, dtype=bool)
    border[1:-1, 1:-1, 1:-1] = False
    if positive:
        seeds[border & ~mask] = 2
        seeds[others] = 2
        seeds[mask] = 1
    else:
        # The click sits in the middle of a false-positive part of the mask: the mask beyond ``depth_factor``
        # times the click's depth in the mask (its distance to the nearest voxel outside) is the object.
        grid = np.indices(mask.shape).reshape(3, -1).T
        mm = np.asarray(spacing_zyx, dtype=np.float64)
        distance = np.sqrt((((grid - np.asarray(at)) * mm) ** 2).sum(axis=1)).reshape(mask.shape)
        outside = distance[~mask]
        depth = float(outside.min()) if outside.size else float(distance.max())
        seeds[~mask] = 2
        seeds[mask & (border | (distance > depth_factor * max(depth, float(mm.max()))))] = 1
    starts = np.array([s.start for s in crop])
    stops = np.array([s.stop for s in crop])
    for v, sign in zip(promise.voxels, promise.positive):
        if np.all((v >= starts) & (v < stops)):
            seeds[tuple(v - starts)] = 1 if sign else 2
    seeds[at] = 1 if positive else 2
    if not positive and not (seeds == 1).any():
        # Nothing in the crop says "object": the walker would give every voxel to the click's side, so the
        # part of the mask the click lies in, inside the crop, goes (a false-positive blob, say).
        return component_at(mask, at)
    if not (seeds == 0).any() or not (seeds == 1).any() or not (seeds == 2).any():
        return None
    data = crop_image.astype(np.float32)
    lo, hi = np.percentile(data, [1.0, 99.0])
    data = np.clip((data - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0)
    try:
        with warnings.catch_warnings():  # a loose convergence is fine: the labels, not the potentials, matter
            warnings.simplefilter("ignore")
            walked = random_walker(data, seeds, beta=beta, mode="cg_j", tol=1e-3,
                                   spacing=np.asarray(spacing_zyx, float))
    except Exception:  # a degenerate system (e.g. a flat crop): no correction from this method
        return None
    side = (walked == 1) & ~mask if positive else (walked == 2) & mask
    return component_at(side, at)


class ClickProtection:
    """Rule 4 of the module docstring for :class:`~dcm.engine.fusion.LabelWriter`: per label, its positive
    promised voxels."""

    def __init__(self, promises: Mapping[int, ClickPromise]):
        owned = [(label, p.voxels[p.positive]) for label, p in promises.items()]
        owned = [(label, v) for label, v in owned if len(v)]
        self.voxels = np.concatenate([v for _, v in owned]) if owned else np.zeros((0, 3), np.int64)
        self.labels = np.concatenate([np.full(len(v), label) for label, v in owned]) if owned else np.zeros(0, int)

    def in_region(self, region: Region) -> Tuple[np.ndarray, np.ndarray]:
        """``(voxels relative to region, their labels)`` of the protected voxels inside ``region``."""
        starts = np.array([s.start for s in region])
        stops = np.array([s.stop for s in region])
        inside = np.all((self.voxels >= starts) & (self.voxels < stops), axis=1)
        return self.voxels[inside] - starts, self.labels[inside]
