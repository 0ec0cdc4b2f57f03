"""The expert pipeline, written once for both experts: frame -> prompts -> cached embedding -> decode -> paste back.

An expert is a *frame* strategy over a :class:`~dcm.experts.backbones.Backbone`. The frame (:class:`Frame`)
is where the network input lies in the image: the global expert's resampled RoI
(:class:`dcm.experts.roi.GlobalRoI`) or the local expert's native-resolution window
(:class:`dcm.experts.local_roi.LocalWindow`). Per object and interaction :meth:`BackboneExpert.predict`

1. asks the expert for the object's frame (:meth:`BackboneExpert.frame_of`, expert-specific);
2. maps the object's clicks into it (:meth:`BackboneExpert.prompts_of`, expert-specific) and builds the
   mask prompt (:meth:`BackboneExpert.mask_prompt`: which source per :meth:`BackboneExpert.mask_prompt_source`,
   sampled by :meth:`Frame.mask_grid`);
3. takes the frame's encoder output from the expert's cache (:class:`EmbeddingCache`), or crops and
   normalises the frame (:meth:`BackboneExpert.frame_input`) and encodes it;
4. decodes the prompts to logits and pastes them back onto the image (:meth:`Frame.paste`).

The backbone is a plain adapter (normalise, encode, decode): it never calls back into the expert.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, Hashable, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

try:
    from typing import Protocol, runtime_checkable
except ImportError:  # pragma: no cover - Python < 3.8
    from typing_extensions import Protocol, runtime_checkable  # type: ignore[assignment]

from dcm.data.cases import ObjectPrompts
from dcm.errors import ConfigError
from dcm.experts.backbones import Backbone, build_backbone_model, load_backbone_weights
from dcm.experts.base import Expert, PointwiseMap, RoIPrediction, RoISlices
from dcm.prompts import ZYX

__all__ = ["BackboneExpert", "EmbeddingCache", "Frame", "MASK_PROMPT_SOURCES"]


#: What :meth:`BackboneExpert.mask_prompt_source` may answer.
MASK_PROMPT_SOURCES = ("none", "zeros", "previous")


@runtime_checkable
class Frame(Protocol):
    """Where an expert's network input lies in the image, and how image, clicks, masks and logits map.

    Implemented by :class:`dcm.experts.roi.GlobalRoI` (an RoI resampled to a cube) and
    :class:`dcm.experts.local_roi.LocalWindow` (a native-resolution, zero-padded window).
    """

    @property
    def key(self) -> Hashable:
        """Identifies the network input for one image (equal keys, equal inputs): the embedding cache key."""

    @property
    def frame_shape(self) -> ZYX:
        """(z, y, x) shape of the network input."""

    def image_region(self, image_shape: Sequence[int]) -> RoISlices:
        """(z, y, x) slices of the image the frame covers, clipped to the image (never empty)."""

    def crop(self, image: np.ndarray, pointwise: Optional[PointwiseMap] = None, mode: str = "trilinear") -> np.ndarray:
        """The (z, y, x) image on the frame: shape :attr:`frame_shape`, zero where the frame leaves the image.

        ``pointwise`` (a per-image normalisation) is applied to image values before padding / resampling, so
        that the padding is 0 after it; ``mode`` is the resampling of a resized frame.
        """

    def to_frame(self, zyx: Any) -> np.ndarray:
        """Image voxel coordinates (N, 3) (z, y, x) -> frame coordinates (N, 3)."""

    def mask_grid(self, label_map: np.ndarray, label: int, m: int) -> np.ndarray:
        """(m, m, m) float32 binary mask prompt: ``label_map == label`` of the whole (Z, Y, X) image on the
        frame, every ``frame / m``-th voxel."""

    def paste(
        self, logits: torch.Tensor, image_shape: Sequence[int], mode: str = "trilinear"
    ) -> Tuple[np.ndarray, RoISlices]:
        """Logits on a grid covering the frame -> ``(prob, slices)``: float32 probabilities of shape
        ``image[slices].shape`` on the frame's image region ``slices``."""


class EmbeddingCache:
    """Encoder outputs by frame key, least recently used dropped first.

    Attributes:
        size: entries kept.
        runs: encoder passes recorded with :meth:`put` (the cache saved the other lookups).
    """

    def __init__(self, size: int, who: str = "expert"):
        if int(size) < 1:
            raise ConfigError(f"{who}: cache_size must be >= 1, got {size!r}")
        self.size = int(size)
        self.runs = 0
        self._entries: "OrderedDict[Hashable, torch.Tensor]" = OrderedDict()

    def get(self, key: Hashable) -> Optional[torch.Tensor]:
        """The cached encoder output of ``key`` (now the most recently used), or None."""
        cached = self._entries.get(key)
        if cached is not None:
            self._entries.move_to_end(key)
        return cached

    def make_room(self) -> None:
        """Drop the least recently used entries until one more fits (before an encoder pass allocates)."""
        while len(self._entries) >= self.size:
            self._entries.popitem(last=False)

    def put(self, key: Hashable, embedding: torch.Tensor) -> None:
        """Store a fresh encoder output (counts one encoder run)."""
        self.make_room()
        self._entries[key] = embedding
        self.runs += 1

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class BackboneExpert(Expert):
    """An expert: a frame strategy over a :class:`~dcm.experts.backbones.Backbone`, with :meth:`predict`.

    Subclasses set ``defaults`` (their settings), ``role`` (the config section name), ``who`` (for
    messages) and ``prob_interpolation`` / ``image_interpolation`` (resampling of a resized frame), call
    :meth:`_build_backbone` in ``__init__``, and implement :meth:`frame_of`, :meth:`prompts_of` and
    :meth:`mask_prompt_source`.

    Attributes:
        backbone: the network adapter.
        embeddings: the encoder outputs of recent frames of the current image.
        image: the (z, y, x) image, or None before :meth:`set_image`.
        spacing_zyx: its (z, y, x) spacing in mm, or None when unknown.
    """

    defaults: Dict[str, Any] = {}
    role: str = "expert"
    who: str = "expert"
    image_interpolation: str = "trilinear"
    prob_interpolation: str = "trilinear"
    backbone: Backbone
    embeddings: EmbeddingCache

    # ------------------------------------------------------------------ construction

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

    def _build_backbone(
        self, model: Union[torch.nn.Module, Backbone], kind: Optional[str], options: Mapping[str, Any]
    ) -> None:
        """Wrap ``model`` (of the configured ``kind``, None: any) with :func:`backbone_options`' ``options``;
        set :attr:`backbone`, ``cfg['backbone']`` and an empty embedding cache of ``options['cache_size']``."""
        from dcm.experts.backbones import make_backbone

        self.backbone = make_backbone(model, kind, self.who, **options)
        self.cfg["backbone"] = self.backbone.kind
        self.embeddings = EmbeddingCache(int(options["cache_size"]), self.who)

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
        """How many times the backbone's image encoder ran (the embedding cache saved the other calls)."""
        return self.embeddings.runs

    # ------------------------------------------------------------------ image

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
        self.embeddings.clear()

    def clear_cache(self) -> None:
        """Drop the cached encoder outputs (the image stays)."""
        self.embeddings.clear()

    def _require_image(self) -> None:
        if self.image is None:
            raise RuntimeError(f"{self.who}: call set_image() first")

    # ------------------------------------------------------------------ what each expert defines

    def frame_of(self, obj: ObjectPrompts) -> Optional[Frame]:
        """The frame ``predict`` uses for ``obj`` now, or None when the expert cannot handle it."""
        raise NotImplementedError

    def prompts_of(self, obj: ObjectPrompts, frame: Frame) -> Tuple[np.ndarray, np.ndarray]:
        """The point prompts of ``obj`` in ``frame``: ``coords`` (N, 3) frame (z, y, x), ``labels`` (N,) 1 / 0."""
        raise NotImplementedError

    def mask_prompt_source(self, obj: ObjectPrompts) -> str:
        """What the mask prompt of ``obj`` is made of, one of :data:`MASK_PROMPT_SOURCES`: ``none`` (no mask
        prompt), ``zeros`` or ``previous`` (the previous prediction; zeros without one)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the pipeline

    def roi_of(self, obj: ObjectPrompts) -> Optional[RoISlices]:
        frame = self.frame_of(obj)
        return None if frame is None else frame.image_region(self.image.shape)  # type: ignore[union-attr]

    def mask_prompt(self, obj: ObjectPrompts, frame: Frame, prev_pred: Optional[np.ndarray]) -> Optional[np.ndarray]:
        """(m, m, m) float32 binary mask prompt (m = the backbone's mask size, 32 for SAM-Med3D), or None.

        None for a backbone without mask prompt (VISTA3D) and when :meth:`mask_prompt_source` says ``none``;
        zeros for ``zeros`` and without ``prev_pred``; else ``prev_pred == obj.label`` on the frame's grid
        (:meth:`Frame.mask_grid`).
        """
        m = self.backbone.mask_size
        if m is None:
            return None
        source = self.mask_prompt_source(obj)
        if source == "none":
            return None
        if source == "zeros" or prev_pred is None:
            return np.zeros((m, m, m), np.float32)
        if tuple(prev_pred.shape) != tuple(self.image.shape):  # type: ignore[union-attr]
            raise ValueError(f"{self.who}: prev_pred shape {prev_pred.shape} "
                             f"differs from the image {self.image.shape}")  # type: ignore[union-attr]
        return frame.mask_grid(prev_pred, obj.label, m)

    def frame_input(self, frame: Frame) -> torch.Tensor:
        """The normalised network input of ``frame``: (1, 1, *frame.frame_shape) float32 on the device."""
        self._require_image()
        if self.backbone.normalise_scope == "image":  # pointwise: the padding stays 0 after it
            x = frame.crop(self.image, pointwise=self.backbone.normalise,  # type: ignore[arg-type]
                           mode=self.image_interpolation)
        else:  # statistics of the whole network input, padding included
            x = self.backbone.normalise(frame.crop(self.image, mode=self.image_interpolation))  # type: ignore[arg-type]
        return torch.from_numpy(np.ascontiguousarray(x))[None, None].to(self.device)

    def image_embedding(self, frame: Frame) -> torch.Tensor:
        """Encoder output of ``frame``, from the cache when this frame of this image was encoded before."""
        embedding = self.embeddings.get(frame.key)
        if embedding is None:
            self.embeddings.make_room()  # free memory before the next pass
            embedding = self.backbone.encode(self.frame_input(frame))
            self.embeddings.put(frame.key, embedding)
        return embedding

    def frame_logits(
        self, frame: Frame, coords: np.ndarray, labels: np.ndarray, mask: Optional[np.ndarray] = None
    ) -> torch.Tensor:
        """Backbone logits on its grid over the frame (SAM-Med3D: (m, m, m); VISTA3D: the frame's shape) for
        clicks ``coords`` (N, 3) frame (z, y, x), ``labels`` (N,) and mask prompt ``mask`` (m, m, m) or None.

        Without a click, a backbone whose answer does not depend on the image (VISTA3D) does not encode.
        Float32 whatever the backbone's autocast dtype (the embedding is cached in that dtype).
        """
        if len(coords) == 0:
            logits = self.backbone.promptless_logits(frame.frame_shape)
            if logits is not None:
                return logits
        return self.backbone.decode(self.image_embedding(frame), coords, labels, mask).float()

    def predict(self, obj: ObjectPrompts, prev_pred: Optional[np.ndarray] = None) -> Optional[RoIPrediction]:
        """Segment ``obj`` in its frame.

        Args:
            obj: the object's prompts (label, box, clicks in order).
            prev_pred: (z, y, x) uint8 label map of the previous output, or None; read (on the frame) only by
                a backbone with a mask prompt (SAM-Med3D).

        Returns:
            ``RoIPrediction(roi, prob, name)``: ``roi`` the frame's image region, ``prob`` float32 in [0, 1] of
            shape ``image[roi].shape``; None when :meth:`frame_of` has no frame for the object.
        """
        frame = self.frame_of(obj)
        if frame is None:
            return None
        coords, labels = self.prompts_of(obj, frame)
        mask = self.mask_prompt(obj, frame, prev_pred)
        logits = self.frame_logits(frame, coords, labels, mask)
        prob, region = frame.paste(logits, self.image.shape, self.prob_interpolation)  # type: ignore[union-attr]
        return RoIPrediction(roi=region, prob=prob, expert=self.name)
