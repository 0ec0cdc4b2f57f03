"""dcm.checkpoints: reading, unwrapping, strict and partial loading, layout hints."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dcm.checkpoints import (
    LoadReport,
    identify_layout,
    known_layouts,
    load_checkpoint,
    load_into,
    load_state_dict,
    strip_prefixes,
)
from dcm.errors import CheckpointError, DCMError
from dcm.models import build_sam_med3d, load_model_config

FIXTURES = Path(__file__).resolve().parent / "fixtures"
MANIFESTS = json.loads((FIXTURES / "checkpoint_manifests.json").read_text())


def _layout_zeros(layout: str) -> dict:
    """A state dict with exactly the manifest layout; zero tensors that share one element (cheap to save)."""
    z = torch.zeros(())
    return {k: z.expand(shape) for k, shape, _ in MANIFESTS[layout]["state_dict"]}


def _layout_small(layout: str, prefix: str = "") -> dict:
    """The manifest's key order with small distinct tensors (for key / prefix tests)."""
    return {prefix + k: torch.full((2,), float(i)) for i, (k, _, _) in enumerate(MANIFESTS[layout]["state_dict"])}


def _empty_model(preset: str) -> torch.nn.Module:
    with torch.device("meta"):
        model = build_sam_med3d(load_model_config(preset))
    return model.to_empty(device="cpu")


@pytest.fixture(scope="module")
def reduced():
    """The golden reduced model and its weights."""
    cfg = json.loads((FIXTURES / "sam64_reduced_golden.json").read_text())
    with np.load(FIXTURES / "sam64_reduced_golden.npz") as z:
        sd = {k[len("weights/"):]: torch.from_numpy(z[k].copy()) for k in z.files if k.startswith("weights/")}
    return cfg, sd


def _fresh(cfg):
    torch.manual_seed(1)
    return build_sam_med3d(cfg)


def _assert_loaded(model, sd):
    got = model.state_dict()
    assert list(got) == list(sd)
    for k, v in sd.items():
        assert torch.equal(got[k], v), k


class NotAllowed:
    """A class no weights-only load may instantiate."""

    def __init__(self, x=1):
        self.x = x


CALLED = []


def _side_effect(*args):
    CALLED.append(args)
    return "pwned"


class Malicious:
    def __reduce__(self):
        return (_side_effect, ("boom",))


# ------------------------------------------------------------------------------------------ manifests


def test_packaged_manifests_match_fixture():
    layouts = known_layouts()
    assert set(layouts) == set(MANIFESTS)
    for name, man in MANIFESTS.items():
        assert [[k, s] for k, s in layouts[name]["state_dict"].items()] == [[k, s] for k, s, _ in man["state_dict"]]
        assert layouts[name]["params"] == man["params"]
    assert layouts["sam_med3d_vit_b_ori_cvpr25"]["preset"].endswith("sam_med3d_turbo_128.yaml")
    assert layouts["dcm_global_expert_sam64"]["preset"].endswith("sam_med3d_64.yaml")
    for name in MANIFESTS:
        assert identify_layout(_layout_zeros(name))[:2] == (name, True)


# ------------------------------------------------------------------------------------------ wrappers


def _dcm_training_ckpt(sd):
    return {
        "epoch": 143,
        "model_state_dict": sd,
        "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 8e-4, "params": [0, 1]}]},
        "lr_scheduler_state_dict": {"milestones": {98: 1, 132: 1}, "gamma": 0.1, "last_epoch": 143},
        "losses": [np.float64(0.9), np.float32(0.5), 0.4],
        "dices": np.array([0.1, 0.5, 0.8]),
        "best_loss": np.float64(0.4),
        "best_dice": np.float64(0.8),
        "args": argparse.Namespace(lr=8e-4, batch_size=4, img_size=64, device=torch.device("cpu"), multi_gpu=True),
    }


WRAPPERS = {
    "raw": lambda sd: sd,
    "model_state_dict": lambda sd: {"model_state_dict": sd, "epoch": 3},
    "state_dict": lambda sd: {"state_dict": sd, "epoch": 3},
    "model": lambda sd: {"model": sd, "epoch": 3, "step": 10},
    "ddp": lambda sd: {"model": {"module." + k: v for k, v in sd.items()}},
    "compiled": lambda sd: {"_orig_mod." + k: v for k, v in sd.items()},
    "ddp+compiled": lambda sd: {"state_dict": {"module._orig_mod." + k: v for k, v in sd.items()}},
    "dcm_training": _dcm_training_ckpt,
}


@pytest.mark.parametrize("form", list(WRAPPERS))
@pytest.mark.parametrize("suffix", [".pt", ".pth"])
def test_wrapped_checkpoints_load_strict(tmp_path, reduced, form, suffix):
    cfg, sd = reduced
    path = tmp_path / f"ckpt{suffix}"
    torch.save(WRAPPERS[form](sd), path)
    model = _fresh(cfg)
    rep = load_into(model, path, strict=True)
    assert isinstance(rep, LoadReport) and rep.complete and rep.loaded == list(sd)
    _assert_loaded(model, sd)
    # the same from an in-memory object
    assert list(load_state_dict(WRAPPERS[form](sd))) == list(sd)


def test_dcm_training_checkpoint_contents(tmp_path, reduced):
    _, sd = reduced
    path = tmp_path / "epoch143.pth"
    torch.save(_dcm_training_ckpt(sd), path)
    obj = load_checkpoint(path)
    assert isinstance(obj["args"], argparse.Namespace) and obj["args"].img_size == 64
    assert obj["best_dice"] == pytest.approx(0.8) and obj["epoch"] == 143


def test_safetensors(tmp_path, reduced):
    from safetensors.torch import save_file

    cfg, sd = reduced
    path = tmp_path / "w.safetensors"
    save_file({"module." + k: v.contiguous() for k, v in sd.items()}, str(path))
    model = _fresh(cfg)
    assert load_into(model, path).complete
    _assert_loaded(model, sd)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        load_checkpoint(bad)


def test_combined_dcm_file_picks_each_expert(tmp_path, reduced):
    _, sam_sd = reduced
    vista = _layout_small("vista3d132", prefix="module.")
    path = tmp_path / "dcm_combined.pth"
    torch.save({"model_state_dict": sam_sd, "model": vista, "epoch": 1}, path)
    assert list(load_state_dict(path)) == list(sam_sd)
    local = load_state_dict(path, key="model")
    assert list(local) == [k for k, _, _ in MANIFESTS["vista3d132"]["state_dict"]]
    assert torch.equal(local["point_head.supported_embed.weight"], vista["module.point_head.supported_embed.weight"])
    with pytest.raises(CheckpointError, match="no key 'ema'"):
        load_state_dict(path, key="ema")


def test_vista_layouts_in_the_wild():
    keys = [k for k, _, _ in MANIFESTS["vista3d132"]["state_dict"]]
    for obj in (
        _layout_small("vista3d132"),
        {"model": _layout_small("vista3d132"), "epoch": 4, "step": 100},
        {"model": _layout_small("vista3d132", "module.")},
    ):
        assert list(load_state_dict(obj)) == keys


def test_strip_prefixes_rules():
    sd = {"module._orig_mod.a.b": torch.zeros(1), "module._orig_mod.c": torch.zeros(1)}
    assert list(strip_prefixes(sd)) == ["a.b", "c"]
    sd = {"enc._orig_mod.x": torch.zeros(1), "dec.y": torch.zeros(1)}
    assert list(strip_prefixes(sd)) == ["enc.x", "dec.y"]
    # a prefix only some keys carry is a real name, not a wrapper
    sd = {"module.x": torch.zeros(1), "head.y": torch.zeros(1)}
    assert list(strip_prefixes(sd)) == ["module.x", "head.y"]


# ------------------------------------------------------------------------------------------ layouts


@pytest.fixture(scope="module")
def sam64_model():
    return _empty_model("sam_med3d_64")


def test_turbo_into_turbo_preset_strict(tmp_path):
    path = tmp_path / "sam_med3d_turbo.pth"
    torch.save({"model_state_dict": _layout_zeros("sam_med3d_vit_b_ori_cvpr25")}, path)
    model = _empty_model("sam_med3d_turbo_128")
    rep = load_into(model, path, strict=True)
    assert rep.complete and len(rep.loaded) == 326
    assert float(model.mask_decoder.iou_prediction_head.layers[2].bias.detach().abs().sum()) == 0.0


def test_turbo_into_64_by_name_and_shape(tmp_path, sam64_model, capsys):
    path = tmp_path / "sam_med3d_turbo.pth"
    torch.save({"model_state_dict": _layout_zeros("sam_med3d_vit_b_ori_cvpr25")}, path)
    model = sam64_model
    with torch.no_grad():
        model.image_encoder.pos_embed.fill_(7.0)
        model.image_encoder.patch_embed.proj.weight.fill_(7.0)
    rep = load_into(model, path, strict=False)
    out = capsys.readouterr().out
    assert [k for k, _, _ in rep.mismatched] == ["image_encoder.patch_embed.proj.weight",
                                                 "mask_decoder.mask_tokens.weight"]
    assert rep.mismatched[0][1:] == ((768, 1, 16, 16, 16), (768, 1, 8, 8, 8))
    assert rep.mismatched[1][1:] == ((4, 384), (1, 384))
    assert rep.missing == []
    assert rep.unexpected == [
        f"mask_decoder.output_hypernetworks_mlps.{i}.layers.{j}.{p}" for i in (1, 2, 3) for j in range(3)
        for p in ("weight", "bias")
    ] + [f"mask_decoder.iou_prediction_head.layers.{j}.{p}" for j in range(3) for p in ("weight", "bias")]
    assert len(rep.loaded) == 300
    assert "image_encoder.patch_embed.proj.weight" in out and "mask_decoder.mask_tokens.weight" in out
    assert "skipped" in out
    # matched tensors were loaded, mismatched ones left alone
    assert float(model.image_encoder.pos_embed.detach().abs().max()) == 0.0
    assert float(model.image_encoder.patch_embed.proj.weight.detach().min()) == 7.0


def test_turbo_into_64_strict_names_fitting_preset(tmp_path, sam64_model):
    path = tmp_path / "sam_med3d_turbo.pth"
    torch.save({"model_state_dict": _layout_zeros("sam_med3d_vit_b_ori_cvpr25")}, path)
    with pytest.raises(CheckpointError) as err:
        load_into(sam64_model, path, strict=True)
    msg = str(err.value)
    assert "sam_med3d_turbo.pth" in msg
    assert "image_encoder.patch_embed.proj.weight" in msg and "mask_decoder.mask_tokens.weight" in msg
    assert "24 unexpected" in msg and "mask_decoder.output_hypernetworks_mlps.1.layers.0.weight" in msg
    assert "sam_med3d_vit_b_ori_cvpr25" in msg and "sam_med3d_turbo_128.yaml" in msg


def test_wrong_layout_names_missing_keys_and_preset(tmp_path, sam64_model, reduced):
    sd = _layout_zeros("dcm_global_expert_sam64")
    del sd["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"]
    del sd["image_encoder.blocks.3.attn.rel_pos_d"]
    with pytest.raises(CheckpointError) as err:
        load_into(_empty_model("sam_med3d_turbo_128"), sd, strict=True)
    msg = str(err.value)
    assert "missing" in msg and "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix" in msg
    assert "image_encoder.blocks.3.attn.rel_pos_d" in msg
    assert "dcm_global_expert_sam64" in msg and "sam_med3d_64.yaml" in msg
    # the VISTA3D layout fed to the SAM model
    with pytest.raises(CheckpointError, match="vista3d132") as err:
        load_into(sam64_model, {"model": _layout_zeros("vista3d132")}, strict=True)
    assert "unexpected" in str(err.value) and "image_encoder.pos_embed" in str(err.value)
    # the reduced golden weights into the full model: shape mismatches, no preset fits exactly
    _, small = reduced
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_into(sam64_model, small, strict=True)


# ------------------------------------------------------------------------------------------ safety


def test_arbitrary_pickle_refused_unless_trusted(tmp_path, reduced):
    cfg, sd = reduced
    path = tmp_path / "unsafe.pt"
    torch.save({"model_state_dict": sd, "extra": NotAllowed(5)}, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert "unsafe.pt" in msg and "arbitrary pickled objects" in msg
    assert "trusted=True" in msg and "--trust-checkpoint" in msg and "NotAllowed" in msg
    with pytest.raises(CheckpointError, match="arbitrary pickled objects"):
        load_into(_fresh(cfg), path)
    obj = load_checkpoint(path, trusted=True)
    assert isinstance(obj["extra"], NotAllowed) and obj["extra"].x == 5
    model = _fresh(cfg)
    assert load_into(model, path, trusted=True).complete
    _assert_loaded(model, sd)


def test_malicious_reduce_not_executed(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "x": Malicious()}, path)
    CALLED.clear()
    with pytest.raises(CheckpointError, match="arbitrary pickled objects"):
        load_checkpoint(path)
    assert CALLED == []


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pth"):
        load_checkpoint(tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="nope.pth"):
        load_into(torch.nn.Linear(1, 1), tmp_path / "nope.pth")
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(100)}, good)
    trunc = tmp_path / "truncated.pt"
    trunc.write_bytes(good.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="truncated.pt"):
        load_checkpoint(trunc)
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.ckpt"):
        load_checkpoint(junk)


def test_no_state_dict_inside(tmp_path):
    path = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "args": argparse.Namespace(a=1)}, path)
    with pytest.raises(CheckpointError, match="no state dict"):
        load_state_dict(path)


def test_combine_two_training_checkpoints(tmp_path):
    from dcm.checkpoints import combine, load_state_dict

    g = {"image_encoder.w": torch.ones(2)}
    l = {"image_encoder.v": torch.zeros(3)}
    torch.save({"epoch": 1, "model_state_dict": g, "args": {}}, tmp_path / "g.pt")
    torch.save({"model_state_dict": {"module." + k: v for k, v in l.items()}, "epoch": 2}, tmp_path / "l.pt")
    out = combine(tmp_path / "g.pt", tmp_path / "l.pt", tmp_path / "dcm.pt")
    assert set(load_state_dict(out)) == {"image_encoder.w"}
    assert set(load_state_dict(out, key="model")) == {"image_encoder.v"}


def test_interpolate_two_checkpoints_of_one_model(tmp_path, capsys):
    from dcm.checkpoints import interpolate, load_state_dict, main

    def dcm_file(name, value):
        sections = {"model_state_dict": {"image_encoder.w": torch.full((2,), value), "steps": torch.tensor([7])},
                    "model": {"image_encoder.v": torch.full((3,), 2 * value)}}
        torch.save(sections, tmp_path / name)
        return tmp_path / name

    a, b = dcm_file("a.pt", 0.0), dcm_file("b.pt", 4.0)
    out = interpolate(a, b, 0.25, tmp_path / "soup.pt")
    assert torch.equal(load_state_dict(out)["image_encoder.w"], torch.full((2,), 1.0))
    assert torch.equal(load_state_dict(out)["steps"], torch.tensor([7]))  # not floating point: taken from FROM
    assert torch.equal(load_state_dict(out, key="model")["image_encoder.v"], torch.full((3,), 2.0))
    torch.save({"image_encoder.w": torch.zeros(3)}, tmp_path / "other.pt")
    torch.save({"image_encoder.w": torch.zeros(2), "steps": torch.tensor([7])}, tmp_path / "plain.pt")
    with pytest.raises(DCMError, match="same tensors"):
        interpolate(tmp_path / "other.pt", tmp_path / "plain.pt", 0.5, tmp_path / "x.pt")
    with pytest.raises(DCMError, match="combined"):  # a plain state dict against a combined file
        interpolate(tmp_path / "plain.pt", b, 0.5, tmp_path / "x.pt")
    torch.save({"w": torch.tensor([0.1], dtype=torch.float64)}, tmp_path / "d.pt")
    torch.save({"w": torch.tensor([0.7], dtype=torch.float64)}, tmp_path / "e.pt")
    assert torch.equal(load_state_dict(interpolate(tmp_path / "d.pt", tmp_path / "e.pt", 0.0, tmp_path / "z.pt"))["w"],
                       torch.tensor([0.1], dtype=torch.float64))  # float64 stays float64, exactly
    assert main(["interpolate", "--from", str(a), "--to", str(b), "--alpha", "2", "--out", str(tmp_path / "y.pt")]) == 2
    assert "interpolate: alpha 2.0 is not in [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "y.pt").exists()
