"""MONAI VISTA3D, the backbone of DCM's local-RoI expert, built from a config.

Two variants, both made of MONAI's own classes (nothing here re-implements VISTA3D):

* ``variant: full``: exactly ``monai.networks.nets.vista3d132(in_channels=1)`` (218 M parameters,
  259 state-dict tensors), the layout of the released DCM and NVIDIA checkpoints;
* ``variant: reduced``: the same :class:`~monai.networks.nets.vista3d.VISTA3D` with a narrow, shallow
  :class:`~monai.networks.nets.SegResNetDS2` encoder and matching ``PointMappingSAM`` /
  ``ClassMappingClassify`` heads, for tests and CPU experiments.

Input of the built module: ``(B, in_channels, Z, Y, X)``; every spatial size must be divisible by
``2 ** (len(blocks_down) - 1)`` (16 for the full model). Point coordinates given to it are voxel indices in
the same axis order as the input tensor, here ``(z, y, x)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from monai.networks.nets import SegResNetDS2
from monai.networks.nets.vista3d import VISTA3D, ClassMappingClassify, PointMappingSAM, vista3d132

from dcm.errors import ConfigError
from dcm.models.onednn import use_onednn_conv3d

__all__ = ["VISTA3D_DEFAULTS", "build_vista3d", "check_vista3d_config", "load_vista3d_config", "vista3d_shape_factor",
           "count_parameters"]

#: Every key ``build_vista3d`` understands, with the value the full model uses.
VISTA3D_DEFAULTS: Dict[str, Any] = {
    "name": "vista3d132",
    "variant": "full",
    "in_channels": 1,
    # Encoder width: SegResNetDS2 init_filters = out_channels = the heads' feature size.
    "encoder_embed_dim": 48,
    "blocks_down": (1, 2, 2, 4, 4),
    "norm": "instance",
    # Size of the class-embedding tables (point and class heads) and the last supported class index.
    "n_classes": 512,
    "last_supported": 132,
    "class_head_mlp": True,
}

_FULL_ONLY = ("encoder_embed_dim", "blocks_down", "norm", "n_classes", "last_supported", "class_head_mlp")

def check_vista3d_config(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """A VISTA3D model config with :data:`VISTA3D_DEFAULTS` filled in; ConfigError naming the key otherwise."""
    unknown = sorted(set(cfg) - set(VISTA3D_DEFAULTS))
    if unknown:
        raise ConfigError(f"vista3d config: unknown keys {unknown} (known: {sorted(VISTA3D_DEFAULTS)})")
    merged = dict(VISTA3D_DEFAULTS)
    merged.update(cfg)
    if merged["variant"] not in ("full", "reduced"):
        raise ConfigError(f"vista3d config: variant must be 'full' or 'reduced', got {merged['variant']!r}")
    dim = merged["encoder_embed_dim"]
    # PointMappingSAM uses 4 heads on attention downsampled by 2, so the width must be a multiple of 8.
    if not isinstance(dim, int) or dim <= 0 or dim % 8:
        raise ConfigError(f"vista3d config: encoder_embed_dim must be a positive multiple of 8, got {dim!r}")
    blocks = merged["blocks_down"]
    if not isinstance(blocks, (list, tuple)) or not blocks or not all(isinstance(b, int) and b > 0 for b in blocks):
        raise ConfigError(f"vista3d config: blocks_down must be a non-empty list of positive ints, got {blocks!r}")
    merged["blocks_down"] = tuple(blocks)
    if not 0 < merged["last_supported"] < merged["n_classes"]:
        raise ConfigError(
            f"vista3d config: need 0 < last_supported ({merged['last_supported']}) < n_classes ({merged['n_classes']})"
        )
    return merged


def build_vista3d(cfg: Optional[Mapping[str, Any]] = None) -> VISTA3D:
    """Build MONAI's VISTA3D from a model config (see ``configs/models/vista3d*.yaml``).

    Args:
        cfg: keys of :data:`VISTA3D_DEFAULTS`; missing keys take the full model's values. With
            ``variant: full`` the architecture keys must be absent or equal to the full model's (so that a
            "full" config always loads the released weights).

    Returns:
        A :class:`monai.networks.nets.vista3d.VISTA3D` on the current default device, in training mode, its
        3D convolutions on oneDNN for CPU float32 (:func:`dcm.models.onednn.use_onednn_conv3d`).

    Raises:
        ConfigError: unknown keys, an invalid value, or a ``full`` config that changes the architecture.
    """
    cfg = check_vista3d_config(cfg or {})
    if cfg["variant"] == "full":
        changed = [k for k in _FULL_ONLY if cfg[k] != VISTA3D_DEFAULTS[k]]
        if changed:
            raise ConfigError(f"vista3d config: variant 'full' is vista3d132; it cannot change {changed}")
        return use_onednn_conv3d(
            vista3d132(encoder_embed_dim=VISTA3D_DEFAULTS["encoder_embed_dim"], in_channels=cfg["in_channels"])
        )

    dim = cfg["encoder_embed_dim"]
    encoder = SegResNetDS2(
        in_channels=cfg["in_channels"],
        blocks_down=cfg["blocks_down"],
        norm=cfg["norm"],
        out_channels=dim,
        init_filters=dim,
        dsdepth=1,
    )
    point_head = PointMappingSAM(feature_size=dim, n_classes=cfg["n_classes"], last_supported=cfg["last_supported"])
    class_head = ClassMappingClassify(n_classes=cfg["n_classes"], feature_size=dim, use_mlp=cfg["class_head_mlp"])
    return use_onednn_conv3d(VISTA3D(image_encoder=encoder, class_head=class_head, point_head=point_head))


def load_vista3d_config(name_or_path: Union[str, Path]) -> Dict[str, Any]:
    """Read and check a model config: a YAML file path, or a preset name from ``configs/models`` (``vista3d132``).

    Read by :func:`dcm.config.load_model_config`, the one config reader.
    """
    from dcm.config import load_model_config

    cfg = load_model_config(name_or_path)
    check_vista3d_config(cfg)
    return cfg


def vista3d_shape_factor(model: VISTA3D) -> Tuple[int, int, int]:
    """What each (z, y, x) input size must be divisible by for ``model`` (16, 16, 16 for vista3d132)."""
    encoder = model.image_encoder
    if hasattr(encoder, "shape_factor"):
        return tuple(int(f) for f in encoder.shape_factor())  # type: ignore[return-value]
    return (1, 1, 1)


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameter elements (buffers excluded)."""
    return sum(p.numel() for p in model.parameters())
