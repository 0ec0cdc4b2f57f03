"""Backbones: the networks the experts run, behind one small interface.

An expert (:mod:`dcm.experts.pipeline`, with its frame: :mod:`dcm.experts.global_roi`,
:mod:`dcm.experts.local_roi`) decides where its frame lies in the image and maps the image, the clicks and the
previous mask into it and the result back. A backbone is the network on that frame, as a plain adapter::

    normalise: image values -> network intensities
    encode:    normalised frame (1, 1, Z, Y, X) -> embedding
    decode:    embedding + clicks (N, 3) frame (z, y, x), labels (N,) 1 fg / 0 bg
               + optional mask prompt (m, m, m)  ->  logits on a grid covering the frame

plus what an expert needs to build that input: the frame sizes it accepts and whether its normalisation
is per frame or per image.

* :class:`SamMed3DBackbone` (``sam_med3d``, :mod:`.sam_med3d`): SAM-Med3D at its ``img_size``^3 frame.
* :class:`Vista3DBackbone` (``vista3d``, :mod:`.vista3d`): MONAI VISTA3D's point head on any frame whose
  sides are multiples of :func:`vista3d_frame_factor`.
* :mod:`.registry`: which backbones exist, building one from a preset, loading its weights.

The percentile helpers live in :mod:`dcm.data.intensity` and are re-exported here.
"""

from __future__ import annotations

from typing import Any

# The private names too: tests and older code import them from here.
from dcm.data.intensity import _integer_percentiles, _percentiles, intensity_percentiles, scale_intensity  # noqa: F401
from dcm.experts.backbones.base import Backbone, _amp_dtype  # noqa: F401
from dcm.experts.backbones.registry import (
    BACKBONES,
    DEFAULT_MODELS,
    backbone_kind_of,
    backbone_options,
    build_backbone_model,
    load_backbone_weights,
    make_backbone,
    preset_kind,
)
from dcm.experts.backbones.sam_med3d import SamMed3DBackbone
from dcm.experts.backbones.vista3d import Vista3DBackbone, vista3d_frame_factor

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


def __getattr__(name: str) -> Any:
    # BackboneExpert moved to dcm.experts.pipeline, which imports this package: resolved on first use.
    if name == "BackboneExpert":
        from dcm.experts.pipeline import BackboneExpert

        return BackboneExpert
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
