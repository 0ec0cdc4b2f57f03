"""One config layer (dcm.config + dcm.config_schema): schemas per section, checks before any model is built,
one engine config shared by the session and the predictor, the accepted forms, defaults that work."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from dcm.config import CONFIG_DIR, MODEL_CONFIG_DIR, load_config, load_model_config
from dcm.config_schema import (BudgetConfig, ClickCorrectionConfig, EngineConfig, GlobalExpertConfig,
                               LocalExpertConfig, check_dcm_config)
from dcm.errors import CheckpointError, ConfigError
from tests.stubs import StubExpert

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------- schemas


@pytest.mark.parametrize("section, where, data, message", [
    (EngineConfig, "engine", {"polcy": "dual"}, "engine: unknown key(s) ['polcy']"),
    (EngineConfig, "engine", {"fusion": "vote"}, "engine.fusion must be one of"),
    (EngineConfig, "engine", {"threshold": 1.0}, "engine.threshold must be a number"),
    (BudgetConfig, "engine.budget", {"calls_per_case": 0}, "engine.budget.calls_per_case must be"),
    (ClickCorrectionConfig, "engine.click_correction", {"methods": ["magic"]}, "engine.click_correction.methods"),
    (GlobalExpertConfig, "global_expert", {"box_scal": 2}, "global_expert: unknown key(s) ['box_scal']"),
    (GlobalExpertConfig, "global_expert", {"outside_clicks": "move"}, "global_expert.outside_clicks must be"),
    (GlobalExpertConfig, "global_expert", {"amp_dtype": "float8"}, "global_expert.amp_dtype must be"),
    (LocalExpertConfig, "local_expert", {"window_size": [32, 32]}, "local_expert.window_size must be"),
    (LocalExpertConfig, "local_expert", {"clicks": "all"}, "local_expert.clicks must be one of"),
    (LocalExpertConfig, "local_expert", {"reuse_window_margin": -1}, "local_expert.reuse_window_margin must be"),
])
def test_each_section_rejects_a_bad_key_or_value_naming_it(section, where, data, message):
    with pytest.raises(ConfigError) as e:
        section.from_mapping(data, where)
    assert message in str(e.value)


def test_whole_config_names_the_section_key():
    with pytest.raises(ConfigError, match=r"^local_expert\.window_size must be"):
        check_dcm_config({"local_expert": {"window_size": "big"}})
    with pytest.raises(ConfigError, match=r"config: unknown key\(s\) \['engin'\]"):
        check_dcm_config({"engin": {}})
    with pytest.raises(ConfigError, match=r"^session\.no_overlap"):
        check_dcm_config({"session": {"no_overlap": "yes"}})


def test_defaults_are_written_once_in_the_schema():
    from dcm.engine.clicks import CORRECTION_DEFAULTS
    from dcm.engine.predictor import ENGINE_DEFAULTS
    from dcm.experts.global_roi import GLOBAL_ROI_DEFAULTS
    from dcm.experts.local_roi import LOCAL_ROI_DEFAULTS

    assert ENGINE_DEFAULTS == EngineConfig().to_dict()
    assert CORRECTION_DEFAULTS == ENGINE_DEFAULTS["click_correction"]
    assert GLOBAL_ROI_DEFAULTS == GlobalExpertConfig().to_dict()
    assert LOCAL_ROI_DEFAULTS == LocalExpertConfig().to_dict()
    # configs/dcm.yaml holds only what it changes; the loaded config has every key
    assert "engine" not in (CONFIG_DIR / "dcm.yaml").read_text().split("\nglobal_expert:")[0].split("\n#")[0]
    cfg = load_config("dcm")
    assert cfg["engine"] == ENGINE_DEFAULTS and cfg["engine"]["budget"]["seconds_per_object"] == 90.0
    assert cfg["global_expert"]["amp"] is True and cfg["global_expert"]["box_scale"] == 1.8


def test_one_config_folder():
    import dcm.models
    import dcm.models.vista3d as vista3d

    assert MODEL_CONFIG_DIR == CONFIG_DIR / "models" and dcm.models.MODEL_CONFIG_DIR is MODEL_CONFIG_DIR
    assert not hasattr(vista3d, "_PRESETS_DIR")
    assert dcm.models.load_model_config is load_model_config
    assert vista3d.load_vista3d_config("vista3d_reduced") == load_model_config("vista3d_reduced")


# ------------------------------------------------------------------------------------------- before any model


@pytest.fixture
def no_model_builds(monkeypatch):
    """Every network builder fails if called: a check that needs a built model shows up."""
    import dcm.experts.backbones.registry as registry
    import dcm.models
    import dcm.models.vista3d

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the config was checked")

    monkeypatch.setattr(registry, "build_backbone_model", refuse)
    monkeypatch.setattr(dcm.models, "build_sam_med3d", refuse)
    monkeypatch.setattr(dcm.models.vista3d, "build_vista3d", refuse)


@pytest.mark.parametrize("override, message", [
    ("engine.fusion=vote", "engine.fusion must be one of"),
    ("engine.budget.safety=2", "engine.budget.safety"),
    ("global_expert.min_size=0", "global_expert.min_size"),
    ("local_expert.clicks=all", "local_expert.clicks"),
    ("local_expert.window_size=36", "local_expert.window_size (36, 36, 36) must be divisible by 8"),
    ("global_expert.frame_size=32", "global_expert.frame_size (32, 32, 32) must be the SAM-Med3D model's input"),
    ("local_expert.model=sam_med3d_64_reduced", "local_expert.model: 'sam_med3d_64_reduced' is a sam_med3d preset"),
    ("local_expert.model=no_such_preset", "no such model config"),
    ("+local_expert.windowsize=32", "local_expert: unknown key(s) ['windowsize']"),
])
def test_every_section_is_checked_before_a_model_is_built(no_model_builds, override, message):
    from dcm.experts import build_experts, build_experts_from_config

    with pytest.raises(ConfigError) as e:
        build_experts_from_config("dcm_reduced", overrides=(override,), random_init=True)
    assert message in str(e.value)
    cfg = load_config("dcm_reduced")  # a dict edited after loading is checked again by build_experts
    section, _, rest = override.lstrip("+").partition(".")
    key, _, value = rest.partition("=")
    if section != "engine" and "." not in key:
        import yaml

        cfg[section][key] = yaml.safe_load(value)
        with pytest.raises(ConfigError) as again:
            build_experts(cfg, random_init=True)
        assert message in str(again.value)


def test_session_and_predictor_reject_the_same_engine_config_at_construction():
    from dcm.engine.predictor import DCMPredictor
    from dcm.engine.session import InteractiveSession

    experts = {"global": StubExpert("global", 4, 0.9)}
    bad = {"fusion": "vote"}
    with pytest.raises(ConfigError) as from_predictor:
        DCMPredictor(experts, bad)
    with pytest.raises(ConfigError) as from_session:
        InteractiveSession(config={"engine": bad}, experts=experts)
    assert str(from_predictor.value) == str(from_session.value)
    session = InteractiveSession(config={"engine": {"threshold": 0.4}, "session": {"no_overlap": True}},
                                 experts=experts)
    assert session.engine_cfg is session.predictor.cfg
    assert session.engine_cfg["threshold"] == 0.4 and session.engine_cfg["overlap"] == "keep_others"


# ------------------------------------------------------------------------------------------- accepted forms


def test_path_preset_name_and_dict_load_alike(tmp_path):
    by_name = load_config("dcm_small")
    by_repo_path = load_config("configs/dcm_small.yaml")
    by_absolute = load_config(CONFIG_DIR / "dcm_small.yaml")
    assert by_name == by_repo_path == by_absolute
    assert load_config(by_name) == by_name  # a dict
    assert load_config({"engine": {"fusion": "average"}})["engine"]["fusion"] == "average"
    # nested mappings, overrides of any schema key, unknown keys fail loudly
    assert by_name["engine"]["policy"] == "dual" and by_name["local_expert"]["window_size"] == 32
    over = load_config("dcm_small", ["engine.budget.calls_per_case=3", "local_expert.clicks=last"])
    assert over["engine"]["budget"]["calls_per_case"] == 3 and over["local_expert"]["clicks"] == "last"
    with pytest.raises(ConfigError, match="engine.polcy"):
        load_config("dcm_small", ["engine.polcy=dual"])
    with pytest.raises(ConfigError, match=r"engine: unknown key\(s\) \['polcy'\]"):
        load_config("dcm_small", ["+engine.polcy=dual"])
    # a user's file over a preset, and training configs as read
    mine = tmp_path / "mine.yaml"
    mine.write_text("_base_: dcm_small.yaml\nengine:\n  threshold: 0.4\n")
    assert load_config(mine)["engine"]["threshold"] == 0.4
    assert load_config("train_local_roi_reduced")["model"] == "vista3d_reduced"
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("engine:\n  threshold: 0.4  # r\xe9glage\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml: not a text file in UTF-8"):
        load_config(latin1)


def test_config_path_from_another_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config("configs/dcm_small.yaml") == load_config("dcm_small")
    (tmp_path / "configs").mkdir()
    own = tmp_path / "configs" / "dcm_small.yaml"
    own.write_text("weights: mine.pt\nengine:\n  threshold: 0.3\n")  # the working folder's file wins
    assert load_config("configs/dcm_small.yaml")["engine"]["threshold"] == 0.3
    assert load_model_config("vista3d_reduced")["variant"] == "reduced"


# ------------------------------------------------------------------------------------------- defaults that work


def _small_experts_built(monkeypatch):
    """Record what build_experts is asked to build, without building it."""
    import dcm.experts

    seen = {}

    def fake(cfg, weights=None, device=None, trusted=False, random_init=False, config_name=None):
        seen.update(cfg=cfg, weights=weights, config_name=config_name)
        return {"global": StubExpert("global", 4, 0.9), "local": StubExpert("local", 4, 0.9)}

    monkeypatch.setattr(dcm.experts, "build_experts", fake)
    return seen


def test_session_without_config_or_weights_runs_the_small_preset(monkeypatch, capsys):
    from dcm.engine.session import InteractiveSession

    seen = _small_experts_built(monkeypatch)
    session = InteractiveSession()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "configs/dcm_small.yaml" in err[0] and "weights/dcm_small.pt" in err[0]
    assert "weights=" in err[0]  # how to pass real weights
    assert seen["cfg"] == load_config("dcm_small") and seen["config_name"] == "dcm_small"
    assert session.engine_cfg["fusion"] == "click_region"


def test_segment_without_config_or_weights_runs_the_small_preset(tmp_path, monkeypatch, capsys):
    from dcm.cli import segment
    from dcm.data.nifti import Geometry, write_nifti

    image = tmp_path / "img.nii.gz"
    write_nifti(image, np.zeros((8, 16, 16), dtype=np.float32), Geometry(spacing_xyz=(1.0, 1.0, 1.0)))
    import dcm.experts

    seen = {}

    def fake(cfg, weights=None, device=None, trusted=False, random_init=False, config_name=None):
        seen.update(cfg=cfg, config_name=config_name)
        return {"global": StubExpert("global", 4, 0.9)}

    monkeypatch.setattr(dcm.experts, "build_experts", fake)
    code = segment.main([str(image), "--box", "2", "5", "4", "10", "4", "10", "--out", str(tmp_path / "m.nii.gz")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 0, err
    assert len(err) == 1 and "configs/dcm_small.yaml" in err[0] and "--weights FILE" in err[0]
    assert seen["config_name"] == "dcm_small" and seen["cfg"]["weights"] == "weights/dcm_small.pt"


def test_full_size_without_weights_is_an_error_naming_the_config(no_model_builds, capsys, tmp_path):
    from dcm.cli import segment
    from dcm.experts import build_experts_from_config

    with pytest.raises(CheckpointError) as e:
        build_experts_from_config("dcm")
    assert "no weights given" in str(e.value) and str(CONFIG_DIR / "dcm.yaml") in str(e.value)
    code = segment.main(["img.nii.gz", "--box", "0", "1", "0", "1", "0", "1", "--config", "dcm",
                         "--out", str(tmp_path / "m.nii.gz")])
    err = capsys.readouterr().err
    assert code == 2 and "no weights given" in err and "dcm.yaml" in err
    # a config naming a weights file that is absent: the error names the file
    with pytest.raises(CheckpointError, match="absent.pt"):
        build_experts_from_config("dcm_reduced", weights=str(tmp_path / "absent.pt"))


def test_predict_sh_defaults_to_the_small_preset(tmp_path, monkeypatch, capsys):
    """inference/predict.py (what predict.sh runs) with neither config nor weights: the small preset, one line."""
    import importlib.util

    monkeypatch.delenv("DCM_CONFIG", raising=False)
    monkeypatch.delenv("DCM_WEIGHTS", raising=False)
    seen = _small_experts_built(monkeypatch)
    spec = importlib.util.spec_from_file_location("dcm_predict_main", REPO / "inference" / "predict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (tmp_path / "inputs").mkdir()
    code = module.main(["--inputs", str(tmp_path / "inputs"), "--outputs", str(tmp_path / "outputs")])
    err = capsys.readouterr().err
    assert code == 1 and "no .npz case file" in err, err  # past the models: only the folder is empty
    err = [line for line in err.splitlines() if line.startswith("dcm:")]
    assert len(err) == 1 and "configs/dcm_small.yaml" in err[0] and "DCM_WEIGHTS" in err[0]
    assert seen["config_name"] == "dcm_small"
    from dcm.config import pick_config

    assert pick_config(None, "w.pt") == "dcm" and pick_config(None, None, random_init=True) == "dcm"
    assert pick_config("dcm_reduced", None) == "dcm_reduced"
    assert os.path.isfile(REPO / "weights" / "dcm_small.pt")


def test_schema_choices_are_the_implemented_ones():
    from dcm.config_schema import POLICY_NAMES
    from dcm.engine.policies import POLICIES

    assert tuple(POLICIES) == POLICY_NAMES


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "ablations").glob("*.yaml")), ids=lambda p: p.name)
def test_every_ablation_variant_is_a_checked_config_that_differs_from_the_others(path):
    import yaml

    from dcm.cli.ablate import variant_configs
    from dcm.config_schema import check_dcm_config

    variants = variant_configs(yaml.safe_load(path.read_text()))
    assert len(variants) >= 2
    checked = {name: check_dcm_config(cfg) for name, (cfg, _) in variants.items()}
    seen = [repr(sorted(c.items())) for c in checked.values()]
    weights = [w for _, w in variants.values()]
    assert len(set(zip(seen, weights))) == len(seen), f"{path.name}: two variants run the same thing"


def test_over_cap_removals_are_rejected_without_a_box_only_in_the_small_preset():
    # chosen on the validation sets with dcm_small (README "Beyond a cap"); dcm.yaml answers objects without a
    # box with both experts, which was not measured, so it keeps the schema's trim
    assert load_config("dcm_small")["engine"]["removal_beyond_cap"] == "reject_without_box"
    assert load_config("dcm")["engine"]["removal_beyond_cap"] == "trim"
    assert EngineConfig().removal_beyond_cap == EngineConfig().addition_beyond_cap == "trim"
