"""Fast CPU 3D convolutions for small volumes.

PyTorch picks oneDNN (MKL-DNN) for a CPU float32 convolution only when a heuristic written for 2D images
holds; for a batch of one 3D volume it asks ``C * D * H > 20480`` (or a stride, dilation, groups or a kernel
larger than 3). The 3D convolutions of small windows and narrow layers fail it (VISTA3D at 32^3 with 16
channels: ``16 * 32 * 32 = 16384``) and fall back to an im2col path about 20x slower (measured: 16 -> 16
channels at 32^3, 146 ms vs 7 ms on one core). :func:`use_onednn_conv3d` sends those convolutions to oneDNN
directly. The results equal PyTorch's up to float32 rounding (about 1e-6); gradients flow as usual.

Channels-last 3D (:mod:`dcm.models.precision`): a layer whose weight is stored channels-last runs oneDNN on the
input in that layout too, so that the layout passes from layer to layer; other weights run as before.
Reduced precision (bfloat16 under CPU autocast) goes to PyTorch's own convolution, which uses oneDNN for it
anyway. :func:`use_pytorch_conv3d` undoes :func:`use_onednn_conv3d` (an expert's ``onednn: false``).

Linear layers in bfloat16 (:class:`OneDNNLinear`, :func:`use_onednn_linear`): a CPU bfloat16 ``F.linear`` hands
oneDNN the plain (out, in) weight at every call, which oneDNN reorders into its blocked layout each time;
a weight reordered once and kept (``torch.ops.mkldnn._reorder_linear_weight``) runs the same products on the
same values, 4-6 % less time per global first click on a processor without AMX
(``benchmarks/profile_first_click.py --ab-linear``). The outputs were bit-equal there at the SAM-Med3D
encoder's 512 tokens (and are in the tests' reduced encoder on any processor); with a few tokens, or on AMX at
full width, oneDNN may sum in another order, a bfloat16 rounding apart. With AMX the packed layers were
slower, so they are used only where :func:`onednn_linear_pays`. The packed copy costs the weights' size again
in memory.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import nn

__all__ = [
    "OneDNNConv3d",
    "OneDNNLinear",
    "channels_last_weights",
    "is_channels_last",
    "onednn_linear_available",
    "onednn_linear_pays",
    "packs_encoder_linear",
    "use_onednn_conv3d",
    "use_onednn_linear",
    "use_pytorch_conv3d",
    "use_pytorch_linear",
]


class OneDNNConv3d(nn.Conv3d):
    """``nn.Conv3d`` that runs on oneDNN for CPU float32 inputs (same parameters, same state-dict keys)."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if (
            input.device.type == "cpu"
            and input.dtype == torch.float32
            and weight.dtype == torch.float32
            and self.padding_mode == "zeros"
            and not isinstance(self.padding, str)
            and input.dim() == 5
            and torch.backends.mkldnn.enabled
            and torch.backends.mkldnn.is_available()
            and not torch.is_autocast_enabled("cpu")
        ):
            if is_channels_last(weight) or is_channels_last(input):  # channels-last 3D: keep the layout
                x, w = input.contiguous(memory_format=torch.channels_last_3d), weight
            else:
                x, w = input.contiguous(), weight.contiguous()
            return torch.mkldnn_convolution(x, w, bias, self.padding, self.stride, self.dilation, self.groups)
        return super()._conv_forward(input, weight, bias)


def is_channels_last(t: torch.Tensor) -> bool:
    """Whether a 5D tensor is stored channels-last 3D and not also plainly contiguous (sizes where both hold,
    such as one channel, count as contiguous)."""
    return t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d) and not t.is_contiguous()


def use_onednn_conv3d(module: nn.Module) -> nn.Module:
    """Turn every plain ``nn.Conv3d`` inside ``module`` into a :class:`OneDNNConv3d`, in place.

    Parameters, buffers and state-dict keys are unchanged (only the class of each layer changes); other
    devices and dtypes run exactly as before. Returns ``module``.
    """
    for layer in module.modules():
        if type(layer) is nn.Conv3d:
            layer.__class__ = OneDNNConv3d
    return module


def use_pytorch_conv3d(module: nn.Module) -> nn.Module:
    """Undo :func:`use_onednn_conv3d`: every :class:`OneDNNConv3d` inside ``module`` becomes a plain
    ``nn.Conv3d`` again (PyTorch's own choice of kernel), in place. Returns ``module``."""
    for layer in module.modules():
        if type(layer) is OneDNNConv3d:
            layer.__class__ = nn.Conv3d
    return module


def channels_last_weights(module: nn.Module) -> nn.Module:
    """Store the weight of every 3D convolution (and transposed convolution) inside ``module`` channels-last 3D,
    in place (values, parameters and state-dict keys unchanged), so that oneDNN keeps that layout from layer
    to layer. Returns ``module``."""
    for layer in module.modules():
        if isinstance(layer, (nn.Conv3d, nn.ConvTranspose3d)) and layer.weight.dim() == 5:
            layer.weight.data = layer.weight.data.contiguous(memory_format=torch.channels_last_3d)
    return module


def onednn_linear_available() -> bool:
    """Whether this torch has oneDNN's packed-weight linear kernels (x86 and aarch64 CPU builds)."""
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    try:
        return hasattr(torch.ops.mkldnn, "_linear_pointwise") and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    except (AttributeError, RuntimeError):
        return False


def onednn_linear_pays() -> bool:
    """Whether the SAM-Med3D encoder's linear layers go to :class:`OneDNNLinear` under CPU bfloat16 (an expert's
    ``onednn: true``): where this torch has the kernels and the processor has no AMX. Measured on two 2-core
    machines (README "Performance", ``benchmarks/profile_first_click.py --ab-linear``): an AMD EPYC with
    ``avx512_bf16`` only, 4-6 % less time per global first click; an Intel Xeon with AMX, 5 % more time and
    about 100 MB more memory, so there the plain ``F.linear`` runs."""
    from dcm.models.precision import cpu_has_amx

    return onednn_linear_available() and not cpu_has_amx()


def packs_encoder_linear(onednn: bool, autocast: Optional[torch.dtype], device: Union[str, torch.device]) -> bool:
    """Whether a SAM-Med3D backbone runs its image encoder's linear layers as :class:`OneDNNLinear`: its
    ``onednn`` setting on, bfloat16 autocast on the CPU, and :func:`onednn_linear_pays` (what ``dcm info``
    reports is this same decision)."""
    return (bool(onednn) and torch.device(device).type == "cpu" and autocast is torch.bfloat16
            and onednn_linear_pays())


class OneDNNLinear(nn.Linear):
    """``nn.Linear`` whose bfloat16 CPU products run on a weight packed once for oneDNN (same parameters, same
    state-dict keys; the same products, summed in the same order at the image encoders' 512 tokens on a
    processor without AMX: see the module docstring).

    It applies where autocast would run the layer in bfloat16 (or the input already is bfloat16) and the
    weight is stored in bfloat16 (:func:`dcm.models.precision.store_weights_in`); the bias is cast to
    bfloat16 as autocast casts it. Without autograd only: with gradients, or anywhere else, it is
    ``nn.Linear``. The packed weight is made at the first such call and again whenever the weight changes
    (a new tensor or an in-place update such as ``load_state_dict``).
    """

    _packed: Optional[Tuple[Tuple[int, int], torch.Tensor, Optional[torch.Tensor]]] = None

    def __getstate__(self):
        state = dict(super().__getstate__())
        state.pop("_packed", None)  # an opaque oneDNN tensor: not copyable, made again when needed
        return state

    def _packed_for(self, weight: torch.Tensor) -> Tuple[Tuple[int, int], torch.Tensor, Optional[torch.Tensor]]:
        """(the weight's identity, its packed copy, the bias in bfloat16), made again when the weight changed."""
        key = (weight.data_ptr(), weight._version)
        if self._packed is None or self._packed[0] != key:
            bias = None if self.bias is None else self.bias.detach().to(torch.bfloat16)
            self._packed = (key, torch.ops.mkldnn._reorder_linear_weight(weight.detach()), bias)
        return self._packed

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if (
            input.device.type == "cpu"
            and weight.dtype == torch.bfloat16
            and not torch.is_grad_enabled()
            and (input.dtype == torch.bfloat16
                 or (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16))
        ):
            _, packed, bias = self._packed_for(weight)
            return torch.ops.mkldnn._linear_pointwise(input.to(torch.bfloat16), packed, bias, "none", [], "")
        return super().forward(input)


def use_onednn_linear(module: nn.Module) -> nn.Module:
    """Turn every plain ``nn.Linear`` inside ``module`` into a :class:`OneDNNLinear`, in place (where this torch
    has the kernels; otherwise nothing changes). Returns ``module``."""
    if not onednn_linear_available():
        return module
    for layer in module.modules():
        if type(layer) is nn.Linear:
            layer.__class__ = OneDNNLinear
    return module


def use_pytorch_linear(module: nn.Module) -> nn.Module:
    """Undo :func:`use_onednn_linear` (and drop the packed weights), in place. Returns ``module``."""
    for layer in module.modules():
        if type(layer) is OneDNNLinear:
            layer.__dict__.pop("_packed", None)
            layer.__class__ = nn.Linear
    return module
