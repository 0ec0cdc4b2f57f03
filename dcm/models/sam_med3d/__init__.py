"""SAM-Med3D (3D segment-anything) modules, re-implemented for DCM's global-RoI expert."""

from dcm.models.sam_med3d.build import build_sam_med3d
from dcm.models.sam_med3d.common import LayerNorm3d, MLPBlock
from dcm.models.sam_med3d.image_encoder import ImageEncoderViT3D
from dcm.models.sam_med3d.mask_decoder import MaskDecoder3D
from dcm.models.sam_med3d.prompt_encoder import PositionEmbeddingRandom3D, PromptEncoder3D
from dcm.models.sam_med3d.sam import SamMed3D
from dcm.models.sam_med3d.transformer import TwoWayTransformer3D

__all__ = [
    "build_sam_med3d",
    "SamMed3D",
    "ImageEncoderViT3D",
    "PromptEncoder3D",
    "PositionEmbeddingRandom3D",
    "MaskDecoder3D",
    "TwoWayTransformer3D",
    "LayerNorm3d",
    "MLPBlock",
]
