"""The one-home helpers: regions, the table writer, Dice's stated empty-mask convention."""

import numpy as np
import pytest

from dcm.metrics import DICE_BOTH_EMPTY_TRAINING, dice
from dcm.regions import mask_bbox, points_bbox, union_region, within
from dcm.tables import markdown_table


@pytest.mark.parametrize("seed", range(5))
def test_mask_bbox_is_the_argwhere_box(seed):
    rng = np.random.default_rng(seed)
    mask = np.zeros((9, 11, 7), bool)
    mask[tuple(rng.integers(0, n, size=4) for n in mask.shape)] = True
    voxels = np.argwhere(mask)
    lo, hi = voxels.min(0), voxels.max(0) + 1
    assert mask_bbox(mask) == tuple(slice(int(a), int(b)) for a, b in zip(lo, hi)) == points_bbox(voxels)
    wide = mask_bbox(mask, margin=2)
    assert wide == tuple(slice(max(int(a) - 2, 0), min(int(b) + 2, n)) for a, b, n in zip(lo, hi, mask.shape))


def test_empty_and_region_arithmetic():
    assert mask_bbox(np.zeros((3, 3, 3), bool)) is None and points_bbox(np.zeros((0, 3), int)) is None
    a, b = (slice(1, 4), slice(2, 3), slice(0, 2)), (slice(3, 6), slice(0, 1), slice(1, 5))
    union = union_region([a, b])
    assert union == (slice(1, 6), slice(0, 3), slice(0, 5))
    assert within(b, union) == (slice(2, 5), slice(0, 1), slice(1, 5))


def test_markdown_table():
    text = markdown_table(["name", "n", "value"], [["a", 3, 0.5], ["b", 1, np.float64(1 / 3)]], digits=3)
    assert text == "| name | n | value |\n|---|---|---|\n| a | 3 | 0.500 |\n| b | 1 | 0.333 |"


def test_dice_conventions_and_the_batched_training_dice():
    torch = pytest.importorskip("torch")
    from dcm.training.global_roi import dice_per_sample

    empty = np.zeros((4, 4, 4), bool)
    assert np.isnan(dice(empty, empty)) and dice(empty, empty, DICE_BOTH_EMPTY_TRAINING) == 1.0
    rng = np.random.default_rng(0)
    preds = rng.random((5, 1, 4, 4, 4)) > 0.6
    gts = rng.random((5, 1, 4, 4, 4)) > 0.5
    preds[0], gts[0] = False, False  # both empty
    gts[1] = False  # one empty
    batched = dice_per_sample(torch.from_numpy(preds), torch.from_numpy(gts)).numpy()
    expected = [dice(g, p, DICE_BOTH_EMPTY_TRAINING) for p, g in zip(preds, gts)]
    np.testing.assert_allclose(batched, expected, rtol=1e-6)
