"""DCM inference end to end with reduced, randomly initialised experts: every policy, predict.sh driven by
the evaluator (with and without boxes), the NIfTI command and the session on real experts."""

import csv
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dcm.config import load_config
from dcm.data.cases import atomic_savez, case_from_arrays
from dcm.data.synthetic import generate_case
from dcm.engine.policies import POLICIES
from dcm.engine.predictor import CallBudget, DCMPredictor
from dcm.evaluate import main as evaluate_main
from dcm.experts import build_experts

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
from stubs import assert_policy_calls, box_step_then_click_step  # noqa: E402


@pytest.fixture(scope="module")
def reduced():
    cfg = load_config("dcm_reduced")
    return cfg, build_experts(cfg, random_init=True)


@pytest.fixture(scope="module")
def cases_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cases")
    for i, flavour in enumerate(["CT", "Microscopy"]):
        atomic_savez(out / f"{flavour}_case_{i}.npz", **generate_case(flavour, seed=10 + i, shape=(16, 32, 32),
                                                                       max_objects=3))
    return out


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_every_policy_box_step_and_click_step(reduced, policy):
    cfg, experts = reduced
    arrays = generate_case("CT", seed=7, shape=(16, 32, 32), max_objects=2, with_tube=False)
    gts = arrays["gts"]
    predictor = DCMPredictor(experts, dict(cfg["engine"], policy=policy))
    segs, segs2, calls = box_step_then_click_step(predictor, experts, arrays, "CT_policy")
    assert segs.shape == segs2.shape == gts.shape and segs2.dtype == np.uint8
    assert_policy_calls(policy, calls, int(gts.max()))


def test_predict_sh_through_the_evaluator(cases_dir, tmp_path):
    cmd = "sh predict.sh --config configs/dcm_reduced.yaml --random-init"
    import os

    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        code = evaluate_main(["--cases", str(cases_dir), "--out", str(tmp_path), "--predict-cmd", cmd])
    finally:
        os.chdir(cwd)
    assert code == 0
    with open(tmp_path / "metrics.csv") as f:
        rows = {r["CaseName"]: r for r in csv.DictReader(f)}
    assert float(rows["CT_case_0.npz"]["RunningTime_1"]) > 0  # box step ran
    assert float(rows["Microscopy_case_1.npz"]["RunningTime_1"]) == 0  # no boxes: starts at step 2
    assert all(float(rows["Microscopy_case_1.npz"][f"RunningTime_{i}"]) > 0 for i in range(2, 7))
    assert "no output file" not in (tmp_path / "notes.txt").read_text()


def test_many_objects_stay_inside_the_budget(reduced):
    cfg, experts = reduced
    arrays = generate_case("Microscopy", seed=3, shape=(24, 96, 96), n_objects=50)
    case = case_from_arrays(arrays, name="Microscopy_many")
    gts = arrays["gts"]
    # a click step: one fg click per object, as the protocol's first no-box step gives
    from dcm.protocol import next_click

    clicks = []
    for label in range(1, int(gts.max()) + 1):
        zyx = next_click(gts == label, np.zeros_like(gts, bool)).zyx
        clicks.append({"fg": [list(zyx)], "bg": []})
    arrays = dict(arrays, clicks=np.array(clicks, dtype=object), prev_pred=np.zeros_like(gts, np.uint8))
    case = case_from_arrays(arrays, name="Microscopy_many")
    assert case.num_objects == 50
    predictor = DCMPredictor(experts, cfg["engine"])
    start = time.perf_counter()
    segs = predictor(case)
    seconds = time.perf_counter() - start
    share = CallBudget.for_case(50, cfg["engine"]["budget"]).seconds
    assert seconds < share and segs.shape == case.shape


def test_segment_command_keeps_nifti_geometry(tmp_path):
    import SimpleITK as sitk

    from dcm.segment import main as segment_main

    image = sitk.GetImageFromArray(generate_case("MR", seed=2, shape=(16, 32, 32))["imgs"].astype(np.float32))
    image.SetSpacing((0.7, 0.8, 2.5))
    image.SetOrigin((-10.0, 4.0, 7.5))
    image.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    src, out = tmp_path / "img.nii.gz", tmp_path / "mask.nii.gz"
    sitk.WriteImage(image, str(src))
    code = segment_main([str(src), "--box", "4", "11", "8", "20", "8", "22", "--point", "8", "14", "15",
                         "--negative", "5", "9", "9", "--out", str(out), "--config", "dcm_reduced", "--random-init"])
    assert code == 0
    mask = sitk.ReadImage(str(out))
    assert mask.GetSize() == image.GetSize()
    np.testing.assert_allclose(mask.GetSpacing(), image.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(mask.GetOrigin(), image.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(mask.GetDirection(), image.GetDirection(), atol=1e-6)
    assert set(np.unique(sitk.GetArrayFromImage(mask))) <= {0, 1}


def test_session_on_real_experts_caches_and_undoes(reduced):
    from dcm.engine.session import InteractiveSession

    cfg, experts = reduced
    session = InteractiveSession(config=cfg, experts=experts)
    arrays = generate_case("CT", seed=5, shape=(16, 48, 48), max_objects=2)
    session.set_image(arrays["imgs"], spacing=tuple(arrays["spacing"][::-1]))
    obj = session.new_object()
    box = arrays["boxes"][0]
    m_box = session.add_box(obj, box)
    runs = experts["global"].encoder_runs
    z, y, x = (box["z_mid"], (box["z_mid_y_min"] + box["z_mid_y_max"]) // 2,
               (box["z_mid_x_min"] + box["z_mid_x_max"]) // 2)
    session.add_point(obj, (z, y, x), positive=True)
    assert experts["global"].encoder_runs == runs  # click inside the RoI: cached embedding
    session.add_point(obj, (z, y, x), positive=False)
    session.undo(obj)
    assert np.array_equal(session.undo(obj), m_box)
