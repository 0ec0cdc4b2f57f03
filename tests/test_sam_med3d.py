"""SAM-Med3D modules: preset layouts, golden fidelity, fast == padded window attention."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import pytest
import torch

from dcm.errors import ConfigError
from dcm.models import SamMed3D, build_sam_med3d, load_model_config
from dcm.models.sam_med3d.image_encoder import (
    Attention3D,
    Block3D,
    fast_window_attention,
    get_rel_pos,
    rel_pos_bias_reference,
)

sys.path.insert(0, str(Path(__file__).parent))
from stubs import load_sam64_golden  # noqa: E402

FIXTURES = Path(__file__).resolve().parent / "fixtures"
ATOL = 1e-5


@pytest.fixture(scope="module")
def golden():
    return load_sam64_golden()


def _manifest(name):
    return json.loads((FIXTURES / "checkpoint_manifests.json").read_text())[name]


# ---------------------------------------------------------------------------------------------- presets


@pytest.mark.parametrize(
    "preset,layout",
    [("sam_med3d_64", "dcm_global_expert_sam64"), ("sam_med3d_turbo_128", "sam_med3d_vit_b_ori_cvpr25")],
)
def test_preset_state_dict_matches_manifest(preset, layout):
    man = _manifest(layout)
    with torch.device("meta"):
        model = build_sam_med3d(load_model_config(preset))
    got = [[k, list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in model.state_dict().items()]
    assert got == man["state_dict"]  # keys, order, shapes, dtypes
    assert sum(p.numel() for p in model.parameters()) == man["params"]


def test_preset_details():
    cfg = load_model_config("sam_med3d_64")
    assert (cfg["img_size"], cfg["patch_size"], cfg["window_size"], cfg["out_chans"]) == (64, 8, 14, 384)
    assert cfg["global_attn_indexes"] == [2, 5, 8, 11]
    turbo = load_model_config("sam_med3d_turbo_128.yaml")
    assert (turbo["img_size"], turbo["patch_size"], turbo["num_multimask_outputs"]) == (128, 16, 3)
    reduced = load_model_config(Path(__file__).resolve().parents[1] / "configs/models/sam_med3d_64_reduced.yaml")
    golden_cfg = json.loads((FIXTURES / "sam64_reduced_golden.json").read_text())
    assert {k: reduced[k] for k in golden_cfg} == golden_cfg


def test_config_errors():
    with pytest.raises(ConfigError, match="no such model config"):
        load_model_config("no_such_preset")
    cfg = load_model_config("sam_med3d_64_reduced")
    with pytest.raises(ConfigError, match="attention"):
        build_sam_med3d({**cfg, "attention": "flash"})
    with pytest.raises(ConfigError, match="missing"):
        build_sam_med3d({k: v for k, v in cfg.items() if k != "window_size"})
    with pytest.raises(ConfigError, match="unknown"):
        build_sam_med3d({**cfg, "windw_size": 3})
    m = build_sam_med3d({**cfg, "attention": "padded"})
    assert isinstance(m, SamMed3D) and m.image_encoder.attention == "padded"
    assert all(b.attention == "padded" for b in m.image_encoder.blocks)


# ---------------------------------------------------------------------------------------------- golden


def test_golden_weights_layout(golden):
    _, weights, _, model = golden
    assert list(model.state_dict()) == list(weights)


@pytest.mark.parametrize("mode", ["fast", "padded"])
def test_golden_image_embedding(golden, mode):
    _, _, io, model = golden
    model.image_encoder.attention = mode
    try:
        with torch.no_grad():
            emb = model.image_encoder(io["image"])
    finally:
        model.image_encoder.attention = "fast"
    assert emb.shape == (1, 48, 8, 8, 8)
    torch.testing.assert_close(emb, io["image_embedding"], atol=ATOL, rtol=0)


def test_golden_prompt_encoder(golden):
    _, _, io, model = golden
    with torch.no_grad():
        sparse, dense = model.prompt_encoder(
            points=(io["point_coords"], io["point_labels"]), boxes=None, masks=io["mask_prompt"]
        )
        pe = model.prompt_encoder.get_dense_pe()
    assert sparse.shape == (1, 4, 48)  # 3 points + the padding point (no box)
    torch.testing.assert_close(sparse, io["sparse_embedding"], atol=ATOL, rtol=0)
    torch.testing.assert_close(dense, io["dense_embedding"], atol=ATOL, rtol=0)
    torch.testing.assert_close(pe, io["dense_pe"], atol=ATOL, rtol=0)


def test_golden_mask_decoder(golden):
    _, _, io, model = golden
    pe = model.prompt_encoder.get_dense_pe()
    with torch.no_grad():
        sparse, dense = model.prompt_encoder(points=(io["point_coords"], io["point_labels"]), masks=io["mask_prompt"])
        logits, iou = model.mask_decoder(
            image_embeddings=io["image_embedding"],
            image_pe=pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        assert iou is None and logits.shape == (1, 1, 32, 32, 32)
        torch.testing.assert_close(logits, io["low_res_logits"], atol=ATOL, rtol=0)

        sparse, dense = model.prompt_encoder(
            points=(io["point_coords"][:, :1], io["point_labels"][:, :1]), boxes=None, masks=None
        )
        assert dense.shape == (1, 48, 8, 8, 8)
        logits1, _ = model.mask_decoder(
            image_embeddings=io["image_embedding"],
            image_pe=pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        torch.testing.assert_close(logits1, io["low_res_logits_first_click_no_mask"], atol=ATOL, rtol=0)


def test_golden_end_to_end(golden):
    _, _, io, model = golden
    with torch.no_grad():
        logits, iou = model(io["image"], points=(io["point_coords"], io["point_labels"]), masks=io["mask_prompt"])
    torch.testing.assert_close(logits, io["low_res_logits"], atol=ATOL, rtol=0)


def test_golden_fast_equals_padded_float64(golden):
    _, weights, io, _ = golden
    cfg = load_model_config("sam_med3d_64_reduced")
    enc = build_sam_med3d(cfg).image_encoder
    enc.load_state_dict({k[len("image_encoder."):]: v for k, v in weights.items() if k.startswith("image_encoder.")})
    enc = enc.double().eval()
    img = io["image"].double()
    with torch.no_grad():
        fast = enc(img)
        enc.attention = "padded"
        padded = enc(img)
    torch.testing.assert_close(fast, padded, atol=1e-11, rtol=0)


# ---------------------------------------------------------------------------------------------- attention


def test_rel_pos_reference_is_the_spec_formula():
    """Brute force: q(a,b,c).R_d[a-f] + q(a,b,d).R_h[b-f] + q(a,b,e).R_w[e-f]."""
    g = torch.Generator().manual_seed(0)
    n, c = 3, 4
    q = torch.randn(1, n, n, n, c, generator=g, dtype=torch.float64)
    rd, rh, rw = (torch.randn(2 * n - 1, c, generator=g, dtype=torch.float64) for _ in range(3))
    got = rel_pos_bias_reference(q.reshape(1, n**3, c), rd, rh, rw, n)[0]
    want = torch.zeros((n,) * 6, dtype=torch.float64)
    for a, b, cc, d, e, f in itertools.product(range(n), repeat=6):
        want[a, b, cc, d, e, f] = (
            q[0, a, b, cc] @ rd[a - f + n - 1] + q[0, a, b, d] @ rh[b - f + n - 1] + q[0, a, b, e] @ rw[e - f + n - 1]
        )
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    assert torch.equal(get_rel_pos(n, rd)[2, 0], rd[2 * n - 2])


def _random_block(dim, heads, window, grid, seed, attention):
    torch.manual_seed(seed)
    blk = Block3D(dim, heads, window_size=window, input_size=grid, attention=attention).double()
    with torch.no_grad():
        for p in blk.parameters():
            p.normal_(0.0, 0.5)
    return blk


@pytest.mark.parametrize(
    "grid,window",
    [((8, 8, 8), 14), ((5, 5, 5), 3), ((6, 6, 6), 4), ((4, 4, 4), 7), ((6, 6, 6), 3), ((5, 3, 4), 3), ((7, 5, 6), 4)],
)
def test_fast_window_block_equals_padded(grid, window):
    blk = _random_block(16, 2, window, grid, seed=sum(grid) * 31 + window, attention="fast")
    x = torch.randn(2, *grid, 16, dtype=torch.float64) * 2.0
    with torch.no_grad():
        fast = blk(x)
        blk.attention = "padded"
        padded = blk(x)
    torch.testing.assert_close(fast, padded, atol=1e-10, rtol=1e-10)


def test_fast_window_block_gradients_equal_padded():
    blk = _random_block(16, 2, 4, (6, 5, 6), seed=5, attention="fast")
    x = torch.randn(1, 6, 5, 6, 16, dtype=torch.float64, requires_grad=True)
    grads = []
    for mode in ("fast", "padded"):
        blk.attention = mode
        blk.zero_grad()
        x.grad = None
        (blk(x) ** 2).sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in blk.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("extent,n", [((8, 8, 8), 14), ((3, 5, 2), 5), ((4, 2, 4), 4), ((2, 4, 4), 4), ((4, 4, 2), 4),
                                      ((2, 2, 4), 4), ((1, 1, 1), 3), ((3, 3, 3), 3)])
def test_fast_window_attention_function(extent, n):
    """Real corner of a padded cube + virtual key == attention over the full padded cube (float64)."""
    g = torch.Generator().manual_seed(n * 7 + sum(extent))
    attn = Attention3D(12, num_heads=3, input_size=(n, n, n)).double()
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(2, *extent, 12, generator=g, dtype=torch.float64)
    pad = torch.nn.functional.pad(x, (0, 0, 0, n - extent[2], 0, n - extent[1], 0, n - extent[0]))
    with torch.no_grad():
        ref = attn.forward_reference(pad)[:, : extent[0], : extent[1], : extent[2]]
        got = attn(x, n)
    torch.testing.assert_close(got, ref, atol=1e-11, rtol=1e-11)


def test_fast_attention_large_logits_stable():
    """Large biases (logits ~ 1e3) stay finite and exact in float64."""
    n, c = 5, 4
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 3, 2, c, generator=g, dtype=torch.float64) for _ in range(3))
    bq, bk, bv = (torch.randn(1, c, generator=g, dtype=torch.float64) * 20 for _ in range(3))
    rels = [torch.randn(2 * n - 1, c, generator=g, dtype=torch.float64) * 20 for _ in range(3)]
    out = fast_window_attention(q, k, v, bq, bk, bv, *rels, n=n, scale=c**-0.5)
    # reference on the full cube
    full_q = bq.view(1, 1, 1, 1, c).repeat(1, n, n, n, 1)
    full_k = bk.view(1, 1, 1, 1, c).repeat(1, n, n, n, 1)
    full_v = bv.view(1, 1, 1, 1, c).repeat(1, n, n, n, 1)
    full_q[:, :2, :3, :2], full_k[:, :2, :3, :2], full_v[:, :2, :3, :2] = q, k, v
    fq = full_q.reshape(1, n**3, c)
    logits = (fq * c**-0.5) @ full_k.reshape(1, n**3, c).transpose(1, 2)
    logits = logits + rel_pos_bias_reference(fq, *rels, n).reshape(1, n**3, n**3)
    ref = (logits.softmax(-1) @ full_v.reshape(1, n**3, c)).view(1, n, n, n, c)[:, :2, :3, :2]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=1e-9, rtol=1e-9)


# ---------------------------------------------------------------------------------------------- decoder


def test_multimask_decoder_and_box_prompt():
    cfg = {**load_model_config("sam_med3d_64_reduced"), "num_multimask_outputs": 3, "depth": 2,
           "global_attn_indexes": [1], "iou_head": True}
    torch.manual_seed(0)
    model = build_sam_med3d(cfg).eval()
    assert model.mask_decoder.iou_prediction_head is not None
    img = torch.randn(2, 1, 64, 64, 64)
    coords = torch.tensor([[[10.0, 20.0, 30.0]], [[40.0, 5.0, 60.0]]])
    labels = torch.tensor([[1], [0]])
    with torch.no_grad():
        emb = model.image_encoder(img)
        assert emb.shape == (2, 48, 8, 8, 8)
        sparse, dense = model.prompt_encoder(points=(coords, labels), boxes=torch.tensor([[1.0, 2, 3, 40, 50, 60]] * 2))
        assert sparse.shape == (2, 3, 48)  # 1 point + 2 box corners, no padding point
        args = dict(image_embeddings=emb, image_pe=model.prompt_encoder.get_dense_pe(),
                    sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense)
        m3, iou3 = model.mask_decoder(**args, multimask_output=True)
        m1, iou1 = model.mask_decoder(**args, multimask_output=False)
    assert m3.shape == (2, 3, 32, 32, 32) and iou3.shape == (2, 3)
    assert m1.shape == (2, 1, 32, 32, 32) and iou1.shape == (2, 1)
