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
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(str(name))
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
        amp: autocast on CUDA (a no-op elsewhere).
        amp_dtype: ``float16`` or ``bfloat16``.
        compile: run the image encoder through ``torch.compile`` (the first pass per input shape compiles;
            worth it on GPUs for long sessions; the weights and state-dict keys are unchanged).

    Attributes:
        kind: the config name (``sam_med3d`` / ``vista3d``).
        normalise_scope: ``frame``: :meth:`normalise` takes the whole network frame after cropping, padding
            and resampling (its statistics include the padding); ``image``: :meth:`normalise` is a pointwise
            map with per-image statistics (:meth:`set_image`), applied to image values, and padding is 0
            after it.
        mask_size: side ``m`` of the mask prompt grid, or None when the backbone takes no mask prompt.
    """

    kind: str = ""
    normalise_scope: str = "frame"
    mask_size: Optional[int] = None

    def __init__(
        self,
        model: torch.nn.Module,
        device: Union[str, torch.device] = "cpu",
        amp: bool = False,
        amp_dtype: str = "float16",
        compile: bool = False,
    ):
        from dcm.experts import resolve_device

        self.device = torch.device(resolve_device(str(device)))
        self.amp = bool(amp)
        self.amp_dtype = _amp_dtype(amp_dtype, self.kind)
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

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to :attr:`amp_dtype` on CUDA with ``amp``; a no-op context otherwise."""
        if self.amp and self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=self.amp_dtype)
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
