"""YAML experiment configs with inheritance and command-line overrides.

A config file may name a parent with ``_base_: relative/or/absolute.yaml``; its keys are merged over the
parent's (dicts recursively, everything else replaced). Overrides are ``dotted.key=value`` strings with YAML
values (``train.lr=1e-4``, ``model.global_attn_indexes=[2,5]``); they must name an existing key, so a typo
fails loudly, unless written ``+new.key=value``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Union

import yaml

from dcm.errors import ConfigError

__all__ = ["CONFIG_DIR", "REPO_ROOT", "load_config", "apply_overrides", "merge", "resolve_config_path", "resolve_repo_path", "get"]

#: the repository's ``configs/`` folder (next to the package).
REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"


def merge(base: Dict[str, Any], update: Dict[str, Any]) -> Dict[str, Any]:
    """Recursive dict merge: ``update`` wins; nested dicts are merged, not replaced."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolve_config_path(name: Union[str, Path], relative_to: Optional[Path] = None) -> Path:
    """A config path as given, relative to ``relative_to``, or relative to ``configs/``."""
    path = Path(name)
    candidates = [path]
    if relative_to is not None:
        candidates.append(relative_to / path)
    candidates += [CONFIG_DIR / path, CONFIG_DIR / f"{path}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(f"{name}: config file not found (looked in {', '.join(str(c) for c in candidates)})")


def resolve_repo_path(path: Union[None, str, Path]) -> Optional[Path]:
    """A file path as given when it exists (or is absolute), else relative to the repository root when it
    exists there (``weights: weights/dcm_small.pt`` in a config works from any working folder)."""
    if path is None:
        return None
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    return REPO_ROOT / p if (REPO_ROOT / p).exists() else p


def _load_file(path: Path, seen: tuple = ()) -> Dict[str, Any]:
    if path.resolve() in seen:
        raise ConfigError(f"{path}: _base_ cycle")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({e})".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping, got {type(data).__name__}")
    base_name = data.pop("_base_", None)
    if base_name is None:
        return data
    bases = base_name if isinstance(base_name, list) else [base_name]
    merged: Dict[str, Any] = {}
    for b in bases:
        merged = merge(merged, _load_file(resolve_config_path(b, path.parent), seen + (path.resolve(),)))
    return merge(merged, data)


def apply_overrides(cfg: Dict[str, Any], overrides: Iterable[str]) -> Dict[str, Any]:
    """Apply ``key.sub=value`` overrides (YAML-parsed values) to a copy of ``cfg``."""
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, _, raw = item.partition("=")
        allow_new = key.startswith("+")
        key = key.lstrip("+").strip()
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = cfg
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            if part not in node:
                if not allow_new:
                    raise ConfigError(f"override {item!r}: no key {'.'.join(parts[:i + 1])!r} (use +{key}=... to add)")
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[:i + 1])!r} is not a mapping")
        if parts[-1] not in node and not allow_new:
            raise ConfigError(f"override {item!r}: no key {key!r} (use +{key}=... to add)")
        node[parts[-1]] = value
    return cfg


def load_config(path: Union[str, Path], overrides: Iterable[str] = ()) -> Dict[str, Any]:
    """Load a YAML config (following ``_base_``) and apply overrides."""
    return apply_overrides(_load_file(resolve_config_path(path)), overrides)


def get(cfg: Dict[str, Any], dotted: str, default: Any = None) -> Any:
    """``cfg['a']['b']`` for ``'a.b'``, or ``default`` when any part is missing."""
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node
