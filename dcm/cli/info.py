"""``dcm info``: what DCM would run on this machine, before anything is loaded.

Versions, the device, the processor's reduced-precision support, and per config (default: the full-size
``dcm`` and the small ``dcm_small`` presets) each expert's backbone, model and the precision path it would
run (the rule of :mod:`dcm.models.precision`, the same one the experts apply when built), plus whether the
config's weights exist. No network is built and no weights are read, so it answers in about a second;
``--json`` prints the same as one JSON object (for bug reports and scripts).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["collect", "main"]

DEFAULT_CONFIGS = ("dcm", "dcm_small")
PACKAGES = ("torch", "monai", "numpy", "scipy", "SimpleITK", "nibabel")


def _version(package: str) -> Optional[str]:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> Dict[str, Any]:
    """Versions, the devices and the processor's bfloat16 / float16 support."""
    import torch

    from dcm import __version__
    from dcm.models.precision import cpu_flags, cpu_has_amx, cpu_name, cpu_native

    cuda = torch.cuda.is_available()
    flags = cpu_flags()
    return {
        "dcm": __version__,
        "dcm_path": str(Path(__file__).resolve().parents[1]),
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in PACKAGES},
        "cuda": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "cpu": {
            "name": cpu_name(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "features": sorted(f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16")
                               if f in flags),
            "amx": cpu_has_amx(),
            "bfloat16": list(cpu_native(torch.bfloat16)),
            "float16": list(cpu_native(torch.float16)),
        },
    }


def config_info(name: str, device: Optional[str] = None, overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """One config's experts and the precision path each would run on ``device`` (default: the config's)."""
    import torch

    from dcm.config import load_config, resolve_config_path, resolve_repo_path
    from dcm.config_schema import check_dcm_config
    from dcm.errors import ConfigError
    from dcm.experts import needed_roles, resolve_device
    from dcm.checks import check_device
    from dcm.experts.backbones.registry import DEFAULT_MODELS, backbone_class, check_expert_models
    from dcm.models.onednn import packs_encoder_linear
    from dcm.models.precision import autocast_dtype, channels_last_active, precision_label

    path = resolve_config_path(name)
    try:  # an inference config whose experts could be built (a training or model config is refused)
        cfg = check_dcm_config(load_config(name, tuple(overrides)))
        check_expert_models(cfg, needed_roles(cfg))
        if not device:  # a --device is checked once, by main()
            check_device(cfg.get("device"), "device")
    except ConfigError as e:
        raise ConfigError(str(e) if str(path) in str(e) else f"{path}: {e}") from None
    dev = torch.device(resolve_device(device or cfg.get("device")))
    weights = cfg.get("weights")
    found = resolve_repo_path(weights) if weights else None
    experts = {}
    for role in needed_roles(cfg):
        section = cfg[f"{role}_expert"]
        kind = section["backbone"]
        model = section.get("model") or DEFAULT_MODELS[kind]
        autocast = autocast_dtype(bool(section["amp"]), section["amp_dtype"], section["amp_device"], dev)
        channels_last = channels_last_active(section["channels_last"], autocast, dev,
                                             backbone_class(kind).convolutional)
        entry = {"backbone": kind, "model": model if isinstance(model, str) else "(inline)",
                 "precision": precision_label(autocast, channels_last)}
        if kind == "sam_med3d" and autocast is torch.bfloat16 and dev.type == "cpu":
            entry["packed_onednn_linear"] = packs_encoder_linear(section["onednn"], autocast, dev)
        experts[role] = entry
    return {
        "config": str(path),
        "policy": cfg["engine"]["policy"],
        "device": str(dev),
        "weights": None if not weights else str(weights),
        "weights_found": None if not weights else bool(found is not None and Path(found).is_file()),
        "experts": experts,
    }


def collect(configs: Sequence[str] = DEFAULT_CONFIGS, device: Optional[str] = None,
            overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """Everything ``dcm info`` prints, as a mapping (``--json``)."""
    return {**machine_info(), "configs": {name: config_info(name, device, overrides) for name in configs}}


def _yes(value: bool) -> str:
    return "yes" if value else "no"


def render(info: Dict[str, Any]) -> str:
    """The human-readable text of :func:`collect`'s mapping."""
    cpu = info["cpu"]
    versions = ", ".join(f"{k} {v or 'not installed'}" for k, v in info["packages"].items())
    lines = [f"dcm {info['dcm']} ({info['dcm_path']})", f"python {info['python']}, {versions}",
             f"CUDA: {', '.join(info['cuda']) if info['cuda'] else 'not available'}",
             f"CPU: {cpu['name']}, {cpu['cpus']} CPUs, torch threads {cpu['torch_threads']}; "
             f"features: {' '.join(cpu['features']) or 'none of interest'}",
             f"  bfloat16 native: {_yes(cpu['bfloat16'][0])} ({cpu['bfloat16'][1]}); "
             f"float16 native: {_yes(cpu['float16'][0])} ({cpu['float16'][1]})"]
    for name, config in info["configs"].items():
        if config["weights"] is None:
            weights = "none in the config (predict.sh needs --weights FILE or DCM_WEIGHTS)"
        else:
            weights = f"{config['weights']} ({'found' if config['weights_found'] else 'NOT FOUND'})"
        lines += ["", f"config {name} ({config['config']}): policy {config['policy']}, device {config['device']}",
                  f"  weights: {weights}"]
        for role, expert in config["experts"].items():
            extra = ""
            if "packed_onednn_linear" in expert:
                extra = f", packed oneDNN linear layers: {_yes(expert['packed_onednn_linear'])}"
            lines.append(f"  {role}_expert: {expert['backbone']} / {expert['model']}: {expert['precision']}{extra}")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dcm.info", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", dest="configs",
                        help="config path or preset name (repeat; default: DCM_CONFIG when set, as predict.sh "
                             f"reads it, else {' and '.join(DEFAULT_CONFIGS)})")
    parser.add_argument("--device", default=os.environ.get("DCM_DEVICE") or None,
                        help="auto, cpu or cuda (default: DCM_DEVICE when set, else each config's device)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, applied to every config")
    args = parser.parse_args(argv)
    from dcm.cli import check_device
    from dcm.errors import DCMError

    try:
        if args.device:
            check_device(args.device, "--device")
        configs = args.configs or ([os.environ["DCM_CONFIG"]] if os.environ.get("DCM_CONFIG") else DEFAULT_CONFIGS)
        info = collect(configs, args.device, args.overrides)
    except DCMError as e:
        print(" ".join(f"dcm info: {e}".split()), file=sys.stderr)
        return 2
    sys.stdout.write(json.dumps(info, indent=2) + "\n" if args.json else render(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
