"""Which precision and memory layout an expert's network runs in: CPU feature detection, the autocast rule,
channels-last 3D.

**Autocast** (``amp`` / ``amp_dtype`` / ``amp_device`` of an expert section, :func:`autocast_dtype`):
``amp: false`` is float32 on every device. With ``amp: true`` the network runs under ``torch.autocast`` in
``amp_dtype`` where ``amp_device`` allows it: ``auto`` on CUDA, and on a CPU whose processor computes that
dtype natively (bfloat16: ``avx512_bf16`` or AMX; float16: ``avx512_fp16`` / AMX-FP16; detected once,
:func:`cpu_native`); ``cuda`` on CUDA only; ``cpu`` on the CPU only, whatever the processor (emulated
bfloat16 is slower than float32: for measurements). Elsewhere float32.

**Channels-last 3D** (``channels_last``, :func:`channels_last_active`): the 3D convolution weights stored
``torch.channels_last_3d`` (N, D, H, W, C in memory), so that oneDNN writes every convolution's output in
that layout and the next one reads it without a reorder; instance norms then run as the equal group norm
with one channel per group (:func:`use_channels_last_norms`), which keeps the layout instead of copying back.
``auto``: on for a convolutional backbone (VISTA3D) under CPU bfloat16 autocast, where it was measured to pay
(README "Performance"); ``true`` / ``false``: always / never.
"""

from __future__ import annotations

import functools
import platform
import sys
from pathlib import Path
from typing import Any, FrozenSet, Optional, Set, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from dcm.config_schema import AMP_DEVICES

__all__ = [
    "AMP_DTYPES",
    "AMP_DEVICES",
    "ChannelsLastInstanceNorm3d",
    "autocast_dtype",
    "channels_last_active",
    "cpu_flags",
    "cpu_has_amx",
    "cpu_name",
    "cpu_native",
    "precision_label",
    "say_once",
    "store_weights_in",
    "use_channels_last_norms",
]

#: ``amp_dtype`` names and their torch dtypes.
AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}

#: /proc/cpuinfo flags of native support, per dtype (x86: AVX-512 and AMX; aarch64: the bf16 / fphp features).
_NATIVE_FLAGS = {
    torch.bfloat16: ("avx512_bf16", "amx_bf16", "bf16"),
    torch.float16: ("avx512_fp16", "amx_fp16", "fphp"),
}


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_name() -> str:
    """The processor's model name from ``/proc/cpuinfo``, else what :mod:`platform` knows."""
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=1)
def cpu_flags() -> FrozenSet[str]:
    """The processor's feature flags from ``/proc/cpuinfo`` (``flags`` on x86, ``Features`` on aarch64); empty
    where the file does not exist."""
    for line in _cpuinfo().splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def _torch_says(dtype: torch.dtype) -> Optional[str]:
    """The native feature PyTorch's own CPU checks report for ``dtype`` (None: none, or no such check)."""
    cpu = getattr(torch, "cpu", None)
    checks = {
        torch.bfloat16: (("_is_amx_tile_supported", "amx_bf16"), ("_is_avx512_bf16_supported", "avx512_bf16")),
        torch.float16: (("_is_amx_fp16_supported", "amx_fp16"),),
    }[dtype]
    for fn, name in checks:
        try:
            if getattr(cpu, fn)():
                return name
        except Exception:  # a check this torch does not have
            continue
    return None


@functools.lru_cache(maxsize=1)
def cpu_has_amx() -> bool:
    """Whether the processor has AMX bfloat16 tiles (PyTorch's check, else ``/proc/cpuinfo``)."""
    return _torch_says(torch.bfloat16) == "amx_bf16" or "amx_bf16" in cpu_flags()


@functools.lru_cache(maxsize=None)
def cpu_native(dtype: torch.dtype) -> Tuple[bool, str]:
    """Whether this processor computes ``dtype`` (bfloat16 / float16) natively, and the reason in words.

    Native means an instruction set for that dtype (``avx512_bf16``, AMX, ``avx512_fp16``; aarch64 ``bf16``)
    *and* oneDNN kernels for it in this torch build (``torch.ops.mkldnn._is_mkldnn_bf16_supported``, which
    alone is also true for AVX-512 processors that only emulate bfloat16). Detected once per process.
    """
    name = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype)
    if name is None:
        return False, f"{dtype} is no autocast dtype"
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False, "this torch has no oneDNN"
    try:
        kernels = bool(getattr(torch.ops.mkldnn,
                               f"_is_mkldnn_{'bf16' if dtype is torch.bfloat16 else 'fp16'}_supported")())
    except Exception:
        kernels = False
    if not kernels:
        return False, f"oneDNN has no {name} kernels for this CPU"
    feature = _torch_says(dtype) or next((f for f in _NATIVE_FLAGS[dtype] if f in cpu_flags()), None)
    if feature is None:
        return False, f"no native {name} on this CPU (no {' / '.join(_NATIVE_FLAGS[dtype][:2])})"
    return True, f"this CPU has {feature}"


def autocast_dtype(
    amp: bool, amp_dtype: Union[str, torch.dtype], amp_device: str, device: Union[str, torch.device]
) -> Optional[torch.dtype]:
    """The dtype an expert's network autocasts to on ``device``, or None for float32 (the rule above).

    Raises:
        ValueError: an unknown ``amp_device`` or ``amp_dtype``.
    """
    if amp_device not in AMP_DEVICES:
        raise ValueError(f"amp_device must be one of {list(AMP_DEVICES)}, got {amp_device!r}")
    dtype = AMP_DTYPES.get(amp_dtype) if isinstance(amp_dtype, str) else amp_dtype
    if dtype not in AMP_DTYPES.values():
        raise ValueError(f"amp_dtype must be one of {list(AMP_DTYPES)}, got {amp_dtype!r}")
    if not amp:
        return None
    kind = torch.device(device).type
    if kind == "cuda":
        return dtype if amp_device in ("auto", "cuda") else None
    if kind == "cpu":
        if amp_device == "cpu" or (amp_device == "auto" and cpu_native(dtype)[0]):
            return dtype
    return None


def channels_last_active(setting: Any, autocast: Optional[torch.dtype], device: Union[str, torch.device],
                         convolutional: bool) -> bool:
    """Whether the network input goes channels-last 3D: ``True`` / ``False`` as set; ``auto``: for a
    ``convolutional`` backbone under CPU bfloat16 autocast (where it was measured to pay).

    Raises:
        ValueError: any other setting.
    """
    if isinstance(setting, bool):
        return setting
    if setting != "auto":
        raise ValueError(f"channels_last must be auto, true or false, got {setting!r}")
    return convolutional and autocast is torch.bfloat16 and torch.device(device).type == "cpu"


def precision_label(autocast: Optional[torch.dtype], channels_last: bool) -> str:
    """``bfloat16 autocast + channels-last 3D``, ``float32``, ... (for the start-up line and tables)."""
    name = "float32" if autocast is None else f"{str(autocast).replace('torch.', '')} autocast"
    return name + (" + channels-last 3D" if channels_last else "")


_SAID: Set[str] = set()


def say_once(line: str) -> bool:
    """Print ``line`` to stderr (one line) unless this process printed it before; True when printed."""
    line = " ".join(line.split())
    if line in _SAID:
        return False
    _SAID.add(line)
    print(line, file=sys.stderr, flush=True)
    return True


class ChannelsLastInstanceNorm3d(nn.InstanceNorm3d):
    """``nn.InstanceNorm3d`` that keeps a channels-last 3D input channels-last.

    PyTorch's instance norm copies its input to the contiguous layout; for a channels-last input without
    running statistics this runs the same normalisation as a group norm with one channel per group, which
    keeps the layout. Other inputs run ``nn.InstanceNorm3d`` unchanged (same parameters and state-dict keys).
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if (
            input.dim() == 5
            and not self.track_running_stats
            and input.is_contiguous(memory_format=torch.channels_last_3d)
            and not input.is_contiguous()
        ):
            return F.group_norm(input, input.shape[1], self.weight, self.bias, self.eps)
        return super().forward(input)


def store_weights_in(module: nn.Module, dtype: torch.dtype,
                     types: Tuple[type, ...] = (nn.Linear, nn.Conv3d, nn.ConvTranspose3d)) -> int:
    """Store the weights (not the biases) of every ``types`` layer inside ``module`` in ``dtype``, in place.

    Under autocast to ``dtype`` these layers cast their float32 weights to ``dtype`` at every call (the cast
    cache lives for one autocast context only, i.e. one encoder pass); stored in ``dtype`` they run the same
    products on the same rounded values (bit-equal outputs) without the cast, which for the SAM-Med3D ViT-B
    encoder is about a tenth of a CPU pass. Only for a network whose weights are read by its layers' own
    ``forward``, always under autocast (biases stay float32: DCM's fast attention folds the qkv bias in float32).
    Returns the number of weights stored.
    """
    count = 0
    for layer in module.modules():
        if isinstance(layer, types) and isinstance(getattr(layer, "weight", None), nn.Parameter):
            if layer.weight.dtype != dtype:
                layer.weight.data = layer.weight.data.to(dtype)
                count += 1
    return count


def use_channels_last_norms(module: nn.Module) -> nn.Module:
    """Turn every plain ``nn.InstanceNorm3d`` inside ``module`` into a :class:`ChannelsLastInstanceNorm3d`, in
    place (a contiguous input runs exactly as before). Returns ``module``."""
    for layer in module.modules():
        if type(layer) is nn.InstanceNorm3d:
            layer.__class__ = ChannelsLastInstanceNorm3d
    return module
