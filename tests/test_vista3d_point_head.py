"""VISTA3D's point head with its click-independent part cached (dcm.models.vista3d.FastPointHead) against
MONAI's own ``PointMappingSAM.forward`` / ``VISTA3D.forward``.

``exact=True`` (the backbone's ``point_head: cached``) must be bit-equal to MONAI; ``exact=False`` (the
default ``fast``) equal up to float rounding: |difference| <= 1e-5 * max |logit| (plus 1e-6). Reduced random
VISTA3Ds on small windows, CPU, 2 threads.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dcm.config_schema import check_dcm_config
from dcm.data.cases import Click, ObjectPrompts
from dcm.errors import ConfigError
from dcm.experts.local_roi import LocalRoIExpert, place_window
from dcm.models.vista3d import (
    FastPointHead,
    PointHeadState,
    image_to_token,
    token_to_image,
)

sys.path.insert(0, str(Path(__file__).parent))
from stubs import reduced_vista3d  # noqa: E402

pytestmark = pytest.mark.usefixtures("two_torch_threads")

W = 32
REL = 1e-5


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return reduced_vista3d(seed=0)


@pytest.fixture(scope="module")
def wide_model() -> torch.nn.Module:
    """Width 16 (4 heads of 2 channels after the attention downsampling), non-trivial biases everywhere."""
    m = reduced_vista3d(seed=1, encoder_embed_dim=16)
    with torch.no_grad():
        for name, p in m.point_head.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return m


def embed(model: torch.nn.Module, shape=(W, W, W), seed: int = 0) -> torch.Tensor:
    x = torch.rand((1, 1) + tuple(shape), generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        embedding, _ = model.image_encoder(x, with_point=True, with_label=False)
    return embedding


def prompts(coords, labels):
    return torch.as_tensor(coords, dtype=torch.float32)[None], torch.as_tensor(labels, dtype=torch.long)[None]


def assert_close_logits(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    scale = float(ref.abs().max())
    torch.testing.assert_close(ours, ref, rtol=0.0, atol=REL * scale + 1e-6)


# Clicks at the window's corners and faces (both ends of every axis), positive and negative, inside too.
CLICK_SETS = [
    ([[16, 16, 16]], [1]),
    ([[0, 0, 0]], [1]),
    ([[W - 1, W - 1, W - 1]], [0]),
    ([[0, W - 1, 5], [W - 1, 0, 17]], [1, 0]),
    ([[3, 28, 31], [31, 3, 0], [16, 16, 16], [0, 15, 31]], [0, 1, 1, 0]),
]


@pytest.mark.parametrize("coords, labels", CLICK_SETS)
def test_matches_monai_point_head(model, coords, labels):
    embedding = embed(model)
    pc, pl = prompts(coords, labels)
    with torch.inference_mode():
        ref = model.point_head(embedding, pc, pl)
        state = FastPointHead(model.point_head).prepare(embedding)
        exact = FastPointHead(model.point_head, exact=True)(state, pc, pl)
        fused = FastPointHead(model.point_head)(state, pc, pl)
    assert torch.equal(exact, ref)  # bit for bit
    assert_close_logits(fused, ref)


@pytest.mark.parametrize("shape", [(16, 24, 32), (8, 40, 16)])
def test_non_cubic_window_and_wider_head(wide_model, shape):
    embedding = embed(wide_model, shape, seed=3)
    coords = [[0, 0, shape[2] - 1], [shape[0] - 1, shape[1] // 2, 0], [shape[0] // 2, shape[1] - 1, 3]]
    pc, pl = prompts(coords, [1, 0, 1])
    with torch.inference_mode():
        ref = wide_model.point_head(embedding, pc, pl)
        head = FastPointHead(wide_model.point_head)
        ours = head(head.prepare(embedding), pc, pl)
    assert ref.shape == (1, 1) + shape
    assert_close_logits(ours, ref)


def test_padding_labels_class_vector_and_batches(model):
    """Labels -1 (not a point) / 2 / 3, a class vector with a zero-shot class, and a batch of two prompts."""
    embedding = embed(model, seed=5)
    pc = torch.tensor([[[4.0, 5.0, 6.0], [0.0, 0.0, 0.0], [31.0, 2.0, 9.0]],
                       [[10.0, 20.0, 30.0], [1.0, 1.0, 1.0], [7.0, 7.0, 7.0]]])
    pl = torch.tensor([[1, -1, 2], [0, 3, -1]])
    cv = torch.tensor([3, 12])  # 12 > last_supported (8): zero-shot embedding
    with torch.inference_mode():
        ref = model.point_head(embedding, pc, pl, class_vector=cv)
        state = FastPointHead(model.point_head).prepare(embedding)
        for exact in (True, False):
            ours = FastPointHead(model.point_head, exact)(state, pc, pl, class_vector=cv)
            assert ours.shape == ref.shape == (2, 1, W, W, W)
            assert_close_logits(ours, ref)
            for b in range(2):  # one prompt at a time: bit-equal with exact=True
                one = FastPointHead(model.point_head, exact)(state, pc[b:b + 1], pl[b:b + 1], cv[b:b + 1])
                ref_one = model.point_head(embedding, pc[b:b + 1], pl[b:b + 1], class_vector=cv[b:b + 1])
                if exact:
                    assert torch.equal(one, ref_one)
                assert_close_logits(one, ref_one)


def test_state_reused_across_clicks_and_same_prompts_not_recomputed(model, monkeypatch):
    embedding = embed(model, seed=7)
    head = FastPointHead(model.point_head)
    with torch.inference_mode():
        state = head.prepare(embedding)
    assert isinstance(state, PointHeadState) and state.out_shape == (W, W, W) and state.grid == (16, 16, 16)
    assert state.nbytes() < embedding.numel() * embedding.element_size()  # less than the encoder output
    runs = []
    real = FastPointHead.transformer
    monkeypatch.setattr(FastPointHead, "transformer", lambda self, *a: runs.append(1) or real(self, *a))
    clicks = [([31, 31, 0], 1), ([0, 16, 16], 0), ([20, 0, 31], 1), ([5, 6, 7], 0)]
    for n in range(1, len(clicks) + 1):
        pc, pl = prompts([c for c, _ in clicks[:n]], [lab for _, lab in clicks[:n]])
        with torch.inference_mode():
            ours = head(state, pc, pl)
            ref = model.point_head(embedding, pc, pl)
            again = head(state, pc.clone(), pl.clone())
        assert_close_logits(ours, ref)
        assert again is ours  # the same prompts: the last answer, no work
        assert len(runs) == n
    with torch.inference_mode():  # other labels, same coordinates: recomputed
        head(state, pc, 1 - pl)
    assert len(runs) == len(clicks) + 1


@pytest.mark.parametrize("layer", [0, 1])
def test_folded_attentions_equal_monai_attention(wide_model, layer):
    """token_to_image / image_to_token against MONAI's Attention.forward on random tokens (biases non-zero)."""
    block = wide_model.point_head.transformer.layers[layer]
    g = torch.Generator().manual_seed(layer)
    tokens, image, values = (torch.randn(shape, generator=g) * 2 for shape in ((1, 5, 16), (1, 300, 16), (1, 300, 16)))
    with torch.inference_mode():
        t2i, i2t = block.cross_attn_token_to_image, block.cross_attn_image_to_token
        torch.testing.assert_close(token_to_image(t2i, tokens, image, values), t2i(q=tokens, k=image, v=values),
                                   rtol=1e-5, atol=1e-5)
        ref = i2t(q=image, k=tokens, v=tokens * 0.5)
        torch.testing.assert_close(image_to_token(i2t, image, tokens, tokens * 0.5), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(image_to_token(i2t, i2t.q_proj(image), tokens, tokens * 0.5, q_projected=True),
                                   ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ in the expert


def random_image(shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape).astype(np.uint8)


def monai_window_logits(expert: LocalRoIExpert, window, coords, labels) -> torch.Tensor:
    with torch.inference_mode():
        return expert.model(
            expert.window_input(window),
            point_coords=torch.as_tensor(coords[None], dtype=torch.float32),
            point_labels=torch.as_tensor(labels[None]),
        )[0, 0]


@pytest.mark.parametrize("mode", ["fast", "cached", "monai"])
def test_expert_clicks_equal_monai_forward_with_cache_reuse_and_invalidation(model, mode):
    """A click sequence in one window (encoder once, the state reused), then a new window and a new image:
    every answer equals VISTA3D.forward on that window's input."""
    image = random_image((48, 40, 56), seed=1)
    expert = LocalRoIExpert(model, {"window_size": W, "reuse_window_margin": 0, "point_head": mode})  # the config key
    assert expert.backbone.point_head_mode == mode
    expert.set_image(image)
    clicks = [((20, 20, 28), True), ((4, 4, 12), False), ((35, 35, 43), True), ((20, 4, 43), False)]
    obj = ObjectPrompts(label=1, clicks=[])
    window0 = None
    for zyx, positive in clicks:  # all inside the first window [4, 36) x [4, 36) x [12, 44), on its edges too
        obj.clicks.append(Click(zyx, positive))
        window = expert.window_of(obj)
        window0 = window0 or window
        assert window.roi == window0.roi
        coords, labels = expert.prompts_of(obj, window)
        ours = expert.window_logits(window, coords, labels)
        ref = monai_window_logits(expert, window, coords, labels)
        if mode == "fast":
            assert_close_logits(ours, ref)
        else:
            assert torch.equal(ours, ref)
        prob = expert.predict(obj).prob
        np.testing.assert_allclose(prob, torch.sigmoid(ref).numpy(), rtol=0, atol=1e-6)
    assert expert.encoder_runs == 1
    cached = expert.embeddings.get(window0.key)
    assert isinstance(cached, torch.Tensor) == (mode == "monai")

    obj.clicks.append(Click((47, 0, 0), True))  # a new window (at the image corner)
    window = expert.window_of(obj)
    assert window.roi != window0.roi
    coords, labels = expert.prompts_of(obj, window)
    assert_close_logits(expert.window_logits(window, coords, labels),
                        monai_window_logits(expert, window, coords, labels))
    assert expert.encoder_runs == 2

    expert.set_image(image[:, ::-1].copy())  # a new image, the same window: the cache is not reused
    ours = expert.window_logits(window, coords, labels)
    ref = monai_window_logits(expert, window, coords, labels)
    assert_close_logits(ours, ref)
    assert expert.encoder_runs == 3  # encoded again


def test_backbone_point_head_mode_checked(model):
    expert = LocalRoIExpert(model, {"window_size": W})
    assert expert.backbone.point_head_mode == "fast"
    with pytest.raises(ConfigError, match="point_head"):
        expert.backbone.set_point_head("fused")
    with pytest.raises(ConfigError, match="local_expert.point_head"):
        check_dcm_config({"local_expert": {"point_head": "fused"}})
    # a state cached by a fast mode cannot be decoded after switching to MONAI's forward
    expert.set_image(random_image((W, W, W)))
    window = place_window((16, 16, 16), (W, W, W), (W, W, W))
    state = expert.image_embedding(window)
    expert.backbone.set_point_head("monai")
    with pytest.raises(RuntimeError, match="embedding cache"):
        expert.backbone.decode(state, np.array([[1, 2, 3]]), np.array([1]), None)
