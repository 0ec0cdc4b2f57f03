import numpy as np
import pytest

from dcm.metrics import case_scores, click_auc, dice, nsd, per_class_scores


def test_per_class_dsc_nsd_match_organisers(protocol_golden):
    meta, arrays = protocol_golden
    for case in meta["cases"]:
        gts, pred = arrays[f"{case['name']}/gts"], arrays[f"{case['name']}/pred"]
        labels, dscs, nsds = per_class_scores(gts, pred, case["spacing"])
        assert labels == case["labels"]
        np.testing.assert_allclose(dscs, case["dsc_per_class"], rtol=0, atol=1e-9)
        np.testing.assert_allclose(nsds, case["nsd_per_class_2mm"], rtol=0, atol=1e-6)


def test_case_scores_match_organisers_including_dsc_rule(protocol_golden):
    meta, arrays = protocol_golden
    for case in meta["cases"]:
        gts, pred = arrays[f"{case['name']}/gts"], arrays[f"{case['name']}/pred"]
        dsc, nsd_value = case_scores(gts, pred, case["spacing"])
        assert abs(dsc - case["case_dsc"]) < 1e-9, case["name"]
        assert abs(nsd_value - case["case_nsd_protocol"]) < 1e-6, case["name"]
    low = next(c for c in meta["cases"] if c["name"] == "low_dsc")
    assert low["case_nsd_protocol"] == 0.0 and low["nsd_per_class_2mm"][0] > 0


def test_click_auc_matches_organisers(protocol_golden):
    meta, _ = protocol_golden
    for example in meta["auc"]:
        assert click_auc(example["dsc_steps_1_to_6"]) == pytest.approx(example["auc"], abs=1e-12)
    assert click_auc([0, 1, 1, 1, 1, 1]) == 4.0
    with pytest.raises(ValueError):
        click_auc([1, 1])


def test_nsd_spacing_order_is_as_given():
    gt = np.zeros((20, 20, 20), bool)
    gt[5:15, 5:15, 5:15] = True
    pred = np.zeros_like(gt)
    pred[7:15, 5:15, 5:15] = True  # shifted along z only
    assert nsd(gt, pred, (1.0, 1.0, 5.0)) == pytest.approx(nsd(gt, pred, (1.0, 1.0, 5.0)))
    assert nsd(gt, pred, (5.0, 1.0, 1.0)) < nsd(gt, pred, (1.0, 1.0, 5.0))


def test_nsd_crop_equals_whole_volume():
    rng = np.random.default_rng(0)
    gt = np.zeros((40, 50, 60), bool)
    gt[10:30, 12:40, 20:50] = True
    pred = gt ^ (rng.random(gt.shape) < 0.02)
    pred[:2] = False
    import torch
    from monai.metrics import compute_surface_dice

    full = compute_surface_dice(torch.from_numpy(pred)[None, None], torch.from_numpy(gt)[None, None], [2.0],
                                include_background=True, spacing=[0.8, 0.8, 2.5], use_subvoxels=True)
    assert nsd(gt, pred, (0.8, 0.8, 2.5)) == pytest.approx(float(full), abs=1e-7)


def test_edge_cases():
    z = np.zeros((4, 4, 4), bool)
    o = z.copy()
    o[1:3, 1:3, 1:3] = True
    assert np.isnan(dice(z, z)) and dice(o, o) == 1.0 and dice(o, z) == 0.0
    assert nsd(o, z, (1, 1, 1)) == 0.0 and nsd(o, o, (1, 1, 1)) == 1.0
    assert case_scores(o.astype(np.uint8), z.astype(np.uint8), (1, 1, 1)) == (0.0, 0.0)
    # labels only in the prediction are not scored
    pred = o.astype(np.uint8)
    pred[0, 0, 0] = 2
    assert case_scores(o.astype(np.uint8), pred, (1, 1, 1))[0] == 1.0
