"""The SAM-Med3D container: image encoder, prompt encoder and mask decoder."""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from dcm.models.sam_med3d.image_encoder import ImageEncoderViT3D
from dcm.models.sam_med3d.mask_decoder import MaskDecoder3D
from dcm.models.sam_med3d.prompt_encoder import PromptEncoder3D

__all__ = ["SamMed3D"]


class SamMed3D(nn.Module):
    """SAM-Med3D model. State-dict keys start with ``image_encoder.``, ``prompt_encoder.``, ``mask_decoder.``.

    The three parts are called separately, as in segment-anything (the image embedding is reused across
    interactions); :meth:`forward` chains them for one prompt set.
    """

    def __init__(
        self,
        image_encoder: ImageEncoderViT3D,
        prompt_encoder: PromptEncoder3D,
        mask_decoder: MaskDecoder3D,
        config: Optional[Dict[str, Any]] = None,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.config: Dict[str, Any] = dict(config or {})

    @property
    def img_size(self) -> int:
        """Side of the cubic input volume."""
        return self.image_encoder.img_size

    def forward(
        self,
        image: torch.Tensor,
        points: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        boxes: Optional[torch.Tensor] = None,
        masks: Optional[torch.Tensor] = None,
        multimask_output: bool = False,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """image (B, 1, S, S, S) + prompts -> (low-res logits (B, M, 4g, 4g, 4g), iou (B, M) or None).

        ``g = S // patch_size`` (32^3 logits for both presets); prompts as in :class:`PromptEncoder3D`,
        outputs as in :class:`MaskDecoder3D`.
        """
        emb = self.image_encoder(image)
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=masks)
        return self.mask_decoder(
            image_embeddings=emb,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
        )
