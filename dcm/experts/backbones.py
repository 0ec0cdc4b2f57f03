"""Backbones: the networks the two RoI strategies run, behind one small interface.

An RoI strategy (:mod:`dcm.experts.global_roi`, :mod:`dcm.experts.local_roi`) decides where its region lies
in the image and how the image, the clicks and the previous mask map into the network's *frame* and the
result back. A backbone is the network on that frame::

    frame image (1, 1, Z, Y, X)
    + clicks (N, 3) frame voxel coordinates (z, y, x), labels (N,) 1 fg / 0 bg
    + optional mask prompt (m, m, m)                    ->  logits on a grid covering the frame

and what a strategy needs to build that input: the frame sizes it accepts, its intensity normalisation
(and whether that is per frame or per image) and an encoder-output cache keyed by frame.

* :class:`SamMed3DBackbone` (``sam_med3d``): SAM-Med3D (:mod:`dcm.models.sam_med3d`). Frame = the model's
  ``img_size`` cube; z-normalisation over the frame's voxels > 0 (torchio's rule by default), padding
  included; mask prompt on an ``m``^3 grid (32) taken as every ``frame / m``-th voxel (``[::2]`` at 64);
  logits on that ``m``^3 grid (:meth:`SamMed3DBackbone.upsample` brings them to the frame).
* :class:`Vista3DBackbone` (``vista3d``): MONAI VISTA3D (:mod:`dcm.models.vista3d`), point head only. Any
  frame whose sides are divisible by the encoder's factor (16 for ``vista3d132``, 8 for the reduced model);
  the whole image's 1st..99th percentiles (computed once per image in :meth:`Vista3DBackbone.set_image`)
  mapped to [0, 1] before padding, padding 0; no mask prompt; logits on the frame itself.

Each expert builds its own backbone around its model: the config key ``backbone`` of either expert section
picks one (``global_expert.backbone: sam_med3d`` and ``local_expert.backbone: vista3d`` by default, DCM's
released pairing).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Dict, Hashable, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from dcm.errors import CheckpointError, ConfigError
from dcm.experts.base import Expert
from dcm.experts.roi import ZNORM_MODES, znorm_positive

__all__ = [
    "BACKBONES",
    "DEFAULT_MODELS",
    "Backbone",
    "BackboneExpert",
    "SamMed3DBackbone",
    "Vista3DBackbone",
    "backbone_kind_of",
    "backbone_options",
    "build_backbone_model",
    "intensity_percentiles",
    "load_backbone_weights",
    "make_backbone",
    "preset_kind",
    "scale_intensity",
    "vista3d_frame_factor",
]

ZYX = Tuple[int, int, int]

#: Backbone names accepted by ``global_expert.backbone`` / ``local_expert.backbone``.
BACKBONES = ("sam_med3d", "vista3d")

#: The model preset (``configs/models``) each backbone builds when the expert section names none.
DEFAULT_MODELS: Dict[str, str] = {"sam_med3d": "sam_med3d_64", "vista3d": "vista3d132"}


# ------------------------------------------------------------------------------------------ intensities


def intensity_percentiles(image: np.ndarray, lower: float = 1.0, upper: float = 99.0) -> Tuple[float, float]:
    """The ``lower`` and ``upper`` percentiles (linear interpolation) of the whole image; ``np.percentile``'s values.

    8- and 16-bit integer images (the challenge's uint8, CT's int16) take a histogram of the values, slab
    by slab: no copy of the image and no partition (``np.percentile`` partitions a whole copy; 2x faster on
    a 300 x 512 x 512 uint8 image). Other images go through ``np.percentile``.
    """
    values = np.asarray(image)
    if values.dtype.kind in "iu" and values.dtype.itemsize <= 2 and values.size:
        return _integer_percentiles(values, (lower, upper))  # type: ignore[return-value]
    lo, hi = np.percentile(values, [lower, upper])
    return float(lo), float(hi)


def _integer_percentiles(values: np.ndarray, percents: Sequence[float], slab: int = 1 << 22) -> Tuple[float, ...]:
    """``np.percentile(values, percents)`` (method ``linear``) of an 8- or 16-bit integer array from its histogram."""
    bits = 8 * values.dtype.itemsize
    flat = values.reshape(-1)
    # Signed values viewed as unsigned with the sign bit flipped are v + 2**(bits - 1): same order, and
    # np.bincount takes them without a widening copy of the slab.
    offset = (1 << (bits - 1)) if values.dtype.kind == "i" else 0
    unsigned = flat.view(np.dtype(f"u{values.dtype.itemsize}"))
    flip = unsigned.dtype.type(offset)
    counts = np.zeros(1 << bits, dtype=np.int64)
    for start in range(0, flat.size, slab):
        chunk = unsigned[start:start + slab]
        counts += np.bincount(chunk ^ flip if offset else chunk, minlength=counts.size)
    cumulative = np.cumsum(counts)
    n = flat.size
    vmin = -offset

    def order_statistic(rank: int) -> np.float64:
        """The value at 0-based position ``rank`` of the sorted array."""
        return np.float64(vmin + int(np.searchsorted(cumulative, rank, side="right")))

    out = []
    for percent in percents:
        # The same float steps as np.percentile's "linear" method, so the results are bitwise equal: virtual
        # index (n - 1) q, its two neighbours (both the last one from n - 1 on), then a two-sided lerp.
        q = np.float64(percent) / 100
        virtual = (n - 1) * q
        below = np.floor(virtual)
        gamma = virtual - below
        if virtual >= n - 1:
            a = b = order_statistic(n - 1)
        else:
            i = max(int(below), 0)
            a, b = order_statistic(i), order_statistic(i + 1)
        diff = b - a
        out.append(float(b - diff * (1 - gamma) if gamma >= 0.5 else a + diff * gamma))
    return tuple(out)


def scale_intensity(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map ``[lo, hi]`` to ``[0, 1]`` and clip; float32, same shape as ``values``.

    When ``hi == lo`` (at least 98% of the voxels share one value) the result is ``clip(values - lo, 0, 1)``,
    so a constant image gives zeros. MONAI's ``ScaleIntensityRangePercentiles`` returns ``values - lo``
    unclipped there; we keep the [0, 1] range the network was trained on.
    """
    out = np.asarray(values, dtype=np.float32) - np.float32(lo)
    if hi > lo:
        out /= np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0, out=out)


# ---------------------------------------------------------------------------------------------- backbones


class Backbone:
    """A network on a frame, with the hooks an RoI strategy needs.

    Args:
        model: the network (moved to ``device``, put in eval mode).
        device: ``cpu``, ``cuda``, ``auto`` ...
        amp: autocast on CUDA (a no-op elsewhere).
        amp_dtype: ``float16`` or ``bfloat16``.
        cache_size: encoder outputs kept (least recently used dropped first).
        compile: run the image encoder through ``torch.compile`` (the first pass per input shape compiles;
            worth it on GPUs for long sessions; the weights and state-dict keys are unchanged).

    Attributes:
        kind: the config name (``sam_med3d`` / ``vista3d``).
        normalise_scope: ``frame``: :meth:`normalise` takes the whole network frame after cropping, padding
            and resampling (its statistics include the padding); ``image``: :meth:`normalise` is a pointwise
            map with per-image statistics (:meth:`set_image`), applied to image values, and padding is 0
            after it.
        mask_size: side ``m`` of the mask prompt grid, or None when the backbone takes no mask prompt.
        encoder_runs: encoder passes so far (the cache saves the others).
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
        cache_size: int = 1,
        compile: bool = False,
    ):
        from dcm.experts import resolve_device

        self.device = torch.device(resolve_device(str(device)))
        self.amp = bool(amp)
        self.amp_dtype = _amp_dtype(amp_dtype, self.kind)
        if int(cache_size) < 1:
            raise ConfigError(f"{self.kind} backbone: cache_size must be >= 1, got {cache_size!r}")
        self.cache_size = int(cache_size)
        self.model = model.to(self.device).eval()
        self.compiled = bool(compile)
        # What encode() calls: the model's image encoder, or a compiled wrapper sharing its parameters.
        self.image_encoder = torch.compile(model.image_encoder) if self.compiled else model.image_encoder
        self.encoder_runs = 0
        self._cache: "OrderedDict[Hashable, torch.Tensor]" = OrderedDict()

    # ------------------------------------------------------------------ frame constraints

    def default_frame_size(self) -> int:
        """Side of the cubic frame used when the config gives none."""
        raise NotImplementedError

    def check_frame(self, size: Sequence[int], what: str) -> None:
        """Raise ConfigError unless a (z, y, x) frame of ``size`` suits this network; ``what`` names the key."""
        raise NotImplementedError

    def logit_grid(self, frame: Sequence[int]) -> ZYX:
        """(z, y, x) shape of :meth:`forward`'s logits for a frame of shape ``frame``."""
        return tuple(int(s) for s in frame)  # type: ignore[return-value]

    # ------------------------------------------------------------------ image and normalisation

    def set_image(self, image: np.ndarray) -> None:
        """A new (z, y, x) image: drop cached encoder outputs (and compute per-image statistics, if any)."""
        self.clear_cache()

    def reset(self) -> None:
        """Forget the image's statistics and every cached encoder output."""
        self.clear_cache()

    def clear_cache(self) -> None:
        self._cache.clear()

    def normalise(self, values: np.ndarray) -> np.ndarray:
        """The network's intensity normalisation (see :attr:`normalise_scope`); float32, same shape."""
        raise NotImplementedError

    # ------------------------------------------------------------------ network

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp and self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=self.amp_dtype)
        return contextlib.nullcontext()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder output of a normalised frame ``x`` (1, 1, Z, Y, X) (no cache)."""
        raise NotImplementedError

    def embedding(self, key: Hashable, make_input: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The encoder output of the frame ``key`` names, from the cache when that frame was encoded before.

        Args:
            key: identifies the network input for the current image (the strategy's RoI / window).
            make_input: builds the normalised (1, 1, Z, Y, X) input when it is not cached.
        """
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        while len(self._cache) >= self.cache_size:  # free memory before the next pass
            self._cache.popitem(last=False)
        embedding = self.encode(make_input())
        self.encoder_runs += 1
        self._cache[key] = embedding
        return embedding

    def decode(
        self, embedding: torch.Tensor, coords: np.ndarray, labels: np.ndarray, mask: Optional[np.ndarray]
    ) -> torch.Tensor:
        """Prompt head: logits on :meth:`logit_grid` from an encoder output and frame prompts."""
        raise NotImplementedError

    def forward(
        self,
        embed: Callable[[], torch.Tensor],
        frame: Sequence[int],
        coords: np.ndarray,
        labels: np.ndarray,
        mask: Optional[np.ndarray] = None,
    ) -> torch.Tensor:
        """Logits for one frame and its prompts.

        Args:
            embed: returns the frame's encoder output (the strategy's cached :meth:`embedding` call); not
                called when the answer does not depend on the image.
            frame: (z, y, x) shape of the network input.
            coords: (N, 3) frame voxel coordinates (z, y, x), float or int.
            labels: (N,) int, 1 foreground, 0 background.
            mask: (m, m, m) binary mask prompt (``m`` = :attr:`mask_size`), or None.

        Returns:
            Logits of shape :meth:`logit_grid` ``(frame)``, covering the whole frame.
        """
        return self.decode(embed(), coords, labels, mask)

    def upsample(self, logits: torch.Tensor, frame: Sequence[int]) -> torch.Tensor:
        """:meth:`forward`'s logits on the frame's own voxels, (z, y, x) shape ``frame``."""
        frame = tuple(int(s) for s in frame)
        if tuple(logits.shape) == frame:
            return logits
        return F.interpolate(logits[None, None].float(), size=frame, mode="trilinear", align_corners=False)[0, 0]


class SamMed3DBackbone(Backbone):
    """SAM-Med3D (:class:`dcm.models.SamMed3D`) as a backbone.

    Frame: the model's ``img_size`` cube (64 for SAM-Med3D-64, 128 for turbo); z-normalisation over the
    frame's voxels > 0 (``znorm``: ``torchio`` or ``monai``, see :func:`dcm.experts.roi.znorm_positive`);
    mask prompt on the prompt encoder's ``m``^3 grid (32), low-resolution logits on that grid.

    Args:
        model: the SAM-Med3D model.
        znorm: z-normalisation rule.
        **kwargs: see :class:`Backbone`.
    """

    kind = "sam_med3d"
    normalise_scope = "frame"

    def __init__(self, model: torch.nn.Module, znorm: str = "torchio", **kwargs: Any):
        if znorm not in ZNORM_MODES:
            raise ConfigError(f"sam_med3d backbone: znorm must be one of {ZNORM_MODES}, got {znorm!r}")
        self.znorm = znorm
        self.img_size = int(model.img_size)
        self.mask_size = int(model.prompt_encoder.mask_input_size[0])
        super().__init__(model, **kwargs)

    def default_frame_size(self) -> int:
        return self.img_size

    def check_frame(self, size: Sequence[int], what: str) -> None:
        size = tuple(int(s) for s in size)
        if size != (self.img_size,) * 3:
            raise ConfigError(
                f"{what} {size} must be the SAM-Med3D model's input size ({self.img_size},) * 3 (its img_size)"
            )

    def logit_grid(self, frame: Sequence[int]) -> ZYX:
        return (self.mask_size,) * 3  # type: ignore[return-value]

    def normalise(self, values: np.ndarray) -> np.ndarray:
        return znorm_positive(np.asarray(values, dtype=np.float32), self.znorm)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), self.autocast():
            return self.image_encoder(x)

    def decode(
        self, embedding: torch.Tensor, coords: np.ndarray, labels: np.ndarray, mask: Optional[np.ndarray]
    ) -> torch.Tensor:
        """Decoder logits (m, m, m) for clicks ``coords`` (N, 3) frame (z, y, x), ``labels`` (N,) and mask
        prompt ``mask`` (m, m, m) or None (``no_mask_embed``)."""
        pe = self.model.prompt_encoder
        points = None
        if len(coords):
            points = (
                torch.as_tensor(coords, dtype=torch.float32, device=self.device)[None],
                torch.as_tensor(labels, dtype=torch.long, device=self.device)[None],
            )
        masks = None if mask is None else torch.as_tensor(mask, dtype=torch.float32, device=self.device)[None, None]
        with torch.inference_mode(), self.autocast():
            sparse, dense = pe(points=points, boxes=None, masks=masks)
            logits, _ = self.model.mask_decoder(
                image_embeddings=embedding,
                image_pe=pe.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
        return logits[0, 0]


def vista3d_frame_factor(model: torch.nn.Module) -> ZYX:
    """What each (z, y, x) frame side must be divisible by for a VISTA3D ``model``.

    The encoder needs multiples of ``2 ** (levels - 1)`` (16 for vista3d132, 8 for the reduced model); the
    point head halves and doubles once more, so at least 2.
    """
    encoder = getattr(model, "image_encoder", None)
    factor = tuple(int(f) for f in encoder.shape_factor()) if hasattr(encoder, "shape_factor") else (1, 1, 1)
    return tuple(f * 2 // math.gcd(f, 2) for f in factor)  # type: ignore[return-value]


class Vista3DBackbone(Backbone):
    """MONAI VISTA3D (point head only) as a backbone.

    Frame: any (z, y, x) shape whose sides are divisible by :func:`vista3d_frame_factor`; intensities
    mapped with the whole image's ``percentiles`` (computed once per image in :meth:`set_image`) to [0, 1];
    no mask prompt; logits on the frame itself; with no click the logits are VISTA3D's "no prompt" value
    (-9999) everywhere and the encoder does not run.

    Args:
        model: a MONAI ``VISTA3D`` (:func:`dcm.models.vista3d.build_vista3d`).
        percentiles: (lower, upper) percentiles of the image mapped to 0 and 1.
        **kwargs: see :class:`Backbone`.
    """

    kind = "vista3d"
    normalise_scope = "image"
    mask_size = None

    def __init__(self, model: torch.nn.Module, percentiles: Sequence[float] = (1.0, 99.0), **kwargs: Any):
        self.percentiles = _percentiles(percentiles, self.kind)
        self.factor = vista3d_frame_factor(model)
        self.intensity_range: Optional[Tuple[float, float]] = None
        super().__init__(model, **kwargs)

    def default_frame_size(self) -> int:
        return 128

    def check_frame(self, size: Sequence[int], what: str) -> None:
        size = tuple(int(s) for s in size)
        if any(s % f for s, f in zip(size, self.factor)):
            raise ConfigError(f"{what} {size} must be divisible by {self.factor} for this model")

    def set_image(self, image: np.ndarray) -> None:
        super().set_image(image)
        self.intensity_range = intensity_percentiles(image, *self.percentiles)

    def reset(self) -> None:
        super().reset()
        self.intensity_range = None

    def normalise(self, values: np.ndarray) -> np.ndarray:
        if self.intensity_range is None:
            raise RuntimeError("vista3d backbone: call set_image() first (the percentiles are per image)")
        lo, hi = self.intensity_range
        return scale_intensity(values, lo, hi)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), self.autocast():
            # VISTA3D.forward's point-only path: the encoder's point branch, no class branch.
            embedding, _ = self.image_encoder(x, with_point=True, with_label=False)
        return embedding

    def decode(
        self, embedding: torch.Tensor, coords: np.ndarray, labels: np.ndarray, mask: Optional[np.ndarray]
    ) -> torch.Tensor:
        """Point-head logits (*frame) for clicks ``coords`` (N >= 1, 3) frame (z, y, x), ``labels`` (N,)."""
        if mask is not None:
            raise ValueError("vista3d backbone: VISTA3D's point head takes no mask prompt")
        point_coords = torch.as_tensor(coords, dtype=torch.float32, device=self.device)[None]
        point_labels = torch.as_tensor(labels, dtype=torch.long, device=self.device)[None]
        with torch.inference_mode(), self.autocast():
            # class_vector=None: supported-class token, as VISTA3D.forward with no class / prompt_class.
            logits = self.model.point_head(embedding, point_coords, point_labels, class_vector=None)
        return logits[0, 0]

    def forward(
        self,
        embed: Callable[[], torch.Tensor],
        frame: Sequence[int],
        coords: np.ndarray,
        labels: np.ndarray,
        mask: Optional[np.ndarray] = None,
    ) -> torch.Tensor:
        if len(coords) == 0:
            return torch.full(tuple(int(s) for s in frame), float(getattr(self.model, "NINF_VALUE", -9999)))
        return self.decode(embed(), coords, labels, mask)


_BACKBONE_CLASSES = {"sam_med3d": SamMed3DBackbone, "vista3d": Vista3DBackbone}


# ------------------------------------------------------------------------------------------- construction


def _amp_dtype(name: Any, who: str) -> torch.dtype:
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(str(name))
    if dtype is None:
        raise ConfigError(f"{who}: amp_dtype must be 'float16' or 'bfloat16', got {name!r}")
    return dtype


def _percentiles(value: Any, who: str) -> Tuple[float, float]:
    try:
        lower, upper = (float(p) for p in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{who}: percentiles must be two numbers (lower, upper), got {value!r}") from None
    if not 0.0 <= lower < upper <= 100.0:
        raise ConfigError(f"{who}: percentiles must satisfy 0 <= lower < upper <= 100, got {value}")
    return lower, upper


def backbone_options(cfg: Mapping[str, Any], who: str, cache_size: int = 1) -> Dict[str, Any]:
    """Validate an expert section's backbone settings; returns them as :func:`make_backbone` options.

    Reads ``backbone``, ``device``, ``amp``, ``amp_dtype``, ``compile``, ``znorm`` (used by ``sam_med3d``) and
    ``percentiles`` (used by ``vista3d``); raises ConfigError naming ``who`` for a bad value.
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
        "cache_size": int(cache_size),
        "compile": bool(cfg.get("compile", False)),
        "znorm": cfg.get("znorm", "torchio"),
        "percentiles": _percentiles(cfg.get("percentiles", (1.0, 99.0)), who),
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
        **options: :class:`Backbone` settings plus ``znorm`` (SAM-Med3D) and ``percentiles`` (VISTA3D);
            those of the other backbone are ignored.
    """
    found = model.kind if isinstance(model, Backbone) else backbone_kind_of(model)
    if kind is not None and kind != found:
        raise ConfigError(f"{who}: backbone is {kind!r} but the model is a {found} network")
    if isinstance(model, Backbone):
        return model
    own = {"sam_med3d": ("znorm",), "vista3d": ("percentiles",)}
    other = {k for name, keys in own.items() if name != found for k in keys}
    return _BACKBONE_CLASSES[found](model, **{k: v for k, v in options.items() if k not in other})


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


class BackboneExpert(Expert):
    """What the global-RoI and local-RoI experts share: a :class:`Backbone`, construction from config,
    and the image they answer for. Subclasses set ``defaults`` (their settings), ``role`` (the config
    section name) and ``who`` (for messages), and implement the RoI strategy.
    """

    defaults: Dict[str, Any] = {}
    role: str = "expert"
    who: str = "expert"
    backbone: Backbone

    @classmethod
    def check_config(cls, cfg: Mapping[str, Any]) -> None:
        """Reject bad settings before any network is built (default: nothing to check)."""

    @classmethod
    def from_config(
        cls,
        cfg: Optional[Mapping[str, Any]] = None,
        weights: Optional[Union[str, Path, Mapping[str, Any]]] = None,
        device: Optional[Union[str, torch.device]] = None,
        trusted: bool = False,
    ):
        """Build the backbone's network from ``cfg['model']`` and load ``weights`` (strictly by default).

        Args:
            cfg: expert settings; ``backbone`` picks the network (``sam_med3d`` or ``vista3d``); ``model`` is a
                model config dict, a preset name in ``configs/models`` or a YAML path, of that backbone
                (absent: the backbone's full-size preset); ``checkpoint_key`` picks this expert inside a
                checkpoint (by role, whatever the backbone: ``model_state_dict`` for the global expert and
                ``model`` for the local one in DCM's combined file; ``None`` lets the loader pick);
                ``init_partial`` (SAM-Med3D only) loads by name + shape and prints what was skipped.
            weights: a checkpoint path or an already loaded checkpoint / state dict; None keeps random weights.
            device: overrides ``cfg['device']``.
            trusted: allow full unpickling of the checkpoint (only for files you trust).

        Raises:
            dcm.errors.CheckpointError: (strict) the checkpoint misses a tensor, has unexpected ones or other
                shapes.
        """
        cfg = dict(cfg or {})
        cls.check_config(cfg)
        if device is not None:
            cfg["device"] = str(device)
        kind = cfg.get("backbone", cls.defaults["backbone"])
        model = build_backbone_model(kind, cfg.get("model"), cls.role)
        if weights is not None:
            key = cfg.get("checkpoint_key", cls.defaults["checkpoint_key"])
            partial = bool(cfg.get("init_partial", cls.defaults["init_partial"]))
            load_backbone_weights(model, weights, key, trusted, partial)
        return cls(model, {**cfg, "backbone": kind})

    @property
    def model(self) -> torch.nn.Module:
        """The backbone's network."""
        return self.backbone.model

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    @property
    def amp_dtype(self) -> torch.dtype:
        return self.backbone.amp_dtype

    @property
    def encoder_runs(self) -> int:
        """How many times the backbone's image encoder ran (its cache saved the other calls)."""
        return self.backbone.encoder_runs

    def set_image(self, image: np.ndarray, spacing_zyx: Optional[Tuple[float, float, float]] = None) -> None:
        """Set the (z, y, x) image and its (z, y, x) spacing in mm (None: unknown); drops every cache."""
        image = np.asarray(image)
        if image.ndim != 3 or min(image.shape) < 1:
            raise ValueError(f"{self.who}: image must be a non-empty (z, y, x) array, got shape {image.shape}")
        self.reset()
        self.image = image
        self.spacing_zyx = None if spacing_zyx is None else tuple(float(v) for v in spacing_zyx)
        self.backbone.set_image(image)

    def reset(self) -> None:
        """Forget the image and every cache."""
        self.image: Optional[np.ndarray] = None
        self.spacing_zyx: Optional[Tuple[float, float, float]] = None
        self.backbone.reset()
