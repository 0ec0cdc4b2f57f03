"""Which backbones exist, building one from a model preset, and loading its weights.

Each expert builds its own backbone around its model: the config key ``backbone`` of either expert section
picks one (``global_expert.backbone: sam_med3d`` and ``local_expert.backbone: vista3d`` by default, DCM's
released pairing); ``model`` names a preset (``configs/models``) of that backbone.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch

from dcm.data.intensity import _percentiles
from dcm.config_schema import ZNORM_MODES, as_zyx
from dcm.errors import CheckpointError, ConfigError
from dcm.experts.backbones.base import Backbone, _amp_dtype
from dcm.experts.backbones.sam_med3d import SamMed3DBackbone
from dcm.experts.backbones.vista3d import Vista3DBackbone

__all__ = [
    "BACKBONES",
    "DEFAULT_MODELS",
    "backbone_class",
    "backbone_kind_of",
    "backbone_options",
    "build_backbone_model",
    "check_expert_models",
    "check_model_preset",
    "load_backbone_weights",
    "make_backbone",
    "preset_kind",
]

#: Backbone names accepted by ``global_expert.backbone`` / ``local_expert.backbone``.
BACKBONES = ("sam_med3d", "vista3d")

#: The model preset (``configs/models``) each backbone builds when the expert section names none.
DEFAULT_MODELS: Dict[str, str] = {"sam_med3d": "sam_med3d_64", "vista3d": "vista3d132"}

_BACKBONE_CLASSES = {"sam_med3d": SamMed3DBackbone, "vista3d": Vista3DBackbone}
#: The options only one backbone takes; :func:`make_backbone` drops those of the other one.
_OWN_OPTIONS = {"sam_med3d": ("znorm",), "vista3d": ("percentiles", "point_head")}


def backbone_class(kind: str) -> type:
    """The :class:`Backbone` subclass of a ``backbone`` name (``sam_med3d`` / ``vista3d``)."""
    if kind not in _BACKBONE_CLASSES:
        raise ConfigError(f"backbone must be one of {BACKBONES}, got {kind!r}")
    return _BACKBONE_CLASSES[kind]


def backbone_options(cfg: Mapping[str, Any], who: str, cache_size: int = 1) -> Dict[str, Any]:
    """Validate an expert section's backbone settings; returns them as :func:`make_backbone` options.

    Reads ``backbone``, ``device``, ``amp``, ``amp_dtype``, ``amp_device``, ``channels_last``, ``onednn``,
    ``compile``, ``znorm`` (used by ``sam_med3d``), ``percentiles`` and ``point_head`` (used by ``vista3d``);
    raises ConfigError naming ``who`` for a bad value. ``cache_size`` (the expert's embedding cache, not the
    backbone's) is passed through. The expert sections are checked by the schema (:mod:`dcm.config_schema`) first.
    """
    kind = cfg.get("backbone")
    if kind not in BACKBONES:
        raise ConfigError(f"{who}: backbone must be one of {BACKBONES}, got {kind!r}")
    if cfg.get("znorm", "torchio") not in ZNORM_MODES:
        raise ConfigError(f"{who}: znorm must be one of {ZNORM_MODES}, got {cfg.get('znorm')!r}")
    _amp_dtype(cfg.get("amp_dtype", "float16"), who)
    return {
        "device": cfg.get("device", "cpu"),
        "amp": bool(cfg.get("amp", False)),
        "amp_dtype": str(cfg.get("amp_dtype", "float16")),
        "amp_device": str(cfg.get("amp_device", "auto")),
        "channels_last": cfg.get("channels_last", "auto"),
        "onednn": bool(cfg.get("onednn", True)),
        "cache_size": int(cache_size),
        "compile": bool(cfg.get("compile", False)),
        "znorm": cfg.get("znorm", "torchio"),
        "percentiles": _percentiles(cfg.get("percentiles", (1.0, 99.0)), who),
        "point_head": str(cfg.get("point_head", "fast")),
    }


def backbone_kind_of(model: torch.nn.Module) -> str:
    """``sam_med3d`` or ``vista3d`` for a built network; ConfigError for anything else."""
    from dcm.models.sam_med3d import SamMed3D

    if isinstance(model, SamMed3D):
        return "sam_med3d"
    try:
        from monai.networks.nets.vista3d import VISTA3D
    except ImportError:  # pragma: no cover - monai is a dependency
        VISTA3D = ()  # type: ignore[assignment,misc]
    if isinstance(model, VISTA3D):
        return "vista3d"
    raise ConfigError(f"no backbone for a {type(model).__name__}: expected SAM-Med3D or MONAI VISTA3D")


def make_backbone(
    model: Union[torch.nn.Module, Backbone], kind: Optional[str] = None, who: str = "expert", **options: Any
) -> Backbone:
    """Wrap ``model`` in its backbone class (or check an already built backbone).

    Args:
        model: a SAM-Med3D or VISTA3D network, or a :class:`Backbone`.
        kind: the configured backbone; ConfigError when the network is of the other kind.
        who: names the expert in errors.
        **options: :class:`Backbone` settings plus ``znorm`` (SAM-Med3D), ``percentiles`` and ``point_head``
            (VISTA3D); those of the other backbone and ``cache_size`` (:func:`backbone_options`' setting of the
            expert's cache) are ignored.
    """
    found = model.kind if isinstance(model, Backbone) else backbone_kind_of(model)
    if kind is not None and kind != found:
        raise ConfigError(f"{who}: backbone is {kind!r} but the model is a {found} network")
    if isinstance(model, Backbone):
        return model
    ignored = {k for name, keys in _OWN_OPTIONS.items() if name != found for k in keys} | {"cache_size"}
    return _BACKBONE_CLASSES[found](model, **{k: v for k, v in options.items() if k not in ignored})


def preset_kind(model_cfg: Mapping[str, Any]) -> Optional[str]:
    """Which backbone a model preset describes (``variant`` -> VISTA3D, ``img_size`` -> SAM-Med3D), or None."""
    if "variant" in model_cfg:
        return "vista3d"
    if "img_size" in model_cfg:
        return "sam_med3d"
    return None


def build_backbone_model(
    kind: str, model: Union[None, str, "os.PathLike[str]", Mapping[str, Any]], who: str = "expert"
) -> torch.nn.Module:
    """Build the network of backbone ``kind`` from a preset name, a YAML path or a model config dict.

    Args:
        kind: ``sam_med3d`` or ``vista3d``.
        model: the preset (``configs/models``); None takes :data:`DEFAULT_MODELS` ``[kind]``.
        who: the config section, for errors (e.g. ``global_expert``).

    Raises:
        ConfigError: unknown backbone, unknown preset, or a preset of the other backbone.
    """
    from dcm.models import build_sam_med3d, load_model_config

    if kind not in BACKBONES:
        raise ConfigError(f"{who}: backbone must be one of {BACKBONES}, got {kind!r}")
    if model is None:
        model = DEFAULT_MODELS[kind]
    model_cfg = model if isinstance(model, Mapping) else load_model_config(model)
    found = preset_kind(model_cfg)
    if found is not None and found != kind:
        name = model_cfg.get("name", model) if isinstance(model, Mapping) else model
        raise ConfigError(
            f"{who}: model {name!r} is a {found} preset but the backbone is {kind!r}; "
            f"set {who}.model to a {kind} preset (e.g. {DEFAULT_MODELS[kind]})"
        )
    if kind == "sam_med3d":
        return build_sam_med3d(model_cfg)
    from dcm.models.vista3d import build_vista3d

    return build_vista3d(model_cfg)


def load_backbone_weights(
    model: torch.nn.Module,
    weights: Union[str, Path, Mapping[str, Any]],
    key: Optional[str],
    trusted: bool = False,
    partial: bool = False,
) -> None:
    """Load a backbone's weights: strictly, or (SAM-Med3D only) by name + shape with a printed report.

    ``key`` (the expert's role: ``model_state_dict`` for the global expert, ``model`` for the local one, as
    in DCM's combined file) is used when the checkpoint has it; otherwise the loader picks (a raw state dict
    is loaded as is, a training checkpoint by its first wrapper key). ``module.`` / ``_orig_mod.`` are
    stripped. VISTA3D always loads strictly: a missing tensor (e.g. the point head's positional buffer)
    would silently randomise the click encoding.

    Raises:
        CheckpointError: (strict) a missing tensor, unexpected ones or other shapes; the file is named.
        ConfigError: ``partial`` for a VISTA3D model.
    """
    from dcm.checkpoints import load_checkpoint, load_into

    if partial and backbone_kind_of(model) == "vista3d":
        raise ConfigError("init_partial: VISTA3D loads strictly (a partial load could randomise the click encoding)")
    path = weights if isinstance(weights, (str, os.PathLike)) else None
    ckpt = load_checkpoint(path, trusted=trusted) if path is not None else weights
    if key is not None and not (isinstance(ckpt, Mapping) and isinstance(ckpt.get(key), Mapping)):
        key = None
    try:
        report = load_into(model, ckpt, strict=not partial, key=key, verbose=False)
    except CheckpointError as e:
        if path is None:
            raise
        msg = str(e)
        msg = msg[len("<state dict>: "):] if msg.startswith("<state dict>: ") else msg
        raise CheckpointError(f"{path}: {msg}") from e
    if partial:
        if path is not None:
            report.source = str(path)
        print(report.format(), flush=True)


# ------------------------------------------------------------------------------------------------ model presets


def check_model_preset(kind: str, model: Any, where: str) -> Dict[str, Any]:
    """The model preset an expert section names (name, YAML path, dict or None), loaded and checked.

    Args:
        kind: the section's backbone, ``sam_med3d`` or ``vista3d``.
        model: the section's ``model`` (None: the backbone's full-size preset).
        where: the section's key (``local_expert``), for errors.

    Raises:
        ConfigError: unknown preset, a preset of the other backbone, or a bad preset key.
    """
    from dcm.models import load_model_config

    model_cfg = dict(model) if isinstance(model, Mapping) else load_model_config(model or DEFAULT_MODELS[kind])
    found = preset_kind(model_cfg)
    if found is not None and found != kind:
        name = model_cfg.get("name", model)
        raise ConfigError(f"{where}.model: {name!r} is a {found} preset but the backbone is {kind!r}; "
                          f"set {where}.model to a {kind} preset (e.g. {DEFAULT_MODELS[kind]})")
    try:
        if kind == "sam_med3d":
            from dcm.models.sam_med3d.build import resolve_config

            return resolve_config(model_cfg)
        from dcm.models.vista3d import check_vista3d_config

        return check_vista3d_config(model_cfg)
    except ConfigError as e:
        raise ConfigError(f"{where}.model: {e}") from None


def _frame_rule(kind: str, preset: Mapping[str, Any]) -> Tuple[Optional[int], int]:
    """(the only side a frame may have or None, what each side must be divisible by) for a checked preset."""
    if kind == "sam_med3d":
        return int(preset["img_size"]), 1
    if preset["variant"] == "full":
        levels = 5  # vista3d132's SegResNetDS2 encoder
    else:
        levels = len(preset["blocks_down"])
    factor = 2 ** (levels - 1)
    return None, factor * 2 // math.gcd(factor, 2)  # the point head halves and doubles once more


def check_expert_models(cfg: Mapping[str, Any], roles: Tuple[str, ...] = ("global", "local")) -> None:
    """Before any network is built: each needed expert's model preset and its frame / window size.

    Args:
        cfg: a checked inference config (:func:`check_dcm_config`).
        roles: the experts that will be built (``global`` / ``local``).

    Raises:
        ConfigError: naming the key (``local_expert.window_size (100, 100, 100) must be divisible by ...``).
    """
    for role in roles:
        where = f"{role}_expert"
        section = cfg[where]
        kind = section["backbone"]
        preset = check_model_preset(kind, section["model"], where)
        only, factor = _frame_rule(kind, preset)
        key = "frame_size" if role == "global" else "window_size"
        value = section[key]
        if value is None:
            continue
        size = (int(value),) * 3 if role == "global" else as_zyx(value, f"{where}.{key}")
        if only is not None and size != (only,) * 3:
            raise ConfigError(f"{where}.{key} {size} must be the SAM-Med3D model's input size "
                              f"({only},) * 3 (its img_size)")
        if any(s % factor for s in size):
            raise ConfigError(f"{where}.{key} {size} must be divisible by {factor} for this model")
