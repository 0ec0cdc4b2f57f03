"""The local-RoI expert: MONAI VISTA3D on one native-resolution window centred at the last click.

Per object and interaction:

1. the window (default 128^3) is centred at the object's last click and shifted to lie inside the image;
   along an axis where the image is smaller than the window it covers the whole axis and the input is
   zero-padded (after normalisation) to the window size, half before and half after;
2. the crop is normalised with the image's 1st..99th percentiles (computed once per image) to [0, 1];
3. the object's clicks inside the window (or only the last one) are given to VISTA3D's point head as
   window voxel indices in (z, y, x) order with labels 1 (fg) / 0 (bg), without a class prompt;
4. ``sigmoid(logits)`` on the window, padding removed, is the result on the window's image region.

We own the window logic instead of calling ``monai.apps.vista3d.inferer.point_based_window_inferer``,
which drops a click lying on a window's first voxel, sums overlapping windows and runs one window per
click. The encoder output of the last window is cached, so a further click whose window is the same
crop of the same image only reruns the (cheap) point head.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from dcm.data.cases import Click, ObjectPrompts
from dcm.errors import CheckpointError, ConfigError
from dcm.experts.base import Expert, RoIPrediction, RoISlices

__all__ = [
    "LOCAL_ROI_DEFAULTS",
    "LocalWindow",
    "LocalRoIExpert",
    "intensity_percentiles",
    "scale_intensity",
    "place_window",
    "window_clicks",
]

#: Expert settings (``cfg`` of :class:`LocalRoIExpert`) and their defaults.
LOCAL_ROI_DEFAULTS: Dict[str, Any] = {
    # (z, y, x) window size, or one int for a cube; each must suit the encoder (multiple of 16 for vista3d132).
    "window_size": 128,
    # Clicks given to VISTA3D: all of the object's clicks inside the window, or only the last one.
    "clicks": "inside_window",
    # Use the box centre as a positive click for an object that has a box but no click yet.
    "box_center_as_click": False,
    # None: every window is centred at the last click (DCM). An int m: keep the previous window of the same
    # image (and its cached encoder output) while the last click lies >= m voxels inside its inner edges.
    "reuse_window_margin": None,
    # Percentiles of the whole image mapped to 0 and 1.
    "percentiles": (1.0, 99.0),
    "device": "cpu",
    # Autocast (CUDA only) and its dtype.
    "amp": False,
    "amp_dtype": "float16",
    # Model config (dict, preset name or YAML path) and checkpoint key, used by ``from_config``.
    "model": "vista3d132",
    "checkpoint_key": "model",
}

ZYX = Tuple[int, int, int]


# ------------------------------------------------------------------------------------------ intensities


def intensity_percentiles(image: np.ndarray, lower: float = 1.0, upper: float = 99.0) -> Tuple[float, float]:
    """The ``lower`` and ``upper`` percentiles (linear interpolation, as ``np.percentile``) of the whole image."""
    lo, hi = np.percentile(image, [lower, upper])
    return float(lo), float(hi)


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


# ------------------------------------------------------------------------------------------------ windows


@dataclass(frozen=True)
class LocalWindow:
    """Where one local window lies.

    Attributes:
        roi: (z, y, x) slices of the image region the window covers (inside the image, never empty).
        pad: per axis (z, y, x), the zeros added (before, after) the region to reach ``size``.
        size: (z, y, x) shape of the network input: ``roi`` extent + padding.
        center: the (z, y, x) voxel the window was centred at (the last click, or the box centre).
    """

    roi: RoISlices
    pad: Tuple[Tuple[int, int], Tuple[int, int], Tuple[int, int]]
    size: ZYX
    center: ZYX

    @property
    def start(self) -> ZYX:
        """(z, y, x) of the window's first image voxel."""
        return tuple(s.start for s in self.roi)  # type: ignore[return-value]

    @property
    def key(self) -> Tuple[Tuple[int, int], ...]:
        """Identifies the crop (same key = same network input for the same image)."""
        return tuple((s.start, s.stop) for s in self.roi) + tuple(self.pad)

    def contains(self, zyx: Sequence[int]) -> bool:
        """Whether image voxel ``zyx`` lies inside the window's image region."""
        return all(s.start <= int(p) < s.stop for s, p in zip(self.roi, zyx))

    def to_window(self, zyx: Sequence[int]) -> ZYX:
        """Image voxel (z, y, x) -> voxel index in the (padded) network input."""
        shifted = (int(p) - s.start + before for p, s, (before, _) in zip(zyx, self.roi, self.pad))
        return tuple(shifted)  # type: ignore[return-value]


def place_window(center_zyx: Sequence[int], image_shape: Sequence[int], window_size: Sequence[int]) -> LocalWindow:
    """The window of ``window_size`` centred at ``center_zyx`` and shifted to lie inside the image.

    Along each axis with image size ``S`` and window size ``W``: if ``S >= W`` the window is
    ``[c - W // 2, c - W // 2 + W)`` clamped to ``[0, S - W]``; otherwise it is the whole axis ``[0, S)`` and
    ``W - S`` zeros are padded, ``(W - S) // 2`` before and the rest after.
    """
    roi: List[slice] = []
    pad: List[Tuple[int, int]] = []
    for c, s, w in zip(center_zyx, image_shape, window_size):
        c, s, w = int(c), int(s), int(w)
        if s <= w:
            roi.append(slice(0, s))
            pad.append(((w - s) // 2, w - s - (w - s) // 2))
        else:
            start = min(max(c - w // 2, 0), s - w)
            roi.append(slice(start, start + w))
            pad.append((0, 0))
    return LocalWindow(
        roi=tuple(roi),  # type: ignore[arg-type]
        pad=tuple(pad),  # type: ignore[arg-type]
        size=tuple(int(w) for w in window_size),  # type: ignore[arg-type]
        center=tuple(int(c) for c in center_zyx),  # type: ignore[arg-type]
    )


def window_clicks(
    clicks: Sequence[Click], window: LocalWindow, mode: str = "inside_window"
) -> Tuple[np.ndarray, np.ndarray]:
    """The clicks VISTA3D gets for ``window``, in window coordinates.

    Args:
        clicks: the object's clicks in order (image (z, y, x) voxels).
        window: the window.
        mode: ``inside_window`` (every click inside the window's image region, in order) or ``last``
            (the last click only).

    Returns:
        ``coords`` (N, 3) int64 (z, y, x) voxel indices in the padded window, and ``labels`` (N,) int64,
        1 for a foreground and 0 for a background click. Clicks outside the window are dropped.
    """
    if mode not in ("inside_window", "last"):
        raise ConfigError(f"local expert: clicks must be 'inside_window' or 'last', got {mode!r}")
    chosen = list(clicks) if mode == "inside_window" else list(clicks[-1:])
    chosen = [c for c in chosen if window.contains(c.zyx)]
    coords = np.array([window.to_window(c.zyx) for c in chosen], dtype=np.int64).reshape(-1, 3)
    labels = np.array([1 if c.positive else 0 for c in chosen], dtype=np.int64)
    return coords, labels


# ------------------------------------------------------------------------------------------------- expert


def _load_vista3d_weights(
    model: torch.nn.Module, weights: Union[str, Path, Mapping[str, Any]], key: Optional[str], trusted: bool
) -> None:
    """Strictly load VISTA3D weights from any of the layouts seen in the wild.

    ``key`` (``model``) is used when the checkpoint has it, which covers DCM's combined file (whose first
    wrapper key, ``model_state_dict``, is the *global* expert), ``{'model': sd, 'epoch', 'step'}`` and DDP
    files; a raw state dict has no wrapper and is loaded as is. The file is read once.
    """
    from dcm.checkpoints import load_checkpoint, load_into

    path = weights if isinstance(weights, (str, os.PathLike)) else None
    ckpt = load_checkpoint(path, trusted=trusted) if path is not None else weights
    if key is not None and not (isinstance(ckpt, Mapping) and isinstance(ckpt.get(key), Mapping)):
        key = None
    try:
        load_into(model, ckpt, strict=True, key=key)
    except CheckpointError as e:
        if path is None:
            raise
        msg = str(e)
        msg = msg[len("<state dict>: "):] if msg.startswith("<state dict>: ") else msg
        raise CheckpointError(f"{path}: {msg}") from e


def _as_zyx(value: Union[int, Sequence[int]], what: str) -> ZYX:
    if isinstance(value, (int, np.integer)):
        value = (int(value),) * 3
    try:
        out = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"local expert: {what} must be an int or 3 ints, got {value!r}") from None
    if len(out) != 3 or any(v <= 0 for v in out):
        raise ConfigError(f"local expert: {what} must be positive, one int or 3 ints (z, y, x), got {value!r}")
    return out  # type: ignore[return-value]


class LocalRoIExpert(Expert):
    """DCM's local-RoI expert around MONAI VISTA3D (point head only).

    Args:
        model: a MONAI ``VISTA3D`` (``dcm.models.vista3d.build_vista3d``), with weights loaded.
        cfg: settings, keys of :data:`LOCAL_ROI_DEFAULTS` (missing keys take the defaults).

    Attributes:
        window_size: (z, y, x) network input size.
        encoder_runs: number of times the image encoder ran (the cache saves the others).
    """

    name = "local"

    def __init__(self, model: torch.nn.Module, cfg: Optional[Mapping[str, Any]] = None):
        cfg = dict(cfg or {})
        unknown = sorted(set(cfg) - set(LOCAL_ROI_DEFAULTS))
        if unknown:
            raise ConfigError(f"local expert: unknown keys {unknown} (known: {sorted(LOCAL_ROI_DEFAULTS)})")
        self.cfg: Dict[str, Any] = {**LOCAL_ROI_DEFAULTS, **cfg}
        self.window_size: ZYX = _as_zyx(self.cfg["window_size"], "window_size")
        factor = self._size_factor(model)
        bad = [w for w, f in zip(self.window_size, factor) if w % f]
        if bad:
            raise ConfigError(
                f"local expert: window_size {self.window_size} must be divisible by {factor} for this model"
            )
        if self.cfg["clicks"] not in ("inside_window", "last"):
            raise ConfigError(f"local expert: clicks must be 'inside_window' or 'last', got {self.cfg['clicks']!r}")
        lower, upper = (float(p) for p in self.cfg["percentiles"])
        if not 0.0 <= lower < upper <= 100.0:
            raise ConfigError(
                f"local expert: percentiles must satisfy 0 <= lower < upper <= 100, got {self.cfg['percentiles']}"
            )
        self.percentiles = (lower, upper)
        margin = self.cfg["reuse_window_margin"]
        if margin is not None and (not isinstance(margin, (int, np.integer)) or margin < 0):
            raise ConfigError(f"local expert: reuse_window_margin must be None or an int >= 0, got {margin!r}")
        self.device = torch.device(self.cfg["device"])
        self.amp_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(str(self.cfg["amp_dtype"]))
        if self.amp_dtype is None:
            raise ConfigError(f"local expert: amp_dtype must be 'float16' or 'bfloat16', got {self.cfg['amp_dtype']!r}")
        self.model = model.to(self.device).eval()
        self.encoder_runs = 0
        self.reset()

    # ------------------------------------------------------------------ construction

    @staticmethod
    def _size_factor(model: torch.nn.Module) -> ZYX:
        # The encoder needs sizes divisible by 2 ** (levels - 1); the point head halves and doubles once more.
        encoder = getattr(model, "image_encoder", None)
        factor = tuple(int(f) for f in encoder.shape_factor()) if hasattr(encoder, "shape_factor") else (1, 1, 1)
        return tuple(f * 2 // math.gcd(f, 2) for f in factor)  # type: ignore[return-value]

    @classmethod
    def from_config(
        cls,
        cfg: Optional[Mapping[str, Any]] = None,
        weights: Optional[Union[str, Path, Mapping[str, Any]]] = None,
        device: Optional[Union[str, torch.device]] = None,
        trusted: bool = False,
    ) -> "LocalRoIExpert":
        """Build VISTA3D from ``cfg['model']`` and load ``weights`` strictly.

        Args:
            cfg: expert settings; ``model`` is a model config dict, a preset name in ``configs/models`` or a
                YAML path; ``checkpoint_key`` picks VISTA3D inside a checkpoint (``model``, as in DCM's combined
                file and MONAI/NVIDIA training checkpoints; ``None`` lets the loader pick).
            weights: a checkpoint path or an already loaded checkpoint / state dict; None keeps random weights.
            device: overrides ``cfg['device']``.
            trusted: allow full unpickling of the checkpoint (only for files you trust).

        Raises:
            dcm.errors.CheckpointError: the checkpoint misses a tensor, has unexpected ones or other shapes.
        """
        from dcm.models.vista3d import build_vista3d, load_vista3d_config

        cfg = dict(cfg or {})
        model_cfg = cfg.get("model", LOCAL_ROI_DEFAULTS["model"])
        if not isinstance(model_cfg, Mapping):
            model_cfg = load_vista3d_config(model_cfg)
        if device is not None:
            cfg["device"] = str(device)
        model = build_vista3d(model_cfg)
        if weights is not None:
            key = cfg.get("checkpoint_key", LOCAL_ROI_DEFAULTS["checkpoint_key"])
            _load_vista3d_weights(model, weights, key, trusted)
        return cls(model, cfg)

    # ------------------------------------------------------------------ Expert API

    def set_image(self, image: np.ndarray, spacing_zyx: Optional[Tuple[float, float, float]] = None) -> None:
        """Set the (z, y, x) image; computes its percentiles once and drops the cached encoder output."""
        image = np.asarray(image)
        if image.ndim != 3 or min(image.shape) < 1:
            raise ValueError(f"local expert: image must be a non-empty (z, y, x) array, got shape {image.shape}")
        self.reset()
        self.image = image
        self.spacing_zyx = spacing_zyx
        self.intensity_range = intensity_percentiles(image, *self.percentiles)

    def reset(self) -> None:
        """Forget the image and every cache."""
        self.image: Optional[np.ndarray] = None
        self.spacing_zyx: Optional[Tuple[float, float, float]] = None
        self.intensity_range: Optional[Tuple[float, float]] = None
        self._cached_window: Optional[LocalWindow] = None
        self._cached_embedding: Optional[torch.Tensor] = None

    def window_center(self, obj: ObjectPrompts) -> Optional[ZYX]:
        """The (z, y, x) voxel the object's window is centred at: its last click, else (per config) its box centre."""
        if obj.clicks:
            return tuple(int(v) for v in obj.clicks[-1].zyx)  # type: ignore[return-value]
        if obj.box is not None and self.cfg["box_center_as_click"]:
            return tuple((lo + hi) // 2 for lo, hi in obj.box.bounds_zyx)  # type: ignore[return-value]
        return None

    def window_of(self, obj: ObjectPrompts) -> Optional[LocalWindow]:
        """The window ``predict`` would use for ``obj`` now, or None when the object has no click."""
        self._require_image()
        center = self.window_center(obj)
        if center is None:
            return None
        window = place_window(center, self.image.shape, self.window_size)  # type: ignore[union-attr]
        cached = self._cached_window
        margin = self.cfg["reuse_window_margin"]
        if margin is not None and cached is not None and window.key != cached.key:
            if self._inside_with_margin(center, cached, int(margin)):
                return LocalWindow(roi=cached.roi, pad=cached.pad, size=cached.size, center=center)
        return window

    def _inside_with_margin(self, zyx: ZYX, window: LocalWindow, margin: int) -> bool:
        # Edges on the image border do not count: a fresh window would be clamped there too.
        for c, s, n in zip(zyx, window.roi, self.image.shape):  # type: ignore[union-attr]
            if not s.start <= c < s.stop:
                return False
            if (s.start > 0 and c - s.start < margin) or (s.stop < n and s.stop - 1 - c < margin):
                return False
        return True

    def roi_of(self, obj: ObjectPrompts) -> Optional[RoISlices]:
        window = self.window_of(obj)
        return None if window is None else window.roi

    def prompts_of(self, obj: ObjectPrompts, window: LocalWindow) -> Tuple[np.ndarray, np.ndarray]:
        """(coords (N, 3), labels (N,)) in window coordinates for ``obj``; see :func:`window_clicks`."""
        clicks = list(obj.clicks)
        if not clicks:  # the box centre stands in for the first click
            clicks = [Click(window.center, True)]
        return window_clicks(clicks, window, self.cfg["clicks"])

    def predict(self, obj: ObjectPrompts, prev_pred: Optional[np.ndarray] = None) -> Optional[RoIPrediction]:
        """Segment ``obj`` in the window at its last click.

        ``prev_pred`` is not used: VISTA3D's point head takes no mask prompt.

        Returns:
            ``RoIPrediction(roi, prob, 'local')`` with ``prob`` float32 in [0, 1] of shape ``image[roi].shape``,
            or None when the object has no click (nor, with ``box_center_as_click``, a box).
        """
        window = self.window_of(obj)
        if window is None:
            return None
        coords, labels = self.prompts_of(obj, window)
        logits = self.window_logits(window, coords, labels)
        inner = tuple(slice(b, w - a) for (b, a), w in zip(window.pad, window.size))
        prob = torch.sigmoid(logits[inner].float()).cpu().numpy().astype(np.float32, copy=False)
        return RoIPrediction(roi=window.roi, prob=prob, expert=self.name)

    # ------------------------------------------------------------------ network

    def window_input(self, window: LocalWindow) -> torch.Tensor:
        """The normalised, padded network input of ``window``: (1, 1, *window.size) float32 on the device."""
        self._require_image()
        lo, hi = self.intensity_range  # type: ignore[misc]
        crop = scale_intensity(self.image[window.roi], lo, hi)  # type: ignore[index]
        if any(b or a for b, a in window.pad):
            crop = np.pad(crop, window.pad, mode="constant", constant_values=0.0)
        return torch.from_numpy(np.ascontiguousarray(crop))[None, None].to(self.device)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.cfg["amp"] and self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=self.amp_dtype)
        return contextlib.nullcontext()

    def image_embedding(self, window: LocalWindow) -> torch.Tensor:
        """Encoder output (1, C, *window.size) of ``window``: reused when the last call had the same crop."""
        cached = self._cached_window
        if cached is None or cached.key != window.key or self._cached_embedding is None:
            self._cached_embedding, self._cached_window = None, None  # free it before the next pass
            x = self.window_input(window)
            with torch.inference_mode(), self._autocast():
                # VISTA3D.forward's point-only path: the encoder's point branch, no class branch.
                embedding, _ = self.model.image_encoder(x, with_point=True, with_label=False)
            self.encoder_runs += 1
            self._cached_embedding, self._cached_window = embedding, window
        return self._cached_embedding

    def window_logits(self, window: LocalWindow, coords: np.ndarray, labels: np.ndarray) -> torch.Tensor:
        """Point-head logits (*window.size) for clicks ``coords`` (N, 3) (z, y, x) window voxels, ``labels`` (N,).

        With no click inside the window the logits are VISTA3D's "no prompt" value (-9999) everywhere.
        """
        if len(coords) == 0:
            return torch.full(window.size, float(getattr(self.model, "NINF_VALUE", -9999)))
        embedding = self.image_embedding(window)
        point_coords = torch.as_tensor(coords, dtype=torch.float32, device=self.device)[None]
        point_labels = torch.as_tensor(labels, dtype=torch.long, device=self.device)[None]
        with torch.inference_mode(), self._autocast():
            # class_vector=None: supported-class token, as VISTA3D.forward with no class / prompt_class.
            logits = self.model.point_head(embedding, point_coords, point_labels, class_vector=None)
        return logits[0, 0]

    def _require_image(self) -> None:
        if self.image is None:
            raise RuntimeError("local expert: call set_image() first")
