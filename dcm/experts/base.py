"""The small interface both experts share.

An expert predicts one object's mask inside its own region of interest (RoI) from the image, the
object's prompts and the previous mask; the engine decides which expert runs and how RoI results are
written back (``dcm.engine``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import numpy as np

from dcm.data.cases import ObjectPrompts

__all__ = ["RoISlices", "RoIPrediction", "Expert", "GLOBAL", "LOCAL", "ROLES", "policy_roles", "PointwiseMap"]

#: (z, y, x) slices of a region inside the image; always within bounds, never empty.
RoISlices = Tuple[slice, slice, slice]

#: A per-voxel map of image values (a per-image normalisation), applied before a frame is cut from the image.
PointwiseMap = Callable[[np.ndarray], np.ndarray]

#: The two expert roles: the keys of an experts dict and of a combined checkpoint.
GLOBAL, LOCAL = "global", "local"
ROLES = (GLOBAL, LOCAL)
#: Routing policies (:mod:`dcm.engine.policies`) that call one role only; every other policy may call both.
_ONE_ROLE_POLICIES = {"global_only": (GLOBAL,), "local_only": (LOCAL,)}


def policy_roles(policy: str) -> Tuple[str, ...]:
    """The expert roles the routing ``policy`` may call, in fusion order: the policy -> roles map.

    It lives here, below the engine, because building experts (:func:`dcm.experts.build_experts`) needs it
    too: only these roles are built for a config.
    """
    return _ONE_ROLE_POLICIES.get(policy, ROLES)


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
