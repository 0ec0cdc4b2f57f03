"""Global-RoI expert (SAM-Med3D at 64^3): RoI geometry, resampling, prompts, caching, loading, preprocessing.

Everything runs the reduced model (``sam_med3d_64_reduced``, random weights) on small images on CPU.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dcm.data.cases import Box, Click, ObjectPrompts, atomic_savez
from dcm.errors import CheckpointError, ConfigError
from dcm.experts.base import Expert
from dcm.experts.global_roi import GlobalRoIExpert
from dcm.experts.roi import (
    GlobalRoI,
    crop_and_resize,
    grow_to_include,
    paste_back,
    roi_from_box,
    roi_from_clicks,
    znorm_positive,
)
from dcm.models import build_sam_med3d, load_model_config

REPO_ROOT = Path(__file__).resolve().parent.parent
SHAPE = (24, 48, 48)


pytestmark = pytest.mark.usefixtures("two_torch_threads")


@pytest.fixture(scope="module")
def reduced_cfg() -> dict:
    return load_model_config("sam_med3d_64_reduced")


@pytest.fixture(scope="module")
def model(reduced_cfg) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_sam_med3d(reduced_cfg).eval()


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=SHAPE).astype(np.uint8)


def make_expert(model, image=None, spacing=(2.0, 1.0, 1.0), **cfg) -> GlobalRoIExpert:
    ex = GlobalRoIExpert(model, cfg)
    if image is not None:
        ex.set_image(image, spacing)
    return ex


def box(z=(8, 14), y=(12, 30), x=(10, 25)) -> Box:
    return Box(z_min=z[0], z_max=z[1], z_mid=(z[0] + z[1]) // 2, z_mid_y_min=y[0], z_mid_y_max=y[1],
               z_mid_x_min=x[0], z_mid_x_max=x[1])


def obj_with(*clicks, b=None, label=1) -> ObjectPrompts:
    return ObjectPrompts(label=label, box=b, clicks=[Click(tuple(p), pos) for p, pos in clicks])


# ------------------------------------------------------------------------------------------- geometry


def test_roi_from_box_centre_size_rounding_and_min_size():
    roi = roi_from_box(box(z=(10, 20), y=(5, 9), x=(30, 30)))
    assert roi.center == (15.0, 7.0, 30.0)
    # 11 * 1.8 = 19.8 -> 20; 5 * 1.8 = 9; 1 * 1.8 -> 2, raised to the minimum 8
    assert roi.size == (20, 9, 8)
    roi = roi_from_box(((10, 21), (0, 2), (4, 40)), scale=1.5, min_size=4)
    assert roi.center == (15.5, 1.0, 22.0)
    assert roi.size == (18, 5, 56)  # 12 * 1.5 = 18; 3 * 1.5 = 4.5 -> 5 (half up); 37 * 1.5 = 55.5 -> 56


def test_roi_from_box_half_up_rounding():
    assert roi_from_box(((0, 2), (0, 0), (0, 0)), scale=1.5, min_size=1).size[0] == 5
    assert roi_from_box(((0, 4), (0, 0), (0, 0)), scale=1.5, min_size=1).size[0] == 8  # 7.5 -> 8


@pytest.mark.parametrize("out", [64, 128])
def test_box_centre_maps_to_frame_centre_and_mapping_round_trips(out):
    b = box(z=(3, 10), y=(0, 47), x=(17, 18))
    roi = roi_from_box(b, out_size=out)
    np.testing.assert_allclose(roi.to_frame(b.center_zyx), [out / 2 - 1] * 3)
    pts = np.array([[0, 0, 0], [23, 47, 47], [5, 20, 17], [-3, 60, 2]], dtype=np.float64)
    np.testing.assert_allclose(roi.from_frame(roi.to_frame(pts)), pts, atol=1e-9)
    # the spec's (p - c) * 64 / size + 31
    if out == 64:
        p = np.array([7, 40, 18])
        expected = (p - np.array(roi.center)) * 64 / np.array(roi.size) + 31
        np.testing.assert_allclose(roi.to_frame(p), expected)


@pytest.mark.parametrize("center,size", [((15.0, 7.0, 30.0), (20, 9, 8)), ((4.5, 2.25, 100.0), (64, 7, 130))])
def test_roi_voxel_range_is_size_voxels_whose_centres_lie_in_the_frame(center, size):
    roi = GlobalRoI(center, size)
    assert tuple(b - a for a, b in roi.bounds) == size
    for ax in range(3):
        a, b = roi.bounds[ax]
        q = lambda p: (p - roi.center[ax]) * 64 / roi.size[ax] + 31  # noqa: E731
        assert -0.5 <= q(a) and q(a - 1) < -0.5
        assert q(b - 1) < 63.5 <= q(b)


def test_from_bounds_covers_exactly_those_voxels():
    roi = GlobalRoI.from_bounds((-3, 5, 10), (9, 69, 11))
    assert roi.start == (-3, 5, 10) and roi.stop == (9, 69, 11) and roi.size == (12, 64, 1)
    assert roi.slices((24, 48, 48)) == (slice(0, 9), slice(5, 48), slice(10, 11))
    assert roi.padding((24, 48, 48)) == ((3, 0), (0, 21), (0, 0))


def test_crop_equals_interpolate_of_zero_padded_crop_when_aligned():
    img = np.random.default_rng(1).random((30, 40, 50)).astype(np.float32)
    roi = GlobalRoI.from_bounds((-10, 5, -20), (60, 69, 80))  # every size >= 64: F.interpolate never clamps
    padded = np.pad(img, [(10, 30), (0, 29), (20, 30)])[:, 5:69, :]
    ref = F.interpolate(torch.from_numpy(padded)[None, None], size=(64,) * 3, mode="trilinear", align_corners=False)
    out = crop_and_resize(img, roi)
    assert out.dtype == np.float32 and out.shape == (64, 64, 64)
    np.testing.assert_allclose(out, ref[0, 0].numpy(), atol=1e-6)


def test_crop_samples_exactly_where_clicks_map():
    """Any RoI: frame voxel q holds the image interpolated at from_frame(q), zero outside (= grid_sample)."""
    img = np.random.default_rng(2).random((20, 30, 40)).astype(np.float32)
    roi = GlobalRoI((3.5, 28.0, 17.3), (13, 33, 50))
    out = crop_and_resize(img, roi)
    zz, yy, xx = np.meshgrid(*[roi.sample_positions(ax) for ax in range(3)], indexing="ij")
    n = img.shape
    grid = np.stack([(xx + 0.5) / n[2] * 2 - 1, (yy + 0.5) / n[1] * 2 - 1, (zz + 0.5) / n[0] * 2 - 1], -1)
    ref = F.grid_sample(torch.from_numpy(img)[None, None], torch.from_numpy(grid)[None].float(),
                        mode="bilinear", padding_mode="zeros", align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(out, ref, atol=1e-5)
    # a click on an image voxel lands on a frame position whose sample is that voxel's value
    p = np.array([5, 20, 30])
    q = roi.to_frame(p)
    roi_at_p = GlobalRoI(tuple(float(v) for v in p), roi.size)  # same RoI shape centred on the voxel
    assert crop_and_resize(img, roi_at_p)[31, 31, 31] == pytest.approx(img[5, 20, 30], abs=1e-6)
    assert np.all(roi.in_frame(q))


def test_crop_zero_padding_at_image_borders():
    ones = np.ones((10, 12, 14), np.float32)
    roi = roi_from_box(((0, 3), (0, 3), (10, 13)), scale=4.0)  # hangs off the low z/y and high x borders
    lin = crop_and_resize(ones, roi)
    near = crop_and_resize(ones.astype(np.uint8), roi, mode="nearest")
    assert near.dtype == np.uint8
    pos = [roi.sample_positions(ax) for ax in range(3)]
    inside = [np.floor(p + 0.5).astype(int) for p in pos]
    inside = [(i >= 0) & (i < n) for i, n in zip(inside, ones.shape)]
    expected = inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]
    np.testing.assert_array_equal(near, expected.astype(np.uint8))
    full = [(p >= 0) & (p <= n - 1) for p, n in zip(pos, ones.shape)]
    full = full[0][:, None, None] & full[1][None, :, None] & full[2][None, None, :]
    far = [(p <= -1) | (p >= n) for p, n in zip(pos, ones.shape)]
    far = far[0][:, None, None] | far[1][None, :, None] | far[2][None, None, :]
    assert full.any() and far.any()
    np.testing.assert_allclose(lin[full], 1.0, atol=1e-6)
    assert np.all(lin[far] == 0.0)


def test_paste_back_clipped_to_image_and_matches_interpolate_when_aligned():
    shape = (20, 30, 40)
    prob = np.random.default_rng(3).random((32, 32, 32)).astype(np.float32)
    roi = GlobalRoI.from_bounds((-5, 10, 30), (15, 43, 80))
    values, slices = paste_back(prob, roi, shape)
    assert slices == (slice(0, 15), slice(10, 30), slice(30, 40))
    assert values.shape == np.zeros(shape)[slices].shape and values.dtype == np.float32
    up = F.interpolate(torch.from_numpy(prob)[None, None], size=roi.size, mode="trilinear", align_corners=False)
    np.testing.assert_allclose(values, up[0, 0, 5:20, 0:20, 0:10].numpy(), atol=1e-6)
    # constant in, constant out, for any RoI; a torch tensor stays a tensor
    roi = GlobalRoI((0.5, 29.0, 1.0), (9, 70, 8))
    values, slices = paste_back(torch.full((32, 32, 32), 0.25), roi, shape)
    assert isinstance(values, torch.Tensor) and tuple(values.shape) == np.zeros(shape)[slices].shape
    assert torch.allclose(values, torch.tensor(0.25))


def test_grow_to_include_minimal_with_margin_and_clipped():
    roi = roi_from_box(((10, 14), (10, 14), (10, 14)), scale=1.0, min_size=1)  # voxels [10, 15) per axis
    assert roi.bounds == ((10, 15),) * 3
    assert grow_to_include(roi, [(12, 10, 14)], margin=3) is roi  # inside, even at the edge: unchanged
    grown = grow_to_include(roi, [(20, 12, 11)], margin=2, image_shape=(40, 40, 40))
    # z grows to 20 + 2; y/x already hold [p - 2, p + 2] except x low side: 11 - 2 = 9
    assert grown.bounds == ((10, 23), (10, 15), (9, 15))
    edge = grow_to_include(roi, [(0, 12, 12)], margin=4, image_shape=(40, 40, 40))
    assert edge.bounds[0] == (0, 15)  # no growth into padding
    # the box centre keeps its frame position when nothing grows; a grown RoI holds the click in its frame
    assert np.all(grown.in_frame(grown.to_frame([20, 12, 11])))


def test_roi_from_clicks_uses_mm_size_and_bbox():
    roi = roi_from_clicks([(10, 20, 30)], spacing_zyx=(4.0, 0.5, 1.0), size_mm=96)
    assert roi.center == (10.0, 20.0, 30.0) and roi.size == (24, 192, 96)
    roi = roi_from_clicks([(10, 20, 30), (10, 20, 100)], spacing_zyx=(1, 1, 1), size_mm=8, scale=1.8)
    assert roi.center == (10.0, 20.0, 65.0) and roi.size == (8, 8, 128)  # 71 * 1.8 = 127.8
    with pytest.raises(ValueError):
        roi_from_clicks([], (1, 1, 1))


def test_znorm_equals_monai_normalize_intensity_nonzero():
    from monai.transforms import NormalizeIntensity

    x = np.random.default_rng(4).random((16, 16, 16)).astype(np.float32) * 200
    x[x < 60] = 0.0
    ref = NormalizeIntensity(nonzero=True)(torch.from_numpy(x.copy()))
    out = znorm_positive(x, "monai")
    assert out.dtype == np.float32 and np.all(out[x == 0] == 0)
    np.testing.assert_allclose(out, np.asarray(ref), atol=1e-5)
    t = znorm_positive(torch.from_numpy(x), "monai")
    assert isinstance(t, torch.Tensor)
    np.testing.assert_allclose(t.numpy(), out, atol=1e-6)
    # torchio's variant (the default: what SAM-Med3D / DCM weights were trained with): every voxel, sample std
    pos = x[x > 0].astype(np.float64)
    np.testing.assert_allclose(znorm_positive(x), (x - pos.mean()) / pos.std(ddof=1), atol=1e-5)
    # degenerate inputs do not blow up
    assert np.all(znorm_positive(np.zeros((4, 4, 4))) == 0)
    assert np.all(znorm_positive(np.full((4, 4, 4), 7.0)) == 0)


# ---------------------------------------------------------------------------------------------- expert


def test_is_an_expert_and_rejects_unknown_keys(model):
    assert isinstance(make_expert(model), Expert)
    with pytest.raises(ConfigError, match=r"_expert: unknown key\(s\)"):
        GlobalRoIExpert(model, {"box_scal": 2.0})
    with pytest.raises(ConfigError, match="outside_clicks"):
        GlobalRoIExpert(model, {"outside_clicks": "move"})
    with pytest.raises(RuntimeError, match="set_image"):
        make_expert(model).roi_of(obj_with(b=box()))


def test_prompts_box_centre_first_then_clicks_in_order(model, image):
    ex = make_expert(model, image)
    b = box()
    o = obj_with(((11, 20, 15), False), ((12, 25, 20), True), ((0, 0, 0), False), b=b)
    roi = ex.global_roi(o)
    coords, labels = ex.prompts_of(o, roi)
    # the far negative click lies outside the RoI: dropped
    assert labels.tolist() == [1, 0, 1]
    np.testing.assert_allclose(coords[0], [31, 31, 31])
    np.testing.assert_allclose(coords[1:], roi.to_frame([(11, 20, 15), (12, 25, 20)]), rtol=1e-6)
    coords, labels = make_expert(model, image, outside_clicks="clip").prompts_of(o, roi)
    assert labels.tolist() == [1, 0, 1, 0] and coords.min() >= 0 and coords.max() <= 63
    # without a box: no extra click, the first positive click is the RoI centre
    o = obj_with(((3, 3, 3), False), ((12, 25, 20), True))
    roi = ex.global_roi(o)
    coords, labels = ex.prompts_of(o, roi)
    assert labels.tolist() == [0, 1]
    np.testing.assert_allclose(coords[-1], [31, 31, 31])


def test_positive_click_outside_grows_roi_and_roi_is_a_function_of_prompts(model, image):
    ex = make_expert(model, image)
    b = box()
    base = ex.global_roi(obj_with(b=b))
    assert base == roi_from_box(b)
    inside = obj_with(((11, 20, 15), True), b=b)
    assert ex.global_roi(inside) == base
    far = (22, 45, 44)
    assert not base.contains(far)
    o = obj_with(((11, 20, 15), True), (far, True), b=b)
    grown = ex.global_roi(o)
    assert grown.contains(far) and all(a1 <= a0 and b1 >= b0 for (a0, b0), (a1, b1) in zip(base.bounds, grown.bounds))
    assert ex.roi_of(o) == grown.slices(SHAPE)
    # a negative click outside never grows it
    assert ex.global_roi(obj_with((far, False), b=b)) == base
    # pure: a fresh expert, and the same expert after other predictions, agree
    ex.predict(o)
    ex.predict(obj_with(((5, 5, 5), True), label=2))
    assert make_expert(model, image).global_roi(o) == ex.global_roi(o) == grown
    # without a box nor positive click the global expert has nothing to say
    assert ex.roi_of(obj_with((far, False))) is None and ex.predict(obj_with((far, False))) is None


def test_no_box_roi_sized_in_mm_around_first_positive_click(model, image):
    ex = make_expert(model, image, spacing=(4.0, 1.0, 0.5), noboxes_size_mm=32.0)
    roi = ex.global_roi(obj_with(((10, 20, 30), True)))
    assert roi.center == (10.0, 20.0, 30.0) and roi.size == (8, 32, 64)


def test_predict_output_on_clipped_roi_at_image_corner(model, image):
    ex = make_expert(model, image)
    corner = obj_with(b=box(z=(0, 5), y=(40, 47), x=(0, 3)))
    pred = ex.predict(corner)
    assert pred.expert == "global" and pred.roi == ex.roi_of(corner)
    assert pred.roi[0].start == 0 and pred.roi[1].stop == 48 and pred.roi[2].start == 0
    assert pred.prob.shape == image[pred.roi].shape and pred.prob.dtype == np.float32
    assert np.all((pred.prob >= 0) & (pred.prob <= 1))


def test_expert_path_equals_manual_model_forward(model, image):
    """Crop -> z-norm -> prompts -> mask prompt -> SAM -> sigmoid -> paste back, step by step."""
    ex = make_expert(model, image)
    b = box()
    prev = np.zeros(SHAPE, np.uint8)
    prev[9:14, 14:28, 12:24] = 1
    prev[9:14, 20:24, 16:20] = 2  # another object inside: not this one's mask
    o = obj_with(((11, 20, 15), False), ((12, 25, 20), True), b=b)
    pred = ex.predict(o, prev)

    roi = roi_from_box(b)
    x = torch.from_numpy(znorm_positive(crop_and_resize(image, roi)))[None, None]
    mask = crop_and_resize((prev == 1).astype(np.uint8), roi, mode="nearest")[::2, ::2, ::2]
    coords = np.concatenate([[[31.0, 31.0, 31.0]], roi.to_frame([(11, 20, 15), (12, 25, 20)])])
    with torch.no_grad():
        logits, _ = model(x, points=(torch.tensor(coords, dtype=torch.float32)[None], torch.tensor([[1, 0, 1]])),
                          masks=torch.from_numpy(mask.astype(np.float32))[None, None])
    ref, slices = paste_back(torch.sigmoid(logits[0, 0]), roi, SHAPE)
    assert pred.roi == slices
    np.testing.assert_allclose(pred.prob, ref.numpy(), atol=1e-5)


def test_mask_prompt_is_prev_pred_of_label_downsampled(model, image):
    ex = make_expert(model, image)
    b = box()
    roi = roi_from_box(b)
    prev = np.zeros(SHAPE, np.uint8)
    prev[9:14, 14:28, 12:24] = 3
    prev[10:12, 16:20, 14:18] = 1
    o = obj_with(((11, 20, 15), True), b=b, label=3)
    mask = ex.mask_prompt(o, roi, prev)
    labels64 = crop_and_resize(prev, roi, mode="nearest")
    assert mask.shape == (32, 32, 32) and mask.dtype == np.float32
    np.testing.assert_array_equal(mask, (labels64 == 3)[::2, ::2, ::2])
    assert 0 < mask.sum() < mask.size
    # the box step: zeros (default) or no mask prompt; no previous prediction: zeros
    assert not ex.mask_prompt(obj_with(b=b, label=3), roi, prev).any()
    assert make_expert(model, image, mask_prompt_at_box_step="none").mask_prompt(obj_with(b=b), roi, prev) is None
    assert not ex.mask_prompt(o, roi, None).any()


def test_embedding_cache_per_roi(model, image):
    ex = make_expert(model, image, cache_size=2)
    b = box()
    ex.predict(obj_with(b=b))
    assert ex.encoder_runs == 1
    ex.predict(obj_with(((11, 20, 15), False), b=b))  # RoI unchanged: decoder only
    ex.predict(obj_with(((11, 20, 15), False), ((12, 25, 20), True), b=b))
    assert ex.encoder_runs == 1
    ex.predict(obj_with(((22, 45, 44), True), b=b))  # grows the RoI: a new embedding
    assert ex.encoder_runs == 2
    ex.predict(obj_with(((11, 20, 15), False), b=b))  # the first RoI is still cached
    assert ex.encoder_runs == 2
    ex.predict(obj_with(((3, 3, 3), True), label=2))  # a third RoI evicts the least recently used one
    ex.predict(obj_with(((22, 45, 44), True), b=b))
    assert ex.encoder_runs == 4
    ex.set_image(image, (2.0, 1.0, 1.0))  # a new image drops the cache
    ex.predict(obj_with(b=b))
    assert ex.encoder_runs == 5


# ----------------------------------------------------------------------------------------------- loading


def _perturbed_state(model) -> dict:
    g = torch.Generator().manual_seed(7)
    return {k: (v + torch.randn(v.shape, generator=g) * 0.01 if v.is_floating_point() else v.clone())
            for k, v in model.state_dict().items()}


@pytest.mark.parametrize("layout", ["combined", "ddp", "object"])
def test_from_config_strict_load(model, tmp_path, layout):
    sd = _perturbed_state(model)
    if layout == "ddp":
        ckpt = {"epoch": 3, "model_state_dict": {"module." + k: v for k, v in sd.items()}}
    else:  # DCM's combined file: VISTA3D under 'model'
        ckpt = {"model_state_dict": sd, "model": {"dummy.weight": torch.zeros(2)}}
    if layout == "object":
        weights = ckpt
    else:
        weights = tmp_path / "w.pt"
        torch.save(ckpt, weights)
    ex = GlobalRoIExpert.from_config({"model": "sam_med3d_64_reduced"}, weights=weights, device="cpu")
    loaded = ex.model.state_dict()
    assert set(loaded) == set(sd)
    for k, v in sd.items():
        assert torch.equal(loaded[k], v), k


def test_from_config_strict_refuses_missing_tensor_and_partial_reports(model, reduced_cfg, tmp_path, capsys):
    sd = _perturbed_state(model)
    pe_key = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
    del sd[pe_key]
    path = tmp_path / "w.pt"
    torch.save({"model_state_dict": sd}, path)
    with pytest.raises(CheckpointError, match="positional_encoding_gaussian_matrix"):
        GlobalRoIExpert.from_config({"model": reduced_cfg}, weights=path)
    ex = GlobalRoIExpert.from_config({"model": reduced_cfg, "init_partial": True}, weights=path)
    out = capsys.readouterr().out
    assert "missing" in out and pe_key in out and str(path) in out
    name = "mask_decoder.output_upscaling.0.weight"
    assert torch.equal(ex.model.state_dict()[name], sd[name])
    with pytest.raises(ConfigError, match=r"_expert: unknown key\(s\)"):
        GlobalRoIExpert.from_config({"model": reduced_cfg, "checkpoint": "x"})


# ------------------------------------------------------------------------------------------ preprocessing


def _write_cases(folder: Path) -> None:
    from dcm.data.synthetic import generate_case

    a = generate_case("CT", 0, shape=SHAPE, n_objects=2, with_tube=False)
    atomic_savez(folder / "CT_a.npz", **a)
    b = generate_case("MR", 1, shape=SHAPE, n_objects=2, with_tube=False)
    b.pop("boxes", None)  # boxes come from gts then
    atomic_savez(folder / "MR_b.npz", **b)
    (folder / "broken.npz").write_bytes(b"PK\x03\x04 not really a zip")


def _check_outputs(cases: Path, out: Path) -> None:
    from dcm.protocol import boxes_from_labels

    names = sorted(p.name for p in out.glob("*.npz"))
    assert names[0].startswith("CT_a_obj001") and all("broken" not in n for n in names)
    for case_file in ("CT_a", "MR_b"):
        with np.load(cases / f"{case_file}.npz", allow_pickle=True) as z:
            imgs, gts = z["imgs"], z["gts"]
        labels = [int(v) for v in np.unique(gts) if v]
        assert labels and ([n for n in names if n.startswith(case_file)]
                           == [f"{case_file}_obj{l:03d}.npz" for l in labels])
        boxes = boxes_from_labels(gts)
        for label, bx in zip(labels, boxes):
            with np.load(out / f"{case_file}_obj{label:03d}.npz") as z:
                assert set(z.files) == {"image", "label", "spacing_zyx", "roi_center", "roi_size"}
                assert z["image"].dtype == np.float32 and z["image"].shape == (64, 64, 64)
                assert z["label"].dtype == np.uint8 and set(np.unique(z["label"])) == {0, 1}
                roi = roi_from_box(Box.from_dict(bx))
                np.testing.assert_array_equal(z["roi_center"], roi.center)
                np.testing.assert_array_equal(z["roi_size"], roi.size)
                # the same resampling as inference, not normalised
                np.testing.assert_array_equal(z["image"], crop_and_resize(imgs, roi))
                np.testing.assert_array_equal(z["label"],
                                              crop_and_resize((gts == label).astype(np.uint8), roi, mode="nearest"))
                assert z["spacing_zyx"].shape == (3,)


def test_preprocess_cli_writes_crops_and_skips_corrupt_case(tmp_path, capsys):
    sys.path.insert(0, str(REPO_ROOT / "train_global_roi"))
    try:
        import preprocess
    finally:
        sys.path.pop(0)
    cases, out = tmp_path / "cases", tmp_path / "out"
    cases.mkdir()
    _write_cases(cases)
    rc = preprocess.main(["--cases", str(cases), "--out", str(out), "--workers", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1
    lines = [ln for ln in err.splitlines() if "broken.npz" in ln]
    assert len(lines) == 1 and "not a readable .npz" in lines[0]
    _check_outputs(cases, out)


def test_preprocess_script_runs_from_a_clone_in_parallel(tmp_path):
    cases, out = tmp_path / "cases", tmp_path / "out"
    cases.mkdir()
    _write_cases(cases)
    (cases / "broken.npz").unlink()
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "train_global_roi" / "preprocess.py"), "--cases", str(cases),
         "--out", str(out), "--workers", "2", "--no-progress"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    _check_outputs(cases, out)


def test_turbo_style_frame_128(reduced_cfg, image):
    """A 128^3 / patch-16 model with 4 mask tokens (the public turbo's layout, reduced widths) runs as is."""
    cfg = {**reduced_cfg, "img_size": 128, "patch_size": 16, "num_multimask_outputs": 3, "iou_head": True}
    torch.manual_seed(0)
    ex = make_expert(build_sam_med3d(cfg).eval(), image)
    assert (ex.frame_size, ex.mask_size) == (128, 32)
    b = box()
    roi = ex.global_roi(obj_with(b=b))
    assert roi.out_size == 128
    coords, _ = ex.prompts_of(obj_with(b=b), roi)
    np.testing.assert_allclose(coords[0], [63, 63, 63])
    prev = np.zeros(SHAPE, np.uint8)
    prev[9:14, 14:28, 12:24] = 1
    o = obj_with(((11, 20, 15), True), b=b)
    mask = ex.mask_prompt(o, roi, prev)
    np.testing.assert_array_equal(mask, (crop_and_resize(prev, roi, mode="nearest") == 1)[::4, ::4, ::4])
    pred = ex.predict(o, prev)
    assert pred.prob.shape == image[pred.roi].shape
