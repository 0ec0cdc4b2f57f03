"""DCM's one config layer: find, read and check every config (inference, training, model presets).

A config is given as a YAML path, a preset name (``dcm_small``: ``configs/dcm_small.yaml``) or a plain dict;
:func:`load_config` returns plain nested dicts (``cfg["engine"]["policy"]``). A file may name a parent with
``_base_: relative/or/absolute.yaml``; its keys are merged over the parent's (dicts recursively, everything
else replaced). Overrides are ``dotted.key=value`` strings with YAML values (``train.lr=1e-4``,
``engine.fusion=average``); they must name an existing key, so a typo fails loudly, unless written
``+new.key=value`` (a key the schema does not know still fails for an inference config).

Inference configs (those with an ``engine`` / ``global_expert`` / ``local_expert`` / ``session`` section,
or only ``weights`` / ``device``) are checked against :mod:`dcm.config_schema`, which holds every default:
the loaded dict has every key, the YAML files only what they change. Training configs are checked by their
trainers against :mod:`dcm.training.config_schema` (before any model is built or data read); model presets
(``configs/models``) by :func:`load_model_config` and their builders.

Where a relative path is looked up: the caller's working folder first, then the repository
(``configs/dcm_small.yaml`` works from any folder), then ``configs/`` (a preset name); a ``_base_`` first
next to the file naming it.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Union

import yaml

from dcm.errors import ConfigError

__all__ = [
    "CONFIG_DIR",
    "MODEL_CONFIG_DIR",
    "REPO_ROOT",
    "DEFAULT_CONFIG",
    "SMALL_CONFIG",
    "ConfigSource",
    "load_config",
    "load_model_config",
    "list_model_configs",
    "apply_overrides",
    "merge",
    "pick_config",
    "resolve_config_path",
    "resolve_repo_path",
    "get",
]

#: A config as callers give it: a YAML path, a preset name, or a plain dict.
ConfigSource = Union[str, Path, Mapping[str, Any]]

#: The repository root (next to the package) and its ``configs/`` folder: the one place presets are found.
REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"
#: The model presets (``configs/models``).
MODEL_CONFIG_DIR = CONFIG_DIR / "models"

#: The full-size inference config (SAM-Med3D-64 + VISTA3D; weights to be given).
DEFAULT_CONFIG = "dcm"
#: The small CPU preset with bundled weights: what runs when neither a config nor weights are given.
SMALL_CONFIG = "dcm_small"


def merge(base: Dict[str, Any], update: Dict[str, Any]) -> Dict[str, Any]:
    """Recursive dict merge: ``update`` wins; nested dicts are merged, not replaced."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolve_config_path(name: Union[str, Path], relative_to: Optional[Path] = None,
                        presets: Path = CONFIG_DIR) -> Path:
    """The file a config path or preset name means.

    Looked up in order: next to ``relative_to`` (the file whose ``_base_`` names it), the working folder,
    the repository root, then ``presets`` (``configs/``; a name may omit ``.yaml``).

    Raises:
        ConfigError: no such file (every place looked at is named).
    """
    path = Path(name)
    candidates: List[Path] = []
    if relative_to is not None and not path.is_absolute():
        candidates.append(relative_to / path)
    candidates.append(path)
    if not path.is_absolute():
        candidates += [REPO_ROOT / path, presets / path]
        if path.suffix not in (".yaml", ".yml"):
            candidates.append(presets / f"{path}.yaml")
    for candidate in dict.fromkeys(candidates):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"{name}: config file not found "
                      f"(looked in {', '.join(str(c) for c in dict.fromkeys(candidates))})")


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
    """A YAML mapping with its ``_base_`` chain merged in (the one reader of every config file)."""
    if path.resolve() in seen:
        raise ConfigError(f"{path}: _base_ cycle")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text file in UTF-8 (byte {e.start}: {e.reason})") from None
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


def load_config(source: ConfigSource, overrides: Iterable[str] = ()) -> Dict[str, Any]:
    """Load a config (path, preset name or dict; ``_base_`` followed), apply overrides, check it.

    An inference config (:func:`dcm.config_schema.is_dcm_config`) comes back complete: every section and key
    of :class:`dcm.config_schema.DCMConfig`, defaults filled in, every value checked, so an override may name
    any key of the schema. Other configs (training) come back as read, overrides applied.

    Raises:
        ConfigError: one line naming the file, the override or the key (``engine.policy must be ...``).
    """
    from dcm.config_schema import check_dcm_config, is_dcm_config

    if isinstance(source, Mapping):
        raw = copy.deepcopy(dict(source))
    else:
        raw = _load_file(resolve_config_path(source))
    overrides = tuple(overrides)
    if not is_dcm_config(raw):
        return apply_overrides(raw, overrides)
    cfg = check_dcm_config(raw)
    return check_dcm_config(apply_overrides(cfg, overrides)) if overrides else cfg


def list_model_configs() -> List[str]:
    """Names of the model presets in :data:`MODEL_CONFIG_DIR` (file stems)."""
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.yaml")) if MODEL_CONFIG_DIR.is_dir() else []


def load_model_config(name_or_path: Union[str, Path]) -> Dict[str, Any]:
    """Read a model preset: a YAML path, or a name in ``configs/models`` with or without ``.yaml``.

    Same reader as :func:`load_config` (``_base_`` followed), looked up in :data:`MODEL_CONFIG_DIR`.

    Raises:
        ConfigError: unknown preset (the presets are listed), unreadable file, or not a mapping.
    """
    try:
        path = resolve_config_path(name_or_path, presets=MODEL_CONFIG_DIR)
    except ConfigError:
        raise ConfigError(f"{name_or_path}: no such model config "
                          f"(presets: {', '.join(list_model_configs()) or 'none'})") from None
    return _load_file(path)


def pick_config(config: Optional[ConfigSource], weights: Optional[Union[str, Path]], random_init: bool = False,
                how_to_pass: str = "--config configs/dcm.yaml --weights FILE") -> ConfigSource:
    """The config to load when a caller may give none ("defaults that work").

    ``config`` when given; the full-size :data:`DEFAULT_CONFIG` when only weights (or a random init) are;
    with neither, the small CPU preset :data:`SMALL_CONFIG` with its bundled weights, announced in one
    stderr line that says how to pass real weights (``how_to_pass``).
    """
    if config is not None:
        return config
    if weights is not None or random_init:
        return DEFAULT_CONFIG
    small = resolve_config_path(SMALL_CONFIG)
    bundled = _load_file(small).get("weights")
    print(f"dcm: no config or weights given: using the small CPU preset {_shown(small)} with {bundled} "
          f"(a demonstration model); for real weights pass {how_to_pass}", file=sys.stderr, flush=True)
    return SMALL_CONFIG


def _shown(path: Path) -> str:
    """``path`` relative to the repository when inside it (as users type it), else as is."""
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def get(cfg: Dict[str, Any], dotted: str, default: Any = None) -> Any:
    """``cfg['a']['b']`` for ``'a.b'``, or ``default`` when any part is missing."""
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node
