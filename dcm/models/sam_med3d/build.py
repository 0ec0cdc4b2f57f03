"""Build a :class:`SamMed3D` from a plain config dict (the keys of ``configs/models/sam_med3d_*.yaml``)."""

from __future__ import annotations

from typing import Any, Dict, Mapping

from dcm.errors import ConfigError
from dcm.models.onednn import use_onednn_conv3d
from dcm.models.sam_med3d.image_encoder import ATTENTION_MODES, ImageEncoderViT3D
from dcm.models.sam_med3d.mask_decoder import MaskDecoder3D
from dcm.models.sam_med3d.prompt_encoder import PromptEncoder3D
from dcm.models.sam_med3d.sam import SamMed3D

__all__ = ["DEFAULTS", "REQUIRED", "resolve_config", "build_sam_med3d"]

#: Keys every config must give (those of the golden fixture's config).
REQUIRED = (
    "img_size",
    "patch_size",
    "embed_dim",
    "depth",
    "num_heads",
    "global_attn_indexes",
    "window_size",
    "out_chans",
    "mlp_ratio",
    "mask_in_chans",
    "num_multimask_outputs",
)

#: Optional keys and their defaults (``transformer_dim`` defaults to ``out_chans``).
DEFAULTS: Dict[str, Any] = {
    "in_chans": 1,
    "attention": "fast",
    "iou_head": None,  # None: an IoU head exactly when num_multimask_outputs > 0
    "iou_head_depth": 3,
    "iou_head_hidden_dim": 256,
    "transformer_dim": None,
    "decoder_depth": 2,
    "decoder_mlp_dim": 2048,
    "decoder_num_heads": 8,
    "norm_eps": 1e-6,
}

#: Keys a preset may carry that do not affect the architecture.
_INFO_KEYS = ("name", "description", "checkpoint_layout")


def resolve_config(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """Validate ``cfg`` and fill in defaults; raises :class:`dcm.errors.ConfigError`."""
    missing = [k for k in REQUIRED if k not in cfg]
    if missing:
        raise ConfigError(f"SAM-Med3D config: missing key(s) {', '.join(missing)}")
    unknown = [k for k in cfg if k not in REQUIRED and k not in DEFAULTS and k not in _INFO_KEYS]
    if unknown:
        raise ConfigError(f"SAM-Med3D config: unknown key(s) {', '.join(map(str, unknown))}")
    out = dict(DEFAULTS)
    out.update(cfg)
    out["global_attn_indexes"] = [int(i) for i in out["global_attn_indexes"]]
    if out["transformer_dim"] is None:
        out["transformer_dim"] = out["out_chans"]
    if out["iou_head"] is None:
        out["iou_head"] = int(out["num_multimask_outputs"]) > 0
    if out["attention"] not in ATTENTION_MODES:
        raise ConfigError(f"SAM-Med3D config: attention must be one of {ATTENTION_MODES}, got {out['attention']!r}")
    if out["img_size"] % out["patch_size"]:
        raise ConfigError("SAM-Med3D config: img_size must be a multiple of patch_size")
    if out["embed_dim"] % out["num_heads"]:
        raise ConfigError("SAM-Med3D config: num_heads must divide embed_dim")
    if out["transformer_dim"] != out["out_chans"]:
        raise ConfigError("SAM-Med3D config: transformer_dim must equal out_chans")
    return out


def build_sam_med3d(cfg: Mapping[str, Any]) -> SamMed3D:
    """Build an (untrained) SAM-Med3D from ``cfg``.

    Args:
        cfg: ``img_size``, ``patch_size``, ``embed_dim``, ``depth``, ``num_heads``, ``global_attn_indexes``,
            ``window_size``, ``out_chans``, ``mlp_ratio``, ``mask_in_chans``, ``num_multimask_outputs``;
            optional ``attention`` (``fast`` | ``padded``), ``iou_head`` (default: multimask > 0),
            ``iou_head_depth``, ``iou_head_hidden_dim``, ``transformer_dim`` (= out_chans),
            ``decoder_depth`` (2), ``decoder_mlp_dim`` (2048), ``decoder_num_heads`` (8), ``in_chans`` (1),
            ``norm_eps`` (1e-6); ``name`` / ``description`` / ``checkpoint_layout`` are informational.

    Returns:
        The model; ``model.config`` holds the resolved config.
    """
    c = resolve_config(cfg)
    grid = c["img_size"] // c["patch_size"]
    image_encoder = ImageEncoderViT3D(
        img_size=c["img_size"],
        patch_size=c["patch_size"],
        in_chans=c["in_chans"],
        embed_dim=c["embed_dim"],
        depth=c["depth"],
        num_heads=c["num_heads"],
        mlp_ratio=c["mlp_ratio"],
        out_chans=c["out_chans"],
        norm_eps=c["norm_eps"],
        window_size=c["window_size"],
        global_attn_indexes=c["global_attn_indexes"],
        attention=c["attention"],
    )
    prompt_encoder = PromptEncoder3D(
        embed_dim=c["transformer_dim"],
        image_embedding_size=(grid, grid, grid),
        input_image_size=(c["img_size"],) * 3,
        mask_in_chans=c["mask_in_chans"],
    )
    mask_decoder = MaskDecoder3D(
        transformer_dim=c["transformer_dim"],
        num_multimask_outputs=c["num_multimask_outputs"],
        transformer_depth=c["decoder_depth"],
        transformer_mlp_dim=c["decoder_mlp_dim"],
        transformer_num_heads=c["decoder_num_heads"],
        iou_head=bool(c["iou_head"]),
        iou_head_depth=c["iou_head_depth"],
        iou_head_hidden_dim=c["iou_head_hidden_dim"],
    )
    # 3D convolutions on oneDNN for CPU float32 (PyTorch's heuristic skips it for narrow ones).
    return use_onednn_conv3d(SamMed3D(image_encoder, prompt_encoder, mask_decoder, config=c))
