"""Stand-in experts for engine and session tests: cheap, deterministic, with call logs."""

import time

import numpy as np

from dcm.experts.base import Expert, RoIPrediction


class StubExpert(Expert):
    """Predicts probability ``value`` on a fixed-size cube around the box centre / last click."""

    def __init__(self, name, half, value, delay=0.0):
        self.name, self.half, self.value, self.delay = name, half, value, delay
        self.calls = []

    def set_image(self, image, spacing_zyx=None):
        self.shape = image.shape

    def _center(self, obj):
        if self.name == "local" and obj.last_click is not None:
            return obj.last_click.zyx
        if obj.box is not None:
            return tuple(int(c) for c in obj.box.center_zyx)
        return obj.clicks[0].zyx if obj.clicks else None

    def roi_of(self, obj):
        c = self._center(obj)
        if c is None:
            return None
        return tuple(slice(max(x - self.half, 0), min(x + self.half + 1, n)) for x, n in zip(c, self.shape))

    def predict(self, obj, prev_pred=None):
        self.calls.append(obj.label)
        time.sleep(self.delay)
        roi = self.roi_of(obj)
        if roi is None:
            return None
        shape = tuple(s.stop - s.start for s in roi)
        return RoIPrediction(roi, np.full(shape, self.value, np.float32), self.name)
