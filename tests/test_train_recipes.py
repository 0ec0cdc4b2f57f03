"""Released training recipes (issue 14): B-spline elastic without folds, zoom draw, steps per patch, augmentation
probabilities, and the click-neighbourhood loss."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dcm.config import load_config
from dcm.errors import ConfigError
from dcm.training.clicks import ball_offsets, click_loss, clicks_honoured
from dcm.training.spatial import RandBSplineElasticd, RandZoomTranslated, bspline_field, jacobian_determinant

sys.path.insert(0, str(Path(__file__).parent))
from toy_training import ToyTrainer, config  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
S = 64

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def released_elastic(**overrides) -> RandBSplineElasticd:
    cfg = dict(load_config(REPO / "configs" / "train_global_roi.yaml")["data"]["augment"]["elastic"])
    cfg.update(overrides)
    cfg.pop("prob")
    return RandBSplineElasticd(["image", "label"], S, prob=1.0, **cfg)


def test_released_elastic_never_folds_and_locks_its_borders():
    t = released_elastic()
    assert (t.control_points, t.locked_borders, t.locked_axes, t.max_displacement) == (7, 2, (0, 1), 7.5)
    t.set_random_state(0)
    lowest = []
    for _ in range(60):
        coords = t.draw_coordinates((S, S, S))
        coarse = t.last_coarse
        lowest.append(float(jacobian_determinant(coarse, (S, S, S)).min()))
        for axis in (0, 1):  # locked: 2 control points per side
            for i in (0, 1, 5, 6):
                assert not coarse.select(axis + 1, i).any()
        assert coarse.select(3, 0).abs().max() > 0  # x is not locked (torchio's first two axes only)
        assert coarse.abs().max() <= 7.5
        grid = torch.stack(torch.meshgrid(*[torch.arange(S, dtype=torch.float64)] * 3, indexing="ij"))
        assert torch.allclose(coords, grid + bspline_field(coarse, (S, S, S)))
    assert min(lowest) > 0.05  # never folds (the guard's floor)


def test_fold_guard_and_limits():
    # below half the grid spacing a draw hardly ever folds; past it (set after the check) it does, guard or not
    t = RandBSplineElasticd(["image"], S, control_points=5, locked_borders=0, locked_axes=[], max_displacement=15.9)
    t.max_displacement = 40.0
    t.set_random_state(1)
    raw = [float(jacobian_determinant(t.draw_coarse(), (S, S, S)).min()) for _ in range(10)]
    assert min(raw) <= 0  # the plain draw folds
    t.set_random_state(1)
    for _ in range(10):
        t.draw_coordinates((S, S, S))
        assert float(jacobian_determinant(t.last_coarse, (S, S, S)).min()) > t.min_jacobian
    with pytest.raises(ConfigError, match="half the grid spacing"):
        released_elastic(max_displacement=8.0)  # 7 points over 64 voxels: spacing 16
    with pytest.raises(ConfigError, match="locked_borders"):
        released_elastic(locked_borders=4)
    # a zero grid is the identity; the warp moves image and label together
    image = torch.rand(1, S, S, S)
    out = released_elastic(max_displacement=0.0)({"image": image, "label": (image > 0.5).float()})
    assert torch.allclose(out["image"], image, atol=1e-5) and torch.equal(out["label"], (image > 0.5).float())


def test_zoom_is_drawn_uniform_around_one():
    s = 0.5
    means = {}
    for draw in ("scale", "inverse"):
        t = RandZoomTranslated(["image"], scales=[0.2, s, s], translation=[4, 4, 4], zoom_draw=draw)
        t.set_random_state(3)
        zooms = np.array([(t.draw_coordinates((4, 4, 4)), t.last_zoom)[1] for _ in range(4000)])
        means[draw] = zooms[:, 1:].mean()
        if draw == "scale":
            assert zooms[:, 0].min() >= 0.8 and zooms[:, 0].max() <= 1.2 and zooms[:, 1:].min() >= 1 - s
    assert means["scale"] == pytest.approx(1.0, abs=0.01)
    assert means["inverse"] == pytest.approx(math.log((1 + s) / (1 - s)) / (2 * s), abs=0.01)  # 1.099
    assert load_config(REPO / "configs" / "train_global_roi.yaml")["data"]["augment"]["affine"]["zoom_draw"] == "scale"
    # zoom 2 about the centre: the centre stays, a voxel 2 away from it samples 1 away
    t = RandZoomTranslated(["image"], scales=[0, 0, 0], translation=[0, 0, 0])
    draws = iter([np.full(3, 2.0), np.zeros(3)])  # the zoom, then the shift
    t.R = type("Fixed", (), {"uniform": lambda self, lo, hi: next(draws)})()
    coords = t.draw_coordinates((9, 9, 9))
    assert coords[:, 4, 4, 4].tolist() == [4, 4, 4] and coords[2, 4, 4, 6] == 5


def test_augmentation_probabilities():
    t = RandZoomTranslated(["image"], prob=0.3)
    t.set_random_state(0)
    done = []
    for _ in range(3000):
        t.randomize(None)
        done.append(t._do_transform)
    assert np.mean(done) == pytest.approx(0.3, abs=0.03)
    # the local expert's released augmentation: each transform with probability 0.2, rot90 in (z, y)
    from monai.transforms import RandFlipd, RandGaussianNoised, RandRotate90d, RandScaleIntensityd, RandShiftIntensityd

    from dcm.training.local_roi import build_transforms

    data = load_config(REPO / "configs" / "train_local_roi.yaml")["data"]
    assert data["crop_background_ratio"] == 1.0
    compose = build_transforms((16, 16, 16), 3, data)
    kinds = {RandFlipd: 3, RandRotate90d: 1, RandScaleIntensityd: 1, RandShiftIntensityd: 1, RandGaussianNoised: 1}
    for kind, count in kinds.items():
        found = [tr for tr in compose.transforms if isinstance(tr, kind)]
        assert len(found) == count and all(tr.prob == pytest.approx(0.2) for tr in found), kind
    rot = next(tr for tr in compose.transforms if isinstance(tr, RandRotate90d))
    assert tuple(rot.spatial_axes) == (0, 1)
    noise = next(tr for tr in compose.transforms if isinstance(tr, RandGaussianNoised))
    assert noise.rand_gaussian_noise.std == pytest.approx(0.2)
    crop = compose.transforms[2]
    assert list(crop.cropper.ratios) == [1.0, 1.0, 1.0]  # background-centred crops as often as each class


def test_steps_per_patch_takes_that_many_optimizer_steps_and_resumes_exactly(tmp_path):
    full = ToyTrainer(config(tmp_path / "full", steps_per_patch=3, accumulation_steps=1)).fit()["step_losses"]
    assert len(full) == 2 * 12 * 3  # 2 epochs x 12 batches x 3 steps per patch
    first = ToyTrainer(config(tmp_path / "split", steps_per_patch=3, accumulation_steps=1, max_steps=7)).fit()
    assert first["steps"] == 9  # stops at the end of the patch that holds step 7
    rest = ToyTrainer(config(tmp_path / "split", steps_per_patch=3, accumulation_steps=1, resume="auto")).fit()
    assert first["step_losses"] + rest["step_losses"] == pytest.approx(full, abs=0, rel=0)
    with pytest.raises(ConfigError, match="steps_per_patch"):
        ToyTrainer(config(tmp_path / "bad", steps_per_patch=2, accumulation_steps=2)).fit()


def test_local_expert_splits_its_clicks_into_optimizer_steps(tmp_path):
    from dcm.data.synthetic import generate_dataset
    from dcm.training.local_roi import LocalRoITrainer, split_steps

    assert split_steps(6, 5) == [(0, 2), (2, 3), (3, 4), (4, 5), (5, 6)]
    assert load_config(REPO / "configs" / "train_local_roi.yaml")["train"]["steps_per_patch"] == 5
    data = tmp_path / "data"
    generate_dataset(data, 2, seed=0, shape=(16, 32, 32), max_objects=2, progress=False)
    cfg = load_config(REPO / "configs" / "train_local_roi_reduced.yaml", [
        f"data.data_dir={data}", f"train.work_dir={tmp_path / 'w'}", "data.patch_size=16", "train.epochs=1",
        "interaction.num_clicks=2", "train.steps_per_patch=3", "data.crop_background_ratio=0",
        "train.checkpoint_every_steps=0", "train.figure_every_epochs=100", "train.click_loss_weight=1"])
    trainer = LocalRoITrainer(cfg)
    model = trainer.build_model()
    runs = {"encoder": 0, "head": 0}
    model.image_encoder.register_forward_hook(lambda *_: runs.__setitem__("encoder", runs["encoder"] + 1))
    model.point_head.register_forward_hook(lambda *_: runs.__setitem__("head", runs["head"] + 1))
    outs = list(trainer.training_steps(model, [trainer.build_dataset()[0]], torch.Generator().manual_seed(0), 3))
    assert len(outs) == 3 and runs == {"encoder": 3, "head": 3}  # one click step per optimizer step
    assert all(len(c) == 3 for c in outs[-1]["clicks"][0])
    summary = LocalRoITrainer(cfg).fit()
    assert summary["steps"] == 2 * 3 and all(np.isfinite(summary["step_losses"]))
    with pytest.raises(ConfigError, match="steps_per_patch"):
        LocalRoITrainer(load_config(REPO / "configs" / "train_local_roi_reduced.yaml", ["train.steps_per_patch=4",
                                                                                        "interaction.num_clicks=2"]))


def test_click_loss_pulls_positive_and_pushes_negative_neighbourhoods():
    assert len(ball_offsets(1)) == 7 and len(ball_offsets(0)) == 1 and len(ball_offsets(2)) == 33
    logits = torch.zeros(2, 1, 8, 8, 8, requires_grad=True)
    points = torch.tensor([[[3, 3, 3], [0, 0, 0]], [[6, 6, 7], [1, 1, 1]]])
    labels = torch.tensor([[1, 0], [0, -1]])
    loss = click_loss(logits, points, labels, 1.0)
    assert float(loss.detach()) == pytest.approx(math.log(2))
    loss.backward()
    g = logits.grad[:, 0]
    assert (g[0, 3, 3, 3] < 0) and (g[0, 2, 3, 3] < 0) and (g[0, 0, 0, 0] > 0) and (g[1, 6, 6, 7] > 0)
    assert int((g != 0).sum()) == 7 + 4 + 6  # voxels outside the volume and ignored clicks count nothing
    assert g[1, 1, 1, 1] == 0
    mask = np.zeros((8, 8, 8), bool)
    mask[2:5, 2:5, 2:5] = True
    assert clicks_honoured(mask, [(3, 3, 3), (2, 3, 3), (0, 0, 0), (5, 3, 3)], [1, 1, 0, 0]).tolist() == \
        [True, False, True, False]


def test_global_click_loss_enters_the_interaction_loss(tmp_path):
    from dcm.training.global_roi import GlobalRoITrainer

    losses = []
    for weight in (0, 1):
        cfg = load_config(REPO / "configs" / "train_global_roi_reduced.yaml", [
            "interaction.num_steps=1", "interaction.num_candidates=2", f"train.click_loss_weight={weight}"])
        trainer = GlobalRoITrainer(cfg)
        model = trainer.build_model()
        gt = torch.zeros(1, 1, S, S, S)
        gt[:, :, 20:40, 20:40, 20:40] = 1
        out = trainer.training_step(model, {"image": gt * 2 - 1, "label": gt}, torch.Generator().manual_seed(0))
        losses.append(float(out["loss"]))
    assert losses[1] > losses[0] > 0
