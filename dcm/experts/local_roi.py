"""The local-RoI expert: one native-resolution window centred at the last click, on any backbone.

The window strategy (this module) is separate from the network (:mod:`dcm.experts.backbones`, config key
``backbone``): MONAI VISTA3D on a 128^3 window (DCM's released pairing, the default) or SAM-Med3D on a window
of its ``img_size`` (64^3 for SAM-Med3D-64, 128^3 for turbo; the design card's pairing). This module holds
the window (the expert's frame, :class:`LocalWindow`), its placement, the clicks in it and the settings; the
steps are run by :meth:`dcm.experts.pipeline.BackboneExpert.predict`. Per object and interaction:

1. the window (``window_size``; default the backbone's own: 128^3 for VISTA3D, SAM-Med3D's ``img_size``^3)
   is centred at the object's last click and shifted to lie inside the image; along an axis where the image
   is smaller than the window it covers the whole axis and the input is zero-padded to the window size, half
   before and half after;
2. the crop is normalised by the backbone: VISTA3D maps the image's 1st..99th percentiles (computed once
   per image) to [0, 1] and pads with 0 after that; SAM-Med3D z-normalises the padded window over its
   voxels > 0;
3. the object's clicks inside the window (or only the last one) are given to the backbone as window voxel
   indices in (z, y, x) order with labels 1 (fg) / 0 (bg) (VISTA3D's point head, without a class prompt);
   SAM-Med3D also gets the object's previous mask in the window (``mask_prompt: previous``) on its 32^3 grid;
4. ``sigmoid(logits)`` on the window (SAM-Med3D's 32^3 logits upsampled trilinearly to it), padding removed,
   is the result on the window's image region.

We own the window logic instead of calling ``monai.apps.vista3d.inferer.point_based_window_inferer``,
which drops a click lying on a window's first voxel, sums overlapping windows and runs one window per
click. The encoder output of the last window is cached, so a further click whose window is the same
crop of the same image only reruns the (cheap) prompt head.

``window_inferer: released`` (VISTA3D only; the ``released`` preset) reproduces the released DCM instead: it
calls that MONAI inferer as the release does, on the whole normalised image, with the object's clicks (its
foreground clicks, then its background ones), one window per click, no previous mask and no cache; the
result covers the bounding box of those windows, 0 where none of them lies (the release's NaN > 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from dcm.data.cases import Click, ObjectPrompts
from dcm.data.intensity import intensity_percentiles, scale_intensity
from dcm.config_schema import LocalExpertConfig, as_zyx
from dcm.errors import ConfigError
from dcm.experts.backbones import Backbone, backbone_options, vista3d_frame_factor
from dcm.experts.base import PointwiseMap, RoIPrediction, RoISlices
from dcm.experts.pipeline import BackboneExpert
from dcm.prompts import ZYX, box_center
from dcm.regions import union_region

__all__ = [
    "LOCAL_ROI_DEFAULTS",
    "LocalWindow",
    "LocalRoIExpert",
    "intensity_percentiles",
    "scale_intensity",
    "place_window",
    "released_click_order",
    "window_clicks",
]

#: Expert settings (``cfg`` of :class:`LocalRoIExpert`) and their defaults: the ``local_expert`` section,
#: written (with what each key means) in :class:`dcm.config_schema.LocalExpertConfig`.
LOCAL_ROI_DEFAULTS: Dict[str, Any] = LocalExpertConfig().to_dict()

_WHO = "local expert"


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

    # ------------------------------------------------------------------ frame (dcm.experts.pipeline.Frame)

    @property
    def frame_shape(self) -> ZYX:
        """(z, y, x) shape of the network input: :attr:`size`."""
        return self.size

    @property
    def padded(self) -> bool:
        """Whether the window reaches outside the image on some axis (zeros are padded there)."""
        return any(b or a for b, a in self.pad)

    def image_region(self, image_shape: Sequence[int]) -> RoISlices:
        """(z, y, x) slices of the image the window covers: :attr:`roi` (always inside the image)."""
        return self.roi

    def to_frame(self, zyx: Any) -> np.ndarray:
        """Image voxels (N, 3) (z, y, x) -> (N, 3) int64 voxel indices in the padded window (:meth:`to_window`)."""
        offset = np.array([before - s.start for s, (before, _) in zip(self.roi, self.pad)], dtype=np.int64)
        return np.asarray(zyx, dtype=np.int64).reshape(-1, 3) + offset

    def crop(self, image: np.ndarray, pointwise: Optional[PointwiseMap] = None, mode: str = "trilinear") -> np.ndarray:
        """The window's image region zero-padded to (*size) float32, at native resolution (``mode`` unused).

        ``pointwise`` (a per-image normalisation) maps the image values before padding, so the padding stays
        0 after it; None keeps the raw values.
        """
        values = image[self.roi]
        values = np.asarray(values, dtype=np.float32) if pointwise is None else pointwise(values)
        if self.padded:
            values = np.pad(values, self.pad, mode="constant", constant_values=0.0)
        return values

    def mask_grid(self, label_map: np.ndarray, label: int, m: int) -> np.ndarray:
        """(m, m, m) float32: ``label_map == label`` on the window (padding 0), every ``size / m``-th voxel.

        Args:
            label_map: (Z, Y, X) label map of the whole image.
            label: the object's label.
            m: side of the mask-prompt grid (every window side must be a multiple of it).
        """
        selected = np.asarray(label_map[self.roi]) == label
        if self.padded:
            selected = np.pad(selected, self.pad, mode="constant", constant_values=False)
        steps = tuple(w // m for w in self.size)
        return selected[::steps[0], ::steps[1], ::steps[2]].astype(np.float32)

    def paste(
        self, logits: torch.Tensor, image_shape: Sequence[int], mode: str = "trilinear"
    ) -> Tuple[np.ndarray, RoISlices]:
        """Probabilities on the window's image region from logits on a grid covering the window.

        Logits on a coarser grid (SAM-Med3D's 32^3) are first resized to the window (``mode``), then the
        padding is cut off and ``sigmoid`` taken.

        Returns:
            ``(prob, roi)``: float32 numpy ``prob`` of shape ``image[roi].shape`` and :attr:`roi`.
        """
        logits = upsample_logits(logits, self.size, mode)
        inner = tuple(slice(b, w - a) for (b, a), w in zip(self.pad, self.size))
        prob = torch.sigmoid(logits[inner].float()).cpu().numpy().astype(np.float32, copy=False)
        return prob, self.roi


def upsample_logits(logits: torch.Tensor, shape: Sequence[int], mode: str = "trilinear") -> torch.Tensor:
    """Logits on a (z, y, x) grid covering a frame, resized to the frame's (z, y, x) ``shape``
    (``F.interpolate``, ``align_corners=False``); unchanged when already of that shape."""
    shape = tuple(int(s) for s in shape)
    if tuple(logits.shape) == shape:
        return logits
    return F.interpolate(logits[None, None].float(), size=shape, mode=mode, align_corners=False)[0, 0]


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
    """The clicks the backbone gets for ``window``, in window coordinates.

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
    coords = window.to_frame([c.zyx for c in chosen])
    labels = np.array([1 if c.positive else 0 for c in chosen], dtype=np.int64)
    return coords, labels


def released_click_order(clicks: Sequence[Click]) -> List[Click]:
    """An object's clicks in the order the released local expert passes them: its foreground clicks, then its
    background ones, each in click order (the challenge file's ``fg`` and ``bg`` lists, one after the other).

    The order decides the order in which MONAI's inferer sums the windows (float rounding only).
    """
    return [c for c in clicks if c.positive] + [c for c in clicks if not c.positive]


# ------------------------------------------------------------------------------------------------- expert


class LocalRoIExpert(BackboneExpert):
    """DCM's local-RoI expert: a native-resolution window (a :class:`LocalWindow`) at the last click over a
    backbone (VISTA3D's point head by default).

    Args:
        model: the network with weights loaded (a MONAI ``VISTA3D``, :func:`dcm.models.vista3d.build_vista3d`,
            or a :class:`dcm.models.SamMed3D`), or a :class:`~dcm.experts.backbones.Backbone`; it must be of
            the kind ``cfg['backbone']`` names.
        cfg: settings, keys of :data:`LOCAL_ROI_DEFAULTS` (missing keys take the defaults, except that
            ``backbone`` defaults to the model's kind).

    Attributes:
        backbone: the :class:`~dcm.experts.backbones.Backbone` around ``model``.
        window_size: (z, y, x) network input size.
        encoder_runs: number of times the image encoder ran (the cache saves the others).
    """

    name = "local"
    role = "local_expert"
    who = _WHO
    defaults = LOCAL_ROI_DEFAULTS

    @classmethod
    def check_config(cls, cfg: Mapping[str, Any]) -> None:
        LocalExpertConfig.from_mapping(cfg, LocalExpertConfig.role)

    def __init__(self, model: Union[torch.nn.Module, Backbone], cfg: Optional[Mapping[str, Any]] = None):
        cfg = dict(cfg or {})
        self.cfg: Dict[str, Any] = LocalExpertConfig.from_mapping(cfg, LocalExpertConfig.role).to_dict()
        options = backbone_options(self.cfg, _WHO, cache_size=1)
        self._build_backbone(model, cfg.get("backbone"), options)
        size = self.cfg["window_size"]
        self.window_size: ZYX = as_zyx(self.backbone.default_frame_size() if size is None else size,
                                       "local_expert.window_size")
        self.backbone.check_frame(self.window_size, "local_expert.window_size")
        self.percentiles = tuple(options["percentiles"])
        self.window_inferer: str = self.cfg["window_inferer"]
        if self.window_inferer == "released" and self.backbone.kind != "vista3d":
            raise ConfigError(f"local_expert.window_inferer released runs MONAI's VISTA3D point inferer: it needs "
                              f"a vista3d backbone, got {self.backbone.kind!r}")
        self.reset()

    @property
    def intensity_range(self) -> Optional[Tuple[float, float]]:
        """VISTA3D: the image's (lower, upper) percentiles set by :meth:`set_image`; None otherwise."""
        return getattr(self.backbone, "intensity_range", None)

    @staticmethod
    def _size_factor(model: torch.nn.Module) -> ZYX:
        """What each window side must be divisible by for a VISTA3D ``model``."""
        return vista3d_frame_factor(model)

    def reset(self) -> None:
        """Forget the image and every cache."""
        super().reset()
        self._cached_window: Optional[LocalWindow] = None
        self._normalised_image: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ the frame and its prompts

    def window_center(self, obj: ObjectPrompts) -> Optional[ZYX]:
        """The (z, y, x) voxel the object's window is centred at: its last click, else (per config) its box centre."""
        if obj.clicks:
            return tuple(int(v) for v in obj.clicks[-1].zyx)  # type: ignore[return-value]
        if obj.box is not None and self.cfg["box_center_as_click"]:
            return box_center(obj.box, to_voxel=True)  # type: ignore[return-value]
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

    def frame_of(self, obj: ObjectPrompts) -> Optional[LocalWindow]:
        """The object's :meth:`window_of`."""
        return self.window_of(obj)

    def roi_of(self, obj: ObjectPrompts) -> Optional[RoISlices]:
        """The window's image region; with ``window_inferer: released`` the bounding box of every click's window."""
        if self.window_inferer == "released":
            windows = self.released_windows(obj)
            return union_region([w.roi for w in windows]) if windows else None
        return super().roi_of(obj)

    def prompts_of(self, obj: ObjectPrompts, window: LocalWindow) -> Tuple[np.ndarray, np.ndarray]:
        """(coords (N, 3), labels (N,)) in window coordinates for ``obj``; see :func:`window_clicks`."""
        clicks = list(obj.clicks)
        if not clicks:  # the box-centre click stands in for the first click (window_center put the window there)
            clicks = [Click(window.center, True)]
        return window_clicks(clicks, window, self.cfg["clicks"])

    def mask_prompt_source(self, obj: ObjectPrompts) -> str:
        """``previous`` (SAM-Med3D's ``prev_pred == label`` in the window), or ``none`` with ``mask_prompt: none``."""
        return "none" if self.cfg["mask_prompt"] in ("none", None) else "previous"

    # ------------------------------------------------------------------ the released window inferer

    def released_clicks(self, obj: ObjectPrompts) -> List[Click]:
        """The clicks ``window_inferer: released`` passes for ``obj`` (:func:`released_click_order`); without a
        click, the window centre's click (:meth:`window_center`: the box centre with ``box_center_as_click``)."""
        if obj.clicks:
            return released_click_order(obj.clicks)
        center = self.window_center(obj)
        return [] if center is None else [Click(center, True)]

    def released_windows(self, obj: ObjectPrompts) -> List[LocalWindow]:
        """One window per released click, where MONAI's inferer puts it (:func:`place_window`'s rule)."""
        self._require_image()
        shape = self.image.shape  # type: ignore[union-attr]
        return [place_window(c.zyx, shape, self.window_size) for c in self.released_clicks(obj)]

    def normalised_image(self) -> torch.Tensor:
        """The whole image normalised by the backbone, (1, 1, Z, Y, X) float32 on the device (kept per image)."""
        self._require_image()
        if self._normalised_image is None:
            x = self.backbone.normalise(self.image)  # type: ignore[arg-type]
            self._normalised_image = torch.from_numpy(np.ascontiguousarray(x))[None, None].to(self.device)
        return self._normalised_image

    def predict(self, obj: ObjectPrompts, prev_pred: Optional[np.ndarray] = None) -> Optional[RoIPrediction]:
        """Segment ``obj``: DCM's window (:meth:`BackboneExpert.predict`), or with ``window_inferer: released``
        MONAI's point inferer as released (:meth:`Vista3DBackbone.point_window_logits`; ``prev_pred`` ignored)."""
        if self.window_inferer != "released":
            return super().predict(obj, prev_pred)
        clicks = self.released_clicks(obj)
        if not clicks:
            return None
        coords = np.array([c.zyx for c in clicks], dtype=np.int64)
        labels = np.array([1 if c.positive else 0 for c in clicks], dtype=np.int64)
        backbone: Any = self.backbone  # a Vista3DBackbone (checked at construction)
        logits = backbone.point_window_logits(self.normalised_image(), coords, labels, self.window_size)
        roi = union_region([w.roi for w in self.released_windows(obj)])
        # sigmoid(NaN) stays NaN: voxels of the box between windows are background, as the release's NaN > 0.
        prob = torch.nan_to_num(torch.sigmoid(logits[roi]), nan=0.0)
        return RoIPrediction(roi=roi, prob=prob.numpy().astype(np.float32, copy=False), expert=self.name)

    # ------------------------------------------------------------------ network

    def image_embedding(self, window: LocalWindow) -> torch.Tensor:  # type: ignore[override]
        """Encoder output of ``window``: reused when the last call had the same crop."""
        embedding = super().image_embedding(window)
        self._cached_window = window
        return embedding

    def window_input(self, window: LocalWindow) -> torch.Tensor:
        """The normalised, padded network input of ``window``: (1, 1, *window.size) float32 on the device."""
        return self.frame_input(window)

    def window_logits(
        self, window: LocalWindow, coords: np.ndarray, labels: np.ndarray, mask: Optional[np.ndarray] = None
    ) -> torch.Tensor:
        """Logits (*window.size) for clicks ``coords`` (N, 3) (z, y, x) window voxels, ``labels`` (N,) and the
        mask prompt ``mask`` (m, m, m) or None (SAM-Med3D's 32^3 logits upsampled trilinearly to the window).

        VISTA3D: with no click inside the window the logits are its "no prompt" value (-9999) everywhere.
        """
        return upsample_logits(self.frame_logits(window, coords, labels, mask), window.size, self.prob_interpolation)
