"""``dcm info``: the precision path it reports is the one the built experts run; text, JSON and errors."""

import json

import pytest
import torch

from dcm.cli import info
from dcm.config import load_config
from dcm.experts import build_experts
from dcm.models import precision
from dcm.models.onednn import OneDNNLinear

#: the reduced presets with both experts asking for bfloat16 on any CPU (amp_device: cpu)
FORCED_BF16 = ("global_expert.amp=true", "global_expert.amp_dtype=bfloat16", "global_expert.amp_device=cpu",
               "local_expert.amp=true", "local_expert.amp_dtype=bfloat16", "local_expert.amp_device=cpu")


@pytest.mark.parametrize("overrides", [(), FORCED_BF16])
def test_reported_precision_is_what_the_built_experts_run(overrides):
    reported = info.config_info("dcm_reduced", "cpu", overrides)["experts"]
    experts = build_experts(load_config("dcm_reduced", overrides), device="cpu", random_init=True)
    assert set(reported) == set(experts) == {"global", "local"}
    for role, expert in experts.items():
        assert reported[role]["precision"] == expert.backbone.precision
    packed = any(type(m) is OneDNNLinear for m in experts["global"].backbone.model.modules())
    assert reported["global"].get("packed_onednn_linear", False) is packed
    if overrides:
        assert reported["local"]["precision"] == "bfloat16 autocast + channels-last 3D"
        assert reported["global"]["precision"] == "bfloat16 autocast"


@pytest.mark.parametrize("native", [False, True])
def test_full_preset_follows_the_processor(monkeypatch, native):
    reason = "this CPU has amx_bf16" if native else "no native bfloat16 on this CPU (no avx512_bf16 / amx_bf16)"
    monkeypatch.setattr(precision, "cpu_native", lambda dtype: (native, reason))
    monkeypatch.setattr(precision, "cpu_has_amx", lambda: native)
    experts = info.config_info("dcm", "cpu")["experts"]
    assert experts["global"]["model"] == "sam_med3d_64" and experts["local"]["model"] == "vista3d132"
    if native:
        assert experts["local"]["precision"] == "bfloat16 autocast + channels-last 3D"
        assert experts["global"]["packed_onednn_linear"] is False  # AMX: plain F.linear
    else:
        assert experts["local"]["precision"] == experts["global"]["precision"] == "float32"
        assert "packed_onednn_linear" not in experts["global"]


def test_text_and_json(capsys):
    assert info.main(["--config", "dcm_small", "--config", "dcm_released"]) == 0
    text = capsys.readouterr().out
    assert "config dcm_small" in text and "weights/dcm_small.pt (found)" in text
    assert "config dcm_released" in text and "weights: none" in text
    assert "torch " in text and "CUDA: " in text
    assert info.main(["--json", "--config", "dcm_small", "engine.policy=global_only"]) == 0
    data = json.loads(capsys.readouterr().out)
    small = data["configs"]["dcm_small"]
    assert small["policy"] == "global_only" and list(small["experts"]) == ["global"]
    assert small["experts"]["global"]["precision"] == "float32" and small["weights_found"] is True
    assert isinstance(data["cpu"]["bfloat16"][0], bool)


def test_bad_config_and_device_are_refused_in_one_line(capsys):
    assert info.main(["--config", "no_such_config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dcm info: no_such_config: config file not found") and err.count("\n") == 1
    assert info.main(["--config", "dcm_small", "engine.policy=sideways"]) == 2
    assert "policy" in capsys.readouterr().err
    for not_inference in ("train_global_roi", "configs/models/sam_med3d_64.yaml"):  # a training / model config
        assert info.main(["--config", not_inference]) == 2
        err = capsys.readouterr().err
        assert err.startswith("dcm info: ") and err.count("\n") == 1
    assert info.main(["--config", "dcm_small", "global_expert.model=nosuch"]) == 2  # what building would refuse
    assert "dcm_small.yaml: nosuch: no such model config" in capsys.readouterr().err
    assert info.main(["--config", "dcm_small", "device=gpu"]) == 2
    assert "device 'gpu': not a device" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert info.main(["--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err


def test_reads_predict_sh_environment(monkeypatch, capsys):
    monkeypatch.setenv("DCM_CONFIG", "dcm_small")
    monkeypatch.setenv("DCM_DEVICE", "cpu")
    assert info.main(["--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert list(data["configs"]) == ["dcm_small"] and data["configs"]["dcm_small"]["device"] == "cpu"
