"""Model definitions and presets.

* :func:`build_sam_med3d` / :class:`SamMed3D`: the global-RoI expert's backbone (SAM-Med3D).
* :func:`load_model_config`: read a YAML preset from ``configs/models/`` (by name or path).
* ``manifests.json``: state-dict layouts of the known checkpoints (used by :mod:`dcm.checkpoints`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Union

from dcm.errors import ConfigError
from dcm.models.sam_med3d import SamMed3D, build_sam_med3d

__all__ = ["build_sam_med3d", "SamMed3D", "load_model_config", "list_model_configs", "MODEL_CONFIG_DIR"]

#: Directory of the model presets (``<repo>/configs/models``).
MODEL_CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "models"


def list_model_configs() -> List[str]:
    """Names of the presets in :data:`MODEL_CONFIG_DIR` (file stems)."""
    if not MODEL_CONFIG_DIR.is_dir():
        return []
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.yaml"))


def load_model_config(path_or_name: Union[str, "os.PathLike[str]"]) -> Dict[str, Any]:
    """Read a model preset.

    Args:
        path_or_name: a YAML file path, or a preset name in ``configs/models/`` with or without
            ``.yaml`` (e.g. ``"sam_med3d_64"``).

    Returns:
        The preset as a dict (pass it to :func:`build_sam_med3d`).

    Raises:
        ConfigError: unknown preset, unreadable file, or not a mapping.
    """
    import yaml

    p = Path(path_or_name)
    if not p.is_file():
        name = p.name if p.suffix in (".yaml", ".yml") else p.name + ".yaml"
        cand = MODEL_CONFIG_DIR / name
        if str(p) == p.name and cand.is_file():
            p = cand
        else:
            raise ConfigError(
                f"{path_or_name}: no such model config (presets: {', '.join(list_model_configs()) or 'none'})"
            )
    try:
        with open(p, "r", encoding="utf-8") as f:
            cfg = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{p}: cannot read model config: {e}") from e
    if not isinstance(cfg, dict):
        raise ConfigError(f"{p}: model config must be a mapping, got {type(cfg).__name__}")
    return cfg
