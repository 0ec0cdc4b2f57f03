"""The released inference as a preset (configs/dcm_released.yaml, configs/dcm_reduced_released.yaml): the local
expert calls MONAI's point inferer as the released DCM does, the global expert gets every click without RoI
growth, and the engine's whole-case fallback to the local expert."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dcm.config import load_config
from dcm.config_schema import LocalExpertConfig, check_dcm_config
from dcm.data.cases import Box, Case, Click, ObjectPrompts, case_from_arrays, case_to_arrays
from dcm.engine.predictor import DCMPredictor
from dcm.errors import ConfigError
from dcm.experts.global_roi import GlobalRoIExpert
from dcm.experts.local_roi import LocalRoIExpert, released_click_order
from dcm.experts.roi import roi_from_box
from dcm.models import build_sam_med3d, load_model_config
from dcm.protocol import boxes_from_labels

sys.path.insert(0, str(Path(__file__).parent))
from stubs import FailingExpert, StubExpert, box_step_then_click_step, reduced_vista3d  # noqa: E402

W = 32  # the reduced VISTA3D's window in these tests (multiples of 8)

pytestmark = pytest.mark.usefixtures("two_torch_threads")


@pytest.fixture(scope="module")
def vista() -> torch.nn.Module:
    return reduced_vista3d(seed=0)


def _image(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape).astype(np.uint8)


def _released_call(model, image, clicks):
    """What the released ``infer/local_roi_expert.py`` computes for one object (our own code, its steps): the
    whole image through MONAI's percentile scaling, the object's fg points then its bg points, MONAI's point
    inferer with the release's arguments; logits (Z, Y, X), NaN outside every window."""
    from monai.apps.vista3d.inferer import point_based_window_inferer
    from monai.transforms import ScaleIntensityRangePercentiles

    x = torch.from_numpy(image).float()[None]
    x = ScaleIntensityRangePercentiles(lower=1, upper=99, b_min=0, b_max=1, clip=True)(x)[None]
    points = [c.zyx for c in clicks if c.positive] + [c.zyx for c in clicks if not c.positive]
    labels = [1 for c in clicks if c.positive] + [0 for c in clicks if not c.positive]
    with torch.no_grad():
        out = point_based_window_inferer(
            inputs=x, roi_size=[W, W, W], transpose=True, with_coord=True, predictor=model, mode="gaussian",
            sw_device="cpu", device="cpu", center_only=True,
            point_coords=torch.from_numpy(np.array([points], dtype=int)),
            point_labels=torch.from_numpy(np.array([labels], dtype=int)),
        )[0]
    return torch.as_tensor(out.as_tensor())[0]


# ------------------------------------------------------------------------------------------ local expert


@pytest.mark.filterwarnings("ignore:Setting affine:UserWarning")  # MONAI's MetaTensor, in the reference call
def test_released_local_expert_equals_monai_point_inferer_as_released(vista):
    image = _image((48, 72, 80), seed=1)
    expert = LocalRoIExpert(vista, {"window_size": W, "window_inferer": "released"})
    expert.set_image(image)
    # Click order in time: fg, bg, fg. The bg click lies on the first voxel of the first click's window
    # [4, 36)^3, where MONAI drops it; it counts in its own window [0, 32)^3.
    obj = ObjectPrompts(label=1, box=None, clicks=[Click((20, 20, 20), True), Click((4, 4, 4), False),
                                                   Click((30, 34, 40), True)])
    assert [c.zyx for c in released_click_order(obj.clicks)] == [(20, 20, 20), (30, 34, 40), (4, 4, 4)]
    windows = expert.released_windows(obj)
    assert [w.start for w in windows] == [(4, 4, 4), (14, 18, 24), (0, 0, 0)]

    pred = expert.predict(obj)
    ref = _released_call(vista, image, obj.clicks)
    covered = ~torch.isnan(ref)
    where = covered.nonzero()
    bbox = tuple(slice(int(lo), int(hi) + 1) for lo, hi in zip(where.min(0).values, where.max(0).values))
    assert pred.roi == bbox == expert.roi_of(obj) == ((slice(0, 46), slice(0, 50), slice(0, 56)))
    inside = ref[pred.roi]
    # the release's numbers (to float rounding) and its mask (logits > 0; NaN between windows is background)
    torch.testing.assert_close(torch.from_numpy(pred.prob)[covered[pred.roi]],
                               torch.sigmoid(inside[covered[pred.roi]]), atol=1e-6, rtol=0)
    assert np.array_equal(pred.prob > 0.5, (inside > 0).numpy())
    assert (pred.prob[~covered[pred.roi].numpy()] == 0).all() and (~covered[pred.roi]).any()
    assert 0 < (pred.prob > 0.5).sum() < pred.prob.size
    # the previous mask is ignored, as released
    prev = np.ones(image.shape, np.uint8)
    assert np.array_equal(expert.predict(obj, prev).prob, pred.prob)
    # DCM's own window (one window at the last click, every click inside it) answers differently
    dcm = LocalRoIExpert(vista, {"window_size": W})
    dcm.set_image(image)
    assert dcm.predict(obj).roi != pred.roi


def test_window_inferer_config():
    assert LocalExpertConfig().window_inferer == "dcm"
    with pytest.raises(ConfigError, match="local_expert.window_inferer must be one of"):
        LocalExpertConfig.from_mapping({"window_inferer": "monai"}, "local_expert")
    with pytest.raises(ConfigError, match="needs local_expert.backbone vista3d"):
        LocalExpertConfig.from_mapping({"window_inferer": "released", "backbone": "sam_med3d"}, "local_expert")
    with pytest.raises(ConfigError, match="engine.fallback must be one of"):
        check_dcm_config({"engine": {"fallback": "global"}})


# ----------------------------------------------------------------------------------------- global expert


def test_released_global_expert_gets_every_click_without_growth():
    """The released global expert: RoI = box x 1.8 whatever the clicks, the box centre then every click at
    ``(p - centre) * 64 / size + 31`` (infer/global_roi_expert.py), inside the RoI or not."""
    torch.manual_seed(0)
    model = build_sam_med3d(load_model_config("sam_med3d_64_reduced")).eval()
    image = _image((40, 64, 64), seed=2)
    box = Box(z_min=10, z_max=19, z_mid=15, z_mid_x_min=20, z_mid_y_min=22, z_mid_x_max=35, z_mid_y_max=33)
    clicks = [Click((15, 27, 30), True), Click((36, 60, 5), True), Click((2, 3, 60), False)]  # 2 outside
    obj = ObjectPrompts(label=1, box=box, clicks=clicks)
    released = GlobalRoIExpert(model, {"grow": False, "outside_clicks": "keep"})
    released.set_image(image)
    roi = released.global_roi(obj)
    assert roi == roi_from_box(box, 1.8, 8, 64)
    coords, labels = released.prompts_of(obj, roi)

    bbox = np.float32([[10, 19], [22, 33], [20, 35]])
    cent = bbox.mean(1)
    size = np.round((bbox[:, 1] - bbox[:, 0] + 1) * 1.8).clip(8)
    expected = (np.float32([cent] + [c.zyx for c in clicks]) - cent) * (64 / size) + 31
    np.testing.assert_allclose(coords, expected, atol=1e-4)
    assert labels.tolist() == [1, 1, 1, 0]
    assert ((coords < -0.5) | (coords >= 63.5)).any(axis=1).tolist() == [False, False, True, True]

    ours = GlobalRoIExpert(model, {})  # DCM: the RoI grows to take the positive click in; the bg one dropped
    ours.set_image(image)
    grown = ours.global_roi(obj)
    assert grown != roi and grown.contains((36, 60, 5))
    assert ours.prompts_of(obj, grown)[1].tolist() == [1, 1, 1]


# ---------------------------------------------------------------------------------------- the presets


RELEASED_KEYS = {"engine": ("policy", "honour_clicks", "fallback", "fusion", "overlap", "threshold"),
                 "global_expert": ("grow", "outside_clicks", "amp", "box_scale", "box_center_click",
                                   "mask_prompt_at_box_step"),
                 "local_expert": ("window_inferer", "amp", "box_center_as_click")}


def test_presets_hold_the_released_settings():
    full, reduced, dual = (check_dcm_config(load_config(n)) for n in ("dcm_released", "dcm_reduced_released", "dcm"))
    for section, keys in RELEASED_KEYS.items():
        for key in keys:
            assert full[section][key] == reduced[section][key], f"{section}.{key}"
    assert full["engine"]["policy"] == "released" and full["engine"]["honour_clicks"] is False
    assert full["engine"]["fallback"] == "local_case"
    assert full["global_expert"]["grow"] is False and full["global_expert"]["outside_clicks"] == "keep"
    assert full["local_expert"]["window_inferer"] == "released"
    assert full["global_expert"]["amp"] is full["local_expert"]["amp"] is False
    assert full["global_expert"]["model"] is None and full["local_expert"]["window_size"] is None  # 64^3, 128^3
    # DCM's default keeps today's behaviour
    assert (dual["engine"]["fallback"], dual["local_expert"]["window_inferer"]) == ("none", "dcm")
    assert (dual["global_expert"]["grow"], dual["global_expert"]["outside_clicks"]) == (True, "drop")


def _tiny_case():
    gts = np.zeros((40, 72, 72), np.uint8)
    gts[8:20, 10:30, 12:34] = 1
    gts[22:34, 40:62, 38:60] = 2
    rng = np.random.default_rng(3)
    imgs = np.clip(gts.astype(np.float32) * 90 + 40 + rng.normal(0, 10, gts.shape), 0, 255).astype(np.uint8)
    return imgs, gts


def test_reduced_preset_runs_end_to_end_through_the_engine():
    from dcm.experts import build_experts_from_config

    torch.manual_seed(0)
    cfg, experts = build_experts_from_config("dcm_reduced_released", random_init=True)
    assert experts["local"].window_inferer == "released"
    predictor = DCMPredictor(experts, cfg["engine"])
    imgs, gts = _tiny_case()
    arrays = case_to_arrays(imgs, (1.0, 1.0, 1.0), boxes=boxes_from_labels(gts), gts=gts)
    segs1, segs2, calls = box_step_then_click_step(predictor, experts, arrays, "CT_tiny")
    assert calls == {"global": 4, "local": 0}  # boxes: the global expert for every object, at every step
    for segs in (segs1, segs2):
        assert segs.shape == gts.shape and segs.dtype == np.uint8 and set(np.unique(segs)) <= {0, 1, 2}

    # No boxes: the local expert answers the whole case from an empty label map, one window per click.
    prev = np.zeros_like(gts)
    prev[0:2, 70:72, 70:72] = 1  # object 1's previous mask, far from every window: dropped as released
    clicks = [{"fg": [[14, 20, 22]], "bg": [[8, 10, 12]]}, {"fg": [[28, 50, 48]], "bg": []}]
    step = case_to_arrays(imgs, (1.0, 1.0, 1.0), clicks=clicks, clicks_order=[["fg", "bg"], ["fg"]],
                          prev_pred=prev)
    segs = predictor(case_from_arrays(step, name="Microscopy_tiny"))
    assert segs.shape == gts.shape and not segs[0:2, 70:72, 70:72].any()
    local = experts["local"]
    for label in (1, 2):
        obj = case_from_arrays(step).objects[label - 1]
        pred = local.predict(obj)
        outside = np.ones(gts.shape, bool)
        outside[pred.roi] = False
        assert not (segs[outside] == label).any()


# ----------------------------------------------------------------------------------------- the fallback


def _two_objects(prev, boxes=True):
    box1 = Box(z_min=4, z_max=10, z_mid=7, z_mid_x_min=4, z_mid_y_min=4, z_mid_x_max=10, z_mid_y_max=10)
    box2 = Box(z_min=12, z_max=18, z_mid=15, z_mid_x_min=18, z_mid_y_min=18, z_mid_x_max=26, z_mid_y_max=26)
    if not boxes:
        box1 = box2 = None
    objects = [ObjectPrompts(1, box1, [Click((7, 7, 7), True)]), ObjectPrompts(2, box2, [Click((15, 22, 22), True)])]
    return Case("CT_fb", np.zeros((20, 30, 30), np.float32), (1.0, 1.0, 1.0), objects, prev_pred=prev)


RELEASED_ENGINE = {"policy": "released", "honour_clicks": False, "fallback": "local_case"}


def test_fallback_fires_when_the_global_expert_raises(capsys):
    prev = np.zeros((20, 30, 30), np.uint8)
    prev[0:2, 0:2, 0:2] = 1  # object 1's previous mask, outside every window
    case = _two_objects(prev)
    glob, local = FailingExpert([2], "global", 3, 0.9), StubExpert("local", 2, 0.9)
    segs = DCMPredictor({"global": glob, "local": local}, RELEASED_ENGINE)(case)
    assert glob.calls == [1] and local.calls == [1, 2]  # global failed on 2: the local expert redoes both
    assert capsys.readouterr().err.splitlines() == [
        "CT_fb: object 2: global expert failed (RuntimeError: boom on object 2); the local expert predicts the "
        "whole case (engine.fallback: local_case)"]
    expected = np.zeros_like(prev)  # an empty map, previous masks ignored
    expected[5:10, 5:10, 5:10] = 1
    expected[13:18, 20:25, 20:25] = 2
    assert np.array_equal(segs, expected)

    # without the fallback (DCM's default) the failing object keeps its previous mask, the others are predicted
    glob.calls.clear()
    local.calls.clear()
    segs = DCMPredictor({"global": glob, "local": local}, dict(RELEASED_ENGINE, fallback="none"))(case)
    assert glob.calls == [1] and local.calls == []
    assert (segs[0:2, 0:2, 0:2] == 1).all() and (segs == 2).sum() == 0
    assert "prediction failed (RuntimeError: boom on object 2); its previous mask is kept" in capsys.readouterr().err


def test_fallback_answers_no_box_cases_and_ignores_local_failures():
    prev = np.zeros((20, 30, 30), np.uint8)
    prev[0:2, 0:2, 0:2] = 1
    case = _two_objects(prev, boxes=False)
    glob, local = StubExpert("global", 3, 0.9), StubExpert("local", 2, 0.9)
    segs = DCMPredictor({"global": glob, "local": local}, dict(RELEASED_ENGINE, policy="dual"))(case)
    assert glob.calls == [] and local.calls == [1, 2] and not segs[0:2, 0:2, 0:2].any()

    # a failing local expert is no global failure: per object, the previous mask is kept
    case = _two_objects(prev)
    glob, local = StubExpert("global", 3, 0.9), FailingExpert([1], "local", 2, 0.9)
    segs = DCMPredictor({"global": glob, "local": local}, dict(RELEASED_ENGINE, policy="dual"))(case)
    assert glob.calls == [1, 2] and local.calls == [2]
    assert (segs[0:2, 0:2, 0:2] == 1).all()
