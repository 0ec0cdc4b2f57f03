"""The click promise (dcm.engine.clicks): stand-in experts that try each way of breaking it, every policy,
fusion and overlap rule, the session, and one protocol run with the bundled weights."""

import sys
from pathlib import Path

import numpy as np
import pytest

from dcm.data.cases import Box, Case, Click, ObjectPrompts
from dcm.engine.clicks import ClickProtection, click_neighbourhood, clicks_kept, honour_clicks, promises_of
from dcm.engine.fusion import FUSION_RULES, OVERLAP_RULES, FusedPrediction, LabelWriter, label_counts
from dcm.engine.policies import POLICIES
from dcm.engine.predictor import DCMPredictor
from dcm.engine.session import InteractiveSession
from dcm.experts.base import Expert, RoIPrediction

sys.path.insert(0, str(Path(__file__).parent))
from stubs import StubExpert  # noqa: E402

SHAPE = (20, 40, 40)
SPACING_XYZ = (1.0, 1.0, 1.0)


class MapExpert(Expert):
    """Answers every object with the same probability map on the whole image (or a fixed RoI)."""

    def __init__(self, name, prob, roi=None):
        self.name, self.prob = name, prob.astype(np.float32)
        self.roi = roi or tuple(slice(0, n) for n in prob.shape)

    def set_image(self, image, spacing_zyx=None):
        pass

    def roi_of(self, obj):
        return self.roi

    def predict(self, obj, prev_pred=None):
        return RoIPrediction(self.roi, self.prob[self.roi].copy(), self.name)


def _image():
    """A dark image with a bright ball at (10, 10, 10) (radius 5) and a bright ball at (10, 28, 28) (radius 4)."""
    z, y, x = np.indices(SHAPE)
    image = np.full(SHAPE, 20.0, np.float32)
    image[(z - 10) ** 2 + (y - 10) ** 2 + (x - 10) ** 2 <= 25] = 200.0
    image[(z - 10) ** 2 + (y - 28) ** 2 + (x - 28) ** 2 <= 16] = 200.0
    return image + np.random.default_rng(0).normal(0, 2, SHAPE).astype(np.float32)


def _ball(center, radius):
    z, y, x = np.indices(SHAPE)
    return (z - center[0]) ** 2 + (y - center[1]) ** 2 + (x - center[2]) ** 2 <= radius ** 2


def _distance(zyx):
    """Distance of every voxel of SHAPE to ``zyx`` (spacing 1)."""
    return np.sqrt(sum((g - c) ** 2.0 for g, c in zip(np.indices(SHAPE), zyx)))


def _case(objects, prev=None):
    return Case(name="CT_test", image=_image(), spacing_xyz=SPACING_XYZ, objects=objects, prev_pred=prev)


def _all_kept(segs, objects):
    kept, total = clicks_kept(segs, objects)
    return kept == total


def test_neighbourhood_is_the_voxel_and_its_face_neighbours_inside_the_image():
    assert len(click_neighbourhood((5, 5, 5), SHAPE)) == 7
    corner = click_neighbourhood((0, 0, 0), SHAPE)
    assert len(corner) == 4 and [0, 0, 0] in corner.tolist()


def test_contradicting_clicks_later_wins_and_earlier_objects_keep_their_positive_voxels():
    obj = ObjectPrompts(1, clicks=[Click((5, 5, 5), True), Click((5, 5, 6), False)])
    other = ObjectPrompts(2, clicks=[Click((5, 5, 4), True)])
    promises = promises_of([obj, other], SHAPE)

    def signs(promise):
        return {tuple(int(c) for c in v): bool(sign) for v, sign in zip(promise.voxels, promise.positive)}

    first, second = signs(promises[1]), signs(promises[2])
    assert first[(5, 5, 6)] is False and first[(5, 5, 5)] is False  # the later negative click won there
    assert first[(5, 5, 4)] is True  # the positive click's voxel the negative one does not claim
    assert (5, 5, 4) not in second  # object 1 (earlier) keeps its positive voxel ...
    assert second[(5, 5, 5)] is True  # ... and object 2 may have one that object 1 must not
    labels = np.zeros(SHAPE, np.uint8)
    labels[tuple(promises[1].voxels[promises[1].positive].T)] = 1
    labels[tuple(promises[2].voxels[promises[2].positive].T)] = 2
    assert clicks_kept(labels, [obj, other]) == (3, 3)
    labels[5, 5, 3] = 0
    assert clicks_kept(labels, [obj, other]) == (2, 3)
    assert clicks_kept(labels, [obj, other], promises) == (2, 3)  # the caller's promises: the same count


def test_a_click_repeated_at_the_same_place_counts_each_time_it_is_not_kept():
    """The organisers' rule repeats a click an answer ignored: the earlier copy owns no voxel of its own,
    but the count must not pass it as kept (it did before 2026-12-02); the engine still corrects the owner."""
    obj = ObjectPrompts(1, clicks=[Click((5, 5, 5), True), Click((5, 5, 5), True), Click((5, 5, 7), True)])
    labels = np.zeros(SHAPE, np.uint8)
    labels[tuple(click_neighbourhood((5, 5, 7), SHAPE).T)] = 1
    assert clicks_kept(labels, [obj]) == (1, 3)
    promise = promises_of([obj], SHAPE)[1]
    at = labels[tuple(promise.voxels.T)] == 1
    assert promise.kept(at).tolist() == [True, False, True]  # the owner of the wrong voxels: what is corrected
    assert promise.honoured(at).tolist() == [False, False, True]
    labels[tuple(click_neighbourhood((5, 5, 5), SHAPE).T)] = 1
    assert clicks_kept(labels, [obj]) == (3, 3)
    # A later click of the other sign still excuses the earlier one where they overlap.
    flip = ObjectPrompts(1, clicks=[Click((5, 5, 5), True), Click((5, 5, 6), False)])
    labels = np.zeros(SHAPE, np.uint8)
    promise = promises_of([flip], SHAPE)[1]
    labels[tuple(promise.voxels[promise.positive].T)] = 1
    assert clicks_kept(labels, [flip]) == (2, 2)


def _run(policy, fusion, experts, objects, prev=None, overlap="later_wins", **engine):
    predictor = DCMPredictor(experts, {"policy": policy, "fusion": fusion, "overlap": overlap, **engine})
    return predictor(_case(objects, prev))


ALL_RULES = [(p, f) for p in POLICIES for f in FUSION_RULES]


@pytest.mark.parametrize("policy, fusion", ALL_RULES)
def test_an_ignored_positive_click_is_kept_with_a_region_that_follows_the_image(policy, fusion):
    # Both experts answer "nothing here"; the user clicks the middle of the bright ball.
    nothing = np.zeros(SHAPE, np.float32)
    experts = {"global": MapExpert("global", nothing), "local": MapExpert("local", nothing)}
    obj = ObjectPrompts(1, clicks=[Click((10, 10, 10), True)])
    segs = _run(policy, fusion, experts, [obj], np.zeros(SHAPE, np.uint8))
    assert _all_kept(segs, [obj])
    added = segs == 1
    ball = _ball((10, 10, 10), 5)
    assert added.sum() > 7 * 10  # far more than the neighbourhood: a region, not a painted voxel
    assert (added & ball).sum() / added.sum() > 0.9  # ... that stays in the bright ball
    assert (added & ball).sum() / ball.sum() > 0.5


@pytest.mark.parametrize("policy, fusion", ALL_RULES)
def test_an_update_cannot_remove_the_part_holding_a_positive_click(policy, fusion):
    # Previous mask: two balls; the earlier positive click sits in the second one. The experts now answer
    # with the first ball only: the second ball (holding the click) keeps its previous mask.
    first, second = _ball((10, 10, 10), 5), _ball((10, 28, 28), 4)
    prev = ((first | second) * 1).astype(np.uint8)
    prob = first.astype(np.float32)
    experts = {"global": MapExpert("global", prob), "local": MapExpert("local", prob)}
    obj = ObjectPrompts(1, box=Box(5, 15, 10, 5, 5, 33, 33),
                        clicks=[Click((10, 28, 28), True), Click((10, 10, 10), True)])
    segs = _run(policy, fusion, experts, [obj], prev)
    assert _all_kept(segs, [obj])
    assert np.array_equal(segs == 1, first | second)


@pytest.mark.parametrize("policy, fusion", ALL_RULES)
def test_an_update_cannot_paint_over_a_negative_click(policy, fusion):
    first, second = _ball((10, 10, 10), 5), _ball((10, 28, 28), 4)
    prev = first.astype(np.uint8)
    prob = (first | second).astype(np.float32)  # the experts add the second ball, where the user said "no"
    experts = {"global": MapExpert("global", prob), "local": MapExpert("local", prob)}
    obj = ObjectPrompts(1, box=Box(5, 15, 10, 5, 5, 33, 33),
                        clicks=[Click((10, 28, 28), False), Click((10, 10, 10), True)])
    segs = _run(policy, fusion, experts, [obj], prev)
    assert _all_kept(segs, [obj])
    assert not (segs == 1)[second].any()  # the whole added part holding the negative click was rejected


@pytest.mark.parametrize("policy, fusion", ALL_RULES)
def test_an_ignored_negative_click_removes_a_region_around_it(policy, fusion):
    # The previous mask wrongly holds both balls; the user clicks "no" in the second; the experts repeat it.
    first, second = _ball((10, 10, 10), 5), _ball((10, 28, 28), 4)
    prob = (first | second).astype(np.float32)
    experts = {"global": MapExpert("global", prob), "local": MapExpert("local", prob)}
    obj = ObjectPrompts(1, box=Box(5, 15, 10, 5, 5, 33, 33), clicks=[Click((10, 28, 28), False)])
    segs = _run(policy, fusion, experts, [obj], prob.astype(np.uint8))
    assert _all_kept(segs, [obj])
    removed = second & (segs != 1)
    assert removed.sum() > 0.5 * second.sum()  # a region, not the clicked voxel
    assert (segs == 1)[first].all()  # the first ball is left alone


@pytest.mark.parametrize("overlap", OVERLAP_RULES)
def test_a_later_object_never_takes_an_earlier_objects_click(overlap):
    # Object 2's experts claim the whole image; object 1's clicked neighbourhood stays object 1's.
    everything = np.full(SHAPE, 0.99, np.float32)
    ball = _ball((10, 10, 10), 5).astype(np.float32) * 0.6
    experts = {"global": _PerLabel({1: ball, 2: everything})}
    a = ObjectPrompts(1, box=Box(5, 15, 10, 5, 5, 15, 15), clicks=[Click((10, 10, 10), True)])
    b = ObjectPrompts(2, box=Box(0, 19, 10, 0, 0, 39, 39), clicks=[Click((3, 30, 30), True)])
    segs = _run("global_only", "local_overrides", experts, [a, b], np.zeros(SHAPE, np.uint8), overlap=overlap)
    assert _all_kept(segs, [a, b])
    assert (segs[tuple(click_neighbourhood((10, 10, 10), SHAPE).T)] == 1).all()


@pytest.mark.parametrize("overlap", OVERLAP_RULES)
def test_an_object_gets_its_own_click_even_where_another_object_was(overlap):
    prev = np.zeros(SHAPE, np.uint8)
    prev[_ball((10, 10, 10), 6)] = 2  # object 2 holds the region of object 1's click from a previous step
    experts = {"global": _PerLabel({1: np.zeros(SHAPE, np.float32), 2: (prev == 2).astype(np.float32)})}
    a = ObjectPrompts(1, box=Box(5, 15, 10, 5, 5, 15, 15), clicks=[Click((10, 10, 10), True)])
    b = ObjectPrompts(2, box=Box(5, 15, 10, 5, 5, 15, 15), clicks=[Click((10, 13, 13), True)])
    segs = _run("global_only", "local_overrides", experts, [a, b], prev, overlap=overlap)
    assert _all_kept(segs, [a, b])


class _PerLabel(Expert):
    name = "global"

    def __init__(self, maps):
        self.maps = maps

    def set_image(self, image, spacing_zyx=None):
        pass

    def roi_of(self, obj):
        return tuple(slice(0, n) for n in SHAPE)

    def predict(self, obj, prev_pred=None):
        return RoIPrediction(self.roi_of(obj), self.maps[obj.label].astype(np.float32).copy(), "global")


def test_contradicting_clicks_of_one_object_the_later_one_wins():
    prob = _ball((10, 10, 10), 5).astype(np.float32)
    experts = {"global": MapExpert("global", prob)}
    obj = ObjectPrompts(1, box=Box(5, 15, 10, 5, 5, 15, 15),
                        clicks=[Click((10, 10, 10), True), Click((10, 10, 11), False)])
    segs = _run("global_only", "local_overrides", experts, [obj], prob.astype(np.uint8))
    assert _all_kept(segs, [obj])
    assert segs[10, 10, 11] == 0 and segs[10, 10, 10] == 0  # the later negative click's neighbourhood
    assert segs[10, 10, 9] == 1  # the positive click's voxels the negative one does not claim


def test_without_the_rule_the_experts_answer_stands():
    nothing = np.zeros(SHAPE, np.float32)
    obj = ObjectPrompts(1, clicks=[Click((10, 10, 10), True)])
    segs = _run("global_only", "local_overrides", {"global": MapExpert("global", nothing)}, [obj],
                np.zeros(SHAPE, np.uint8), honour_clicks=False)
    assert not segs.any()


def test_the_correction_methods_are_tried_in_order():
    # The experts' probability at the click is 0.2: `probability` takes the region above 0.15 (a cube),
    # the random walker the bright ball; with no method, only the neighbourhood.
    prob = np.zeros(SHAPE, np.float32)
    prob[6:15, 6:15, 6:15] = 0.2
    obj = ObjectPrompts(1, clicks=[Click((10, 10, 10), True)])
    fused = FusedPrediction(tuple(slice(0, n) for n in SHAPE), prob.copy(), True)
    promise = promises_of([obj], SHAPE)[1]
    image, prev = _image(), np.zeros(SHAPE, np.uint8)

    def mask(methods):
        out = honour_clicks(FusedPrediction(fused.region, prob.copy(), True), obj, promise, image, (1, 1, 1), prev,
                            0.5, {"methods": methods, "radius_mm": 8})
        return out.mask(0.5)

    cube = np.zeros(SHAPE, bool)
    cube[6:15, 6:15, 6:15] = True
    assert np.array_equal(mask(["probability", "random_walker"]), cube)
    walked = mask(["random_walker"])
    assert (walked & _ball((10, 10, 10), 5)).sum() / walked.sum() > 0.9 and walked.sum() > 200
    assert mask([]).sum() == 7


def test_label_writer_protection_for_every_overlap_rule():
    for overlap in OVERLAP_RULES:
        segs = np.zeros(SHAPE, np.uint8)
        a = ObjectPrompts(1, clicks=[Click((5, 5, 5), True)])
        b = ObjectPrompts(2, clicks=[Click((15, 30, 30), True)])
        writer = LabelWriter(segs, overlap, ClickProtection(promises_of([a, b], SHAPE)))
        region = tuple(slice(0, n) for n in SHAPE)
        prob_a = np.zeros(SHAPE, np.float32)
        prob_a[tuple(click_neighbourhood((5, 5, 5), SHAPE).T)] = 0.6
        writer.write(1, FusedPrediction(region, prob_a, True))
        writer.write(2, FusedPrediction(region, np.full(SHAPE, 0.9, np.float32), True))
        assert _all_kept(segs, [a, b]), overlap


# ------------------------------------------------------------------------------------------- session
def _session(**engine):
    experts = {"global": StubExpert("global", 4, 0.9), "local": StubExpert("local", 1, 0.1)}
    s = InteractiveSession(config={"engine": {"policy": "dual", **engine}}, experts=experts)
    s.set_image(_image(), spacing=(1.0, 1.0, 1.0))
    return s


BOX_A = dict(z_min=6, z_max=14, z_mid=10, z_mid_x_min=6, z_mid_y_min=6, z_mid_x_max=14, z_mid_y_max=14)
BOX_B = dict(z_min=6, z_max=14, z_mid=10, z_mid_x_min=9, z_mid_y_min=9, z_mid_x_max=17, z_mid_y_max=17)


@pytest.mark.parametrize("overlap", OVERLAP_RULES)
def test_session_undo_of_one_object_is_as_if_its_step_never_happened(overlap):
    s = _session(policy="global_only", overlap=overlap)
    a, b = s.new_object(), s.new_object()
    s.add_box(a, BOX_A)
    s.add_box(b, BOX_B)  # overlaps a's box
    after_boxes = s.labels()
    s.add_point(a, (10, 8, 8), positive=True)
    s.add_point(b, (10, 16, 16), positive=True)
    assert _all_kept(s.labels(), [s.objects[a], s.objects[b]])
    b_mask = s.mask(b)
    s.undo(a)  # b's click stays, b's mask does not change
    assert np.array_equal(s.mask(b), b_mask)
    twin = _session(policy="global_only", overlap=overlap)
    ta, tb = twin.new_object(), twin.new_object()
    twin.add_box(ta, BOX_A)
    twin.add_box(tb, BOX_B)
    twin.add_point(tb, (10, 16, 16), positive=True)
    assert np.array_equal(s.labels(), twin.labels())
    s.undo(b)  # a does not grow back what its undone click had taken
    assert np.array_equal(s.labels(), after_boxes)


def test_session_set_image_refused_changes_nothing_and_bool_images_are_taken():
    s = _session()
    a = s.new_object()
    s.add_box(a, BOX_A)
    before = s.labels()
    with pytest.raises(ValueError):
        s.set_image(np.full(SHAPE, np.nan, np.float32))
    assert np.array_equal(s.labels(), before) and a in s.objects
    s.set_image(_image() > 100)
    assert s.image.dtype == np.uint8 and s.image.max() == 255 and not s.objects


@pytest.mark.parametrize("call", [
    lambda s, o: s.add_point(o, (10, 10, 10), positive="no"),
    lambda s, o: s.add_point(o, (True, False, True)),
    lambda s, o: s.add_point(o, "101"),
    lambda s, o: s.add_box(o, dict(BOX_A, z_min="6")),
    lambda s, o: s.add_box(o, dict(BOX_A, z_max=True)),
])
def test_session_refuses_what_is_not_an_integer_or_a_bool(call):
    s = _session()
    o = s.new_object()
    with pytest.raises(ValueError):
        call(s, o)
    assert not s.objects[o].clicks and s.objects[o].box is None


def test_session_refuses_a_bad_engine_config_at_construction():
    from dcm.errors import ConfigError

    with pytest.raises(ConfigError, match="engine.fusion must be one of"):
        InteractiveSession(config={"engine": {"fusion": "vote"}}, experts={"global": StubExpert("global", 4, 0.9)})


# ------------------------------------------------------------------------------- end to end, bundled weights
def test_protocol_with_the_bundled_weights_keeps_every_click(tmp_path):
    """The 6-step protocol (organisers' click rule) with configs/dcm_small.yaml and weights/dcm_small.pt on
    a synthetic case: every click given so far is kept after every step."""
    import torch

    from dcm.data.synthetic import generate_case
    from dcm.engine.clicks import clicks_kept as count
    from dcm.evaluate import InProcessPredictor, evaluate_case
    from dcm.experts import build_experts_from_config

    torch.manual_seed(0)
    cfg, experts = build_experts_from_config("dcm_small")
    predictor = DCMPredictor(experts, cfg["engine"])
    totals = [0, 0]

    def counting(case):
        segs = predictor(case)
        kept, total = count(segs, case.objects)
        totals[0] += kept
        totals[1] += total
        return segs

    from dcm.data.cases import case_from_arrays

    arrays = generate_case("CT", seed=30, shape=(20, 40, 40), n_objects=3)
    evaluate_case(case_from_arrays(arrays, name="CT_e2e"), InProcessPredictor(counting), tmp_path)
    assert totals[1] >= 10
    assert totals[0] == totals[1]


@pytest.mark.parametrize("bad", ["folder", "under_file", "proc"])
def test_session_save_to_an_unwritable_path_is_one_line_naming_it(tmp_path, bad):
    from dcm.errors import DCMError

    s = _session()
    s.add_box(s.new_object(), BOX_A)
    (tmp_path / "a_file").write_text("x")
    path = {"folder": tmp_path, "under_file": tmp_path / "a_file" / "m.nii.gz",
            "proc": Path("/proc/dcm_test/m.nii.gz")}[bad]
    with pytest.raises(DCMError) as e:
        s.save(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value) and ".tmp" not in str(e.value)


def test_a_bool_image_in_a_case_file_is_predicted_as_0_255(tmp_path):
    from dcm.data.cases import case_to_arrays, load_case, atomic_savez

    image = _image() > 100
    atomic_savez(tmp_path / "CT_bool.npz", **case_to_arrays(image, [1.0, 1.0, 1.0],
                                                            boxes=[BOX_A]))
    case = load_case(tmp_path / "CT_bool.npz")
    assert case.image.dtype == np.uint8 and set(np.unique(case.image)) == {0, 255}
    experts = {"global": StubExpert("global", 4, 0.9)}
    segs = DCMPredictor(experts, {"policy": "global_only"})(case)
    assert segs.any()


def test_session_remove_frees_the_removed_objects_clicked_voxels_for_the_others():
    s = _session(policy="global_only")
    a, b = s.new_object(), s.new_object()
    s.add_box(a, BOX_A)
    s.add_point(a, (10, 12, 12), positive=True)
    s.add_box(b, BOX_B)  # covers a's click; b may not take a's clicked voxels while a exists
    assert s.labels()[10, 12, 12] == a
    s.remove(a)
    assert s.labels()[10, 12, 12] == b  # replayed without a: b's answer stands there


@pytest.mark.parametrize("scope", ["click_sign", "click_part"])
def test_update_scope_a_click_step_changes_the_mask_only_the_way_the_click_asks(scope):
    # Previous mask: the first ball minus a cap, plus a wrong blob far away. The user clicks the cap
    # (positive). The experts answer with the whole first ball, drop the far blob and add a second far blob.
    first = _ball((10, 10, 10), 5)
    cap = first & (np.indices(SHAPE)[2] >= 12)
    far_old, far_new = _ball((10, 30, 30), 3), _ball((10, 30, 10), 3)
    prev = ((first & ~cap) | far_old).astype(np.uint8)
    prob = (first | far_new).astype(np.float32)
    experts = {"global": MapExpert("global", prob)}
    obj = ObjectPrompts(1, box=Box(5, 15, 10, 3, 3, 36, 36), clicks=[Click((10, 10, 14), True)])
    cfg = {"policy": "global_only", "fusion": "local_overrides", "update_scope": scope,
           "max_removal": 0}  # the whole answer's removal below: no cap
    segs = DCMPredictor(experts, cfg)(_case([obj], prev))
    assert _all_kept(segs, [obj])
    assert (segs[cap] == 1).all()                  # the addition the click asked for is taken
    assert (segs[far_old] == 1).all()              # a positive click removes nothing
    if scope == "click_part":
        assert (segs[far_new] == 0).all()          # ... and adds only where it was given
    else:
        assert (segs[far_new] == 1).all()
    whole = DCMPredictor(experts, {**cfg, "update_scope": "whole"})(_case([obj], prev))
    assert (whole[far_old] == 0).all() and (whole[far_new] == 1).all()


def test_update_scope_negative_click_only_removes():
    first = _ball((10, 10, 10), 5)
    bump = _ball((10, 10, 16), 2) & ~first
    prev = (first | bump).astype(np.uint8)
    prob = (first | _ball((10, 30, 30), 3)).astype(np.float32)  # removes the bump, adds a far blob
    experts = {"global": MapExpert("global", prob)}
    obj = ObjectPrompts(1, box=Box(5, 15, 10, 3, 3, 36, 36), clicks=[Click((10, 10, 17), False)])
    cfg = {"policy": "global_only", "fusion": "local_overrides", "update_scope": "click_sign"}
    segs = DCMPredictor(experts, cfg)(_case([obj], prev))
    assert _all_kept(segs, [obj])
    assert (segs[bump] == 0).all() and (segs[first] == 1).all()
    assert (segs[_ball((10, 30, 30), 3)] == 0).all()


def test_max_removal_takes_at_most_that_fraction_nearest_the_click():
    # The previous mask is a ball; after a negative click at its edge the expert keeps only a small piece on
    # the far side. With max_removal 0.25 the step removes at most a quarter of the ball, the voxels nearest
    # the click; without the cap the expert's answer stands.
    ball = _ball((10, 20, 20), 6)
    piece = ball & (np.indices(SHAPE)[2] <= 16)
    prev = ball.astype(np.uint8)
    experts = {"global": MapExpert("global", piece.astype(np.float32))}
    click = (10, 20, 26)
    obj = ObjectPrompts(1, box=Box(4, 16, 10, 14, 14, 26, 26), clicks=[Click(click, False)])
    cfg = {"policy": "global_only", "fusion": "local_overrides", "max_removal": 0.25,
           "click_correction": {"methods": []}}
    segs = DCMPredictor(experts, cfg)(_case([obj], prev))
    assert _all_kept(segs, [obj])
    removed = ball & (segs != 1)
    assert 0 < removed.sum() <= 0.25 * ball.sum() + 1  # + the click neighbourhood's own voxels, if any
    distance = _distance(click)
    kept_answer_removed = ball & (segs == 1) & ~piece  # what the expert removed and the cap kept
    assert kept_answer_removed.any() and distance[removed].max() <= distance[kept_answer_removed].min() + 1e-9
    free = DCMPredictor(experts, {**cfg, "max_removal": 0})(_case([obj], prev))
    assert ((free == 1) == piece).all()
    with pytest.raises(ValueError, match="max_removal"):
        DCMPredictor(experts, {"max_removal": 1.5})


def test_max_addition_adds_at_most_that_multiple_nearest_the_click():
    # The previous mask is a small ball; after a positive click at its edge the expert answers with a slab
    # far larger. With max_addition 2 (and no floor) the step adds at most twice the ball, the voxels nearest
    # the click; with the floor, twice a quarter of the box; without the cap (0) the answer stands; an empty
    # previous mask is not capped.
    ball = _ball((10, 20, 20), 3)
    slab = np.zeros(SHAPE, bool)
    slab[4:16, 10:30, 10:30] = True
    experts = {"global": MapExpert("global", (ball | slab).astype(np.float32))}
    click = (10, 20, 23)
    obj = ObjectPrompts(1, box=Box(4, 15, 10, 10, 10, 29, 29), clicks=[Click(click, True)])
    cfg = {"policy": "global_only", "fusion": "local_overrides", "max_addition": 2.0, "addition_floor": 0.0,
           "click_correction": {"methods": []}}
    segs = DCMPredictor(experts, cfg)(_case([obj], ball.astype(np.uint8)))
    assert _all_kept(segs, [obj]) and ((segs == 1) >= ball).all()
    added = (segs == 1) & ~ball
    assert added.sum() == 2 * ball.sum()
    distance = _distance(click)
    assert distance[added].max() <= distance[slab & ~ball & (segs != 1)].min() + 1e-9
    floored = DCMPredictor(experts, {**cfg, "addition_floor": 0.25})(_case([obj], ball.astype(np.uint8)))
    box_volume = 12 * 20 * 20
    assert ((floored == 1) & ~ball).sum() == int(2 * 0.25 * box_volume) > 2 * ball.sum()
    free = DCMPredictor(experts, {**cfg, "max_addition": 0})(_case([obj], ball.astype(np.uint8)))
    assert ((free == 1) == (ball | slab)).all()
    fresh = DCMPredictor(experts, cfg)(_case([obj], np.zeros(SHAPE, np.uint8)))
    assert ((fresh == 1) == (ball | slab)).all()
    with pytest.raises(ValueError, match="max_addition"):
        DCMPredictor(experts, {"max_addition": -1})
    with pytest.raises(ValueError, match="addition_floor"):
        DCMPredictor(experts, {"addition_floor": 2})


def test_beyond_cap_reject_takes_none_of_a_removal_or_addition_past_its_cap():
    # A negative click at the ball's edge; the expert keeps only a far piece (a removal past the 0.25 cap):
    # with removal_beyond_cap reject the ball stays but for the click's correction (none here: the click's
    # neighbourhood alone). A removal within the cap is taken whatever the mode. Then a positive click
    # answered with a slab far larger than twice the ball: with addition_beyond_cap reject nothing of it is
    # added but the click's neighbourhood.
    ball = _ball((10, 20, 20), 6)
    piece = ball & (np.indices(SHAPE)[2] <= 16)
    click = (10, 20, 26)
    obj = ObjectPrompts(1, box=Box(4, 16, 10, 14, 14, 26, 26), clicks=[Click(click, False)])
    cfg = {"policy": "global_only", "fusion": "local_overrides", "max_removal": 0.25,
           "removal_beyond_cap": "reject", "click_correction": {"methods": []}}
    segs = DCMPredictor({"global": MapExpert("global", piece.astype(np.float32))}, cfg)(
        _case([obj], ball.astype(np.uint8)))
    assert _all_kept(segs, [obj])
    neighbourhood = np.zeros(SHAPE, bool)
    neighbourhood[tuple(click_neighbourhood(click, SHAPE).T)] = True
    assert ((segs == 1) == (ball & ~neighbourhood)).all()
    small = ball & ~(np.indices(SHAPE)[2] >= 25)  # removes under a quarter of the ball: taken as it is
    assert (ball & ~small).sum() <= 0.25 * ball.sum()
    segs = DCMPredictor({"global": MapExpert("global", small.astype(np.float32))}, cfg)(
        _case([obj], ball.astype(np.uint8)))
    assert ((segs == 1) == (small & ~neighbourhood)).all()

    little = _ball((10, 20, 20), 3)
    slab = np.zeros(SHAPE, bool)
    slab[4:16, 10:30, 10:30] = True
    grow = ObjectPrompts(1, box=Box(4, 15, 10, 10, 10, 29, 29), clicks=[Click((10, 20, 23), True)])
    cfg = {"policy": "global_only", "fusion": "local_overrides", "max_addition": 2.0, "addition_floor": 0.0,
           "addition_beyond_cap": "reject", "click_correction": {"methods": []}}
    segs = DCMPredictor({"global": MapExpert("global", (little | slab).astype(np.float32))}, cfg)(
        _case([grow], little.astype(np.uint8)))
    near = np.zeros(SHAPE, bool)
    near[tuple(click_neighbourhood((10, 20, 23), SHAPE).T)] = True
    assert ((segs == 1) == (little | near)).all()
    with pytest.raises(ValueError, match="removal_beyond_cap"):
        DCMPredictor({}, {"removal_beyond_cap": "cut"})


def test_reject_without_box_rejects_for_objects_without_a_box_and_trims_for_the_others():
    ball = _ball((10, 20, 20), 6)
    piece = ball & (np.indices(SHAPE)[2] <= 16)
    experts = {"global": MapExpert("global", piece.astype(np.float32))}
    cfg = {"policy": "global_only", "fusion": "local_overrides", "max_removal": 0.25,
           "removal_beyond_cap": "reject_without_box", "click_correction": {"methods": []}}
    click = Click((10, 20, 26), False)
    boxed = ObjectPrompts(1, box=Box(4, 16, 10, 14, 14, 26, 26), clicks=[click])
    unboxed = ObjectPrompts(1, box=None, clicks=[click])
    trimmed = DCMPredictor(experts, cfg)(_case([boxed], ball.astype(np.uint8)))
    assert 0.2 * ball.sum() < (ball & (trimmed != 1)).sum() <= 0.25 * ball.sum() + 1
    kept = DCMPredictor(experts, cfg)(_case([unboxed], ball.astype(np.uint8)))
    assert _all_kept(kept, [unboxed]) and (ball & (kept != 1)).sum() <= 7  # the click's neighbourhood only


def test_reject_takes_a_removal_of_exactly_the_cap_and_refuses_one_voxel_more():
    ball = _ball((10, 20, 20), 6)
    click = (10, 20, 26)
    cap = int(0.25 * ball.sum())
    voxels = np.argwhere(ball)
    order = np.argsort(_distance(click)[ball], kind="stable")
    obj = ObjectPrompts(1, box=Box(4, 16, 10, 14, 14, 26, 26), clicks=[Click(click, False)])
    cfg = {"policy": "global_only", "fusion": "local_overrides", "max_removal": 0.25,
           "removal_beyond_cap": "reject", "click_correction": {"methods": []}}
    neighbourhood = np.zeros(SHAPE, bool)
    neighbourhood[tuple(click_neighbourhood(click, SHAPE).T)] = True
    for removed, taken in ((cap, True), (cap + 1, False)):
        answer = ball.copy()
        answer[tuple(voxels[order[:removed]].T)] = False
        segs = DCMPredictor({"global": MapExpert("global", answer.astype(np.float32))}, cfg)(
            _case([obj], ball.astype(np.uint8)))
        assert ((segs == 1) == ((answer if taken else ball) & ~neighbourhood)).all(), removed


def test_addition_reject_without_box_rejects_a_jump_without_a_box_and_trims_with_one():
    little = _ball((10, 20, 20), 3)
    slab = np.zeros(SHAPE, bool)
    slab[4:16, 10:30, 10:30] = True
    experts = {"global": MapExpert("global", (little | slab).astype(np.float32))}
    cfg = {"policy": "global_only", "fusion": "local_overrides", "max_addition": 2.0, "addition_floor": 0.0,
           "addition_beyond_cap": "reject_without_box", "click_correction": {"methods": []}}
    click = Click((10, 20, 23), True)
    near = np.zeros(SHAPE, bool)
    near[tuple(click_neighbourhood(click.zyx, SHAPE).T)] = True
    boxed = DCMPredictor(experts, cfg)(_case([ObjectPrompts(1, box=Box(4, 15, 10, 10, 10, 29, 29), clicks=[click])],
                                             little.astype(np.uint8)))
    assert ((boxed == 1) & ~little & ~near).sum() >= 2 * little.sum() - len(click_neighbourhood(click.zyx, SHAPE))
    unboxed = DCMPredictor(experts, cfg)(_case([ObjectPrompts(1, box=None, clicks=[click])], little.astype(np.uint8)))
    assert ((unboxed == 1) == (little | near)).all()


def test_positive_correction_within_step_caps_is_held_to_the_addition_cap():
    # The expert answers 0.4 on a slab around a small ball (below the threshold): the positive click beside
    # the ball is not kept, and the probability correction (prob > 0.3) would add the slab on its crop.
    # Within the step's addition cap (0.5 times the 123-voxel ball: 61 voxels) every crop down to 5^3 is too
    # large, so the click keeps its neighbourhood alone.
    little = _ball((10, 20, 20), 3)
    slab = np.zeros(SHAPE, bool)
    slab[4:16, 10:30, 10:30] = True
    prob = np.where(little, 1.0, np.where(slab, 0.4, 0.0)).astype(np.float32)
    click = Click((10, 20, 26), True)
    obj = ObjectPrompts(1, box=Box(4, 15, 10, 10, 10, 29, 29), clicks=[click])
    correction = {"methods": ["probability"], "probability_levels": [0.3], "max_box_fraction": 0}
    cfg = {"policy": "global_only", "fusion": "local_overrides", "max_addition": 0.5, "addition_floor": 0.0,
           "click_correction": correction}
    experts = {"global": MapExpert("global", prob)}
    free = DCMPredictor(experts, cfg)(_case([obj], little.astype(np.uint8)))
    assert ((free == 1) & ~little).sum() > 0.5 * little.sum()
    cfg["click_correction"] = {**correction, "within_step_caps": True}
    capped = DCMPredictor(experts, cfg)(_case([obj], little.astype(np.uint8)))
    near = np.zeros(SHAPE, bool)
    near[tuple(click_neighbourhood(click.zyx, SHAPE).T)] = True
    assert _all_kept(capped, [obj]) and ((capped == 1) == (little | near)).all()


def test_correction_within_the_removal_cap_or_mask_fraction_is_retried_on_smaller_crops_until_it_fits():
    # The expert keeps the whole ball (0.6 everywhere on it) although the user clicked its edge negative; the
    # probability correction (level 0.3: prob < 0.7) removes the ball on its crop (half-size 6 voxels: the
    # object's radius), 628 of 925 voxels. Within the step's caps it may remove a quarter of the previous
    # mask at most: refused on that crop, taken on the next (half-size 3: 185 voxels).
    ball = _ball((10, 20, 20), 6)
    click = (10, 20, 25)
    obj = ObjectPrompts(1, box=Box(4, 16, 10, 14, 14, 26, 26), clicks=[Click(click, False)])
    correction = {"methods": ["probability"], "probability_levels": [0.3], "max_box_fraction": 0}
    cfg = {"policy": "global_only", "fusion": "local_overrides", "max_removal": 0.25,
           "click_correction": correction}
    experts = {"global": MapExpert("global", 0.6 * ball.astype(np.float32))}
    free = DCMPredictor(experts, cfg)(_case([obj], ball.astype(np.uint8)))
    crop6 = np.zeros(SHAPE, bool)
    crop6[4:17, 14:27, 19:32] = True
    assert _all_kept(free, [obj]) and ((free == 1) == (ball & ~crop6)).all()
    cfg["click_correction"] = {**correction, "within_step_caps": True}
    capped = DCMPredictor(experts, cfg)(_case([obj], ball.astype(np.uint8)))
    assert _all_kept(capped, [obj])
    crop = np.zeros(SHAPE, bool)
    crop[7:14, 17:24, 22:29] = True
    assert ((capped == 1) == (ball & ~crop)).all() and (ball & crop).sum() <= 0.25 * ball.sum()
    # the same bound from click_correction.max_mask_fraction, with the step's caps off
    cfg = {**cfg, "max_removal": 0, "click_correction": {**correction, "max_mask_fraction": 0.25}}
    by_mask = DCMPredictor(experts, cfg)(_case([obj], ball.astype(np.uint8)))
    assert (by_mask == capped).all()
    with pytest.raises(ValueError, match="max_mask_fraction"):
        DCMPredictor(experts, {"click_correction": {"max_mask_fraction": -1}})


def test_label_counts_counts_every_label_slab_by_slab():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 256, size=(7, 5, 6)).astype(np.uint8)
    expected = np.bincount(labels.ravel(), minlength=256)
    for chunk in (1, 29, 30, 60, 90, 1 << 20):  # chunks across slices, a partial last chunk, everything
        assert np.array_equal(label_counts(labels, chunk_voxels=chunk), expected)
        strided = labels[:, :, ::2]  # not contiguous: counted z slab by z slab (3 voxels a slice here)
        assert np.array_equal(label_counts(strided, chunk_voxels=chunk), np.bincount(strided.ravel(), minlength=256))
    with pytest.raises(TypeError, match="uint8"):
        label_counts(labels.astype(np.int32))


@pytest.mark.parametrize("overlap", ["later_wins", "highest_prob"])
def test_max_taken_bounds_what_a_later_object_takes_of_an_earlier_one(overlap):
    # Object 1 holds a ball from the last step; object 2's answer claims 60 % of it. Under the cap a step's
    # answers take at most a quarter of object 1's previous mask, the voxels nearest object 2's click; what
    # object 1 gained in this very step is not capped; object 2's own click neighbourhood is written and
    # counts; without a previous map (the box step), keep_others and max_taken 0 nothing is capped.
    ball = _ball((10, 20, 20), 6)
    prev = ball.astype(np.uint8)
    claim = ball & (np.indices(SHAPE)[2] >= 18)
    region = tuple(slice(0, n) for n in SHAPE)
    click = (10, 20, 27)

    def written(max_taken, overlap=overlap, prob_1=None, claim=claim, protection=None, prev_pred=prev,
                prev_counts=None):
        segs = prev.copy()
        writer = LabelWriter(segs, overlap, protection, max_taken=max_taken, prev_pred=prev_pred,
                             prev_counts=prev_counts)
        if prob_1 is not None:
            writer.write(1, FusedPrediction(region, prob_1 * 0.6, True))
        writer.write(2, FusedPrediction(region, claim.astype(np.float32) * 0.9, True), anchor_zyx=click)
        return segs

    allowance = int(0.25 * ball.sum())
    segs = written(0.25)
    assert np.array_equal(segs, written(0.25, prev_counts=label_counts(prev)))  # the caller's counts: the same
    taken = ball & (segs == 2)
    assert taken.sum() == allowance < claim.sum()
    distance = _distance(click)
    kept = claim & (segs == 1)
    assert kept.any() and distance[taken].max() <= distance[kept].min() + 1e-9
    assert ((written(0.0) == 2) == claim).all()
    assert ((written(0.25, "keep_others") == 2).sum() == 0)
    growth = _ball((10, 20, 28), 3) & ~ball  # object 1 grows there this step; object 2 claims it all
    segs = written(0.25, prob_1=(ball | growth).astype(np.float32), claim=claim | growth)
    assert ((segs == 2) & growth).sum() == growth.sum() > 0
    assert ((segs == 2) & ball).sum() == allowance  # the growth did not use up the allowance
    assert ((written(0.25, prev_pred=None) == 2) == claim).all()  # no previous map: nothing to cap
    far = (10, 20, 15)  # object 2's click deep in object 1: its neighbourhood is written and counts
    two = ObjectPrompts(2, clicks=[Click(far, True)])
    segs = written(0.25, claim=claim | _ball(far, 1), protection=ClickProtection(promises_of([two], SHAPE)))
    assert _all_kept(segs, [two]) and (ball & (segs == 2)).sum() == allowance
    with pytest.raises(ValueError, match="max_taken"):
        DCMPredictor({}, {"max_taken": -0.1})


def test_update_scope_is_checked():
    with pytest.raises(ValueError, match="update_scope"):
        DCMPredictor({}, {"update_scope": "nearby"})


def test_a_correction_larger_than_the_bound_is_retried_smaller_or_dropped():
    # Both experts miss; the user clicks the bright ball. Unbounded, the correction takes much of the ball;
    # bounded to a tiny fraction of the (small) box, it must stay within the bound and the click is still kept.
    nothing = np.zeros(SHAPE, np.float32)
    experts = {"global": MapExpert("global", nothing), "local": MapExpert("local", nothing)}
    obj = ObjectPrompts(1, box=Box(5, 15, 10, 5, 5, 15, 15), clicks=[Click((10, 10, 10), True)])
    free = _run("global_only", "local_overrides", experts, [obj], np.zeros(SHAPE, np.uint8),
                click_correction={"max_box_fraction": 0})
    box_volume = 11 * 11 * 11
    bounded = _run("global_only", "local_overrides", experts, [obj], np.zeros(SHAPE, np.uint8),
                   click_correction={"max_box_fraction": 0.05})
    assert _all_kept(free, [obj]) and _all_kept(bounded, [obj])
    assert (free == 1).sum() > 0.05 * box_volume
    assert 7 <= (bounded == 1).sum() <= 0.05 * box_volume
    with pytest.raises(ValueError, match="max_box_fraction"):
        DCMPredictor(experts, {"click_correction": {"max_box_fraction": -1}})


def test_local_click_radius_lets_the_local_answer_stand_near_the_clicks_in_its_window():
    # The global expert misses the second ball; the local expert (window around it) finds it. With
    # local_click_radius 2 (rule off) the local answer stands within 2 voxels of the click, nowhere else.
    second = _ball((10, 28, 28), 4)
    window = (slice(2, 18), slice(20, 36), slice(20, 36))
    experts = {"global": MapExpert("global", np.zeros(SHAPE, np.float32)),
               "local": MapExpert("local", second.astype(np.float32), roi=window)}
    obj = ObjectPrompts(1, clicks=[Click((10, 28, 28), True), Click((10, 5, 5), True)])  # the 2nd: outside
    cfg = {"policy": "dual", "fusion": "click_region", "local_margin": 0.45, "honour_clicks": False}
    segs = DCMPredictor(experts, {**cfg, "local_click_radius": 2})(_case([obj], np.zeros(SHAPE, np.uint8)))
    near = _ball((10, 28, 28), 2)
    assert (segs[near] == 1).all() and (segs[~near] == 0).all()
    off = DCMPredictor(experts, cfg)(_case([obj], np.zeros(SHAPE, np.uint8)))
    assert (off == 0).all()
    with pytest.raises(ValueError, match="local_click_radius"):
        DCMPredictor(experts, {"local_click_radius": -1})
