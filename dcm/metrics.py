"""The challenge metrics: DSC, normalised surface Dice (NSD), click AUC and per-case scores.

Values equal the organisers' evaluation code (``tests/fixtures/protocol_golden.*``): DSC to 1e-9 and NSD
(DeepMind ``surface-distance`` method, computed here with MONAI's sub-voxel surface Dice) to 1e-6.
"""

from __future__ import annotations

import warnings
from typing import List, Sequence, Tuple

import numpy as np

from dcm.regions import mask_bbox

__all__ = ["NSD_TOLERANCE_MM", "DSC_THRESHOLD_FOR_NSD", "DICE_BOTH_EMPTY_SCORE", "DICE_BOTH_EMPTY_TRAINING", "dice",
           "nsd", "click_auc", "case_scores", "per_class_scores"]

NSD_TOLERANCE_MM = 2.0
#: the case NSD is only computed when the case DSC is above this (else it is 0).
DSC_THRESHOLD_FOR_NSD = 0.2
#: voxels of context kept around both masks when cropping for NSD (surface kernels need 1).
_NSD_MARGIN = 2


#: :func:`dice` of two empty masks for the challenge's scores (the organisers' value).
DICE_BOTH_EMPTY_SCORE = float("nan")
#: :func:`dice` of two empty masks in the trainers' logs (an object correctly left empty is perfect).
DICE_BOTH_EMPTY_TRAINING = 1.0


def dice(gt_mask: np.ndarray, pred_mask: np.ndarray, both_empty: float = DICE_BOTH_EMPTY_SCORE) -> float:
    """Dice similarity coefficient ``2|A∩B| / (|A| + |B|)`` of two binary (z, y, x) masks (symmetric).

    The empty-mask convention, the one place it is stated: two empty masks score ``both_empty``, which is

    * NaN for the challenge's scores (the default, :data:`DICE_BOTH_EMPTY_SCORE`): the organisers' code gives
      NaN, and a gt label is never empty there, so a NaN only ever marks a scoring mistake;
    * 1.0 in the trainers' logs (:data:`DICE_BOTH_EMPTY_TRAINING`): a patch whose object is correctly left
      empty is a perfect answer and its mean over a batch must stay finite.
      :func:`dcm.training.global_roi.dice_per_sample` is the batched torch form of that convention.

    One empty mask against a non-empty one scores 0.
    """
    gt_mask = np.asarray(gt_mask, dtype=bool)
    pred_mask = np.asarray(pred_mask, dtype=bool)
    total = int(np.count_nonzero(gt_mask)) + int(np.count_nonzero(pred_mask))
    if total == 0:
        return float(both_empty)
    return 2.0 * int(np.count_nonzero(gt_mask & pred_mask)) / total


def nsd(
    gt_mask: np.ndarray,
    pred_mask: np.ndarray,
    spacing: Sequence[float],
    tolerance_mm: float = NSD_TOLERANCE_MM,
) -> float:
    """Normalised surface Dice of two binary masks at ``tolerance_mm``.

    Args:
        gt_mask, pred_mask: binary masks of the same shape.
        spacing: voxel size per **array axis in the order given**. The organisers pass the challenge's
            stored ``spacing`` (x, y, z order) unchanged to (z, y, x) arrays; pass ``case.spacing_xyz`` to
            reproduce official numbers, ``case.spacing_zyx`` for the physically correct value.
        tolerance_mm: distance under which surface points count as matched.

    Returns:
        NSD in [0, 1]; 0 when exactly one mask is empty, NaN when both are.
    """
    gt_mask = np.asarray(gt_mask, dtype=bool)
    pred_mask = np.asarray(pred_mask, dtype=bool)
    if gt_mask.shape != pred_mask.shape:
        raise ValueError(f"gt_mask {gt_mask.shape} and pred_mask {pred_mask.shape} differ in shape")
    spacing = [float(s) for s in spacing]
    if len(spacing) != gt_mask.ndim:
        raise ValueError(f"spacing {spacing} does not match a {gt_mask.ndim}D mask")
    gt_any, pred_any = bool(gt_mask.any()), bool(pred_mask.any())
    if not gt_any and not pred_any:
        return float("nan")
    if not gt_any or not pred_any:
        return 0.0
    # Surface points of both masks lie inside the union's bounding box; distances between them do not
    # depend on anything outside it, so the crop changes nothing but the cost.
    box = mask_bbox(gt_mask | pred_mask, margin=_NSD_MARGIN)
    gt_crop, pred_crop = gt_mask[box], pred_mask[box]

    import torch
    from monai.metrics import compute_surface_dice

    y = torch.from_numpy(np.ascontiguousarray(gt_crop))[None, None]
    y_pred = torch.from_numpy(np.ascontiguousarray(pred_crop))[None, None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = compute_surface_dice(
            y_pred,
            y,
            class_thresholds=[float(tolerance_mm)],
            include_background=True,
            spacing=spacing,
            use_subvoxels=True,
        )
    return float(value.reshape(-1)[0])


def click_auc(values: Sequence[float]) -> float:
    """Area under a per-step metric curve over the 5 click steps (the last 5 values), maximum 4.0.

    ``scipy.integrate.cumulative_trapezoid(values[-5:], np.arange(5))[-1]``, as the organisers compute it
    (the box step is not part of the AUC since 2025-03-25).
    """
    from scipy.integrate import cumulative_trapezoid

    vals = np.asarray(values, dtype=np.float64)
    if vals.size < 5:
        raise ValueError(f"click_auc needs at least 5 step values, got {vals.size}")
    return float(cumulative_trapezoid(vals[-5:], np.arange(5))[-1])


def per_class_scores(
    gts: np.ndarray,
    segs: np.ndarray,
    spacing: Sequence[float],
    tolerance_mm: float = NSD_TOLERANCE_MM,
    with_nsd: bool = True,
) -> Tuple[List[int], List[float], List[float]]:
    """DSC and NSD of every label present in ``gts`` (labels only in ``segs`` are not scored).

    Returns:
        ``(labels, dsc_per_label, nsd_per_label)``; NSD is an empty list when ``with_nsd`` is False.
    """
    gts = np.asarray(gts)
    segs = np.asarray(segs)
    if gts.shape != segs.shape:
        raise ValueError(f"gts {gts.shape} and segs {segs.shape} differ in shape")
    labels = [int(v) for v in np.unique(gts) if v != 0]
    dscs: List[float] = []
    nsds: List[float] = []
    for label in labels:
        g, s = gts == label, segs == label
        dscs.append(dice(g, s))
        if with_nsd:
            nsds.append(nsd(g, s, spacing, tolerance_mm))
    return labels, dscs, nsds


def case_scores(
    gts: np.ndarray,
    segs: np.ndarray,
    spacing: Sequence[float],
    tolerance_mm: float = NSD_TOLERANCE_MM,
) -> Tuple[float, float]:
    """The challenge's (DSC, NSD) of one case: means over the labels present in ``gts``.

    The NSD is computed only when the case DSC exceeds 0.2 and is 0 otherwise (the organisers' rule).
    ``spacing`` is applied to array axes in the order given (pass the stored x-y-z spacing for official
    numbers). A case without any gt label scores (NaN, NaN).
    """
    labels, dscs, _ = per_class_scores(gts, segs, spacing, with_nsd=False)
    if not labels:
        return float("nan"), float("nan")
    case_dsc = float(np.mean(dscs))
    if case_dsc <= DSC_THRESHOLD_FOR_NSD:
        return case_dsc, 0.0
    nsds = [nsd(gts == label, segs == label, spacing, tolerance_mm) for label in labels]
    return case_dsc, float(np.mean(nsds))
