import numpy as np
import pytest

from dcm import protocol
from dcm.protocol import boxes_from_labels, next_click, next_clicks


def _cases(golden):
    meta, arrays = golden
    for case in meta["cases"]:
        yield case, arrays[f"{case['name']}/gts"], arrays[f"{case['name']}/pred"]


def test_next_click_matches_organisers(protocol_golden):
    n = 0
    for case, gts, pred in _cases(protocol_golden):
        got = next_clicks(gts, pred, case["labels"])
        for g, expected in zip(got, case["next_clicks"]):
            if expected is None:
                assert g is None, case["name"]
            else:
                assert (g.zyx, g.kind) == (tuple(expected["zyx"]), expected["kind"]), case["name"]
            n += 1
    assert n == 11


def test_boxes_match_organisers(protocol_golden):
    for case, gts, _ in _cases(protocol_golden):
        assert boxes_from_labels(gts, seed=2025) == case["boxes_seed2025"], case["name"]


def test_boxes_scale_shift_with_image_size():
    gts = np.zeros((8, 512, 1024), np.uint8)
    gts[2:6, 100:200, 300:400] = 1
    tight = boxes_from_labels(gts, seed=None)[0]
    assert tight == dict(z_min=2, z_max=5, z_mid=4, z_mid_x_min=300, z_mid_y_min=100, z_mid_x_max=399, z_mid_y_max=199)
    shift = np.random.RandomState(2025).randint(0, 6)
    box = boxes_from_labels(gts, seed=2025)[0]
    assert box["z_mid_x_min"] == 300 - int(shift * 1024 / 256)
    assert box["z_mid_y_max"] == 199 + int(shift * 512 / 256)


def test_boxes_do_not_touch_global_rng():
    np.random.seed(7)
    expected = np.random.rand()
    np.random.seed(7)
    boxes_from_labels(np.ones((3, 4, 5), np.uint8))
    assert np.random.rand() == expected


def test_no_error_gives_none_and_crop_is_invisible():
    gt = np.zeros((30, 40, 50), bool)
    gt[5:20, 10:30, 10:40] = True
    assert next_click(gt, gt) is None
    pred = gt.copy()
    pred[8:12, 15:25, 12:20] = False
    click = next_click(gt, pred)
    (z, y, x), kind = click.zyx, click.kind
    assert kind == "fg" and gt[z, y, x] and not pred[z, y, x]


def test_border_is_not_boundary():
    # An error touching the image border: the padding, not the border, bounds the EDT, so the deepest
    # point of a slab lying on the border is on the border itself.
    gt = np.zeros((10, 10, 10), bool)
    gt[0:3] = True
    click = next_click(gt, np.zeros_like(gt))
    assert click.positive and click.zyx[0] == 1


def test_downsampled_edt_path(monkeypatch):
    gt = np.zeros((20, 24, 28), bool)
    gt[2:17, 3:21, 4:25] = True
    exact = next_click(gt, np.zeros_like(gt))
    monkeypatch.setattr(protocol, "EDT_DOWNSAMPLE_VOXELS", 100)
    coarse = next_click(gt, np.zeros_like(gt))
    assert coarse.positive and exact.positive
    # The pooled EDT is coarser (a flatter plateau) but its maximum stays deep inside the object.
    z, y, x = coarse.zyx
    assert gt[z - 3:z + 4, y - 3:y + 4, x - 3:x + 4].all()


def test_largest_component_tie_takes_lowest_id():
    error = np.zeros((5, 5, 9), bool)
    error[2, 2, 1] = True
    error[2, 2, 7] = True
    comp = protocol.largest_error_component(error)
    assert comp[2, 2, 1] and not comp[2, 2, 7]


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        next_click(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)))


def test_distance_to_background_equals_scipy_edt_in_float32():
    """The click rule's EDT (the ``edt`` package) has SciPy's values to float32, so the same argmax voxels."""
    from scipy.ndimage import distance_transform_edt

    rng = np.random.default_rng(3)
    for shape, density in [((17, 23, 29), 0.9), ((40, 40, 40), 0.97), ((1, 30, 30), 0.8)]:
        mask = rng.random(shape) < density
        mask[0, 0, 0] = False
        ours = protocol.distance_to_background(mask)
        ref = distance_transform_edt(mask)
        assert ours.shape == mask.shape
        np.testing.assert_array_equal(ours, ref.astype(np.float32))
        np.testing.assert_array_equal(np.argwhere(ours == ours.max()), np.argwhere(ref == ref.max()))
