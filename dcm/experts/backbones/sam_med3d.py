"""SAM-Med3D (:mod:`dcm.models.sam_med3d`) as a backbone.

Frame = the model's ``img_size`` cube; z-normalisation over the frame's voxels > 0 (torchio's rule by
default), padding included; mask prompt on an ``m``^3 grid (32); logits on that ``m``^3 grid.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch

from dcm.errors import ConfigError
from dcm.experts.backbones.base import Backbone
from dcm.prompts import ZYX
from dcm.experts.roi import ZNORM_MODES, znorm_positive

__all__ = ["SamMed3DBackbone"]


class SamMed3DBackbone(Backbone):
    """SAM-Med3D (:class:`dcm.models.SamMed3D`) as a backbone.

    Frame: the model's ``img_size`` cube (64 for SAM-Med3D-64, 128 for turbo); z-normalisation over the
    frame's voxels > 0 (``znorm``: ``torchio`` or ``monai``, see :func:`dcm.experts.roi.znorm_positive`);
    mask prompt on the prompt encoder's ``m``^3 grid (32), low-resolution logits on that grid. Under autocast
    the network's linear and convolution weights are stored in the autocast dtype
    (:func:`dcm.models.precision.store_weights_in`: the same values autocast would cast them to); under CPU
    bfloat16 with ``onednn`` on, on a processor without AMX (:func:`dcm.models.onednn.onednn_linear_pays`),
    the image encoder's linear layers run on weights packed once for oneDNN
    (:class:`dcm.models.onednn.OneDNNLinear`).

    Args:
        model: the SAM-Med3D model.
        znorm: z-normalisation rule.
        **kwargs: see :class:`Backbone`.
    """

    kind = "sam_med3d"
    normalise_scope = "frame"

    def __init__(self, model: torch.nn.Module, znorm: str = "torchio", **kwargs: Any):
        if znorm not in ZNORM_MODES:
            raise ConfigError(f"sam_med3d backbone: znorm must be one of {ZNORM_MODES}, got {znorm!r}")
        self.znorm = znorm
        self.img_size = int(model.img_size)
        self.mask_size = int(model.prompt_encoder.mask_input_size[0])
        super().__init__(model, **kwargs)
        if self.autocast_dtype is not None:
            from dcm.models.precision import store_weights_in

            # encode() and decode() run under autocast, whose layers would cast their weights at every call
            # (a tenth of a CPU encoder pass)
            store_weights_in(self.model, self.autocast_dtype)
            from dcm.models.onednn import packs_encoder_linear, use_onednn_linear

            # weights packed once for oneDNN: 5 % of a first click without AMX (slower with it), bit-equal at
            # the encoder's 512 tokens there (not in the decoder, whose few-token products oneDNN accumulates
            # in another order)
            if packs_encoder_linear(self.onednn, self.autocast_dtype, self.device):
                use_onednn_linear(self.model.image_encoder)

    def default_frame_size(self) -> int:
        return self.img_size

    def check_frame(self, size: Sequence[int], what: str) -> None:
        size = tuple(int(s) for s in size)
        if size != (self.img_size,) * 3:
            raise ConfigError(
                f"{what} {size} must be the SAM-Med3D model's input size ({self.img_size},) * 3 (its img_size)"
            )

    def logit_grid(self, frame: Sequence[int]) -> ZYX:
        return (self.mask_size,) * 3  # type: ignore[return-value]

    def normalise(self, values: np.ndarray) -> np.ndarray:
        return znorm_positive(np.asarray(values, dtype=np.float32), self.znorm)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), self.autocast():
            return self.image_encoder(x)

    def decode(
        self, embedding: torch.Tensor, coords: np.ndarray, labels: np.ndarray, mask: Optional[np.ndarray]
    ) -> torch.Tensor:
        """Decoder logits (m, m, m) for clicks ``coords`` (N, 3) frame (z, y, x), ``labels`` (N,) and mask
        prompt ``mask`` (m, m, m) or None (``no_mask_embed``)."""
        pe = self.model.prompt_encoder
        points = None
        if len(coords):
            points = (
                torch.as_tensor(coords, dtype=torch.float32, device=self.device)[None],
                torch.as_tensor(labels, dtype=torch.long, device=self.device)[None],
            )
        masks = None if mask is None else torch.as_tensor(mask, dtype=torch.float32, device=self.device)[None, None]
        with torch.inference_mode(), self.autocast():
            sparse, dense = pe(points=points, boxes=None, masks=masks)
            logits, _ = self.model.mask_decoder(
                image_embeddings=embedding,
                image_pe=pe.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
        return logits[0, 0]
