"""oneDNN 3D convolutions and packed bfloat16 linear layers: same results (and gradients) as PyTorch's own path,
same state dict."""

import copy

import pytest
import torch
from torch import nn

from dcm.models.onednn import (OneDNNConv3d, OneDNNLinear, onednn_linear_available, use_onednn_conv3d,
                               use_onednn_linear, use_pytorch_linear)

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch build")


@pytest.mark.parametrize("cin,cout,kernel,stride,padding,groups,bias", [
    (16, 16, 3, 1, 1, 1, True),   # the narrow VISTA3D layer PyTorch sends to its slow path
    (1, 8, 3, 1, 1, 1, False),
    (8, 8, 1, 1, 0, 1, True),
    (4, 8, 2, 2, 0, 1, True),
    (8, 8, 3, 1, 2, 2, True),
])
def test_onednn_conv3d_matches_pytorch(cin, cout, kernel, stride, padding, groups, bias):
    torch.manual_seed(0)
    ref = nn.Conv3d(cin, cout, kernel, stride=stride, padding=padding, groups=groups, bias=bias)
    ours = use_onednn_conv3d(copy.deepcopy(ref))
    assert type(ours) is OneDNNConv3d and ours.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(1, cin, 12, 10, 14, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y_ref, y = ref(x), ours(x2)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    y_ref.backward(g)
    y.backward(g)
    torch.testing.assert_close(x2.grad, x.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, atol=1e-4, rtol=1e-5)


def test_other_layers_and_dtypes_untouched():
    model = nn.Sequential(nn.Conv3d(2, 2, 3, padding=1), nn.ConvTranspose3d(2, 2, 2, stride=2),
                          nn.Conv3d(2, 2, 3, padding="same"))
    use_onednn_conv3d(model)
    assert [type(m) for m in model] == [OneDNNConv3d, nn.ConvTranspose3d, OneDNNConv3d]
    x = torch.randn(1, 2, 4, 4, 4)
    assert model(x).shape == (1, 2, 8, 8, 8)  # string padding falls back to PyTorch's path
    double = copy.deepcopy(model).double()
    assert double(x.double()).dtype == torch.float64


def test_built_models_use_onednn():
    from dcm.models import build_sam_med3d, load_model_config
    from dcm.models.vista3d import build_vista3d, load_vista3d_config

    for model in (build_sam_med3d(load_model_config("sam_med3d_64_reduced")),
                  build_vista3d(load_vista3d_config("vista3d_reduced"))):
        convs = [m for m in model.modules() if isinstance(m, nn.Conv3d)]
        assert convs and all(type(m) is OneDNNConv3d for m in convs)


def _bf16_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 8, bias=False))
    for layer in model:
        if isinstance(layer, nn.Linear):
            layer.weight.data = layer.weight.data.to(torch.bfloat16)
    return model


def _autocast_run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        return model(x)


@pytest.mark.skipif(not onednn_linear_available(), reason="no oneDNN linear kernels in this torch build")
def test_onednn_linear_bit_equal_and_repacked_after_an_update():
    """Packed bf16 weights give autocast's products bit for bit; an in-place weight update is seen; the state
    dict, copies and the autograd path are plain ``nn.Linear``'s."""
    plain = _bf16_mlp()
    packed = use_onednn_linear(copy.deepcopy(plain))
    assert [type(m) for m in packed] == [OneDNNLinear, nn.GELU, OneDNNLinear]
    assert list(packed.state_dict()) == list(plain.state_dict())
    x = torch.randn(2, 3, 5, 24)
    got = _autocast_run(packed, x)
    assert got.dtype == torch.bfloat16 and torch.equal(got, _autocast_run(plain, x))
    assert packed[0]._packed is not None
    assert torch.equal(_autocast_run(packed, x.to(torch.bfloat16)), _autocast_run(plain, x.to(torch.bfloat16)))
    clone = copy.deepcopy(packed)  # the packed weight is not copied, made again at the next call
    assert "_packed" not in vars(clone[0]) and torch.equal(_autocast_run(clone, x), got)
    with torch.no_grad():
        for model in (plain, packed):
            model[0].weight.mul_(-1)
            model[2].weight.add_(0.5)
    assert torch.equal(_autocast_run(packed, x), _autocast_run(plain, x))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # with gradients: nn.Linear's own path
        packed(x).float().sum().backward()
    assert packed[0].weight.grad is not None
    use_pytorch_linear(packed)
    assert [type(m) for m in packed] == [nn.Linear, nn.GELU, nn.Linear] and "_packed" not in vars(packed[0])
