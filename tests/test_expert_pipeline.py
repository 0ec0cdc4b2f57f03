"""The expert pipeline (dcm.experts.pipeline): the frame interface of both experts, the pipeline over a stub
backbone, the backbones package layout, load_into's choice of a combined file's entry, atomic_torch_save."""

from __future__ import annotations

import subprocess
import sys
from typing import List, Optional, Sequence, Tuple

import numpy as np
import pytest
import torch

from dcm.data.cases import Box, Click, ObjectPrompts
from dcm.experts.backbones import Backbone
from dcm.experts.global_roi import GlobalRoIExpert
from dcm.experts.local_roi import LocalRoIExpert, place_window
from dcm.experts.pipeline import EmbeddingCache, Frame
from dcm.experts.roi import GlobalRoI

IMAGE_SHAPE = (12, 20, 24)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """(z, y, x) float32 values around 0, so that their sigmoid is far from saturation."""
    return np.random.default_rng(3).normal(0.0, 2.0, size=IMAGE_SHAPE).astype(np.float32)


def _identity_roi() -> GlobalRoI:
    """A 16^3 RoI whose frame voxels are image voxels (size == out_size, edges on voxel edges); it leaves the
    image before z 0 and after y 20 / x 24."""
    return GlobalRoI.from_bounds((-2, 6, 10), (14, 22, 26), out_size=16)


def _padded_image_region(image: np.ndarray, start: Sequence[int], size: int) -> np.ndarray:
    """``image[start : start + size]`` per axis, zero where that leaves the image."""
    out = np.zeros((size,) * 3, dtype=image.dtype)
    src = tuple(slice(max(a, 0), min(a + size, n)) for a, n in zip(start, image.shape))
    dst = tuple(slice(s.start - a, s.stop - a) for s, a in zip(src, start))
    out[dst] = image[src]
    return out


# ------------------------------------------------------------------------------------------ frames


def test_both_frames_implement_the_frame_interface():
    window = place_window((5, 10, 12), IMAGE_SHAPE, (16, 16, 16))
    for frame in (_identity_roi(), window):
        assert isinstance(frame, Frame)
        assert len(frame.frame_shape) == 3
        hash(frame.key)
    assert window.frame_shape == (16, 16, 16) and _identity_roi().frame_shape == (16, 16, 16)


def test_local_window_round_trips_crop_and_paste(image):
    window = place_window((5, 10, 12), IMAGE_SHAPE, (16, 16, 16))  # z: whole axis, padded 2 + 2
    assert window.pad == ((2, 2), (0, 0), (0, 0)) and window.image_region(IMAGE_SHAPE) == window.roi
    crop = window.crop(image)
    assert crop.shape == (16, 16, 16) and crop.dtype == np.float32
    np.testing.assert_array_equal(crop, _padded_image_region(image, (-2, 2, 4), 16))
    # clicks map onto the voxel that holds their image value
    points = np.array([[0, 2, 4], [11, 17, 19], [5, 10, 12]])
    q = window.to_frame(points)
    assert q.dtype == np.int64 and q.tolist() == [[2, 0, 0], [13, 15, 15], [7, 8, 8]]
    assert [window.to_window(p) for p in points] == [tuple(r) for r in q.tolist()]
    np.testing.assert_array_equal(crop[tuple(q.T)], image[tuple(points.T)])
    # a pointwise map comes before the padding, which stays 0
    mapped = window.crop(image, pointwise=lambda v: np.asarray(v, np.float32) * 2 + 1)
    np.testing.assert_array_equal(mapped, _padded_image_region(image * 2 + 1, (-2, 2, 4), 16))
    # paste: the frame's logits back on the image region, padding cut off
    prob, region = window.paste(torch.from_numpy(crop), IMAGE_SHAPE)
    assert region == window.roi and prob.dtype == np.float32
    np.testing.assert_allclose(prob, torch.sigmoid(torch.from_numpy(image[window.roi])).numpy(), rtol=0, atol=1e-6)
    # a coarser logit grid is resized to the window first
    prob, _ = window.paste(torch.zeros(8, 8, 8), IMAGE_SHAPE)
    assert prob.shape == image[window.roi].shape and np.all(prob == 0.5)


def test_local_window_mask_grid():
    labels = np.random.default_rng(1).integers(0, 3, size=IMAGE_SHAPE).astype(np.uint8)
    window = place_window((5, 10, 12), IMAGE_SHAPE, (16, 16, 16))
    expected = (_padded_image_region(labels, (-2, 2, 4), 16) == 2)[::2, ::2, ::2]
    grid = window.mask_grid(labels, 2, 8)
    assert grid.dtype == np.float32 and grid.shape == (8, 8, 8)
    np.testing.assert_array_equal(grid, expected.astype(np.float32))


def test_global_roi_round_trips_crop_and_paste(image):
    roi = _identity_roi()
    assert roi.image_region(IMAGE_SHAPE) == (slice(0, 12), slice(6, 20), slice(10, 24))
    crop = roi.crop(image)
    assert crop.shape == (16, 16, 16)
    np.testing.assert_allclose(crop, _padded_image_region(image, (-2, 6, 10), 16), rtol=0, atol=1e-6)
    points = np.array([[0, 6, 10], [11, 19, 23], [5, 10, 12]])
    q = roi.to_frame(points)
    np.testing.assert_allclose(q, points - np.array([-2, 6, 10]), atol=1e-9)
    np.testing.assert_allclose(roi.from_frame(q), points, atol=1e-9)
    mapped = roi.crop(image, pointwise=lambda v: np.asarray(v, np.float32) * 2 + 1)
    np.testing.assert_allclose(mapped, _padded_image_region(image * 2 + 1, (-2, 6, 10), 16), rtol=0, atol=1e-5)
    prob, region = roi.paste(torch.from_numpy(crop), IMAGE_SHAPE)
    assert region == roi.image_region(IMAGE_SHAPE) and prob.dtype == np.float32
    np.testing.assert_allclose(prob, torch.sigmoid(torch.from_numpy(image[region])).numpy(), rtol=0, atol=1e-6)
    # the RoI missing the image entirely: all padding
    outside = GlobalRoI.from_bounds((40, 40, 40), (56, 56, 56), out_size=16)
    assert not outside.crop(image, pointwise=lambda v: v + 1).any()


def test_global_roi_mask_grid():
    labels = np.random.default_rng(2).integers(0, 3, size=IMAGE_SHAPE).astype(np.uint8)
    roi = _identity_roi()
    expected = (_padded_image_region(labels, (-2, 6, 10), 16) == 1)[::2, ::2, ::2]
    np.testing.assert_array_equal(roi.mask_grid(labels, 1, 8), expected.astype(np.float32))


# ------------------------------------------------------------------------------------------ pipeline


class _Encoder(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.image_encoder = _Encoder()


class EchoBackbone(Backbone):
    """The logits are the normalised frame itself: the pipeline's output is ``sigmoid(normalise(image))``
    on the frame's region. Records what the pipeline hands it."""

    kind = "echo"
    mask_size = None

    def __init__(self, scope: str = "image"):
        self.normalise_scope = scope
        self.calls: List[Tuple[str, object]] = []
        super().__init__(_Net())

    def default_frame_size(self) -> int:
        return 16

    def check_frame(self, size: Sequence[int], what: str) -> None:
        pass

    def normalise(self, values: np.ndarray) -> np.ndarray:
        return np.asarray(values, dtype=np.float32) / np.float32(2)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(("encode", tuple(x.shape)))
        return x

    def decode(self, embedding: torch.Tensor, coords: np.ndarray, labels: np.ndarray,
               mask: Optional[np.ndarray]) -> torch.Tensor:
        self.calls.append(("decode", (np.asarray(coords).tolist(), np.asarray(labels).tolist(), mask)))
        return embedding[0, 0]


def _obj(*clicks: Tuple[Tuple[int, int, int], bool], box: Optional[Box] = None) -> ObjectPrompts:
    return ObjectPrompts(label=1, box=box, clicks=[Click(tuple(p), pos) for p, pos in clicks])


def test_pipeline_local_expert_over_a_stub_backbone(image):
    backbone = EchoBackbone("image")
    expert = LocalRoIExpert(backbone, {"window_size": 16})
    expert.set_image(image)
    obj = _obj(((5, 10, 12), True))
    pred = expert.predict(obj)
    window = expert.window_of(obj)
    assert pred.roi == window.roi == expert.roi_of(obj) and pred.expert == "local"
    expected = torch.sigmoid(torch.from_numpy(image[window.roi] / np.float32(2))).numpy()
    np.testing.assert_allclose(pred.prob, expected, rtol=0, atol=1e-6)
    assert backbone.calls == [("encode", (1, 1, 16, 16, 16)), ("decode", ([[7, 8, 8]], [1], None))]
    # a further click in the same window: the cached embedding, only the prompt head runs
    obj.clicks.append(Click((6, 10, 12), False))  # same window start: same crop
    expert.predict(obj)
    assert [c[0] for c in backbone.calls] == ["encode", "decode", "decode"] and expert.encoder_runs == 1


@pytest.mark.parametrize("scope", ["image", "frame"])
def test_pipeline_global_expert_over_a_stub_backbone(image, scope):
    backbone = EchoBackbone(scope)
    expert = GlobalRoIExpert(backbone, {"frame_size": 16})
    expert.set_image(image, (1.0, 1.0, 1.0))
    obj = _obj(box=Box(z_min=3, z_max=8, z_mid=5, z_mid_x_min=8, z_mid_y_min=6, z_mid_x_max=16, z_mid_y_max=12))
    pred = expert.predict(obj)
    roi = expert.global_roi(obj)
    if scope == "image":
        x = roi.crop(image, pointwise=backbone.normalise)
    else:
        x = backbone.normalise(roi.crop(image))
    np.testing.assert_array_equal(expert.frame_input(roi)[0, 0].numpy(), x)
    prob, region = roi.paste(torch.from_numpy(x), IMAGE_SHAPE)
    assert pred.roi == region == expert.roi_of(obj) and pred.expert == "global"
    np.testing.assert_array_equal(pred.prob, prob)
    # the box centre is the one click; nothing but tensors and arrays reaches the backbone
    (name, shape), (_, (coords, labels, mask)) = backbone.calls
    assert (name, shape, labels, mask) == ("encode", (1, 1, 16, 16, 16), [1], None)
    np.testing.assert_allclose(coords, [[roi.frame_center] * 3], atol=1e-6)


def test_embedding_cache_drops_least_recently_used():
    cache = EmbeddingCache(2)
    cache.put("a", torch.zeros(1))
    cache.put("b", torch.ones(1))
    assert cache.get("a") is not None  # "b" is now the least recently used
    cache.put("c", torch.ones(1))
    assert cache.get("b") is None and cache.get("a") is not None and len(cache) == 2 and cache.runs == 3


def test_backbones_take_no_callbacks():
    """The backbone is a plain adapter: none of its methods takes a function of the expert."""
    import inspect

    from dcm.experts.backbones import SamMed3DBackbone, Vista3DBackbone

    for cls in (Backbone, SamMed3DBackbone, Vista3DBackbone):
        for name, method in inspect.getmembers(cls, inspect.isfunction):
            params = inspect.signature(method).parameters.values()
            assert not any("Callable" in str(p.annotation) for p in params), (cls.__name__, name)
        assert not hasattr(cls, "embedding") and not hasattr(cls, "forward")


def test_backbones_package_keeps_the_old_names():
    import dcm.data.intensity as intensity
    import dcm.experts.backbones as backbones
    from dcm.experts.backbones.registry import make_backbone
    from dcm.experts.pipeline import BackboneExpert

    assert backbones.intensity_percentiles is intensity.intensity_percentiles
    assert backbones.scale_intensity is intensity.scale_intensity
    assert backbones._integer_percentiles is intensity._integer_percentiles
    assert backbones._percentiles is intensity._percentiles
    assert backbones.make_backbone is make_backbone and backbones.BackboneExpert is BackboneExpert
    for name in backbones.__all__:
        assert getattr(backbones, name) is not None


# ------------------------------------------------------------------------------------------ checkpoints


@pytest.fixture(scope="module")
def combined_file(tmp_path_factory):
    """DCM's combined layout with the reduced models: SAM-Med3D under model_state_dict, VISTA3D under model."""
    from dcm.models import build_sam_med3d, load_model_config
    from dcm.models.vista3d import build_vista3d, load_vista3d_config

    torch.manual_seed(11)
    sam = build_sam_med3d(load_model_config("sam_med3d_64_reduced")).state_dict()
    vista = build_vista3d(load_vista3d_config("vista3d_reduced")).state_dict()
    path = tmp_path_factory.mktemp("ckpt") / "dcm_combined.pth"
    torch.save({"model_state_dict": sam, "model": {"module." + k: v for k, v in vista.items()}, "epoch": 3}, path)
    return path, sam, vista


def _assert_holds(model: torch.nn.Module, sd: dict) -> None:
    got = model.state_dict()
    assert list(got) == list(sd)
    assert all(torch.equal(got[k], v) for k, v in sd.items())


def test_load_into_without_key_picks_the_fitting_entry(combined_file, capsys):
    from dcm.checkpoints import load_checkpoint, load_into
    from dcm.models import build_sam_med3d, load_model_config
    from dcm.models.vista3d import build_vista3d, load_vista3d_config

    path, sam_sd, vista_sd = combined_file
    torch.manual_seed(12)
    vista = build_vista3d(load_vista3d_config("vista3d_reduced"))
    report = load_into(vista, path)
    assert report.complete and report.entry == "model"
    _assert_holds(vista, vista_sd)
    out = capsys.readouterr().out
    assert "took entry 'model'" in out and str(path) in out and "'model_state_dict'" in out

    sam = build_sam_med3d(load_model_config("sam_med3d_64_reduced"))
    report = load_into(sam, load_checkpoint(path), verbose=False)
    assert report.complete and report.entry == "model_state_dict"
    _assert_holds(sam, sam_sd)
    assert capsys.readouterr().out == ""
    # a given key still wins, and a single state dict is loaded as before, with nothing to say
    assert load_into(sam, path, key="model_state_dict").entry == "model_state_dict"
    assert load_into(vista, {"model": vista_sd}).entry is None
    assert capsys.readouterr().out == ""


def test_load_into_picked_entry_by_name_and_shape(combined_file, capsys):
    from dcm.checkpoints import load_into
    from dcm.models.vista3d import build_vista3d, load_vista3d_config

    path, _, vista_sd = combined_file
    vista = build_vista3d(load_vista3d_config("vista3d_reduced"))
    report = load_into(vista, path, strict=False)
    assert report.complete and report.entry == "model" and len(report.loaded) == len(vista_sd)
    assert "[model]" in report.format()


def test_checkpoints_module_does_not_import_training():
    code = "import sys, dcm.checkpoints; print(sorted(m for m in sys.modules if m.startswith('dcm.training')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------------------------------ atomic save


def test_atomic_torch_save_replaces_whole_files(tmp_path):
    from dcm.atomic import atomic_torch_save, stale_temporaries
    from dcm.training.checkpointing import atomic_torch_save as training_save

    assert training_save is atomic_torch_save
    path = tmp_path / "sub" / "latest.pt"
    assert atomic_torch_save({"step": 1, "w": torch.arange(4)}, path) == path
    assert atomic_torch_save({"step": 2, "w": torch.arange(5)}, str(path)) == path
    loaded = torch.load(path, weights_only=True)
    assert loaded["step"] == 2 and torch.equal(loaded["w"], torch.arange(5))
    with pytest.raises(Exception):
        atomic_torch_save({"step": 3, "bad": lambda: None}, path)  # a lambda does not pickle
    assert torch.load(path, weights_only=True)["step"] == 2  # the previous complete file
    assert sorted(p.name for p in path.parent.iterdir()) == ["latest.pt"]
    assert stale_temporaries(path.parent) == []
