"""The small interface both experts share.

An expert predicts one object's mask inside its own region of interest (RoI) from the image, the
object's prompts and the previous mask; the engine decides which expert runs and how RoI results are
written back (``dcm.engine``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from dcm.data.cases import ObjectPrompts

__all__ = ["RoISlices", "RoIPrediction", "Expert"]

#: (z, y, x) slices of a region inside the image; always within bounds, never empty.
RoISlices = Tuple[slice, slice, slice]


@dataclass
class RoIPrediction:
    """One expert's answer for one object.

    Attributes:
        roi: (z, y, x) slices of the image region the expert predicted (clipped to the image).
        prob: float32 foreground probability on that region, shape ``image[roi].shape``.
        expert: name of the expert that produced it.
    """

    roi: RoISlices
    prob: np.ndarray
    expert: str = ""

    def mask(self, threshold: float = 0.5) -> np.ndarray:
        """Binary mask on the RoI region (``prob > threshold``)."""
        return self.prob > threshold


class Expert:
    """Base class of the global-RoI and local-RoI experts.

    Usage: ``expert.set_image(image, spacing_zyx)`` once per image (caches what depends only on the
    image), then ``expert.predict(obj, prev_pred)`` per object and interaction.
    """

    name: str = "expert"

    def set_image(self, image: np.ndarray, spacing_zyx: Optional[Tuple[float, float, float]] = None) -> None:
        """Set the (z, y, x) image all further predictions refer to; clears image-dependent caches."""
        raise NotImplementedError

    def roi_of(self, obj: ObjectPrompts) -> Optional[RoISlices]:
        """The region ``predict`` would use for ``obj`` now, or None when the expert cannot handle it."""
        raise NotImplementedError

    def predict(self, obj: ObjectPrompts, prev_pred: Optional[np.ndarray] = None) -> Optional[RoIPrediction]:
        """Predict ``obj`` inside its RoI.

        Args:
            obj: the object's prompts (label, box, clicks in order).
            prev_pred: (z, y, x) uint8 label map of the previous output (``obj.label`` marks this object),
                or None. The expert reads only its RoI of it.

        Returns:
            The prediction, or None when the expert has nothing to say for this object (e.g. no prompt).
        """
        raise NotImplementedError

    def reset(self) -> None:
        """Drop every cache (image and prompts)."""
