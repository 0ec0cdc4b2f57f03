"""Reliability (issue 8): bad input, faults and size, with nothing lost.

* Bad case files through ``predict.sh`` (one call over a folder of them), the evaluator and the session: each
  gets one line naming the file and the field; a per-object problem keeps that object's previous mask while
  the others are predicted; no output is partial (no temporary left, no output for a failed case).
* Size: the engine holds no per-object full-volume array (tracemalloc); ``benchmarks/bench_large_case.py``
  runs the big case.
* Training faults: SIGKILL of one torchrun rank after a checkpoint, exact resume; SIGKILL during a checkpoint
  save leaves the old or the new file, loadable. (A corrupt training case is skipped with a warning:
  ``tests/test_train_local_roi.py::test_unusable_cases_are_skipped_with_a_warning``.)
* Determinism: same inputs and seed, bitwise the same outputs (DCMPredictor, predict.sh) and the same first
  training losses.
* Untrusted checkpoints: ``predict.sh --weights evil.pt`` refuses pickled objects unless
  ``--trust-checkpoint`` (the loader itself: ``tests/test_checkpoints.py``).

Models are the reduced experts with random weights; volumes are small.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import pytest
import torch

from dcm.config import load_config
from dcm.data.cases import Case, Click, ObjectPrompts, case_from_arrays, case_to_arrays, load_case
from dcm.engine.fusion import FusedPrediction, LabelWriter
from dcm.engine.predictor import DCMPredictor
from dcm.errors import CaseError, DCMError
from dcm.experts import build_experts

sys.path.insert(0, str(Path(__file__).parent))
from stubs import FailingExpert, StubExpert  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PREDICT = ["sh", str(REPO / "predict.sh"), "--config", str(REPO / "configs" / "dcm_reduced.yaml")]
SHAPE = (12, 40, 40)
SPACING = np.array([1.0, 1.0, 2.0])


def _box(z0: int, z1: int, y0: int, y1: int, x0: int, x1: int) -> Dict[str, int]:
    return dict(z_min=z0, z_max=z1, z_mid=(z0 + z1) // 2, z_mid_x_min=x0, z_mid_y_min=y0, z_mid_x_max=x1,
                z_mid_y_max=y1)


B1, B2 = _box(2, 8, 5, 15, 5, 15), _box(3, 9, 20, 32, 22, 34)
CLICKS = [{"fg": [[5, 10, 10]], "bg": []}, {"fg": [[6, 26, 28]], "bg": []}]


def _image(shape=SHAPE) -> np.ndarray:
    image = np.random.default_rng(0).integers(0, 60, shape, dtype=np.uint8)
    image[2:9, 5:16, 5:16] += 120
    return image


def _prev(shape=SHAPE) -> np.ndarray:
    prev = np.zeros(shape, np.uint8)
    prev[2:9, 6:14, 6:14] = 1
    prev[3:10, 21:33, 23:33] = 2
    return prev


def _click_step(**changes) -> Dict[str, object]:
    """A two-object click step (boxes, one fg click each, prev_pred) with ``changes`` applied."""
    arrays = case_to_arrays(_image(), SPACING, boxes=[B1, B2], clicks=CLICKS, clicks_order=[["fg"], ["fg"]],
                            prev_pred=_prev())
    arrays.update(changes)
    return arrays


def _objects(*entries) -> np.ndarray:
    out = np.empty(len(entries), dtype=object)
    for i, e in enumerate(entries):
        out[i] = e
    return out


class _Payload:
    """Unpickling this runs ``os.mkdir(marker)``: proof that a file executed code while it was read."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def reduced():
    torch.manual_seed(0)
    cfg = load_config("dcm_reduced")
    return cfg, build_experts(cfg, random_init=True)


def _run(args: List[str], timeout: float = 240, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable)
    return subprocess.run(args, env=env, cwd=str(REPO), capture_output=True, text=True, timeout=timeout, **kwargs)


# ------------------------------------------------------------------------------------------- bad inputs

#: file stem -> what must happen: ("ok", None) predicted without a line; ("note", None) predicted with one
#: line; ("kept", label) predicted, that object keeps its previous mask, one line; ("empty", None) an
#: all-zero output and one line; ("fail", field) no output and one line "<file>: <field>: ..."
#: (field None: the file is not a readable archive).
EXPECTED: Dict[str, Tuple[str, Optional[object]]] = {
    "CT_good_box": ("ok", None),
    "CT_good_click": ("ok", None),
    "CT_missing_imgs": ("fail", "imgs"),
    "CT_img2d": ("fail", "imgs"),
    "CT_img4d": ("fail", "imgs"),
    "CT_one_slice_box": ("ok", None),
    "CT_one_slice_click": ("ok", None),
    "CT_nan": ("fail", "imgs"),
    "CT_inf": ("fail", "imgs"),
    "CT_constant": ("ok", None),
    "CT_constant_zero_click": ("ok", None),
    "CT_spacing_zero": ("fail", "spacing"),
    "CT_spacing_negative": ("fail", "spacing"),
    "CT_spacing_nan": ("fail", "spacing"),
    "CT_spacing_two": ("fail", "spacing"),
    "CT_spacing_text": ("fail", "spacing"),
    "CT_spacing_missing": ("fail", "spacing"),
    "CT_empty_boxes": ("empty", None),
    "CT_no_objects": ("empty", None),
    "CT_box_outside": ("kept", 2),
    "CT_box_inverted": ("kept", 2),
    "CT_box_not_integer": ("kept", 1),
    "CT_click_outside": ("kept", 2),
    "CT_click_negative": ("kept", 1),
    "CT_click_not_integer": ("kept", 2),
    "CT_click_not_a_list": ("kept", 1),
    "CT_more_click_lists": ("fail", "clicks"),
    "CT_order_with_none": ("ok", None),
    "CT_order_none": ("ok", None),
    "CT_order_bad_entry": ("kept", 1),
    "CT_prev_shape": ("fail", "prev_pred"),
    "CT_prev_float": ("fail", "prev_pred"),
    "CT_prev_float_integral": ("ok", None),
    "CT_prev_labels_beyond": ("note", None),
    "CT_256_objects": ("fail", "boxes"),
    "CT_truncated": ("fail", None),
    "CT_corrupt": ("fail", None),
    "CT_corrupt_member": ("fail", "imgs"),
    "CT_pickle_payload": ("fail", None),
    "CT_boxes_payload": ("fail", "boxes"),
}


def _write_bad_inputs(folder: Path, marker: Path) -> None:
    """One file per entry of :data:`EXPECTED` (and a README.txt that is no case)."""
    folder.mkdir(parents=True)

    def save(name: str, compress: bool = False, **arrays) -> None:
        (np.savez_compressed if compress else np.savez)(folder / f"{name}.npz", **arrays)

    good_box = case_to_arrays(_image(), SPACING, boxes=[B1, B2])
    save("CT_good_box", **good_box)
    save("CT_good_click", **_click_step())
    save("CT_missing_imgs", spacing=SPACING, boxes=_objects(B1))
    save("CT_img2d", imgs=np.zeros(SHAPE[1:]), spacing=SPACING, boxes=_objects(B1))
    save("CT_img4d", imgs=np.zeros((1,) + SHAPE), spacing=SPACING, boxes=_objects(B1))
    one = _image((1, 40, 40))
    save("CT_one_slice_box", **case_to_arrays(one, SPACING, boxes=[_box(0, 0, 5, 15, 5, 15)]))
    save("CT_one_slice_click", **case_to_arrays(one, SPACING, boxes=[_box(0, 0, 5, 15, 5, 15)],
                                                 clicks=[{"fg": [[0, 10, 10]], "bg": [[0, 30, 30]]}],
                                                 clicks_order=[["fg", "bg"]], prev_pred=np.zeros((1, 40, 40))))
    for name, value in (("CT_nan", np.nan), ("CT_inf", np.inf)):
        image = _image().astype(np.float32)
        image[3, 3, 3] = value
        save(name, imgs=image, spacing=SPACING, boxes=_objects(B1))
    save("CT_constant", **case_to_arrays(np.full(SHAPE, 7, np.uint8), SPACING, boxes=[B1, B2]))
    save("CT_constant_zero_click", **_click_step(imgs=np.zeros(SHAPE, np.float32)))
    for name, spacing in (("zero", [1, 0, 1]), ("negative", [1, -1, 1]), ("nan", [1, np.nan, 1]), ("two", [1, 1]),
                          ("text", np.array("abc"))):
        save(f"CT_spacing_{name}", imgs=_image(), spacing=np.asarray(spacing), boxes=_objects(B1))
    save("CT_spacing_missing", imgs=_image(), boxes=_objects(B1))
    save("CT_empty_boxes", imgs=_image(), spacing=SPACING, boxes=np.empty(0, dtype=object))
    save("CT_no_objects", imgs=_image(), spacing=SPACING)
    save("CT_box_outside", **_click_step(boxes=_objects(B1, _box(2, 8, 30, 45, 5, 15))))
    save("CT_box_inverted", **_click_step(boxes=_objects(B1, _box(8, 2, 20, 32, 22, 34))))
    save("CT_box_not_integer", **_click_step(boxes=_objects(dict(B1, z_mid_x_min=5.5), B2)))
    save("CT_click_outside", **_click_step(clicks=_objects(CLICKS[0], {"fg": [[12, 26, 28]], "bg": []})))
    save("CT_click_negative", **_click_step(clicks=_objects({"fg": [[5, -1, 10]], "bg": []}, CLICKS[1])))
    save("CT_click_not_integer", **_click_step(clicks=_objects(CLICKS[0], {"fg": [[6.5, 26, 28]], "bg": []})))
    save("CT_click_not_a_list", **_click_step(clicks=_objects({"fg": 5, "bg": []}, CLICKS[1])))
    save("CT_more_click_lists", **_click_step(clicks=_objects(*CLICKS, CLICKS[0]),
                                              clicks_order=np.array([["fg"]] * 3)))
    save("CT_order_with_none", **_click_step(clicks=_objects(CLICKS[0], {"fg": [], "bg": []}),
                                             clicks_order=_objects(["fg"], [None])))
    save("CT_order_none", **_click_step(clicks_order=np.array(None, dtype=object)))
    save("CT_order_bad_entry", **_click_step(clicks_order=np.array([["xx"], ["fg"]])))
    save("CT_prev_shape", **_click_step(prev_pred=np.zeros((12, 40, 41), np.uint8)))
    save("CT_prev_float", **_click_step(prev_pred=_prev().astype(np.float32) + 0.5))
    save("CT_prev_float_integral", **_click_step(prev_pred=_prev().astype(np.float32)))
    beyond = _prev()
    beyond[0, 0, 0] = 7
    save("CT_prev_labels_beyond", **_click_step(prev_pred=beyond))
    save("CT_256_objects", imgs=_image(), spacing=SPACING, boxes=_objects(*[B1] * 256))
    data = (folder / "CT_good_box.npz").read_bytes()
    (folder / "CT_truncated.npz").write_bytes(data[: len(data) // 2])
    (folder / "CT_corrupt.npz").write_bytes(b"PK\x03\x04" + bytes(range(256)) * 8)
    save("CT_corrupt_member", compress=True, **good_box)
    corrupt = bytearray((folder / "CT_corrupt_member.npz").read_bytes())
    corrupt[200:260] = bytes(60)  # inside imgs.npy's compressed data: a CRC error on reading it
    (folder / "CT_corrupt_member.npz").write_bytes(bytes(corrupt))
    with open(folder / "CT_pickle_payload.npz", "wb") as f:  # a plain pickle that np.load would unpickle
        pickle.dump({"imgs": _Payload(marker)}, f)
    save("CT_boxes_payload", imgs=_image(), spacing=SPACING, boxes=_objects(_Payload(marker)))
    (folder / "README.txt").write_text("not a case")
    assert sorted(p.stem for p in folder.glob("*.npz")) == sorted(EXPECTED)


def _lines_about(stderr: str, path: Path) -> List[str]:
    return [line for line in stderr.splitlines() if f"{path}:" in line]


def test_predict_sh_one_line_per_bad_file_nothing_partial_and_deterministic(tmp_path):
    inputs, outputs, marker = tmp_path / "inputs", tmp_path / "outputs", tmp_path / "payload-ran"
    _write_bad_inputs(inputs, marker)
    outputs.mkdir()
    (outputs / ".CT_good_box.npz.k1l2m3.tmp").write_bytes(b"left by a killed call")
    (outputs / "CT_nan.npz").write_bytes((inputs / "CT_good_box.npz").read_bytes())  # an earlier call's output

    out = _run(PREDICT + ["--random-init", "--inputs", str(inputs), "--outputs", str(outputs)])
    assert out.returncode == 1, out.stderr[-3000:]  # some files failed; the others were written
    assert not marker.exists()  # no pickled payload ran
    readme = inputs / "README.txt"
    assert _lines_about(out.stderr, readme) == [f"{readme}: skipped (not a .npz case file)"]
    written = {p.stem for p in outputs.iterdir()}
    assert written == {name for name, (kind, _) in EXPECTED.items() if kind != "fail"}  # no temporary, no stale
    for name, (kind, detail) in EXPECTED.items():
        path = inputs / f"{name}.npz"
        lines = _lines_about(out.stderr, path)
        assert len(lines) == (0 if kind == "ok" else 1), (name, lines)
        if kind == "fail":
            assert lines[0].startswith(f"{path}: {detail}: " if detail else f"{path}: not a readable .npz file"), lines
            continue
        with np.load(outputs / f"{name}.npz") as z:
            assert list(z.files) == ["segs"]
            segs = z["segs"]
        case = load_case(path, strict=False)
        assert segs.dtype == np.uint8 and segs.shape == case.shape, name
        assert int(segs.max()) <= case.num_objects, name
        if kind == "empty":
            assert not segs.any() and "no objects" in lines[0]
        if kind == "kept":
            other = 3 - int(detail)
            assert lines[0].startswith(f"{path}: object {detail}: ") and "previous mask is kept" in lines[0]
            assert np.array_equal(segs == detail, case.prev_pred == detail), name  # exactly its previous mask
            assert not np.array_equal(segs == other, case.prev_pred == other), name  # the other was predicted
    assert "labels above 2 (up to 7) set to 0" in _lines_about(out.stderr, inputs / "CT_prev_labels_beyond.npz")[0]
    assert "255" in _lines_about(out.stderr, inputs / "CT_256_objects.npz")[0]

    # Determinism: the same inputs and seed give bitwise the same outputs in another process.
    again_in, again_out = tmp_path / "again_inputs", tmp_path / "again_outputs"
    again_in.mkdir()
    same = ["CT_good_box", "CT_good_click", "CT_one_slice_click", "CT_box_outside"]
    for name in same:
        (again_in / f"{name}.npz").write_bytes((inputs / f"{name}.npz").read_bytes())
    again = _run(PREDICT + ["--random-init", "--seed", "0", "--inputs", str(again_in), "--outputs", str(again_out)])
    assert again.returncode == 0, again.stderr[-3000:]
    for name in same:
        with np.load(outputs / f"{name}.npz") as a, np.load(again_out / f"{name}.npz") as b:
            assert np.array_equal(a["segs"], b["segs"]), name


def test_sigterm_leaves_only_complete_outputs(tmp_path):
    inputs, outputs = tmp_path / "inputs", tmp_path / "outputs"
    inputs.mkdir()
    arrays = case_to_arrays(_image((24, 96, 96)), SPACING, boxes=[B1, B2])
    for i in range(40):
        np.savez(inputs / f"CT_{i:02d}.npz", **arrays)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable)
    proc = subprocess.Popen(PREDICT + ["--random-init", "--inputs", str(inputs), "--outputs", str(outputs)],
                            env=env, cwd=str(REPO), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list(outputs.glob("CT_*.npz")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    names = sorted(p.name for p in outputs.iterdir())
    assert names and len(names) < 40 and all(not n.startswith(".") for n in names)  # stopped midway, no temporary
    for name in names:
        with np.load(outputs / name) as z:
            assert z["segs"].shape == (24, 96, 96)


def test_folder_level_failures_exit_non_zero(tmp_path, capsys):
    from dcm.baselines import main as baseline_main
    from dcm.runner import predict_folder

    assert baseline_main(["box-fill", "--inputs", str(tmp_path / "absent"), "--outputs", str(tmp_path / "o")]) == 1
    (tmp_path / "empty").mkdir()
    assert baseline_main(["box-fill", "--inputs", str(tmp_path / "empty"), "--outputs", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [f"{tmp_path / 'absent'}: input folder does not exist",
                   f"{tmp_path / 'empty'}: no .npz case file to predict"]

    # One folder for inputs and outputs: a failed case must not cost the user the input file.
    same = tmp_path / "same"
    same.mkdir()
    np.savez(same / "CT_bad.npz", imgs=np.zeros((2, 2)), spacing=SPACING)
    result = predict_folder(same, same, lambda case: np.zeros(case.shape, np.uint8))
    assert not result.ok and (same / "CT_bad.npz").is_file()


def test_evaluator_lists_each_bad_case_and_scores_the_others(tmp_path, capsys):
    from dcm.data.synthetic import generate_case
    from dcm.evaluate import main as evaluate_main
    from dcm.protocol import boxes_from_labels

    cases = tmp_path / "cases"
    cases.mkdir()
    good = generate_case("CT", seed=1, shape=(12, 32, 32), max_objects=2, with_tube=False)
    np.savez(cases / "CT_good.npz", **good)
    gts = np.zeros((1, 32, 32), np.uint8)
    gts[0, 5:15, 5:15], gts[0, 20:28, 18:30] = 1, 2
    np.savez(cases / "CT_one_slice.npz", **case_to_arrays((gts * 80 + 10).astype(np.uint8), [1, 1, 3],
                                                            boxes=boxes_from_labels(gts), gts=gts))
    np.savez(cases / "CT_constant.npz", **dict(good, imgs=np.full(good["imgs"].shape, 9, np.uint8)))
    bad = {
        "CT_nan": ("imgs", dict(good, imgs=np.where(good["gts"] > 0, np.nan, 1.0))),
        "CT_spacing": ("spacing", dict(good, spacing=np.array([1.0, -2.0, 1.0]))),
        "CT_no_imgs": ("imgs", {k: v for k, v in good.items() if k != "imgs"}),
        "CT_box_outside": ("boxes[0]", dict(good, boxes=_objects(*[dict(b, z_max=99) for b in good["boxes"]]))),
        "CT_no_gts": ("gts", {k: v for k, v in good.items() if k != "gts"}),
    }
    for name, (_, arrays) in bad.items():
        np.savez(cases / f"{name}.npz", **arrays)
    data = (cases / "CT_good.npz").read_bytes()
    (cases / "CT_truncated.npz").write_bytes(data[: len(data) // 2])
    (cases / "notes.txt").write_text("not a case")

    code = evaluate_main(["--cases", str(cases), "--out", str(tmp_path / "out"), "--predictor", "box-fill"])
    assert code == 1
    err = capsys.readouterr().err
    import csv

    with open(tmp_path / "out" / "failures.csv") as f:
        failures = {row["CaseName"]: row["Error"] for row in csv.DictReader(f)}
    with open(tmp_path / "out" / "metrics.csv") as f:
        rows = {row["CaseName"]: row for row in csv.DictReader(f)}
    assert set(rows) == {"CT_good.npz", "CT_one_slice.npz", "CT_constant.npz"}  # CaseName: the file name
    assert float(rows["CT_one_slice.npz"]["DSC_Final"]) == 1.0  # box-fill fills the one-slice boxes exactly
    assert set(failures) == {f"{name}.npz" for name in bad} | {"CT_truncated.npz"}
    for name, (field, _) in bad.items():
        assert failures[f"{name}.npz"].startswith(f"{cases / name}.npz: {field}: ")
        assert [line for line in err.splitlines() if line.startswith(f"FAILED {name}.npz: ")], name
    assert failures["CT_truncated.npz"].startswith(f"{cases / 'CT_truncated.npz'}: not a readable .npz file")


# ------------------------------------------------------------------------------------------- session


def test_session_rejects_bad_input_in_one_line_and_handles_thin_or_flat_images(reduced):
    from dcm.engine.session import InteractiveSession

    cfg, experts = reduced
    session = InteractiveSession(config=cfg, experts=experts)
    for image, spacing, field in [
        (np.zeros((4, 4)), None, "image"),
        (np.zeros((1, 4, 4, 4)), None, "image"),
        (np.zeros((0, 4, 4)), None, "image"),
        (np.where(_prev() > 0, np.nan, 0.0), None, "image"),
        (np.full(SHAPE, np.inf), None, "image"),
        (_image(), (1.0, 0.0, 1.0), "spacing"),
        (_image(), (1.0, -1.0, 1.0), "spacing"),
        (_image(), (1.0, float("nan"), 1.0), "spacing"),
        (_image(), (1.0, 1.0), "spacing"),
    ]:
        with pytest.raises(CaseError) as err:
            session.set_image(image, spacing=spacing)
        assert err.value.field == field and str(err.value).startswith(f"{field}: ") and "\n" not in str(err.value)
    assert session.image is None  # nothing was half set

    for image in (_image((1, 40, 40)), np.full(SHAPE, 7, np.uint8)):  # one slice; a constant image
        session.set_image(image, spacing=(3.0, 1.0, 1.0))
        obj = session.new_object()
        mask = session.add_box(obj, _box(0, 0, 5, 15, 5, 15))
        assert mask.shape == image.shape and mask.dtype == bool
        session.add_point(obj, (0, 10, 10), positive=True)
        assert session.labels().shape == image.shape
        for point, problem in [((0, 10), "3 coordinates"), ((0, 10.5, 10), "not an integer"),
                               ((0, 10, float("nan")), "not an integer"), ((0, 40, 10), "outside"),
                               ((-1, 10, 10), "outside")]:
            with pytest.raises(CaseError, match=problem) as err:
                session.add_point(obj, point)
            assert err.value.field == "point"
        for box, problem in [(_box(0, 0, 15, 5, 5, 15), "inverted"), (_box(0, 0, 5, 45, 5, 15), "outside"),
                             ({"z_min": 0}, "missing keys"), (dict(_box(0, 0, 5, 15, 5, 15), z_min=0.5), "integer")]:
            with pytest.raises(CaseError, match=problem) as err:
                session.add_box(obj, box)
            assert err.value.field == "box"
        assert sum(w.label == obj for w in session._log) == 2  # refused interactions change nothing

    stubs = InteractiveSession(config={}, experts={"global": StubExpert("global", 1, 0.9)})
    stubs.set_image(np.zeros((2, 3, 3)))
    for _ in range(255):
        stubs.new_object()
    with pytest.raises(CaseError, match="at most 255 objects"):
        stubs.new_object()


# ------------------------------------------------------------------------------------------- engine

_TWO_LINES = "boom on object {label}\nsecond line"


def test_an_object_whose_prediction_raises_keeps_its_previous_mask(capsys):
    prev = _prev()
    prev[4:6, 24:26, 26:28] = 1  # a piece of object 1 inside object 2's predicted cube
    case = case_from_arrays(_click_step(prev_pred=prev), name="CT_fault")
    expert = FailingExpert([1], "global", 3, 0.9, message=_TWO_LINES)
    segs = DCMPredictor({"global": expert}, {"policy": "global_only"})(case)
    err = capsys.readouterr().err.splitlines()
    assert err == ["CT_fault: object 1: prediction failed (RuntimeError: boom on object 1 second line); "
                   "its previous mask is kept"]
    assert np.array_equal(segs == 1, prev == 1)  # all of it, also where object 2 (later) claims voxels
    cube = (slice(3, 10), slice(23, 30), slice(25, 32))  # object 2: the stub's cube around its box centre
    assert expert.calls == [2] and ((segs[cube] == 2) | (prev[cube] == 1)).all()
    with pytest.raises(DCMError, match="prediction failed for every object"):
        failing = FailingExpert([1, 2], "global", 3, 0.9, message=_TWO_LINES)
        DCMPredictor({"global": failing}, {"policy": "global_only"})(case)


def _reference_highest_prob(segs: np.ndarray, owner: np.ndarray, label: int, fused: FusedPrediction) -> None:
    """The rule with a full-volume float16 map of the winners' probabilities (what LabelWriter used to hold)."""
    view, own = segs[fused.region], owner[fused.region]
    covered, fg = fused.covered, fused.mask(0.5)
    view[covered & ~fg & (view == label)] = 0
    p = np.nan_to_num(fused.prob).astype(np.float16)
    win = fg & ((view == 0) | (view == label) | (p > own))
    view[win] = label
    own[win] = p[win]


@pytest.mark.parametrize("block", [2, 3, 32])
def test_highest_prob_overlap_without_a_full_volume_map_is_unchanged(block):
    from dcm.engine import fusion

    rng = np.random.default_rng(3)
    for _ in range(60):
        shape = (5, 6, 7)
        start = (rng.integers(0, 4, shape) * (rng.random(shape) < 0.5)).astype(np.uint8)
        expected, owner, writer = start.copy(), np.zeros(shape, np.float16), LabelWriter(start.copy(), "highest_prob")
        writer._owner_prob = fusion._BlockMap(shape, block)  # small blocks: regions straddle several
        for _ in range(int(rng.integers(1, 7))):
            lo = [int(rng.integers(0, n)) for n in shape]
            region = tuple(slice(a, int(rng.integers(a + 1, n + 1))) for a, n in zip(lo, shape))
            prob = rng.random(tuple(s.stop - s.start for s in region)).astype(np.float32)
            prob[rng.random(prob.shape) < 0.2] = np.nan
            fused, label = FusedPrediction(region, prob), int(rng.integers(1, 5))
            _reference_highest_prob(expected, owner, label, fused)
            writer.write(label, fused)
            assert np.array_equal(writer.segs, expected)


@pytest.mark.parametrize("overlap", ["later_wins", "highest_prob", "keep_others"])
def test_engine_memory_is_per_object_not_per_volume(overlap):
    """20 objects in a 17 M-voxel volume: the engine's numpy peak stays near the one output label map."""
    shape = (64, 512, 512)
    prev = np.zeros(shape, np.uint8)
    objects = []
    for k in range(20):
        z, y, x = 8 + 3 * k, 20 + 5 * k, 30 + 4 * k
        prev[z - 2:z + 3, y - 3:y + 4, x - 3:x + 4] = k + 1
        problem = "boxes[3]: outside" if k == 3 else None
        objects.append(ObjectPrompts(label=k + 1, clicks=[] if problem else [Click((z, y, x), True)], problem=problem))
    case = Case("CT_big", np.zeros(shape, np.uint8), (1.0, 1.0, 1.0), objects, prev_pred=prev)
    experts = {"global": StubExpert("global", 12, 0.9), "local": StubExpert("local", 6, 0.2)}
    predictor = DCMPredictor(experts, {"policy": "dual", "overlap": overlap})
    predictor(case)  # warm-up: what the first call imports (the random walker's modules) is not the engine's
    tracemalloc.start()
    try:
        segs = predictor(case)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    volume = int(np.prod(shape))
    assert peak < 1.25 * volume  # the output map (one uint8 volume) plus per-object crops; no float map
    assert np.array_equal(segs == 4, prev == 4) and (segs == 5).sum() > (prev == 5).sum()


def test_inference_is_bitwise_deterministic(reduced):
    cfg, experts = reduced
    torch.manual_seed(0)
    again = build_experts(cfg, random_init=True)
    for role in experts:
        a, b = experts[role].model.state_dict(), again[role].model.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)  # the seed fixes the random weights
    case = case_from_arrays(_click_step(), name="CT_det")
    first = DCMPredictor(experts, cfg["engine"])(case)
    assert np.array_equal(first, DCMPredictor(experts, cfg["engine"])(case))  # warm caches change nothing
    assert np.array_equal(first, DCMPredictor(again, cfg["engine"])(case))
    assert not np.array_equal(first, case.prev_pred)


# ------------------------------------------------------------------------------------------- checkpoints


def test_predict_sh_refuses_untrusted_checkpoint_unless_opted_in(reduced, tmp_path):
    _, experts = reduced
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"model_state_dict": experts["global"].model.state_dict(), "model": experts["local"].model.state_dict(),
                "note": _Payload(marker)}, evil)
    inputs, outputs = tmp_path / "inputs", tmp_path / "outputs"
    inputs.mkdir()
    np.savez(inputs / "CT_good.npz", **_click_step())

    refused = _run(PREDICT + ["--weights", str(evil), "--inputs", str(inputs), "--outputs", str(outputs)])
    assert refused.returncode == 2
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and str(evil) in lines[0] and "--trust-checkpoint" in lines[0], refused.stderr[-2000:]
    assert not marker.exists() and not (outputs / "CT_good.npz").exists()

    trusted = _run(PREDICT + ["--weights", str(evil), "--trust-checkpoint", "--inputs", str(inputs),
                              "--outputs", str(outputs)])
    assert trusted.returncode == 0, trusted.stderr[-2000:]
    assert marker.is_dir()  # the full load ran the pickle, as the user allowed
    with np.load(outputs / "CT_good.npz") as z:
        assert z["segs"].shape == SHAPE


# ------------------------------------------------------------------------------------------- training

TRAIN_CONFIG = REPO / "configs" / "train_local_roi_reduced.yaml"
TRAIN_SMALL = ["data.patch_size=16", "interaction.max_prompt=2", "interaction.num_clicks=2", "train.device=cpu",
               "train.figure_every_epochs=100"]


@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    from dcm.data.synthetic import generate_dataset

    out = tmp_path_factory.mktemp("train_data")
    generate_dataset(out, 6, seed=0, shape=(16, 32, 32), max_objects=3, progress=False)
    return out


def test_two_single_process_runs_give_the_same_losses(train_data, tmp_path):
    from dcm.training.local_roi import LocalRoITrainer

    def losses(work: Path) -> List[float]:
        cfg = load_config(TRAIN_CONFIG, [f"data.data_dir={train_data}", f"train.work_dir={work}", *TRAIN_SMALL,
                                         "train.epochs=1", "train.checkpoint_every_steps=0", "+train.max_steps=3"])
        return LocalRoITrainer(cfg).fit()["step_losses"]

    first, second = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert len(first) == 3 and first == second  # bitwise


def _save_forever(path: str, progress) -> None:
    from dcm.training.checkpointing import atomic_torch_save

    step = 0
    while True:
        step += 1
        atomic_torch_save({"step": step, "weights": torch.full((2_000_000,), float(step))}, path)
        progress.send(step)


def test_sigkill_during_checkpoint_save_leaves_old_or_new_file(tmp_path):
    import multiprocessing

    from dcm.checkpoints import load_checkpoint

    path = tmp_path / "latest.pt"
    fork = multiprocessing.get_context("fork")  # starts at once: the trainer's save path is already imported
    for delay in (0.0, 0.004, 0.011, 0.023, 0.037):
        receiver, sender = fork.Pipe(duplex=False)
        saver = fork.Process(target=_save_forever, args=(str(path), sender), daemon=True)
        saver.start()
        try:
            receiver.recv(), receiver.recv()  # two complete saves; the next one is in flight
            time.sleep(delay)
            os.kill(saver.pid, signal.SIGKILL)
            saver.join(timeout=30)
        finally:
            if saver.is_alive():
                saver.kill()
                saver.join()
            receiver.close()
        state = load_checkpoint(path)  # the complete old file or the complete new one
        assert state["step"] >= 2 and torch.equal(state["weights"], torch.full((2_000_000,), float(state["step"])))
    # Each kill may leave the hidden temporary of the save it interrupted; never under the real name.
    assert all(p.name == "latest.pt" or (p.name.startswith(".latest.pt.") and p.name.endswith(".tmp"))
               for p in tmp_path.iterdir())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun_cmd(work_dir: Path, data_dir: Path, *extra: str) -> List[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
            str(REPO / "train_local_roi" / "train.py"), "--config", str(TRAIN_CONFIG), f"train.work_dir={work_dir}",
            f"data.data_dir={data_dir}", *TRAIN_SMALL, "train.epochs=3", "train.checkpoint_every_steps=1", *extra]


def _torchrun_env() -> Dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1")


def _rank_pids(root: int) -> Dict[int, int]:
    """{rank: pid} of the torchrun workers descending from process ``root`` (read from /proc)."""
    parents: Dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
            except (OSError, ValueError):
                pass
    ranks = {}
    for pid in parents:
        ancestor = parents.get(pid)
        while ancestor not in (None, 0, 1, root):
            ancestor = parents.get(ancestor)
        if ancestor != root:
            continue
        try:
            entries = (Path("/proc") / str(pid) / "environ").read_text().split("\0")
            env = dict(v.split("=", 1) for v in entries if "=" in v)
        except OSError:
            continue
        if "LOCAL_RANK" in env and "RANK" in env:
            ranks[int(env["RANK"])] = pid
    return ranks


def _losses(work_dir: Path) -> List[float]:
    return json.loads((work_dir / "summary.json").read_text())["step_losses"]


@pytest.mark.slow  # three 2-process torchrun runs: about 40 s on two idle cores, 90 s on busy ones
def test_sigkill_of_one_rank_then_resume_matches_uninterrupted(train_data, tmp_path):
    full_dir, split_dir = tmp_path / "full", tmp_path / "split"
    full_dir.mkdir(), split_dir.mkdir()
    full = subprocess.run(_torchrun_cmd(full_dir, train_data), env=_torchrun_env(), capture_output=True, text=True,
                          timeout=300, cwd=str(tmp_path))
    assert full.returncode == 0, full.stderr[-3000:]
    reference = _losses(full_dir)
    assert len(reference) == 9  # 6 cases / 2 ranks = 3 steps per epoch, 3 epochs

    proc = subprocess.Popen(_torchrun_cmd(split_dir, train_data), env=_torchrun_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, cwd=str(tmp_path))
    killed = None
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            if (split_dir / "latest.pt").is_file():
                killed = _rank_pids(proc.pid).get(1)
                if killed is not None:
                    os.kill(killed, signal.SIGKILL)
                    break
            time.sleep(0.01)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert killed is not None and proc.returncode != 0, stderr[-3000:]
    assert not (split_dir / "summary.json").exists()  # it died mid-run

    from dcm.checkpoints import load_checkpoint

    ckpt = load_checkpoint(split_dir / "latest.pt")
    done = int(ckpt["global_step"])
    assert 1 <= done < 9 and ckpt["batches_done"] > 0 and ckpt["world_size"] == 2  # written mid-epoch
    resumed = subprocess.run(_torchrun_cmd(split_dir, train_data, "train.resume=auto"), env=_torchrun_env(),
                             capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rest = _losses(split_dir)
    assert rest[0] == reference[done]  # the next step's loss, bitwise
    assert rest == reference[done:]
