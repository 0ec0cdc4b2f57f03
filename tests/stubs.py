"""Shared test helpers: stand-in experts (cheap, deterministic, with call logs) and a protocol step runner."""

import json
import time
from pathlib import Path

import numpy as np

from dcm.experts.base import Expert, RoIPrediction
from dcm.prompts import box_center


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
            return box_center(obj.box, to_voxel=True)
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



class FailingExpert(StubExpert):
    """A :class:`StubExpert` whose prediction raises ``RuntimeError(message)`` for the labels given."""

    def __init__(self, fail_labels, *args, message="boom on object {label}"):
        super().__init__(*args)
        self.fail_labels, self.message = set(fail_labels), message

    def predict(self, obj, prev_pred=None):
        if obj.label in self.fail_labels:
            raise RuntimeError(self.message.format(label=obj.label))
        return super().predict(obj, prev_pred)


def box_step_then_click_step(predictor, experts, arrays, name):
    """Run ``predictor`` on a case's box step, then on the click step the protocol derives from it.

    Returns ``(segs_step1, segs_step2, calls)`` with ``calls[role]`` = number of ``predict`` calls per expert.
    """
    from dcm.data.cases import case_from_arrays, case_to_arrays
    from dcm.protocol import record_next_clicks

    gts = arrays["gts"]
    calls = {role: 0 for role in experts}
    originals = {role: e.predict for role, e in experts.items()}

    def spy(role):
        def wrapped(*args, **kwargs):
            calls[role] += 1
            return originals[role](*args, **kwargs)
        return wrapped

    for role, e in experts.items():
        e.predict = spy(role)
    try:
        segs = predictor(case_from_arrays(arrays, name=name))
        labels = list(range(1, int(gts.max()) + 1))
        clicks, order = [{"fg": [], "bg": []} for _ in labels], [[] for _ in labels]
        record_next_clicks(gts, segs, labels, clicks, order)
        step2 = case_to_arrays(arrays["imgs"], arrays["spacing"], boxes=arrays.get("boxes"), clicks=clicks,
                               clicks_order=order, prev_pred=segs)
        segs2 = predictor(case_from_arrays(step2, name=name))
    finally:
        for role, e in experts.items():
            e.predict = originals[role]
    return segs, segs2, calls


def assert_policy_calls(policy, calls, n):
    """Each policy's expert calls over a box step and a click step of ``n`` objects (``calls`` as returned
    by :func:`box_step_then_click_step`)."""
    expected = {"dual": (2 * n, 2 * n), "released": (2 * n, 0), "global_only": (2 * n, 0), "local_only": (0, 2 * n),
                "global_then_local": (n, n)}
    if policy in expected:
        assert (calls["global"], calls["local"]) == expected[policy]
    else:  # outside_global_roi: global at the box step, then one expert per object
        assert calls["global"] >= n and calls["global"] + calls["local"] == 2 * n


def load_sam64_golden():
    """The golden SAM-Med3D-64 reduction (``tests/fixtures/sam64_reduced_golden.*``): ``(cfg, weights, io,
    model)`` with the model built from ``cfg`` and loaded strictly, in eval mode."""
    import torch

    from dcm.models import build_sam_med3d

    fixtures = Path(__file__).resolve().parent / "fixtures"
    cfg = json.loads((fixtures / "sam64_reduced_golden.json").read_text())
    with np.load(fixtures / "sam64_reduced_golden.npz") as z:
        weights = {k[len("weights/"):]: torch.from_numpy(z[k]) for k in z.files if k.startswith("weights/")}
        io = {k[len("io/"):]: torch.from_numpy(z[k]) for k in z.files if k.startswith("io/")}
    model = build_sam_med3d(cfg).eval()
    model.load_state_dict(weights, strict=True)
    return cfg, weights, io, model


def reduced_vista3d(seed=None, **overrides):
    """The reduced-width VISTA3D preset (``vista3d_reduced``, plus ``overrides``), in eval mode; built after
    ``torch.manual_seed(seed)`` when a seed is given."""
    import torch

    from dcm.models.vista3d import build_vista3d, load_vista3d_config

    if seed is not None:
        torch.manual_seed(seed)
    return build_vista3d({**load_vista3d_config("vista3d_reduced"), **overrides}).eval()


def reduced_sam_med3d(seed=None):
    """The reduced-width SAM-Med3D-64 preset (``sam_med3d_64_reduced``) in eval mode; seeded as
    :func:`reduced_vista3d`."""
    import torch

    from dcm.models import build_sam_med3d, load_model_config

    if seed is not None:
        torch.manual_seed(seed)
    return build_sam_med3d(load_model_config("sam_med3d_64_reduced")).eval()
