"""The two experts and how a config builds them.

A DCM config has sections ``global_expert`` and ``local_expert`` (expert settings, each with a ``backbone``
and a ``model`` preset of that backbone) and ``engine`` (policy, fusion, budget). Each expert is an RoI
strategy over a backbone (:mod:`dcm.experts.backbones`): the released pairing is global RoI -> SAM-Med3D,
local RoI -> VISTA3D (the defaults); ``configs/dcm_card_pairing.yaml`` is the design card's opposite pairing.
One combined checkpoint holds both experts by role, whatever their backbones: the global expert under
``model_state_dict`` and the local one under ``model`` (DCM's released layout); it is read once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

from dcm.experts.base import Expert, RoIPrediction, RoISlices, policy_roles

__all__ = ["Expert", "RoIPrediction", "RoISlices", "announce_precision", "build_experts", "build_experts_from_config",
           "precision_line", "resolve_device"]


def resolve_device(device: Optional[str]) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``."""
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def needed_roles(cfg: Dict[str, Any]) -> Tuple[str, ...]:
    """The expert roles the config's ``engine.policy`` calls (``global_only`` / ``local_only``: one)."""
    policy = (cfg.get("engine") or {}).get("policy", "dual")
    return policy_roles(policy)


def build_experts(
    cfg: Dict[str, Any],
    weights: Optional[Union[str, Path]] = None,
    device: Optional[str] = None,
    trusted: bool = False,
    random_init: bool = False,
    config_name: Optional[str] = None,
) -> Dict[str, Expert]:
    """Build the experts the config's policy needs and load their weights from one combined file.

    Every section of the config, the experts' model presets and their frame / window sizes are checked
    first (:mod:`dcm.config_schema`): a bad setting costs no model build.

    Args:
        cfg: the whole DCM config.
        weights: combined checkpoint; default ``cfg['weights']``.
        device: overrides ``cfg['device']`` (``auto`` picks CUDA when available).
        trusted: allow full unpickling of the checkpoint (only for files you trust).
        random_init: build without weights (tests, benchmarks); otherwise missing weights are an error.
        config_name: where ``cfg`` came from (a path or preset name), for the missing-weights error.
    """
    from dcm.config import resolve_repo_path
    from dcm.config_schema import check_dcm_config
    from dcm.experts.backbones.registry import check_expert_models
    from dcm.errors import CheckpointError

    cfg = check_dcm_config(cfg)
    roles = needed_roles(cfg)
    check_expert_models(cfg, roles)
    weights = None if random_init else resolve_repo_path(weights or cfg.get("weights"))
    if weights is None and not random_init:
        raise CheckpointError(_no_weights(config_name))
    checkpoint = None
    if weights is not None:
        from dcm.checkpoints import load_checkpoint

        checkpoint = load_checkpoint(weights, trusted=trusted)
    dev = resolve_device(device or cfg.get("device"))
    experts: Dict[str, Expert] = {}
    try:
        if "global" in roles:
            from dcm.experts.global_roi import GlobalRoIExpert

            experts["global"] = GlobalRoIExpert.from_config(cfg["global_expert"], weights=checkpoint, device=dev)
        if "local" in roles:
            from dcm.experts.local_roi import LocalRoIExpert

            experts["local"] = LocalRoIExpert.from_config(cfg["local_expert"], weights=checkpoint, device=dev)
    except CheckpointError as e:  # raised about the loaded dict: every caller's message names the file
        raise CheckpointError(e.naming(weights), path=weights) from None
    announce_precision(experts)
    return experts


def precision_line(experts: Dict[str, Expert]) -> Optional[str]:
    """The one start-up line saying which precision path each CPU expert with ``amp: true`` runs, and why
    (``dcm: CPU precision: global_expert bfloat16 autocast, local_expert bfloat16 autocast + channels-last 3D
    (this CPU has avx512_bf16)``); None when no expert on the CPU asks for ``amp`` (float32, as before)."""
    from dcm.models.precision import cpu_native

    parts, reasons = [], []
    for role, expert in experts.items():
        backbone = getattr(expert, "backbone", None)
        if backbone is None or backbone.device.type != "cpu" or not backbone.amp:
            continue
        onednn = "" if backbone.onednn else ", oneDNN 3D convolutions off"
        parts.append(f"{role}_expert {backbone.precision}{onednn}")
        if backbone.amp_device == "cuda":
            reason = "amp_device: cuda"
        else:
            reason = cpu_native(backbone.amp_dtype)[1] + ("; amp_device: cpu" if backbone.amp_device == "cpu" else "")
        if reason not in reasons:
            reasons.append(reason)
    if not parts:
        return None
    return f"dcm: CPU precision: {', '.join(parts)} ({'; '.join(reasons)})"


def announce_precision(experts: Dict[str, Expert]) -> None:
    """Print :func:`precision_line` to stderr, once per process (the same line is not repeated)."""
    from dcm.models.precision import say_once

    line = precision_line(experts)
    if line is not None:
        say_once(line)


def _no_weights(config_name: Optional[str]) -> str:
    """The missing-weights error: which config has no ``weights`` and how to give them."""
    where = ""
    if config_name is not None:
        from dcm.config import resolve_config_path
        from dcm.errors import ConfigError

        try:
            where = f" ({resolve_config_path(config_name)} has weights: null)"
        except ConfigError:
            where = f" ({config_name} has weights: null)"
    return (f"no weights given{where}: pass --weights FILE (or DCM_WEIGHTS=FILE), or --random-init for a test "
            f"run; with neither a config nor weights DCM runs the small CPU preset (configs/dcm_small.yaml)")


def build_experts_from_config(
    config: Union[str, Path, Dict[str, Any], None],
    weights: Optional[Union[str, Path]] = None,
    device: Optional[str] = None,
    overrides: Tuple[str, ...] = (),
    **kwargs: Any,
) -> Tuple[Dict[str, Any], Dict[str, Expert]]:
    """Load a config (path, preset name or dict; None = ``configs/dcm.yaml``) and build its experts.

    Returns the checked config (every section complete, :mod:`dcm.config_schema`) and the experts; every
    section is checked before any model is built.
    """
    from dcm.config import DEFAULT_CONFIG, load_config
    from dcm.config_schema import check_dcm_config

    source = DEFAULT_CONFIG if config is None else config
    cfg = check_dcm_config(load_config(source, overrides))
    kwargs.setdefault("config_name", None if isinstance(source, dict) else str(source))
    return cfg, build_experts(cfg, weights, device, **kwargs)
