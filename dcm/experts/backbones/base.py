"""The backbone interface: a network on a frame, as a plain adapter (encode, decode, normalise).

A backbone knows nothing about RoIs, windows or caches: the expert pipeline (:mod:`dcm.experts.pipeline`)
builds the normalised frame, keeps the encoder outputs and calls :meth:`Backbone.encode` and
:meth:`Backbone.decode`; the backbone never calls back into the expert.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from dcm.errors import ConfigError
from dcm.prompts import ZYX

__all__ = ["Backbone"]


def _amp_dtype(name: Any, who: str) -> torch.dtype:
    """``float16`` / ``bfloat16`` as a torch dtype; ConfigError naming ``who`` otherwise."""
    from dcm.models.precision import AMP_DTYPES

    dtype = AMP_DTYPES.get(str(name))
    if dtype is None:
        raise ConfigError(f"{who}: amp_dtype must be 'float16' or 'bfloat16', got {name!r}")
    return dtype


class Backbone:
    """A network on a frame::

        normalised frame (1, 1, Z, Y, X) --encode--> embedding
        embedding + clicks (N, 3) frame (z, y, x), labels (N,) 1 fg / 0 bg
                  + optional mask prompt (m, m, m) --decode--> logits on :meth:`logit_grid` over the frame

    Args:
        model: the network (moved to ``device``, put in eval mode).
        device: ``cpu``, ``cuda``, ``auto`` ...
        amp: autocast where ``amp_device`` allows it (:func:`dcm.models.precision.autocast_dtype`); False:
            float32 on every device.
        amp_dtype: ``float16`` or ``bfloat16``.
        amp_device: ``auto`` (CUDA, and a CPU with native support for ``amp_dtype``), ``cuda`` or ``cpu``.
        channels_last: ``auto`` (a convolutional backbone under CPU bfloat16 autocast), True or False: the 3D
            convolution weights, and so the activations between them, in channels-last 3D
            (:func:`dcm.models.precision.channels_last_active`).
        onednn: keep DCM's oneDNN 3D convolutions for CPU float32 (:mod:`dcm.models.onednn`); False: PyTorch's
            own choice of kernel.
        compile: run the image encoder through ``torch.compile`` (the first pass per input shape compiles;
            worth it on GPUs for long sessions; the weights and state-dict keys are unchanged).

    The network is prepared in place (its convolution classes and weight layout, and under autocast the dtype
    a backbone may store weights in; values up to that rounding and state-dict keys unchanged).

    Attributes:
        kind: the config name (``sam_med3d`` / ``vista3d``).
        normalise_scope: ``frame``: :meth:`normalise` takes the whole network frame after cropping, padding
            and resampling (its statistics include the padding); ``image``: :meth:`normalise` is a pointwise
            map with per-image statistics (:meth:`set_image`), applied to image values, and padding is 0
            after it.
        mask_size: side ``m`` of the mask prompt grid, or None when the backbone takes no mask prompt.
        convolutional: a convolutional network, where channels-last 3D pays under CPU bfloat16 (``auto``).
        autocast_dtype: the dtype the network autocasts to on :attr:`device`, None for float32.
        channels_last: whether the convolution weights (and activations) are channels-last 3D.
    """

    kind: str = ""
    normalise_scope: str = "frame"
    mask_size: Optional[int] = None
    convolutional: bool = False

    def __init__(
        self,
        model: torch.nn.Module,
        device: Union[str, torch.device] = "cpu",
        amp: bool = False,
        amp_dtype: str = "float16",
        amp_device: str = "auto",
        channels_last: Union[str, bool] = "auto",
        onednn: bool = True,
        compile: bool = False,
    ):
        from dcm.experts import resolve_device
        from dcm.models.onednn import channels_last_weights, use_pytorch_conv3d
        from dcm.models.precision import autocast_dtype, channels_last_active, use_channels_last_norms

        self.device = torch.device(resolve_device(str(device)))
        self.amp = bool(amp)
        self.amp_dtype = _amp_dtype(amp_dtype, self.kind)
        try:
            self.autocast_dtype = autocast_dtype(self.amp, self.amp_dtype, str(amp_device), self.device)
            self.channels_last = channels_last_active(channels_last, self.autocast_dtype, self.device,
                                                      self.convolutional)
        except ValueError as e:
            raise ConfigError(f"{self.kind}: {e}") from None
        self.amp_device = str(amp_device)
        self.onednn = bool(onednn)
        if not self.onednn:
            use_pytorch_conv3d(model)
        if self.channels_last:
            use_channels_last_norms(channels_last_weights(model))
        self.model = model.to(self.device).eval()
        self.compiled = bool(compile)
        # What encode() calls: the model's image encoder, or a compiled wrapper sharing its parameters.
        self.image_encoder = torch.compile(model.image_encoder) if self.compiled else model.image_encoder

    # ------------------------------------------------------------------ frame constraints

    def default_frame_size(self) -> int:
        """Side of the cubic frame used when the config gives none."""
        raise NotImplementedError

    def check_frame(self, size: Sequence[int], what: str) -> None:
        """Raise ConfigError unless a (z, y, x) frame of ``size`` suits this network; ``what`` names the key."""
        raise NotImplementedError

    def logit_grid(self, frame: Sequence[int]) -> ZYX:
        """(z, y, x) shape of :meth:`decode`'s logits for a frame of shape ``frame``."""
        return tuple(int(s) for s in frame)  # type: ignore[return-value]

    # ------------------------------------------------------------------ image and normalisation

    def set_image(self, image: np.ndarray) -> None:
        """A new (z, y, x) image: compute its per-image statistics, if the normalisation has any."""

    def reset(self) -> None:
        """Forget the image's statistics."""

    def normalise(self, values: np.ndarray) -> np.ndarray:
        """The network's intensity normalisation (see :attr:`normalise_scope`); float32, same shape."""
        raise NotImplementedError

    # ------------------------------------------------------------------ network

    @property
    def precision(self) -> str:
        """What runs, in words: ``bfloat16 autocast + channels-last 3D``, ``float32``, ..."""
        from dcm.models.precision import precision_label

        return precision_label(self.autocast_dtype, self.channels_last)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to :attr:`autocast_dtype` on :attr:`device` (see ``amp_device``); a no-op context for float32."""
        if self.autocast_dtype is not None:
            return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)
        return contextlib.nullcontext()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder output of a normalised frame ``x`` (1, 1, Z, Y, X) on :attr:`device`."""
        raise NotImplementedError

    def decode(
        self, embedding: torch.Tensor, coords: np.ndarray, labels: np.ndarray, mask: Optional[np.ndarray]
    ) -> torch.Tensor:
        """Prompt head: logits on :meth:`logit_grid` from an encoder output and frame prompts.

        Args:
            embedding: :meth:`encode`'s output for the frame.
            coords: (N, 3) frame voxel coordinates (z, y, x), float or int.
            labels: (N,) int, 1 foreground, 0 background.
            mask: (m, m, m) binary mask prompt (``m`` = :attr:`mask_size`), or None.
        """
        raise NotImplementedError

    def promptless_logits(self, frame: Sequence[int]) -> Optional[torch.Tensor]:
        """Logits for a frame of (z, y, x) shape ``frame`` without any click, when they do not depend on the
        image (the encoder need not run); None when :meth:`decode` must run (default)."""
        return None
