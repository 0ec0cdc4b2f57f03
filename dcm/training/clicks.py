"""Training that makes clicks matter: a loss on each click's neighbourhood, and whether a mask honours a click.

A positive click must pull its region into the mask and a negative one push it out. The DiceCE loss of
the interaction loops only sees the whole mask, where a click's few voxels weigh nothing; the click loss
(``train.click_loss_weight``, ``train.click_loss_radius``) adds a binary cross-entropy on the voxels within
``radius`` of every click: target 1 around positive clicks, 0 around negative ones.

The trainers carry clicks as :data:`ClickT` ``((z, y, x), label)`` pairs (label 1 fg, 0 bg, -1 padding) and
hand them to the models as tensors; :func:`click_to_t` / :func:`click_from_t` are the one conversion between
that form and :class:`dcm.prompts.Click` (None: no click), :func:`click_tensors` builds the model input.

A click is *honoured* by a mask (the engine's promise, :mod:`dcm.engine.clicks`) when its voxel and the 6
face neighbours of it inside the volume are in the mask (positive click) or all outside it (negative).
Coordinates are (z, y, x) voxel indices.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from dcm.errors import ConfigError
from dcm.prompts import ZYX, Click
from dcm.prompts import ball_offsets as prompt_ball_offsets

if TYPE_CHECKING:
    from dcm.training.config_schema import TrainConfig

__all__ = [
    "ClickT",
    "PADDING_LABEL",
    "PADDING_CLICK",
    "click_to_t",
    "click_from_t",
    "click_tensors",
    "ClickLoss",
    "ball_offsets",
    "click_loss",
    "clicks_honoured",
]

#: One click as the trainers carry it: ((z, y, x) voxel, label) with label 1 fg, 0 bg, -1 padding.
ClickT = Tuple[ZYX, int]
#: The label of a padding click ("not a point"): the point heads and the click loss ignore it.
PADDING_LABEL = -1
#: What stands for "no click" where every object needs the same number of clicks (a perfect object).
PADDING_CLICK: ClickT = ((0, 0, 0), PADDING_LABEL)


def click_to_t(click: Optional[Click]) -> ClickT:
    """The trainers' form of a click: ``((z, y, x), 1 | 0)``; None (no click) gives :data:`PADDING_CLICK`."""
    if click is None:
        return PADDING_CLICK
    return click.zyx, 1 if click.positive else 0


def click_from_t(click: ClickT) -> Optional[Click]:
    """The :class:`~dcm.prompts.Click` of a trainer click (label 1 positive, 0 negative); None for padding
    (label < 0). Coordinates become Python ints (z, y, x)."""
    zyx, label = click
    if int(label) < 0:
        return None
    return Click(tuple(int(c) for c in zyx), int(label) == 1)  # type: ignore[arg-type]


def click_tensors(clicks: Sequence[Sequence[ClickT]], device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """The point-head input of K objects with N clicks each (pad with :data:`PADDING_CLICK`).

    Returns:
        ``coords`` (K, N, 3) float32 (z, y, x) voxels and ``labels`` (K, N) int64 (1 fg, 0 bg, -1 padding).
    """
    coords = torch.tensor([[list(zyx) for zyx, _ in obj] for obj in clicks], dtype=torch.float32, device=device)
    labels = torch.tensor([[lab for _, lab in obj] for obj in clicks], dtype=torch.long, device=device)
    return coords, labels


def ball_offsets(radius: float, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """:func:`dcm.prompts.ball_offsets` as a (m, 3) long tensor on ``device``."""
    return torch.as_tensor(prompt_ball_offsets(radius), device=device)


def click_loss(logits: torch.Tensor, points: torch.Tensor, labels: torch.Tensor, radius: float) -> torch.Tensor:
    """Mean binary cross-entropy of ``logits`` on the clicks' neighbourhoods, against each click's sign.

    Args:
        logits: (N, 1, Z, Y, X) mask logits.
        points: (N, n, 3) voxel (z, y, x) clicks of each of the N masks (float or integer values).
        labels: (N, n) 1 positive, 0 negative, anything < 0 ignored (padding, or a click not to enforce).
        radius: the neighbourhood, voxels within this Euclidean distance of the click (see :func:`ball_offsets`).

    Returns:
        Scalar: the mean over every (click, neighbourhood voxel inside the volume) pair; a voxel in two
        neighbourhoods counts once for each. 0 (still attached to ``logits``) when there is none.
    """
    shape = torch.tensor(logits.shape[2:], device=logits.device)
    offsets = ball_offsets(radius, logits.device)
    voxels = points.round().long()[:, :, None, :] + offsets[None, None]  # (N, n, m, 3)
    valid = (labels[:, :, None] >= 0) & ((voxels >= 0) & (voxels < shape)).all(-1)
    voxels = torch.minimum(voxels.clamp(min=0), shape - 1)
    flat = (voxels[..., 0] * shape[1] + voxels[..., 1]) * shape[2] + voxels[..., 2]
    values = logits.flatten(1).gather(1, flat.flatten(1)).view(flat.shape).float()
    target = (labels[:, :, None] > 0).to(values.dtype).expand_as(values)
    bce = F.binary_cross_entropy_with_logits(values, target, reduction="none")
    return (bce * valid).sum() / valid.sum().clamp(min=1)


class ClickLoss:
    """``train.click_loss_weight`` × :func:`click_loss` with ``train.click_loss_radius``; weight 0: off.

    Calling it returns the weighted term, or None when off (so that a run without it computes nothing more).
    """

    def __init__(self, weight: float = 0.0, radius: float = 1.0) -> None:
        self.weight, self.radius = float(weight), float(radius)
        if self.weight < 0 or self.radius < 0:
            raise ConfigError(f"train.click_loss_weight and train.click_loss_radius must be >= 0, got "
                              f"{self.weight} and {self.radius}")

    @classmethod
    def from_cfg(cls, train: "TrainConfig") -> "ClickLoss":
        """From the checked ``train`` section (:class:`dcm.training.config_schema.TrainConfig`)."""
        return cls(train.click_loss_weight, train.click_loss_radius)

    def __call__(self, logits: torch.Tensor, points: torch.Tensor, labels: torch.Tensor):
        if self.weight == 0:
            return None
        return self.weight * click_loss(logits, points, labels, self.radius)


def clicks_honoured(mask: np.ndarray, points: Sequence[Sequence[int]], labels: Sequence[int]) -> np.ndarray:
    """(n,) bool: does the (Z, Y, X) bool ``mask`` honour each click (label 1 positive, 0 negative)?

    The engine's own neighbourhood (:func:`dcm.engine.clicks.click_neighbourhood`): the click voxel and its
    face neighbours inside the volume, all in the mask for a positive click, all outside for a negative one.
    """
    from dcm.engine.clicks import click_neighbourhood

    out = np.zeros(len(points), dtype=bool)
    for i, (zyx, label) in enumerate(zip(points, labels)):
        v = click_neighbourhood([int(c) for c in zyx], mask.shape)
        inside = mask[v[:, 0], v[:, 1], v[:, 2]]
        out[i] = bool(inside.all()) if int(label) == 1 else bool(not inside.any())
    return out
