"""Engine routing, RoI-update fusion, overlap rules and the time budget, with stand-in experts."""

import sys
from pathlib import Path

import numpy as np
import pytest

from dcm.data.cases import Box, Case, Click, ObjectPrompts
from dcm.engine.fusion import LabelWriter, fuse_predictions
from dcm.engine.policies import POLICIES, route
from dcm.engine.predictor import CallBudget, DCMPredictor
from dcm.experts.base import RoIPrediction

sys.path.insert(0, str(Path(__file__).parent))
from stubs import StubExpert  # noqa: E402

SHAPE = (20, 30, 30)


BOX = Box(z_min=5, z_max=14, z_mid=10, z_mid_x_min=5, z_mid_y_min=5, z_mid_x_max=14, z_mid_y_max=14)


def _case(clicks=(), prev=None, boxes=True):
    obj = ObjectPrompts(label=1, box=BOX if boxes else None, clicks=list(clicks))
    return Case("CT_t", np.zeros(SHAPE, np.float32), (1.0, 1.0, 1.0), [obj], prev_pred=prev)


def _experts(g=0.9, l=0.9):
    return {"global": StubExpert("global", 4, g), "local": StubExpert("local", 2, l)}


def test_policies_route_as_documented():
    ex = _experts()
    box_step = _case()
    click = _case([Click((10, 10, 10), True)])
    far = _case([Click((18, 25, 25), True)])
    noboxes = _case([Click((10, 10, 10), True)], boxes=False)
    for e in ex.values():
        e.set_image(box_step.image)
    o = lambda c: c.objects[0]
    assert route("dual", box_step, o(box_step), ex) == ["global", "local"]
    assert route("released", click, o(click), ex) == ["global"]
    assert route("released", noboxes, o(noboxes), ex) == ["local"]
    assert route("global_then_local", box_step, o(box_step), ex) == ["global"]
    assert route("global_then_local", click, o(click), ex) == ["local"]
    assert route("outside_global_roi", click, o(click), ex) == ["global"]
    assert route("outside_global_roi", far, o(far), ex) == ["local"]
    assert route("global_only", far, o(far), ex) == ["global"]
    assert route("local_only", box_step, o(box_step), ex) == ["local"]
    assert set(POLICIES) == {"dual", "released", "global_then_local", "outside_global_roi", "global_only", "local_only"}


def test_local_overrides_inside_its_window_only():
    g = RoIPrediction((slice(0, 10),) * 3, np.full((10,) * 3, 0.9, np.float32))
    l = RoIPrediction((slice(4, 8),) * 3, np.full((4,) * 3, 0.1, np.float32))
    fused = fuse_predictions([g, l], "local_overrides")
    m = fused.mask()
    assert m.sum() == 1000 - 64 and not m[4:8, 4:8, 4:8].any()
    avg = fuse_predictions([g, l], "average")
    assert avg.prob[5, 5, 5] == pytest.approx(0.5) and avg.prob[0, 0, 0] == pytest.approx(0.9)
    conf = fuse_predictions([g, l], "confidence")
    assert conf.prob[5, 5, 5] == pytest.approx(0.5, abs=1e-3)


def test_click_region_takes_the_local_answer_only_where_the_click_is():
    # global: a 10^3 object minus a hole at (2..3)^3 and a false blob missing; local window (0..8)^3 says:
    # the hole is object (the click's error), and also wrongly that (6..7)^3 is background.
    gp = np.full((10,) * 3, 0.9, np.float32)
    gp[2:4, 2:4, 2:4] = 0.2
    g = RoIPrediction((slice(0, 10),) * 3, gp)
    lp = np.full((8,) * 3, 0.8, np.float32)
    lp[6:8, 6:8, 6:8] = 0.1
    l = RoIPrediction((slice(0, 8),) * 3, lp)
    fused = fuse_predictions([g, l], "click_region", click_zyx=(2, 3, 2))
    m = fused.mask()
    assert m[2:4, 2:4, 2:4].all()        # the clicked error is fixed by the local expert
    assert m[6:8, 6:8, 6:8].all()        # the local expert's other disagreement is not taken
    assert fused.prob[6, 6, 6] == pytest.approx(0.9) and fused.prob[2, 2, 2] == pytest.approx(0.8)
    # both agree at the click: the global answer stands everywhere
    same = fuse_predictions([g, l], "click_region", click_zyx=(5, 5, 5))
    np.testing.assert_array_equal(same.prob, gp)
    # one prediction only, or the click outside the window: that / the global answer
    assert np.array_equal(fuse_predictions([g], "click_region", click_zyx=(2, 2, 2)).prob, gp)
    assert np.array_equal(fuse_predictions([g, l], "click_region", click_zyx=(9, 9, 9)).prob, gp)
    # a background click: only the region the local expert removes around it
    removed = fuse_predictions([g, RoIPrediction((slice(5, 10),) * 3, np.full((5,) * 3, 0.1, np.float32))],
                               "click_region", click_zyx=(7, 7, 7), click_positive=False)
    assert not removed.mask()[5:, 5:, 5:].any() and removed.mask()[0, 0, 0]
    # ... and a foreground click there changes nothing (the local expert adds nothing around it)
    kept = fuse_predictions([g, RoIPrediction((slice(5, 10),) * 3, np.full((5,) * 3, 0.1, np.float32))],
                            "click_region", click_zyx=(7, 7, 7), click_positive=True)
    np.testing.assert_array_equal(kept.prob, gp)
    # margin: an unconfident local change (0.4 for a background click) is not taken
    unsure = RoIPrediction((slice(5, 10),) * 3, np.full((5,) * 3, 0.4, np.float32))
    assert not fuse_predictions([g, unsure], "click_region", click_zyx=(7, 7, 7), click_positive=False).mask()[7, 7, 7]
    assert fuse_predictions([g, unsure], "click_region", click_zyx=(7, 7, 7), click_positive=False,
                            margin=0.2).mask()[7, 7, 7]
    # a pair of margins (add, remove): the unsure removal is taken under a small remove margin only
    assert not fuse_predictions([g, unsure], "click_region", click_zyx=(7, 7, 7), click_positive=False,
                                margin=(0.3, 0.05)).mask()[7, 7, 7]
    assert fuse_predictions([g, unsure], "click_region", click_zyx=(7, 7, 7), click_positive=False,
                            margin=(0.0, 0.2)).mask()[7, 7, 7]
    unsure_add = fuse_predictions([g, l], "click_region", click_zyx=(2, 3, 2), margin=(0.35, 0.0))
    assert not unsure_add.mask()[2, 2, 2]  # local 0.8 is not above 0.5 + 0.35
    # no click (box step): the window's centre anchors it, as a foreground click
    hole = fuse_predictions([g, RoIPrediction((slice(1, 5),) * 3, np.full((4,) * 3, 0.7, np.float32))],
                            "click_region")
    assert hole.mask()[2:4, 2:4, 2:4].all()


def test_roi_update_keeps_previous_mask_outside_rois():
    prev = np.zeros(SHAPE, np.uint8)
    prev[0:3, 0:3, 0:3] = 1  # far from every RoI
    prev[10, 10, 10] = 1
    case = _case([Click((10, 10, 10), False)], prev=prev)
    # max_addition 0: the global RoI's answer adds far more than twice this tiny previous mask
    segs = DCMPredictor(_experts(g=0.9, l=0.1), {"policy": "dual", "max_addition": 0})(case)
    assert segs[0:3, 0:3, 0:3].all()
    assert segs[10, 10, 10] == 0  # the local window says background
    assert segs[6, 6, 6] == 1  # global RoI, outside the local window
    assert segs.dtype == np.uint8 and segs.shape == SHAPE


def test_without_box_routes_click_only_objects_to_one_expert():
    click = [Click((10, 10, 10), True)]
    for without_box, calls in [("policy", ([1], [1])), ("local", ([], [1])), ("global", ([1], []))]:
        ex = _experts()
        DCMPredictor(ex, {"policy": "dual", "without_box": without_box})(_case(click, boxes=False))
        assert (ex["global"].calls, ex["local"].calls) == calls, without_box
    ex = _experts()  # objects with a box keep the policy's experts
    DCMPredictor(ex, {"policy": "dual", "without_box": "local"})(_case(click))
    assert (ex["global"].calls, ex["local"].calls) == ([1], [1])
    ex = _experts()  # a single-expert policy is left alone
    DCMPredictor(ex, {"policy": "global_only", "without_box": "local"})(_case(click, boxes=False))
    assert (ex["global"].calls, ex["local"].calls) == ([1], [])


@pytest.mark.parametrize("cfg, message", [
    ({"fusion": "vote"}, "engine.fusion must be one of"),
    ({"without_box": "both"}, "engine.without_box must be one of ['policy', 'global', 'local']"),
    ({"policy": "bogus"}, "engine.policy must be one of"),
    ({"threshold": "abc"}, "engine.threshold must be a number in (0, 1)"),
    ({"threshold": 2}, "engine.threshold must be a number in (0, 1)"),
    ({"local_at_box_step": "centre"}, "engine.local_at_box_step must be one of"),
    ({"honour_clicks": "yes"}, "engine.honour_clicks must be true or false"),
    ({"click_correction": {"methods": ["paint"]}}, "engine.click_correction.methods must be a list"),
    ({"click_correction": {"radius_mm": 0}}, "engine.click_correction.radius_mm must be"),
    ({"budget": {"safety": 0}}, "engine.budget.safety must be a number in (0, 1]"),
    ({"budget": {"calls_per_case": 1.5}}, "engine.budget.calls_per_case must be an integer"),
    ({"polcy": "dual"}, "engine: unknown key(s) ['polcy']"),
    ({"overlap": "first"}, "engine.overlap must be one of"),
    ({"local_margin": 0.5}, "local_margin values must lie in [0, 0.5)"),
    ({"local_margin": [0.1, 0.2, 0.3]}, "a number or a pair [add, remove]"),
])
def test_bad_engine_config_is_refused_at_construction(cfg, message):
    from dcm.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        DCMPredictor(_experts(), cfg)
    assert message in str(e.value)


def test_local_skipped_at_box_step_when_configured():
    ex = _experts()
    DCMPredictor(ex, {"policy": "dual", "local_at_box_step": "skip"})(_case())
    assert ex["global"].calls == [1] and ex["local"].calls == []


def test_overlap_rules():
    segs = np.zeros((4, 4, 4), np.uint8)
    a = fuse_predictions([RoIPrediction((slice(0, 3),) * 3, np.full((3,) * 3, 0.6, np.float32))])
    b = fuse_predictions([RoIPrediction((slice(1, 4),) * 3, np.full((3,) * 3, 0.9, np.float32))])
    low = fuse_predictions([RoIPrediction((slice(1, 4),) * 3, np.full((3,) * 3, 0.55, np.float32))])
    w = LabelWriter(segs.copy(), "later_wins")
    w.write(1, a); w.write(2, low)
    assert w.segs[1, 1, 1] == 2
    w = LabelWriter(segs.copy(), "highest_prob")
    w.write(1, a); w.write(2, low)
    assert w.segs[1, 1, 1] == 1 and w.segs[3, 3, 3] == 2
    w.write(2, b)
    assert w.segs[1, 1, 1] == 2
    w = LabelWriter(segs.copy(), "keep_others")
    w.write(1, a); w.write(2, b)
    assert w.segs[1, 1, 1] == 1 and w.segs[3, 3, 3] == 2


def test_budget_skips_expert_and_keeps_previous_mask(capsys):
    prev = np.zeros(SHAPE, np.uint8)
    prev[10, 10, 10] = 1
    ex = {"global": StubExpert("global", 4, 0.0, delay=0.05)}
    case = _case([Click((10, 10, 10), True)], prev=prev)
    cfg = {"policy": "global_only", "budget": {"seconds_per_object": 0.04, "calls_per_case": 1, "safety": 1.0,
                                               "expected_seconds": {"global": 0.0}}}
    case.objects.append(ObjectPrompts(label=2, box=BOX, clicks=[]))
    segs = DCMPredictor(ex, cfg)(case)
    assert ex["global"].calls == [1]  # the second object would overrun the share
    assert "skipped to stay within the time budget" in capsys.readouterr().err
    b = CallBudget.for_case(10, {"seconds_per_object": 90, "calls_per_case": 6, "safety": 1.0})
    assert b.seconds == pytest.approx(150.0)


def test_object_with_problem_keeps_previous_mask():
    prev = np.zeros(SHAPE, np.uint8)
    prev[1, 1, 1] = 1
    case = _case(prev=prev)
    case.objects[0].problem = "boxes[0]: outside"
    segs = DCMPredictor(_experts(g=0.0, l=0.0))(case)
    assert segs[1, 1, 1] == 1


def test_ablation_variants_share_experts_and_a_later_variant_gets_the_roles_it_needs():
    from dcm.ablate import variant_predictor
    from dcm.config import load_config

    built = {}
    first = variant_predictor(load_config("dcm_reduced", ("engine.policy=global_only",)), None, built,
                              random_init=True)
    second = variant_predictor(load_config("dcm_reduced"), None, built, random_init=True)
    assert sorted(first.experts) == ["global"] and sorted(second.experts) == ["global", "local"]
    assert first.experts["global"] is second.experts["global"]
