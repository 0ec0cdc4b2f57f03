"""Local-RoI expert (MONAI VISTA3D): model presets, weight loading, windows, prompts, caching, normalisation.

Everything runs the reduced model on 32^3 windows on CPU; the full vista3d132 is only built on the meta
device (no memory, no weights) to check its state-dict layout against the manifest.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Tuple

import numpy as np
import pytest
import torch

from dcm.data.cases import Box, Click, ObjectPrompts
from dcm.errors import CheckpointError, ConfigError
from dcm.experts.base import Expert
from dcm.experts.local_roi import (
    LocalRoIExpert,
    intensity_percentiles,
    place_window,
    scale_intensity,
    window_clicks,
)
from dcm.models.vista3d import build_vista3d, load_vista3d_config

FIXTURES = Path(__file__).parent / "fixtures"
PE_BUFFER = "point_head.pe_layer.positional_encoding_gaussian_matrix"
W = 32  # test window size (the reduced encoder needs multiples of 8)


pytestmark = pytest.mark.usefixtures("two_torch_threads")


@pytest.fixture(scope="module")
def reduced_cfg() -> dict:
    return load_vista3d_config("vista3d_reduced")


@pytest.fixture(scope="module")
def model(reduced_cfg) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_vista3d(reduced_cfg).eval()


def make_expert(model: torch.nn.Module, **cfg) -> LocalRoIExpert:
    return LocalRoIExpert(model, {"window_size": W, **cfg})


def random_image(shape: Tuple[int, int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape).astype(np.uint8)


def obj_with(*clicks: Tuple[Tuple[int, int, int], bool], box: Box = None) -> ObjectPrompts:
    return ObjectPrompts(label=1, box=box, clicks=[Click(tuple(p), pos) for p, pos in clicks])


class EncoderCalls:
    """Counts forward calls of the model's image encoder with a forward hook."""

    def __init__(self, model: torch.nn.Module):
        self.count = 0
        self._handle = model.image_encoder.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.count += 1

    def close(self):
        self._handle.remove()


# --------------------------------------------------------------------------------------------- models


def test_full_model_state_dict_matches_manifest():
    manifest = json.loads((FIXTURES / "checkpoint_manifests.json").read_text())["vista3d132"]
    with torch.device("meta"):  # 218 M parameters, allocated nowhere
        full = build_vista3d(load_vista3d_config("vista3d132"))
    got = [(k, list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in full.state_dict().items()]
    assert got == [tuple(e) for e in manifest["state_dict"]]
    assert len(got) == 259
    assert sum(p.numel() for p in full.parameters()) == manifest["params"]
    assert PE_BUFFER in dict(full.named_buffers())


def test_model_config_validation(reduced_cfg):
    with pytest.raises(ConfigError, match="unknown keys"):
        build_vista3d({"variant": "reduced", "embed_dim": 8})
    with pytest.raises(ConfigError, match="cannot change"):
        build_vista3d({"variant": "full", "encoder_embed_dim": 16})
    with pytest.raises(ConfigError, match="multiple of 8"):
        build_vista3d({**reduced_cfg, "encoder_embed_dim": 12})
    with pytest.raises(ConfigError, match="variant"):
        build_vista3d({"variant": "tiny"})


def test_reduced_model_output_shape(model):
    x = torch.rand(1, 1, 16, 24, 32)  # non-cubic: (z, y, x) stays in that order
    with torch.inference_mode():
        out = model(x, point_coords=torch.tensor([[[3.0, 5.0, 7.0]]]), point_labels=torch.tensor([[1]]))
    assert out.shape == (1, 1, 16, 24, 32)


def test_point_coords_follow_tensor_axis_order(model):
    """VISTA3D's point encoding uses the raw tensor index order: coord i <-> spatial dim i of the input."""
    pe = model.point_head.pe_layer
    shape = (6, 10, 14)
    dense = pe(shape)  # (C, 6, 10, 14): dim i normalised by shape[i]
    p = (4, 7, 2)
    sparse = pe.forward_with_coords(torch.tensor([[p]], dtype=torch.float32) + 0.5, shape)[0, 0]
    torch.testing.assert_close(sparse, dense[:, p[0], p[1], p[2]], atol=1e-5, rtol=0)
    swapped = pe.forward_with_coords(torch.tensor([[p[::-1]]], dtype=torch.float32) + 0.5, shape)[0, 0]
    assert not torch.allclose(swapped, dense[:, p[0], p[1], p[2]], atol=1e-3)


def test_expert_network_path_equals_monai_forward(model):
    """Our encoder + point head calls (with caching) give exactly VISTA3D.forward's point-only output."""
    expert = make_expert(model)
    expert.set_image(random_image((40, 36, 48)))
    window = place_window((20, 18, 24), (40, 36, 48), (W, W, W))
    coords = np.array([[16, 16, 16], [0, 3, 30]])
    labels = np.array([1, 0])
    ours = expert.window_logits(window, coords, labels)
    with torch.inference_mode():
        ref = model(
            expert.window_input(window),
            point_coords=torch.as_tensor(coords[None], dtype=torch.float32),
            point_labels=torch.as_tensor(labels[None]),
        )
    assert ref.shape == (1, 1, W, W, W)
    torch.testing.assert_close(ours, ref[0, 0], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------- weight loading


def _random_sd(model: torch.nn.Module, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}


def _assert_loaded(expert: LocalRoIExpert, sd: dict):
    got = expert.model.state_dict()
    assert set(got) == set(sd)
    for k, v in sd.items():
        assert torch.equal(got[k].cpu(), v), k


@pytest.mark.parametrize("layout", ["raw", "raw_file", "model_epoch_step", "ddp", "dcm_combined"])
def test_from_config_loads_checkpoint_layouts(model, reduced_cfg, tmp_path, layout):
    sd = _random_sd(model, seed=1)
    if layout == "raw":
        weights = sd
    else:
        obj = {
            "raw_file": sd,
            "model_epoch_step": {"model": sd, "epoch": 3, "step": 1200},
            "ddp": {"model": {"module." + k: v for k, v in sd.items()}, "epoch": 3},
            # DCM's released file: global expert under 'model_state_dict', VISTA3D under 'model'.
            "dcm_combined": {
                "model_state_dict": {"image_encoder.pos_embed": torch.zeros(1, 8, 8, 8, 768)},
                "model": {"module." + k: v for k, v in sd.items()},
                "epoch": 143,
            },
        }[layout]
        weights = tmp_path / "ckpt.pth"
        torch.save(obj, weights)
    expert = LocalRoIExpert.from_config({"model": reduced_cfg, "window_size": W}, weights=weights, device="cpu")
    _assert_loaded(expert, sd)
    assert expert.window_size == (W, W, W)


def test_missing_tensor_is_an_error_naming_it(model, reduced_cfg, tmp_path):
    """A checkpoint without the point head's positional buffer must not load (it would randomise clicks)."""
    sd = _random_sd(model, seed=2)
    del sd[PE_BUFFER]
    path = tmp_path / "missing.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError, match="positional_encoding_gaussian_matrix"):
        LocalRoIExpert.from_config({"model": reduced_cfg, "window_size": W}, weights=path)
    with pytest.raises(CheckpointError, match="positional_encoding_gaussian_matrix"):
        LocalRoIExpert.from_config({"model": reduced_cfg, "window_size": W}, weights=sd)


# -------------------------------------------------------------------------------------------- windows


@pytest.mark.parametrize(
    "center, shape, size, roi, pad",
    [
        # centred, clamped at 0, clamped at the far end
        ((50, 50, 50), (100, 100, 100), (32, 32, 32), [(34, 66)] * 3, [(0, 0)] * 3),
        ((0, 0, 0), (100, 90, 80), (32, 32, 32), [(0, 32)] * 3, [(0, 0)] * 3),
        ((99, 89, 79), (100, 90, 80), (32, 32, 32), [(68, 100), (58, 90), (48, 80)], [(0, 0)] * 3),
        # image smaller than the window along z (whole axis, padded 6 + 7) and equal along y
        ((5, 10, 40), (19, 32, 64), (32, 32, 32), [(0, 19), (0, 32), (24, 56)], [(6, 7), (0, 0), (0, 0)]),
        # per-axis window size
        ((10, 10, 10), (40, 40, 40), (16, 32, 8), [(2, 18), (0, 32), (6, 14)], [(0, 0)] * 3),
    ],
)
def test_place_window(center, shape, size, roi, pad):
    window = place_window(center, shape, size)
    assert [(s.start, s.stop) for s in window.roi] == roi
    assert [tuple(p) for p in window.pad] == pad
    assert window.size == tuple(size)
    assert window.contains(center)
    for s, n in zip(window.roi, shape):
        assert 0 <= s.start < s.stop <= n


def test_window_clicks_labels_shift_and_drop():
    window = place_window((50, 50, 50), (100, 100, 100), (32, 32, 32))  # image region [34, 66)^3
    clicks = [
        Click((40, 41, 42), True),
        Click((10, 50, 50), False),  # outside along z: dropped
        Click((34, 34, 34), False),  # the window's first voxel: kept, at (0, 0, 0)
        Click((65, 65, 65), True),  # the window's last voxel
        Click((50, 50, 50), True),
    ]
    coords, labels = window_clicks(clicks, window, "inside_window")
    assert coords.tolist() == [[6, 7, 8], [0, 0, 0], [31, 31, 31], [16, 16, 16]]
    assert labels.tolist() == [1, 0, 1, 1]
    coords, labels = window_clicks(clicks, window, "last")
    assert coords.tolist() == [[16, 16, 16]] and labels.tolist() == [1]
    # padding shifts coordinates by the pad before the image region
    small = place_window((3, 50, 50), (20, 100, 100), (32, 32, 32))
    coords, _ = window_clicks([Click((3, 50, 50), True)], small)
    assert coords.tolist() == [[3 + 6, 16, 16]]
    with pytest.raises(ConfigError):
        window_clicks(clicks, window, "all")


def test_first_voxel_click_is_used(model):
    """MONAI drops a click on a patch's first voxel (strict '> 0'); our expert passes it at (0, 0, 0)."""
    image = random_image((64, 64, 64), seed=3)
    expert = make_expert(model)
    expert.set_image(image)
    obj = obj_with(((4, 4, 4), False), ((20, 20, 20), True))  # window [4, 36)^3: bg click on its first voxel
    window = expert.window_of(obj)
    assert window.start == (4, 4, 4)
    coords, labels = expert.prompts_of(obj, window)
    assert coords.tolist() == [[0, 0, 0], [16, 16, 16]] and labels.tolist() == [0, 1]
    with_first = expert.predict(obj).prob
    without = expert.predict(obj_with(((20, 20, 20), True))).prob
    assert not np.allclose(with_first, without)  # the click changed the answer

    # The pitfall we avoid: MONAI's patch update drops it (the only click -> nothing left).
    patch = [slice(None), slice(None), slice(4, 36), slice(4, 36), slice(4, 36)]
    dropped = model.update_point_to_patch(patch, torch.tensor([[[4, 4, 4]]]), torch.tensor([[0]]))
    assert dropped == (None, None)


@pytest.mark.parametrize("click", [(0, 0, 0), (47, 39, 55)])
def test_predict_at_image_corners(model, click):
    image = random_image((48, 40, 56), seed=4)
    expert = make_expert(model)
    expert.set_image(image)
    pred = expert.predict(obj_with((click, True)))
    assert pred.expert == "local"
    assert pred.roi == expert.roi_of(obj_with((click, True)))
    assert pred.prob.shape == image[pred.roi].shape == (W, W, W)
    assert pred.prob.dtype == np.float32
    assert np.all((pred.prob >= 0) & (pred.prob <= 1)) and np.all(np.isfinite(pred.prob))
    for s, c, n in zip(pred.roi, click, image.shape):
        assert s.start <= c < s.stop and 0 <= s.start and s.stop <= n


def test_opposite_corner_objects_get_their_own_windows(model):
    image = random_image((48, 40, 56), seed=5)
    expert = make_expert(model)
    expert.set_image(image)
    near = obj_with(((40, 35, 50), False), ((2, 3, 1), True))  # earlier click far away, last near the origin
    far = obj_with(((2, 3, 1), False), ((45, 38, 54), True))
    roi_near, roi_far = expert.roi_of(near), expert.roi_of(far)
    assert [s.start for s in roi_near] == [0, 0, 0]
    assert [s.stop for s in roi_far] == list(image.shape)
    # the other object's click lies outside each window and is dropped
    assert expert.prompts_of(near, expert.window_of(near))[1].tolist() == [1]
    assert expert.prompts_of(far, expert.window_of(far))[1].tolist() == [1]
    assert expert.predict(near).prob.shape == expert.predict(far).prob.shape == (W, W, W)


def test_image_smaller_than_window(model):
    image = random_image((12, 20, 40), seed=6)
    expert = make_expert(model)
    expert.set_image(image)
    obj = obj_with(((11, 0, 39), True))
    window = expert.window_of(obj)
    assert [(s.start, s.stop) for s in window.roi] == [(0, 12), (0, 20), (8, 40)]
    assert window.pad == ((10, 10), (6, 6), (0, 0))
    x = expert.window_input(window)
    assert x.shape == (1, 1, W, W, W)
    assert float(x[0, 0, :10].abs().max()) == 0.0 and float(x[0, 0, :, -6:].abs().max()) == 0.0
    coords, _ = expert.prompts_of(obj, window)
    assert coords.tolist() == [[21, 6, 31]]
    pred = expert.predict(obj)
    assert pred.roi == window.roi and pred.prob.shape == image[pred.roi].shape == (12, 20, 32)
    # the pasted region is the padded output without its padding
    logits = expert.window_logits(window, coords, np.array([1]))
    ref = torch.sigmoid(logits[10:22, 6:26, :]).numpy()
    np.testing.assert_allclose(pred.prob, ref, atol=1e-6)


def test_no_click_no_window_unless_box_centre(model):
    image = random_image((40, 40, 40), seed=7)
    box = Box(z_min=10, z_max=21, z_mid=15, z_mid_x_min=4, z_mid_y_min=30, z_mid_x_max=9, z_mid_y_max=39)
    expert = make_expert(model)
    expert.set_image(image)
    assert expert.roi_of(ObjectPrompts(label=1, box=box)) is None
    assert expert.predict(ObjectPrompts(label=1, box=box)) is None
    assert expert.predict(ObjectPrompts(label=2)) is None

    expert = make_expert(model, box_center_as_click=True)
    expert.set_image(image)
    obj = ObjectPrompts(label=1, box=box)
    window = expert.window_of(obj)
    assert window.center == (15, 34, 6)
    coords, labels = expert.prompts_of(obj, window)
    assert labels.tolist() == [1] and coords.tolist() == [list(window.to_window((15, 34, 6)))]
    assert expert.predict(obj).prob.shape == image[window.roi].shape
    # once there are clicks, the last click places the window
    obj.clicks.append(Click((30, 30, 30), False))
    assert expert.window_of(obj).center == (30, 30, 30)


# -------------------------------------------------------------------------------------------- caching


def test_encoder_cache_reused_in_same_window_only(model):
    image = random_image((64, 48, 48), seed=8)
    expert = make_expert(model)
    calls = EncoderCalls(model)
    try:
        expert.set_image(image)
        obj = obj_with(((2, 2, 2), True))
        first = expert.predict(obj).prob
        assert calls.count == 1
        obj.clicks.append(Click((5, 9, 1), False))  # clamped to the same window [0, 32)^3
        assert expert.roi_of(obj) == expert.roi_of(obj_with(((2, 2, 2), True)))
        second = expert.predict(obj).prob
        assert calls.count == 1  # cached encoder output reused
        assert expert.encoder_runs == 1
        # the cached path gives what a fresh expert computes
        fresh = make_expert(model)
        fresh.set_image(image)
        np.testing.assert_allclose(fresh.predict(obj).prob, second, atol=1e-6)
        assert not np.allclose(first, second)
        assert calls.count == 2

        obj.clicks.append(Click((60, 40, 40), True))  # another window
        expert.predict(obj)
        assert calls.count == 3
        expert.predict(obj)
        assert calls.count == 3

        expert.set_image(image[::-1].copy())  # new image, same window: recompute
        expert.predict(obj)
        assert calls.count == 4
        expert.reset()
        with pytest.raises(RuntimeError, match="set_image"):
            expert.predict(obj)
        expert.set_image(image)
        expert.predict(obj)
        assert calls.count == 5
    finally:
        calls.close()


def test_reuse_window_margin_keeps_previous_window(model):
    """Off by default (each window centred at its last click); with a margin, a nearby click reuses the crop."""
    image = random_image((96, 96, 96), seed=11)
    obj = obj_with(((48, 48, 48), True))
    default = make_expert(model)
    default.set_image(image)
    default.predict(obj)
    obj.clicks.append(Click((50, 45, 56), False))
    assert [s.start for s in default.roi_of(obj)] == [34, 29, 40]

    expert = make_expert(model, reuse_window_margin=4)
    expert.set_image(image)
    calls = EncoderCalls(model)
    try:
        expert.predict(obj_with(((48, 48, 48), True)))
        pred = expert.predict(obj)  # (50, 45, 56) is >= 4 voxels inside [32, 64)^3
        assert [s.start for s in pred.roi] == [32, 32, 32] and calls.count == 1
        assert expert.prompts_of(obj, expert.window_of(obj))[0].tolist() == [[16, 16, 16], [18, 13, 24]]
        obj.clicks.append(Click((61, 48, 48), True))  # 2 voxels from the inner edge: a new centred window
        assert [s.start for s in expert.roi_of(obj)] == [45, 32, 32]
        expert.predict(obj)
        assert calls.count == 2
        # edges on the image border do not count against the margin
        expert.predict(obj_with(((2, 2, 2), True)))
        assert calls.count == 3
        assert [s.start for s in expert.roi_of(obj_with(((20, 1, 0), True)))] == [0, 0, 0]
        assert [s.start for s in expert.roi_of(obj_with(((28, 1, 0), True)))] == [12, 0, 0]
    finally:
        calls.close()
    with pytest.raises(ConfigError, match="reuse_window_margin"):
        make_expert(model, reuse_window_margin=-1)


# -------------------------------------------------------------------------------------- normalisation


def test_percentile_normalisation_matches_monai():
    from monai.transforms import ScaleIntensityRangePercentiles

    rng = np.random.default_rng(9)
    image = (rng.gamma(2.0, 300.0, size=(20, 30, 40)) - 1000).astype(np.int16)
    lo, hi = intensity_percentiles(image, 1, 99)
    assert (lo, hi) == tuple(np.percentile(image, [1, 99]))
    ours = scale_intensity(image, lo, hi)
    ref = ScaleIntensityRangePercentiles(lower=1, upper=99, b_min=0, b_max=1, clip=True)(
        torch.from_numpy(image.astype(np.float32))[None]
    )[0]
    assert ours.dtype == np.float32 and ours.min() == 0.0 and ours.max() == 1.0
    np.testing.assert_allclose(ours, np.asarray(ref), atol=1e-5)



@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint16, np.float32])
def test_percentiles_equal_numpy_bitwise(dtype):
    """8/16-bit images take the histogram path; its values are np.percentile's, bit for bit."""
    rng = np.random.default_rng(3)
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    for n in (1, 2, 7, 100, 999, 5000):
        lo_v, hi_v = (max(info.min, -1500), min(info.max, 3000)) if info else (-1500, 3000)
        values = rng.integers(lo_v, hi_v, n).astype(dtype)
        if n % 2:
            values = (values // 37).astype(dtype)  # many ties
        for pair in ((1.0, 99.0), (0.5, 99.5), (0.0, 100.0), (12.345, 67.89)):
            expected = tuple(float(v) for v in np.percentile(values, list(pair)))
            assert intensity_percentiles(values.reshape(1, 1, -1), *pair) == expected, (n, pair)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint16])
def test_value_counts_chunked_contiguous_or_strided(dtype):
    """The histogram behind the percentiles (and the engine's label counts): index i counts iinfo.min + i, the
    same from chunks of the flat array, from first-axis slabs of a strided view, and against np.unique."""
    from dcm.data.intensity import value_counts

    info = np.iinfo(dtype)
    values = np.random.default_rng(4).integers(max(info.min, -300), min(info.max, 700), (6, 5, 8)).astype(dtype)
    for view in (values, values[:, :, ::3]):
        found, counts = np.unique(view, return_counts=True)
        for chunk in (1, 7, 40, 1 << 22):
            histogram = value_counts(view, chunk)
            assert histogram.sum() == view.size
            assert np.array_equal(histogram[found.astype(np.int64) - info.min], counts)
    with pytest.raises(TypeError, match="8- or 16-bit"):
        value_counts(values.astype(np.int32))


def test_constant_image_normalises_to_zeros():
    image = np.full((8, 8, 8), 77, dtype=np.uint8)
    with np.errstate(all="raise"):
        out = scale_intensity(image, *intensity_percentiles(image))
    assert out.dtype == np.float32 and not out.any()


def test_window_uses_whole_image_percentiles(model):
    """Percentiles come from the whole volume (once per image), not from the window."""
    image = np.zeros((64, 32, 32), dtype=np.float32)
    image[:, :, :] = np.linspace(0, 100, 32)[None, None, :]
    image[32:] += 1000  # a bright far half
    expert = make_expert(model)
    expert.set_image(image)
    lo, hi = expert.intensity_range
    assert (lo, hi) == intensity_percentiles(image, 1, 99)
    window = expert.window_of(obj_with(((0, 16, 16), True)))  # dark half only
    x = expert.window_input(window)[0, 0].numpy()
    np.testing.assert_allclose(x, np.clip((image[:32] - lo) / (hi - lo), 0, 1), atol=1e-6)
    assert x.max() < 0.2


# ----------------------------------------------------------------------------------------------- config


def test_expert_config_validation(model):
    with pytest.raises(ConfigError, match="divisible"):
        LocalRoIExpert(model, {"window_size": 36})
    with pytest.raises(ConfigError, match=r"_expert: unknown key\(s\)"):
        LocalRoIExpert(model, {"windowsize": 32})
    with pytest.raises(ConfigError, match="clicks"):
        LocalRoIExpert(model, {"window_size": 32, "clicks": "all"})
    expert = LocalRoIExpert(model, {"window_size": [16, 32, 8], "amp": True})  # amp is a no-op on CPU
    assert isinstance(expert, Expert) and expert.window_size == (16, 32, 8)
    expert.set_image(random_image((20, 40, 10)))
    pred = expert.predict(obj_with(((19, 0, 9), True)))
    assert pred.prob.shape == (16, 32, 8)


def test_last_click_only_mode(model):
    expert = make_expert(model, clicks="last")
    expert.set_image(random_image((40, 40, 40), seed=10))
    obj = obj_with(((20, 20, 20), True), ((22, 21, 20), False))
    coords, labels = expert.prompts_of(obj, expert.window_of(obj))
    assert labels.tolist() == [0] and len(coords) == 1
