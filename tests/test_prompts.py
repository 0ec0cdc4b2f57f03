"""One prompt representation: dcm.prompts types, the case-file writer, the protocol's Click, the trainers'
click form and the box-centre click rule."""

from pathlib import Path

import numpy as np
import pytest
import torch

from dcm.data.cases import atomic_savez, case_from_arrays, case_to_arrays, load_case, load_npz, prompts_to_arrays
from dcm.prompts import (
    BOX_KEYS,
    Box,
    Click,
    ObjectPrompts,
    box_center,
    box_center_click,
    box_center_in_frame,
)
from dcm.protocol import boxes_from_labels, next_click, next_clicks, record_next_clicks
from dcm.training.clicks import PADDING_CLICK, click_from_t, click_tensors, click_to_t

SHAPE = (10, 20, 30)
BOX_A = Box(z_min=2, z_max=7, z_mid=4, z_mid_x_min=3, z_mid_y_min=4, z_mid_x_max=20, z_mid_y_max=15)
BOX_B = Box(z_min=0, z_max=9, z_mid=5, z_mid_x_min=0, z_mid_y_min=1, z_mid_x_max=29, z_mid_y_max=18)


def _image():
    return np.arange(np.prod(SHAPE), dtype=np.uint8).reshape(SHAPE)


def _objects():
    return [
        ObjectPrompts(1, BOX_A, [Click((3, 5, 5), True), Click((5, 5, 5), False), Click((4, 6, 6), True)]),
        ObjectPrompts(2, BOX_B, [Click((2, 2, 2), True)]),
    ]


def test_old_imports_are_the_same_objects():
    import dcm.data as data
    import dcm.data.cases as cases
    import dcm.prompts as prompts

    for name in ("Box", "Click", "ObjectPrompts", "BOX_KEYS", "parse_voxel"):
        assert getattr(cases, name) is getattr(prompts, name)
    assert data.Box is Box and data.Click is Click and data.ObjectPrompts is ObjectPrompts
    assert list(BOX_A.to_dict()) == list(BOX_KEYS) and Box.from_dict(BOX_A.to_dict()) == BOX_A


# ------------------------------------------------------------------------------------------ case files


@pytest.mark.parametrize("with_boxes", [True, False])
def test_prompts_round_trip_through_challenge_arrays(tmp_path, with_boxes):
    objects = _objects()
    if not with_boxes:
        objects = [ObjectPrompts(o.label, None, o.clicks) for o in objects]
    prev = np.zeros(SHAPE, np.uint8)
    prev[3, 5, 5] = 2
    arrays = prompts_to_arrays(_image(), (0.8, 0.8, 2.5), objects, prev_pred=prev)
    assert ("boxes" in arrays) == with_boxes
    case = case_from_arrays(arrays, name="CT_rt")
    assert case.objects == objects and not case.warnings
    np.testing.assert_array_equal(case.prev_pred, prev)
    atomic_savez(tmp_path / "CT_rt.npz", **arrays)
    assert load_case(tmp_path / "CT_rt.npz").objects == objects


def test_writer_matches_the_hand_built_organisers_layout():
    """What the evaluator wrote by hand (``clicks`` dicts, ``clicks_order`` with None for a perfect object)."""
    objects = _objects()
    clicked = [[True, True, True], [True, False, False]]
    got = prompts_to_arrays(_image(), (1, 1, 2), objects, clicked=clicked)
    expected = case_to_arrays(_image(), (1, 1, 2), boxes=[BOX_A.to_dict(), BOX_B.to_dict()],
                              clicks=[{"fg": [[3, 5, 5], [4, 6, 6]], "bg": [[5, 5, 5]]}, {"fg": [[2, 2, 2]], "bg": []}],
                              clicks_order=[["fg", "bg", "fg"], ["fg", None, None]])
    assert sorted(got) == sorted(expected)
    for key in expected:
        assert got[key].dtype == expected[key].dtype and got[key].shape == expected[key].shape, key
        assert got[key].tolist() == expected[key].tolist(), key
    # without a None, clicks_order is the organisers' 2D <U2 array
    full = prompts_to_arrays(_image(), (1, 1, 2), [objects[1], ObjectPrompts(2, BOX_A, [Click((1, 1, 1), False)])])
    assert full["clicks_order"].dtype.kind == "U" and full["clicks_order"].tolist() == [["fg"], ["bg"]]
    # the box step: boxes only
    box_step = prompts_to_arrays(_image(), (1, 1, 2), [ObjectPrompts(1, BOX_A)], with_clicks=False)
    assert sorted(box_step) == ["boxes", "imgs", "spacing"]
    assert case_from_arrays(box_step).objects == [ObjectPrompts(1, BOX_A)]


def test_writer_refuses_inconsistent_prompts():
    with pytest.raises(ValueError, match="no box"):
        prompts_to_arrays(_image(), (1, 1, 1), [ObjectPrompts(1, BOX_A), ObjectPrompts(2)])
    with pytest.raises(ValueError, match="click steps"):
        prompts_to_arrays(_image(), (1, 1, 1), _objects(), clicked=[[True, True], [True]])


# ------------------------------------------------------------------------------------------ protocol


def test_next_click_returns_the_case_click():
    gt = np.zeros((12, 14, 16), bool)
    gt[2:9, 3:11, 4:13] = True
    first = next_click(gt, np.zeros_like(gt))
    assert isinstance(first, Click) and first.positive and first.kind == "fg" and gt[first.zyx]
    assert all(type(c) is int for c in first.zyx)
    pred = gt.copy()
    pred[0:2] = True  # a false-positive slab
    pred[2:9, 3:11, 4:13] = True
    wrong = next_click(gt, pred)
    assert isinstance(wrong, Click) and not wrong.positive and not gt[wrong.zyx] and pred[wrong.zyx]
    assert next_click(gt, gt) is None

    gts = gt.astype(np.uint8)
    gts[10:12, 0:3, 0:3] = 2
    segs = gts.copy()
    segs[10:12, 0:3, 0:3] = 0
    assert next_clicks(gts, segs, [1, 2]) == [None, next_click(gts == 2, segs == 2)]
    clicks, order = [{"fg": [], "bg": []}, {"fg": [], "bg": []}], [[], []]
    record_next_clicks(gts, segs, [1, 2], clicks, order)
    c2 = next_click(gts == 2, segs == 2)
    assert order == [[None], ["fg"]] and clicks[1]["fg"] == [list(c2.zyx)] and clicks[0] == {"fg": [], "bg": []}


def test_evaluator_writes_its_prompts_with_none_for_a_perfect_object(tmp_path):
    from dcm.data.cases import Case
    from dcm.evaluate import evaluate_case

    gts = np.zeros(SHAPE, np.uint8)
    gts[2:8, 4:16, 3:21] = 1
    gts[1:3, 1:4, 24:28] = 2
    boxes = [Box.from_dict(b) for b in boxes_from_labels(gts)]
    case = Case("CT_eval", _image(), (1.0, 1.0, 1.0), [ObjectPrompts(i + 1, b) for i, b in enumerate(boxes)], gts=gts)
    seen = []

    def run_step(in_file: Path, workdir: Path):
        seen.append(load_npz(in_file))
        segs = np.where(gts == 1, 1, 0).astype(np.uint8)  # object 1 perfect, object 2 never found
        atomic_savez(workdir / "outputs" / in_file.name, segs=segs)
        return 0.0, ""

    evaluate_case(case, run_step, tmp_path)
    assert len(seen) == 6 and "clicks" not in seen[0]
    last = case_from_arrays(seen[-1], name="CT_eval")
    assert [o.box for o in last.objects] == boxes
    assert seen[-1]["clicks_order"].tolist() == [[None] * 5, ["fg"] * 5]
    assert last.objects[0].clicks == [] and len(last.objects[1].clicks) == 5
    assert last.objects[1].clicks[0] == next_click(gts == 2, np.zeros(SHAPE, bool))


# ------------------------------------------------------------------------------------------ trainers


def test_trainer_click_form_round_trip():
    for click in (Click((1, 2, 3), True), Click((4, 0, 7), False)):
        t = click_to_t(click)
        assert t == (click.zyx, 1 if click.positive else 0)
        assert click_from_t(t) == click
    assert click_to_t(None) == PADDING_CLICK == ((0, 0, 0), -1) and click_from_t(PADDING_CLICK) is None
    assert click_from_t((np.array([1, 2, 3]), np.int64(1))) == Click((1, 2, 3), True)

    per_object = [[click_to_t(Click((1, 2, 3), True)), click_to_t(None)],
                  [click_to_t(Click((0, 5, 6), False)), click_to_t(Click((7, 8, 9), True))]]
    coords, labels = click_tensors(per_object, torch.device("cpu"))
    assert coords.dtype == torch.float32 and coords.shape == (2, 2, 3)
    assert labels.dtype == torch.long and labels.tolist() == [[1, -1], [0, 1]]
    back = [[click_from_t((tuple(p), lab)) for p, lab in zip(c.long().tolist(), l.tolist())]
            for c, l in zip(coords, labels)]
    assert back == [[Click((1, 2, 3), True), None], [Click((0, 5, 6), False), Click((7, 8, 9), True)]]


# ------------------------------------------------------------------------------------------ box centre


def test_box_center_rule():
    assert box_center(BOX_A) == BOX_A.center_zyx == (4.5, 9.5, 11.5)
    assert box_center(BOX_A, to_voxel=True) == (4, 9, 11)
    assert BOX_A.size_zyx == (6, 12, 18)  # bounds inclusive
    assert box_center_click(BOX_A) == Click((4, 9, 11), True)
    assert box_center_in_frame(64) == (31, 31, 31) and box_center_in_frame(128) == (63, 63, 63)
    # the voxel is int() of the exact centre (the engine's former rule) and (lo + hi) // 2 (the local expert's)
    rng = np.random.default_rng(0)
    for _ in range(200):
        lo = rng.integers(0, 500, 3)
        hi = lo + rng.integers(0, 500, 3)
        box = Box(int(lo[0]), int(hi[0]), int(lo[0]), int(lo[2]), int(lo[1]), int(hi[2]), int(hi[1]))
        voxel = box_center(box, to_voxel=True)
        assert voxel == tuple(int(c) for c in box.center_zyx)
        assert voxel == tuple((a + b) // 2 for a, b in box.bounds_zyx)
        assert all(type(c) is int for c in voxel)


def test_engine_local_view_clicks_the_box_center():
    from dcm.engine.predictor import _local_view

    obj = ObjectPrompts(1, BOX_A)
    assert _local_view(obj).clicks == [box_center_click(BOX_A)]
    with_click = ObjectPrompts(1, BOX_A, [Click((1, 1, 1), False)])
    assert _local_view(with_click) is with_click
