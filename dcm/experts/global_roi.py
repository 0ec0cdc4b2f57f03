"""The global-RoI expert: the object's whole RoI, resampled to a cubic frame, on any backbone.

The RoI strategy (this module, geometry in :mod:`dcm.experts.roi`) is separate from the network
(:mod:`dcm.experts.backbones`, config key ``backbone``): SAM-Med3D at its ``img_size`` (64^3, DCM's released
pairing, the default) or VISTA3D at ``frame_size`` (the design card's pairing). This module holds the RoI
rule (the expert's frame is the :class:`~dcm.experts.roi.GlobalRoI`), the prompts in it and the settings;
the steps are run by :meth:`dcm.experts.pipeline.BackboneExpert.predict`. Per object and interaction:

1. RoI: the box enlarged ``box_scale`` (1.8) times, at least ``min_size`` voxels per axis; an object without a
   box gets ``noboxes_size_mm`` (96 mm, the released ``64 / spacing * 1.5``) around its first positive click.
   Every positive click outside the RoI then grows it (in click order, minimally, with ``grow_margin``) so the
   RoI encompasses all positive prompts. The RoI is a pure function of (box, clicks, spacing, image shape):
   the stateless ``predict.sh`` and the interactive session get the same RoI for the same prompts, and
   removing a click (undo) gives back the smaller RoI. The backbone changes only the frame size.
2. The RoI is cropped with zero padding and resized to the frame (trilinear), then normalised by the
   backbone: SAM-Med3D z-normalises the frame over its voxels > 0; VISTA3D maps the image's percentiles to
   [0, 1] before resampling (padding 0). The encoder's output is cached per RoI (small LRU), so a click that
   leaves the RoI unchanged costs only the prompt head.
3. Prompts in the frame, (z, y, x): the box centre as a positive click (frame voxel 31 while the RoI is the
   box's and the frame 64), then every click of the object in order, 1 fg / 0 bg. Without a box no click is
   added: the first positive click is the RoI centre and plays that role. Negative clicks outside the RoI are
   dropped (or clipped onto its border, ``outside_clicks: clip``); positive ones are always inside (step 1)
   unless ``grow`` is off. ``outside_clicks: keep`` passes every click at its frame coordinates, inside the
   frame or not, as the released expert does (SAM-Med3D's Fourier point encoding takes any coordinate).
   Mask prompt (SAM-Med3D only): ``prev_pred == label`` resampled (nearest) to the frame, then every
   ``frame / 32``-th voxel (``[::2, ::2, ::2]`` for 64) -> 32^3 binary; at the box step (no click yet) zeros,
   or no mask prompt (``mask_prompt_at_box_step: none``, the ``no_mask_embed`` path).
4. Logits on the backbone's grid over the frame (SAM-Med3D 32^3, VISTA3D the frame) -> sigmoid -> trilinear
   onto the RoI's image voxels, clipped to the image -> ``RoIPrediction(slices, prob)``; the engine
   thresholds and writes it.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import numpy as np
import torch

from dcm.data.cases import ObjectPrompts
from dcm.config_schema import GlobalExpertConfig
from dcm.errors import ConfigError
from dcm.experts.backbones import Backbone, backbone_options
from dcm.experts.pipeline import BackboneExpert
from dcm.experts.roi import GlobalRoI, grow_to_include, roi_from_box, roi_from_clicks

__all__ = ["GLOBAL_ROI_DEFAULTS", "GlobalRoIExpert"]

#: Expert settings (``cfg`` of :class:`GlobalRoIExpert`) and their defaults: the ``global_expert`` section,
#: written (with what each key means) in :class:`dcm.config_schema.GlobalExpertConfig`.
GLOBAL_ROI_DEFAULTS: Dict[str, Any] = GlobalExpertConfig().to_dict()

_WHO = "global expert"


def _validate(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """The settings with defaults filled in; ConfigError naming ``global_expert.<key>`` otherwise."""
    return GlobalExpertConfig.from_mapping(cfg, GlobalExpertConfig.role).to_dict()


class GlobalRoIExpert(BackboneExpert):
    """DCM's global-RoI expert: the object's RoI resampled to a cubic frame (a :class:`GlobalRoI`) over a backbone.

    SAM-Med3D by default, at its own ``img_size`` frame, the only size it takes (64 for SAM-Med3D-64, 128 for
    turbo); or VISTA3D at ``frame_size`` (default 128; a multiple of 16, 8 for the reduced model).

    Args:
        model: the network with weights loaded (a :class:`dcm.models.SamMed3D` or a MONAI ``VISTA3D``), or a
            :class:`~dcm.experts.backbones.Backbone`; it must be of the kind ``cfg['backbone']`` names.
        cfg: settings, keys of :data:`GLOBAL_ROI_DEFAULTS` (missing keys take the defaults, except that
            ``backbone`` defaults to the model's kind).

    Attributes:
        backbone: the :class:`~dcm.experts.backbones.Backbone` around ``model``.
        frame_size: side of the network input (SAM-Med3D: the model's ``img_size``).
        mask_size: side of the mask prompt / low-res logits (32 for SAM-Med3D), None without mask prompt.
        encoder_runs: number of image-encoder passes (the embedding cache saves the others).
    """

    name = "global"
    role = "global_expert"
    who = _WHO
    defaults = GLOBAL_ROI_DEFAULTS

    @classmethod
    def check_config(cls, cfg: Mapping[str, Any]) -> None:
        _validate(cfg)

    def __init__(self, model: Union[torch.nn.Module, Backbone], cfg: Optional[Mapping[str, Any]] = None):
        cfg = dict(cfg or {})
        self.cfg: Dict[str, Any] = _validate(cfg)
        options = backbone_options(self.cfg, _WHO, cache_size=int(self.cfg["cache_size"]))
        self._build_backbone(model, cfg.get("backbone"), options)
        self.image_interpolation = self.cfg["image_interpolation"]
        self.prob_interpolation = self.cfg["prob_interpolation"]
        frame = self.cfg["frame_size"]
        self.frame_size = int(self.backbone.default_frame_size() if frame is None else frame)
        self.backbone.check_frame((self.frame_size,) * 3, "global_expert.frame_size")
        self.mask_size: Optional[int] = self.backbone.mask_size
        if self.mask_size is not None and self.frame_size % self.mask_size:
            raise ConfigError(f"global_expert.frame_size {self.frame_size} is not a multiple of the mask size "
                              f"{self.mask_size}")
        self.reset()

    # ------------------------------------------------------------------ the frame and its prompts

    def global_roi(self, obj: ObjectPrompts) -> Optional[GlobalRoI]:
        """The object's RoI from its prompts alone (see the module docstring), or None without box and positive
        click."""
        self._require_image()
        c = self.cfg
        positives = [click.zyx for click in obj.clicks if click.positive]
        if obj.box is not None:
            roi = roi_from_box(obj.box, float(c["box_scale"]), int(c["min_size"]), self.frame_size)
        elif positives:
            roi = roi_from_clicks(positives[:1], self.spacing_zyx, float(c["noboxes_size_mm"]),
                                  float(c["box_scale"]), int(c["min_size"]), self.frame_size)
        else:
            return None
        if c["grow"]:
            for p in positives:
                margin = tuple(int(math.ceil(float(c["grow_margin"]) * s - 1e-9)) for s in roi.size)
                roi = grow_to_include(roi, [p], margin, self.image.shape)  # type: ignore[union-attr]
        return roi

    def frame_of(self, obj: ObjectPrompts) -> Optional[GlobalRoI]:
        """The object's :meth:`global_roi`."""
        return self.global_roi(obj)

    def prompts_of(self, obj: ObjectPrompts, roi: GlobalRoI) -> Tuple[np.ndarray, np.ndarray]:
        """The point prompts of ``obj`` in ``roi``'s frame.

        Returns:
            ``coords`` (N, 3) float32 frame coordinates (z, y, x) and ``labels`` (N,) int64 (1 fg, 0 bg): the box
            centre first (``box_center_click``), then the clicks in order; clicks outside the frame dropped,
            clipped or kept as they are (``outside_clicks``).
        """
        points, labels = [], []
        if obj.box is not None and self.cfg["box_center_click"]:
            points.append(obj.box.center_zyx)
            labels.append(1)
        for click in obj.clicks:
            points.append(click.zyx)
            labels.append(1 if click.positive else 0)
        if not points:
            return np.zeros((0, 3), np.float32), np.zeros((0,), np.int64)
        q = roi.to_frame(np.asarray(points, dtype=np.float64))
        inside = roi.in_frame(q)
        if self.cfg["outside_clicks"] == "drop":
            q, labels = q[inside], [lab for lab, ok in zip(labels, inside) if ok]
        elif self.cfg["outside_clicks"] == "clip":
            q = np.clip(q, 0.0, self.frame_size - 1.0)
        return q.astype(np.float32), np.asarray(labels, dtype=np.int64)

    def mask_prompt_source(self, obj: ObjectPrompts) -> str:
        """The previous prediction once the object has clicks; at the box step (no click yet) zeros, or no mask
        prompt with ``mask_prompt_at_box_step: none``."""
        if obj.clicks:
            return "previous"
        return "none" if self.cfg["mask_prompt_at_box_step"] in ("none", None) else "zeros"
