"""CPU precision paths of the experts: bfloat16 autocast, channels-last 3D, the oneDNN switch.

The rule (``amp`` / ``amp_dtype`` / ``amp_device`` / ``channels_last`` / ``onednn``), the detection of native
bfloat16 and the one start-up line; ``amp: false`` is float32 exactly as before; bfloat16 stays within these
tolerances of float32 (README "Speed settings of both experts"), measured on the fixtures below:

* golden SAM-Med3D-64 reduction (``tests/fixtures/sam64_reduced_golden.*``) through the backbone under CPU
  bfloat16: image embedding max |diff| 0.034 (values up to 3.6) -> tolerance :data:`GOLDEN_EMB_ATOL`;
  low-resolution logits max |diff| 1.5e-3 (values up to 0.106) -> :data:`GOLDEN_LOGIT_ATOL`;
* reduced random experts, probabilities: global max 4.3e-4, local max 4.9e-3 -> :data:`PROB_ATOL`.

bfloat16 is forced with ``amp_device: cpu`` so that these run on any CPU (emulated where not native);
nothing here times anything.
"""

from __future__ import annotations

import copy

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dcm.config_schema import check_dcm_config
from dcm.data.cases import Box, Click, ObjectPrompts
from dcm.errors import ConfigError
from dcm.experts import build_experts, precision_line
from dcm.experts.backbones import make_backbone
from dcm.experts.global_roi import GlobalRoIExpert
from dcm.experts.local_roi import LocalRoIExpert
from dcm.models import build_sam_med3d, load_model_config
from dcm.models import precision
from dcm.models.onednn import (OneDNNConv3d, OneDNNLinear, is_channels_last, onednn_linear_available,
                               onednn_linear_pays)
from dcm.models.precision import ChannelsLastInstanceNorm3d, autocast_dtype, channels_last_active, cpu_native
from dcm.models.sam_med3d.image_encoder import fast_window_attention, reduced_window_attention
from dcm.models.vista3d import build_vista3d, load_vista3d_config
from dcm.config import load_config

sys.path.insert(0, str(Path(__file__).parent))
from stubs import load_sam64_golden  # noqa: E402

GOLDEN_EMB_ATOL = 0.05
GOLDEN_LOGIT_ATOL = 3e-3
PROB_ATOL = {"global": 2e-3, "local": 2e-2}
BF16 = {"amp": True, "amp_dtype": "bfloat16", "amp_device": "cpu"}

pytestmark = pytest.mark.usefixtures("two_torch_threads")


@pytest.fixture
def said(monkeypatch):
    """A fresh record of the start-up lines printed so far (the line is printed once per process)."""
    monkeypatch.setattr(precision, "_SAID", set())


def _image() -> np.ndarray:
    img = np.random.default_rng(0).integers(0, 256, size=(40, 48, 48)).astype(np.uint8)
    img[10:30, 14:34, 12:36] += 60
    return img


def _obj() -> ObjectPrompts:
    box = Box(z_min=10, z_max=29, z_mid=20, z_mid_y_min=14, z_mid_y_max=33, z_mid_x_min=12, z_mid_x_max=35)
    return ObjectPrompts(label=1, box=box, clicks=[Click((20, 24, 24), True), Click((12, 16, 14), False)])


def _expert(role: str, **cfg):
    """A reduced expert with fresh random weights (seed 0) on the test image."""
    torch.manual_seed(0)
    if role == "global":
        expert = GlobalRoIExpert(build_sam_med3d(load_model_config("sam_med3d_64_reduced")).eval(), cfg)
        expert.set_image(_image(), (2.0, 1.0, 1.0))
    else:
        model = build_vista3d(load_vista3d_config("vista3d_reduced")).eval()
        expert = LocalRoIExpert(model, {"window_size": 32, **cfg})
        expert.set_image(_image())
    return expert


# ------------------------------------------------------------------------------------------------- the rule


@pytest.mark.parametrize("amp,amp_device,device,native,want", [
    (False, "auto", "cpu", True, None),           # amp false: float32 everywhere
    (False, "auto", "cuda", True, None),
    (False, "cpu", "cpu", True, None),
    (True, "auto", "cpu", True, torch.bfloat16),  # auto: a CPU with native bf16
    (True, "auto", "cpu", False, None),           # ... float32 elsewhere
    (True, "auto", "cuda", False, torch.bfloat16),
    (True, "cuda", "cpu", True, None),            # the previous behaviour: CUDA only
    (True, "cuda", "cuda", True, torch.bfloat16),
    (True, "cpu", "cpu", False, torch.bfloat16),  # forced on any CPU
    (True, "cpu", "cuda", True, None),
])
def test_autocast_rule(monkeypatch, amp, amp_device, device, native, want):
    monkeypatch.setattr(precision, "cpu_native", lambda dtype: (native, "patched"))
    assert autocast_dtype(amp, "bfloat16", amp_device, device) is want


def test_autocast_rule_refuses_unknown_values():
    with pytest.raises(ValueError, match="amp_device"):
        autocast_dtype(True, "bfloat16", "gpu", "cpu")
    with pytest.raises(ValueError, match="amp_dtype"):
        autocast_dtype(True, "float8", "auto", "cpu")
    with pytest.raises(ValueError, match="channels_last"):
        channels_last_active("yes", None, "cpu", True)


def test_channels_last_rule():
    assert channels_last_active("auto", torch.bfloat16, "cpu", convolutional=True)
    assert not channels_last_active("auto", torch.bfloat16, "cpu", convolutional=False)  # SAM-Med3D: a ViT
    assert not channels_last_active("auto", None, "cpu", convolutional=True)  # float32
    assert not channels_last_active("auto", torch.bfloat16, "cuda", convolutional=True)
    assert channels_last_active(True, None, "cpu", convolutional=False)
    assert not channels_last_active(False, torch.bfloat16, "cpu", convolutional=True)


def test_detection_of_native_bfloat16(monkeypatch):
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this torch build has no oneDNN bfloat16 kernels for this CPU")
    real = cpu_native(torch.bfloat16)
    flags = precision.cpu_flags()
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        assert real[0] and "this CPU has" in real[1]
    # from /proc/cpuinfo alone, when torch's own checks say nothing
    monkeypatch.setattr(precision, "_torch_says", lambda dtype: None)
    for fake, native in ((frozenset({"avx512f", "avx512_bf16"}), True), (frozenset({"avx512f", "avx2"}), False)):
        monkeypatch.setattr(precision, "cpu_flags", lambda fake=fake: fake)
        precision.cpu_native.cache_clear()
        ok, reason = cpu_native(torch.bfloat16)
        assert ok is native
        assert reason == ("this CPU has avx512_bf16" if native else
                          "no native bfloat16 on this CPU (no avx512_bf16 / amx_bf16)")
    precision.cpu_native.cache_clear()


# ------------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("section,key,value,message", [
    ("global_expert", "amp_device", "gpu", "global_expert.amp_device must be one of ['auto', 'cuda', 'cpu']"),
    ("local_expert", "amp_device", None, "local_expert.amp_device must be one of"),
    ("local_expert", "channels_last", "yes", "local_expert.channels_last must be one of ['auto', True, False]"),
    ("global_expert", "channels_last", 1, "global_expert.channels_last must be one of"),
    ("local_expert", "onednn", "off", "local_expert.onednn must be true or false"),
    ("global_expert", "amp", "true", "global_expert.amp must be true or false"),
    ("local_expert", "amp_dtype", "float32", "local_expert.amp_dtype must be one of"),
])
def test_config_errors_name_the_key(section, key, value, message):
    with pytest.raises(ConfigError) as e:
        check_dcm_config({section: {key: value}})
    assert message in str(e.value) and "\n" not in str(e.value)


def test_presets():
    """Full size: bf16 autocast where the CPU has it (auto); the small presets stay float32."""
    for name in ("dcm", "dcm_card_pairing"):
        cfg = check_dcm_config(load_config(name))
        for role in ("global_expert", "local_expert"):
            assert (cfg[role]["amp"], cfg[role]["amp_dtype"], cfg[role]["amp_device"]) == (True, "bfloat16", "auto")
            assert (cfg[role]["channels_last"], cfg[role]["onednn"]) == ("auto", True)
    for name in ("dcm_small", "dcm_reduced"):
        cfg = check_dcm_config(load_config(name))
        assert not cfg["global_expert"]["amp"] and not cfg["local_expert"]["amp"]


# ------------------------------------------------------------------------------------------------- start-up line


def test_one_start_up_line(capsys, said, monkeypatch):
    cfg = load_config("dcm_reduced", ("global_expert.amp=true", "local_expert.amp=true",
                                      "global_expert.amp_device=cpu", "local_expert.amp_device=cpu"))
    experts = build_experts(cfg, random_init=True)
    err = capsys.readouterr().err.splitlines()
    lines = [ln for ln in err if ln.startswith("dcm: CPU precision:")]
    assert len(lines) == 1, err
    assert ("global_expert bfloat16 autocast, local_expert bfloat16 autocast + channels-last 3D" in lines[0]
            and "amp_device: cpu" in lines[0])
    assert experts["global"].backbone.autocast_dtype is torch.bfloat16
    build_experts(cfg, random_init=True)  # the same line is not repeated
    assert "CPU precision" not in capsys.readouterr().err

    # auto on a CPU without native bf16: float32, and the line says why
    monkeypatch.setattr(precision, "cpu_native", lambda dtype: (False, "no native bfloat16 on this CPU (patched)"))
    cfg = load_config("dcm_reduced", ("global_expert.amp=true", "engine.policy=global_only"))
    experts = build_experts(cfg, random_init=True)
    assert experts["global"].backbone.autocast_dtype is None
    line = capsys.readouterr().err.strip()
    assert line == "dcm: CPU precision: global_expert float32 (no native bfloat16 on this CPU (patched))"


def test_no_line_when_amp_is_off(capsys, said):
    experts = build_experts(load_config("dcm_reduced"), random_init=True)
    assert precision_line(experts) is None and "CPU precision" not in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- float32


@pytest.mark.parametrize("role", ["global", "local"])
def test_amp_false_is_plain_float32(role):
    """``amp: false``: no autocast anywhere; the expert's probabilities equal, bit for bit, the network run
    step by step in float32 (the computation before this option existed)."""
    seen = []
    expert = _expert(role, amp=False)
    if role == "local":
        expert.backbone.set_point_head("cached")  # MONAI's own point-head code (``fast`` folds it: ~1e-6 off)
    model = expert.model
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append((torch.is_autocast_enabled("cpu"), o.dtype)))
             for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv3d))]
    obj = _obj()
    pred = expert.predict(obj)
    for h in hooks:
        h.remove()
    assert seen and all(not autocast and dtype == torch.float32 for autocast, dtype in seen)
    assert all(type(m) is OneDNNConv3d for m in model.modules() if isinstance(m, torch.nn.Conv3d))
    assert not any(is_channels_last(p) for p in model.parameters())
    frame = expert.frame_of(obj)
    coords, labels = expert.prompts_of(obj, frame)
    mask = expert.mask_prompt(obj, frame, None)
    with torch.inference_mode():
        x = expert.frame_input(frame)
        if role == "global":
            emb = model.image_encoder(x)
            pe = model.prompt_encoder
            sparse, dense = pe(points=(torch.as_tensor(coords, dtype=torch.float32)[None],
                                       torch.as_tensor(labels)[None]), boxes=None,
                               masks=torch.as_tensor(mask)[None, None])
            logits = model.mask_decoder(image_embeddings=emb, image_pe=pe.get_dense_pe(),
                                        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                        multimask_output=False)[0][0, 0]
        else:
            emb, _ = model.image_encoder(x, with_point=True, with_label=False)
            logits = model.point_head(emb, torch.as_tensor(coords, dtype=torch.float32)[None],
                                      torch.as_tensor(labels)[None], class_vector=None)[0, 0]
            from dcm.experts.local_roi import upsample_logits

            logits = upsample_logits(logits, frame.size, expert.prob_interpolation)
    prob, region = frame.paste(logits, expert.image.shape, expert.prob_interpolation)
    assert region == pred.roi and np.array_equal(prob, pred.prob)


# ------------------------------------------------------------------------------------------------- bfloat16


@pytest.fixture(scope="module")
def golden():
    _, _, io, model = load_sam64_golden()
    return io, model


@pytest.mark.parametrize("attention", ["fast", "padded"])
def test_bf16_golden_within_tolerance(golden, attention):
    """The golden SAM-Med3D-64 reduction through the backbone under CPU bfloat16 (fast: virtual key in float32)."""
    io, model = golden
    backbone = make_backbone(model, "sam_med3d", **BF16)
    assert backbone.autocast_dtype is torch.bfloat16 and not backbone.channels_last
    model.image_encoder.attention = attention
    try:
        emb = backbone.encode(io["image"])
        logits = backbone.decode(emb, io["point_coords"][0].numpy(), io["point_labels"][0].numpy(),
                                 io["mask_prompt"][0, 0].numpy())
    finally:
        model.image_encoder.attention = "fast"
    torch.testing.assert_close(emb.float(), io["image_embedding"], atol=GOLDEN_EMB_ATOL, rtol=0)
    torch.testing.assert_close(logits.float(), io["low_res_logits"][0, 0], atol=GOLDEN_LOGIT_ATOL, rtol=0)
    assert (emb.float() - io["image_embedding"]).abs().mean() < 0.01


def test_bf16_weights_stored_once_give_the_same_encoder_output():
    """Under autocast SAM-Med3D's linear / conv weights are stored in bf16 once: the same encoder output and
    decoder logits as autocast casting float32 weights at every call, bit for bit; biases and norms stay float32."""
    torch.manual_seed(0)
    model = build_sam_med3d(load_model_config("sam_med3d_64_reduced")).eval()
    x = torch.randn(1, 1, 64, 64, 64)
    coords, labels = np.array([[30.0, 31.0, 29.0], [10.0, 50.0, 40.0]]), np.array([1, 0])
    mask = np.random.default_rng(0).normal(size=(32, 32, 32)).astype(np.float32)
    reference = make_backbone(copy.deepcopy(model), "sam_med3d")  # float32 weights, autocast per call below
    reference.autocast_dtype = torch.bfloat16
    want = reference.encode(x)
    want_logits = reference.decode(want, coords, labels, mask)
    backbone = make_backbone(model, "sam_med3d", **BF16)
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv3d, torch.nn.ConvTranspose3d))]
    assert layers and all(m.weight.dtype is torch.bfloat16 for m in layers)
    assert all(m.bias is None or m.bias.dtype is torch.float32 for m in layers)
    assert all(p.dtype is torch.float32 for n, p in model.named_parameters() if "norm" in n)
    encoder = [m for m in model.image_encoder.modules() if isinstance(m, torch.nn.Linear)]
    # the linear layers run on weights packed once for oneDNN where that pays (no AMX), same values
    assert encoder and all(type(m) is (OneDNNLinear if onednn_linear_pays() else torch.nn.Linear) for m in encoder)
    emb = backbone.encode(x)
    assert torch.equal(emb, want)
    assert torch.equal(backbone.decode(emb, coords, labels, mask), want_logits)
    fp32 = make_backbone(build_sam_med3d(load_model_config("sam_med3d_64_reduced")).eval(), "sam_med3d")
    assert all(p.dtype is torch.float32 for p in fp32.model.parameters())


@pytest.mark.skipif(not onednn_linear_available(), reason="no oneDNN linear kernels in this torch build")
@pytest.mark.parametrize("amx", [False, True])
def test_packed_linear_layers_only_on_a_processor_without_amx(monkeypatch, amx):
    """OneDNNLinear was measured faster on an avx512_bf16 processor and slower (and 100 MB larger) with AMX."""
    monkeypatch.setattr(precision, "cpu_has_amx", lambda: amx)
    torch.manual_seed(0)
    model = build_sam_med3d(load_model_config("sam_med3d_64_reduced")).eval()
    plain = copy.deepcopy(model)
    backbone = make_backbone(model, "sam_med3d", **BF16)
    kinds = {type(m) for m in model.image_encoder.modules() if isinstance(m, torch.nn.Linear)}
    assert kinds == ({torch.nn.Linear} if amx else {OneDNNLinear})
    # packed or not, the reduced encoder's output is the same bit for bit (on this processor, whichever it is)
    monkeypatch.setattr(precision, "cpu_has_amx", lambda: not amx)
    other = make_backbone(plain, "sam_med3d", **BF16)
    x = torch.randn(1, 1, 64, 64, 64)
    assert torch.equal(backbone.encode(x), other.encode(x))


@pytest.mark.parametrize("shape", [(8, 8, 8), (14, 14, 14), (5, 7, 3)])
@pytest.mark.parametrize("use_sdpa", [True, False])
def test_reduced_window_attention_close_to_float64(shape, use_sdpa):
    """bf16 q, k, v with the fold and softmax in float32: within bf16 rounding of the exact float64 result."""
    g = torch.Generator().manual_seed(0)
    bh, n, c = 4, 14, 16
    q, k, v = (torch.randn(bh, *shape, c, generator=g) for _ in range(3))
    biases = [torch.randn(bh, c, generator=g) for _ in range(3)]
    tables = [0.3 * torch.randn(2 * n - 1, c, generator=g) for _ in range(3)]
    exact = fast_window_attention(q.double(), k.double(), v.double(), *[t.double() for t in biases + tables],
                                  n, c ** -0.5)
    out = reduced_window_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), *biases, *tables, n, c ** -0.5,
                                   use_sdpa=use_sdpa)
    assert out.dtype == torch.bfloat16 and out.shape == exact.shape
    assert (out.double() - exact).abs().max() < 0.04 and (out.double() - exact).abs().mean() < 4e-3


@pytest.mark.parametrize("role", ["global", "local"])
def test_bf16_experts_close_to_float32(role):
    ref = _expert(role).predict(_obj())
    expert = _expert(role, **BF16)
    assert expert.backbone.autocast_dtype is torch.bfloat16
    assert expert.backbone.channels_last is (role == "local")  # auto: the convolutional backbone only
    pred = expert.predict(_obj())
    assert pred.roi == ref.roi and pred.prob.dtype == np.float32
    assert np.all((pred.prob >= 0) & (pred.prob <= 1))
    assert np.abs(pred.prob - ref.prob).max() < PROB_ATOL[role]
    assert np.abs(pred.prob - ref.prob).mean() < 2e-3
    (embedding,) = expert.embeddings._entries.values()
    # cached as computed under autocast (VISTA3D: the point head's click-independent part, whose image tokens
    # come from a bf16 convolution; SAM-Med3D's neck ends in a float32 LayerNorm3d)
    cached = embedding.keys if role == "local" else embedding
    assert cached.dtype == (torch.bfloat16 if role == "local" else torch.float32)


def test_channels_last_local_expert():
    """VISTA3D in channels-last 3D: weights stored so, the activations stay so (instance norms as group norms),
    float32 equal to rounding, bf16 within the bf16 tolerance."""
    ref = _expert("local").predict(_obj()).prob
    expert = _expert("local", channels_last=True)
    model = expert.model
    convs = [m for m in model.modules()  # (a one-channel or 1x1x1 weight is both layouts at once)
             if isinstance(m, torch.nn.Conv3d) and m.in_channels > 1 and max(m.kernel_size) > 1]
    assert convs and all(is_channels_last(m.weight) for m in convs)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.InstanceNorm3d)]
    assert norms and all(type(m) is ChannelsLastInstanceNorm3d for m in norms)
    layouts = []
    hook = model.image_encoder.register_forward_hook(lambda m, i, o: layouts.append(is_channels_last(o[0])))
    prob = expert.predict(_obj()).prob
    hook.remove()
    assert layouts == [True]
    np.testing.assert_allclose(prob, ref, atol=1e-5)
    bf16 = _expert("local", channels_last=True, **BF16).predict(_obj()).prob
    assert np.abs(bf16 - ref).max() < PROB_ATOL["local"]


def test_channels_last_instance_norm_equals_instance_norm():
    norm = torch.nn.InstanceNorm3d(6, affine=True)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    x = torch.randn(2, 6, 5, 7, 4)
    ref = norm(x)
    norm.__class__ = ChannelsLastInstanceNorm3d
    assert torch.equal(norm(x), ref)  # a contiguous input runs nn.InstanceNorm3d unchanged
    out = norm(x.contiguous(memory_format=torch.channels_last_3d))
    assert is_channels_last(out)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("role", ["global", "local"])
def test_onednn_off(role):
    """``onednn: false``: PyTorch's own 3D convolutions, the same values to float32 rounding."""
    ref = _expert(role).predict(_obj()).prob
    expert = _expert(role, onednn=False)
    assert not any(type(m) in (OneDNNConv3d, OneDNNLinear) for m in expert.model.modules())
    np.testing.assert_allclose(expert.predict(_obj()).prob, ref, atol=1e-5)
