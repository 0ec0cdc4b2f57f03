"""Challenge case I/O: every form a case file takes, validation errors, atomic writes."""

import os
from pathlib import Path

import numpy as np
import pytest

from dcm.data.cases import (
    Box,
    case_from_arrays,
    case_to_arrays,
    atomic_savez,
    load_case,
    save_segmentation,
)
from dcm.errors import CaseError

SHAPE = (10, 20, 30)
BOX = dict(z_min=2, z_max=7, z_mid=4, z_mid_x_min=3, z_mid_y_min=4, z_mid_x_max=20, z_mid_y_max=15)


def _write(tmp_path, name="CT_case", **arrays):
    path = tmp_path / f"{name}.npz"
    np.savez(path, **arrays)
    return path


def _image():
    return np.arange(np.prod(SHAPE), dtype=np.uint8).reshape(SHAPE)


def test_box_step(tmp_path):
    path = _write(tmp_path, imgs=_image(), spacing=np.array([0.8, 0.8, 5.0]), boxes=np.array([BOX, BOX]))
    case = load_case(path)
    assert case.shape == SHAPE and case.num_objects == 2 and case.has_boxes
    assert case.spacing_xyz == (0.8, 0.8, 5.0) and case.spacing_zyx == (5.0, 0.8, 0.8)
    assert case.objects[1].label == 2 and case.objects[0].box == Box(**BOX)
    assert case.objects[0].box.bounds_zyx == ((2, 7), (4, 15), (3, 20))
    assert case.prev_pred is None and case.modality == "CT"
    assert not case.prev_mask(1).any()


def test_click_step_in_organisers_layout(tmp_path):
    prev = np.zeros(SHAPE, np.uint8)
    prev[3, 5, 5] = 1
    arrays = case_to_arrays(_image(), [1, 1, 2], boxes=[BOX, BOX],
                            clicks=[{"fg": [[3, 5, 5], [4, 6, 6]], "bg": [[5, 5, 5]]}, {"fg": [[2, 2, 2]], "bg": []}],
                            clicks_order=[["fg", "bg", "fg"], ["fg", None, None]], prev_pred=prev)
    assert arrays["clicks"].dtype == object and arrays["clicks_order"].dtype == object
    atomic_savez(tmp_path / "MR_x.npz", **arrays)
    case = load_case(tmp_path / "MR_x.npz")
    kinds = [(c.zyx, c.kind) for c in case.objects[0].clicks]
    assert kinds == [((3, 5, 5), "fg"), ((5, 5, 5), "bg"), ((4, 6, 6), "fg")]
    assert case.objects[0].last_click.zyx == (4, 6, 6) and case.objects[0].last_click.positive
    assert case.objects[1].fg_clicks == [(2, 2, 2)] and case.objects[1].bg_clicks == []
    assert case.prev_mask(1).sum() == 1 and case.prev_pred.dtype == np.uint8


def test_clicks_order_as_2d_string_array(tmp_path):
    arrays = case_to_arrays(_image(), [1, 1, 1], clicks=[{"fg": [[1, 1, 1]], "bg": [[2, 2, 2]]}],
                            clicks_order=[["bg", "fg"]], prev_pred=np.zeros(SHAPE, np.uint8))
    assert arrays["clicks_order"].dtype.kind == "U" and arrays["clicks_order"].shape == (1, 2)
    path = _write(tmp_path, "US_y", **arrays)
    case = load_case(path)
    assert not case.has_boxes
    assert [c.kind for c in case.objects[0].clicks] == ["bg", "fg"]


def test_optional_keys_missing_and_numpy_click_arrays(tmp_path):
    clicks = np.empty(1, dtype=object)
    clicks[0] = {"fg": np.array([[1, 2, 3]]), "bg": np.zeros((0, 3))}
    path = _write(tmp_path, "Microscopy_z", imgs=_image().astype(np.float32), spacing=[1, 1, 1], clicks=clicks)
    case = load_case(path)
    assert case.objects[0].clicks[0].zyx == (1, 2, 3) and case.prev_pred is None


@pytest.mark.parametrize(
    "arrays, field",
    [
        (dict(spacing=[1, 1, 1]), "imgs"),
        (dict(imgs=np.zeros((4, 4)), spacing=[1, 1, 1]), "imgs"),
        (dict(imgs=np.zeros((2, 4, 4, 4)), spacing=[1, 1, 1]), "imgs"),
        (dict(imgs=np.full(SHAPE, np.nan), spacing=[1, 1, 1]), "imgs"),
        (dict(imgs=np.zeros(SHAPE)), "spacing"),
        (dict(imgs=np.zeros(SHAPE), spacing=[1, 0, 1]), "spacing"),
        (dict(imgs=np.zeros(SHAPE), spacing=[1, -1, 1]), "spacing"),
        (dict(imgs=np.zeros(SHAPE), spacing=[1, np.nan, 1]), "spacing"),
        (dict(imgs=np.zeros(SHAPE), spacing=[1, 1]), "spacing"),
        (dict(imgs=np.zeros(SHAPE), spacing=[1, 1, 1], boxes=np.array([{**BOX, "z_max": 10}])), "boxes[0]"),
        (dict(imgs=np.zeros(SHAPE), spacing=[1, 1, 1], boxes=np.array([{**BOX, "z_min": 8}])), "boxes[0]"),
        (dict(imgs=np.zeros(SHAPE), spacing=[1, 1, 1], clicks=np.array([{"fg": [[10, 0, 0]], "bg": []}])), "clicks[0]"),
        (dict(imgs=np.zeros(SHAPE), spacing=[1, 1, 1],
              clicks=np.array([{"fg": [[1.5, 0, 0]], "bg": []}])), "clicks[0]"),
        (dict(imgs=np.zeros(SHAPE), spacing=[1, 1, 1], boxes=np.array([BOX]),
              clicks=np.array([{"fg": [], "bg": []}, {"fg": [], "bg": []}])), "clicks"),
        (dict(imgs=np.zeros(SHAPE), spacing=[1, 1, 1], boxes=np.array([BOX]),
              prev_pred=np.zeros((2, 2, 2))), "prev_pred"),
        (dict(imgs=np.zeros(SHAPE), spacing=[1, 1, 1], boxes=np.array([BOX]),
              prev_pred=np.full(SHAPE, 3)), "prev_pred"),
        (dict(imgs=np.zeros(SHAPE), spacing=[1, 1, 1], boxes=np.array([BOX] * 256)), "boxes"),
    ],
)
def test_bad_input_names_file_and_field(tmp_path, arrays, field):
    path = _write(tmp_path, **arrays)
    with pytest.raises(CaseError) as err:
        load_case(path)
    assert err.value.field == field
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_per_object_problem_kept_when_not_strict(tmp_path):
    path = _write(tmp_path, imgs=np.zeros(SHAPE), spacing=[1, 1, 1], boxes=np.array([BOX, {**BOX, "z_max": 99}]))
    case = load_case(path, strict=False)
    assert case.objects[0].problem is None and case.objects[0].box is not None
    assert "boxes[1]" in case.objects[1].problem and case.objects[1].box is None


def test_truncated_and_non_npz_files(tmp_path):
    good = _write(tmp_path, imgs=np.zeros(SHAPE), spacing=[1, 1, 1])
    data = good.read_bytes()
    bad = tmp_path / "CT_trunc.npz"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CaseError, match="not a readable .npz"):
        load_case(bad)
    text = tmp_path / "notes.npz"
    text.write_text("hello")
    with pytest.raises(CaseError, match="not a readable .npz"):
        load_case(text)
    with pytest.raises(CaseError, match="no such file"):
        load_case(tmp_path / "absent.npz")


def test_save_segmentation_is_atomic_and_checked(tmp_path, monkeypatch):
    out = tmp_path / "out" / "CT_case.npz"
    save_segmentation(out, np.ones(SHAPE, np.int64), shape=SHAPE)
    with np.load(out) as z:
        assert z["segs"].dtype == np.uint8 and z["segs"].shape == SHAPE
    with pytest.raises(CaseError, match="shape"):
        save_segmentation(out, np.ones((2, 2, 2)), shape=SHAPE)
    # A failure while writing leaves the previous complete file and no temporary behind.
    import dcm.data.cases as cases

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(cases.np, "savez_compressed", boom)
    monkeypatch.setattr(cases.np.lib.format, "write_array", boom)  # the level-1 writer
    with pytest.raises(OSError):
        save_segmentation(out, np.zeros(SHAPE, np.uint8), shape=SHAPE)
    assert sorted(os.listdir(out.parent)) == ["CT_case.npz"]
    with np.load(out) as z:
        assert z["segs"].max() == 1


def test_case_from_arrays_in_memory():
    case = case_from_arrays({"imgs": np.zeros((1, 5, 5)), "spacing": [1, 1, 1], "boxes": [
        dict(z_min=0, z_max=0, z_mid=0, z_mid_x_min=0, z_mid_y_min=0, z_mid_x_max=4, z_mid_y_max=4)]}, name="PET_1")
    assert case.shape == (1, 5, 5) and case.path is None and case.modality == "PET"
