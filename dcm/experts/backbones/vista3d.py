"""MONAI VISTA3D (:mod:`dcm.models.vista3d`, point head only) as a backbone.

Any frame whose sides are divisible by the encoder's factor (:func:`vista3d_frame_factor`: 16 for
``vista3d132``, 8 for the reduced model); the whole image's 1st..99th percentiles (computed once per image in
:meth:`Vista3DBackbone.set_image`) mapped to [0, 1] before padding, padding 0; no mask prompt; logits on the
frame itself.

The point head runs as :class:`dcm.models.vista3d.FastPointHead` (``point_head``): :meth:`Vista3DBackbone.encode`
returns the encoder output's click-independent point-head state (:class:`~dcm.models.vista3d.PointHeadState`),
which the expert's embedding cache keeps per window, and :meth:`Vista3DBackbone.decode` only does the
per-click part.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional, Sequence, Tuple

import numpy as np
import torch

from dcm.data.intensity import _percentiles, intensity_percentiles, scale_intensity
from dcm.config_schema import POINT_HEAD_MODES
from dcm.errors import ConfigError
from dcm.experts.backbones.base import Backbone
from dcm.prompts import ZYX

__all__ = ["POINT_HEAD_MODES", "Vista3DBackbone", "vista3d_frame_factor"]


def vista3d_frame_factor(model: torch.nn.Module) -> ZYX:
    """What each (z, y, x) frame side must be divisible by for a VISTA3D ``model``.

    The encoder needs multiples of ``2 ** (levels - 1)`` (16 for vista3d132, 8 for the reduced model); the
    point head halves and doubles once more, so at least 2.
    """
    encoder = getattr(model, "image_encoder", None)
    factor = tuple(int(f) for f in encoder.shape_factor()) if hasattr(encoder, "shape_factor") else (1, 1, 1)
    return tuple(f * 2 // math.gcd(f, 2) for f in factor)  # type: ignore[return-value]


class Vista3DBackbone(Backbone):
    """MONAI VISTA3D (point head only) as a backbone.

    Frame: any (z, y, x) shape whose sides are divisible by :func:`vista3d_frame_factor`; intensities
    mapped with the whole image's ``percentiles`` (computed once per image in :meth:`set_image`) to [0, 1];
    no mask prompt; logits on the frame itself; with no click the logits are VISTA3D's "no prompt" value
    (-9999) everywhere and the encoder does not run.

    Args:
        model: a MONAI ``VISTA3D`` (:func:`dcm.models.vista3d.build_vista3d`).
        percentiles: (lower, upper) percentiles of the image mapped to 0 and 1.
        point_head: one of :data:`POINT_HEAD_MODES` (see :meth:`set_point_head`).
        **kwargs: see :class:`Backbone`.
    """

    kind = "vista3d"
    normalise_scope = "image"
    mask_size = None
    convolutional = True  # channels_last: auto turns channels-last 3D on under CPU bfloat16

    def __init__(self, model: torch.nn.Module, percentiles: Sequence[float] = (1.0, 99.0), point_head: str = "fast",
                 **kwargs: Any):
        self.percentiles = _percentiles(percentiles, self.kind)
        self.factor = vista3d_frame_factor(model)
        self.intensity_range: Optional[Tuple[float, float]] = None
        super().__init__(model, **kwargs)
        self.set_point_head(point_head)

    def set_point_head(self, mode: str) -> None:
        """How the point head runs (:data:`POINT_HEAD_MODES`). :meth:`encode`'s output depends on it: drop the
        expert's cached embeddings after a change."""
        if mode not in POINT_HEAD_MODES:
            raise ConfigError(f"{self.kind}: point_head must be one of {POINT_HEAD_MODES}, got {mode!r}")
        from dcm.models.vista3d import FastPointHead  # imports MONAI: only once a VISTA3D exists

        self.point_head_mode = mode
        self.fast_head = None if mode == "monai" else FastPointHead(
            self.model.point_head, exact=(mode == "cached")
        )

    def default_frame_size(self) -> int:
        return 128

    def check_frame(self, size: Sequence[int], what: str) -> None:
        size = tuple(int(s) for s in size)
        if any(s % f for s, f in zip(size, self.factor)):
            raise ConfigError(f"{what} {size} must be divisible by {self.factor} for this model")

    def set_image(self, image: np.ndarray) -> None:
        """The whole (z, y, x) image's percentiles: :meth:`normalise` maps them to 0 and 1."""
        self.intensity_range = intensity_percentiles(image, *self.percentiles)

    def reset(self) -> None:
        self.intensity_range = None

    def normalise(self, values: np.ndarray) -> np.ndarray:
        if self.intensity_range is None:
            raise RuntimeError("vista3d backbone: call set_image() first (the percentiles are per image)")
        lo, hi = self.intensity_range
        return scale_intensity(values, lo, hi)

    def encode(self, x: torch.Tensor) -> Any:
        """The encoder output of ``x`` as the point head needs it: the click-independent
        :class:`~dcm.models.vista3d.PointHeadState` (``point_head`` ``fast`` / ``cached``; the encoder output
        itself is not kept) or the encoder output (``monai``)."""
        with torch.inference_mode(), self.autocast():
            # VISTA3D.forward's point-only path: the encoder's point branch, no class branch.
            embedding, _ = self.image_encoder(x, with_point=True, with_label=False)
            if self.fast_head is not None:
                return self.fast_head.prepare(embedding)
        return embedding

    def decode(
        self, embedding: Any, coords: np.ndarray, labels: np.ndarray, mask: Optional[np.ndarray]
    ) -> torch.Tensor:
        """Point-head logits (*frame) for clicks ``coords`` (N >= 1, 3) frame (z, y, x), ``labels`` (N,), from
        :meth:`encode`'s output ``embedding``."""
        if mask is not None:
            raise ValueError("vista3d backbone: VISTA3D's point head takes no mask prompt")
        point_coords = torch.as_tensor(coords, dtype=torch.float32, device=self.device)[None]
        point_labels = torch.as_tensor(labels, dtype=torch.long, device=self.device)[None]
        with torch.inference_mode(), self.autocast():
            # class_vector=None: supported-class token, as VISTA3D.forward with no class / prompt_class.
            if not isinstance(embedding, torch.Tensor):  # a dcm.models.vista3d.PointHeadState
                if self.fast_head is None:
                    raise RuntimeError("vista3d backbone: a cached point-head state after set_point_head('monai'); "
                                       "clear the expert's embedding cache")
                # the state's last answer is returned as is for the same prompts: copy, callers may write to it
                logits = self.fast_head(embedding, point_coords, point_labels, class_vector=None).clone()
            else:
                logits = self.model.point_head(embedding, point_coords, point_labels, class_vector=None)
        return logits[0, 0]

    def point_window_logits(
        self, image: torch.Tensor, coords: np.ndarray, labels: np.ndarray, roi_size: Sequence[int]
    ) -> torch.Tensor:
        """MONAI's ``point_based_window_inferer`` on a whole normalised image, called as the released DCM calls it.

        One ``roi_size`` window per click, centred at it and shifted inside the (padded) image; each window gets
        the clicks lying strictly inside it (MONAI drops one on the window's first voxel; a window left without
        a click is -9999 everywhere); overlapping windows' logits are summed; no previous mask.

        Args:
            image: (1, 1, Z, Y, X) normalised image (:meth:`normalise`) on :attr:`device`.
            coords: (N >= 1, 3) int image voxels (z, y, x) of one object's clicks, in the release's order.
            labels: (N,) int, 1 fg / 0 bg.
            roi_size: (z, y, x) window size.

        Returns:
            (Z, Y, X) float32 logits on the CPU; NaN where no window lies.
        """
        from monai.apps.vista3d.inferer import point_based_window_inferer

        with torch.no_grad(), self.autocast(), warnings.catch_warnings():
            # MONAI wraps its output in a MetaTensor of our plain input and warns that it sets an affine twice.
            warnings.filterwarnings("ignore", message="Setting affine, but the applied meta contains an affine")
            out = point_based_window_inferer(
                inputs=image, roi_size=[int(s) for s in roi_size], transpose=True, with_coord=True,
                predictor=self.model, mode="gaussian", sw_device=self.device, device=self.device,
                center_only=True,  # only the window centred at each click, as released
                point_coords=torch.as_tensor(np.asarray(coords, dtype=np.int64)[None], device=self.device),
                point_labels=torch.as_tensor(np.asarray(labels, dtype=np.int64)[None], device=self.device),
            )
        out = out.as_tensor() if hasattr(out, "as_tensor") else out  # a MetaTensor -> a plain tensor
        return out[0, 0].float()

    def promptless_logits(self, frame: Sequence[int]) -> Optional[torch.Tensor]:
        """VISTA3D's "no prompt" value (-9999) everywhere on the (z, y, x) ``frame``, on the CPU."""
        return torch.full(tuple(int(s) for s in frame), float(getattr(self.model, "NINF_VALUE", -9999)))
