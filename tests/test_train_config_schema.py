"""The training configs' schema (dcm.training.config_schema): every train config passes with its former
effective values, typos and out-of-range values fail naming the key, before any model is built."""

from pathlib import Path

import pytest

from dcm.config import load_config
from dcm.errors import ConfigError
from dcm.training.config_schema import GlobalDataConfig, LocalDataConfig
from dcm.training.global_roi import GlobalRoITrainer
from dcm.training.local_roi import LocalRoITrainer

REPO = Path(__file__).resolve().parent.parent
TRAIN_CONFIGS = sorted(p.name for p in (REPO / "configs").glob("train_*.yaml"))

#: The code fallbacks the trainers used before the schema (``tcfg.get(key, default)``), to compare with.
LEGACY_TRAIN = dict(seed=0, work_dir="work_dirs/run", batch_size=1, num_workers=0, resume=None, device="auto",
                    init_from=None, find_unused_parameters=False, weight_decay=0.0, accumulation_steps=1,
                    steps_per_patch=1, amp=True, epochs=1, max_steps=None, checkpoint_every_steps=0,
                    log_every_steps=10, grad_clip=None, figure_every_epochs=1, warmup_steps=0,
                    click_loss_weight=0.0, click_loss_radius=1.0)
LEGACY_LOCAL_TRAIN = dict(lr=1e-4, min_lr_factor=0.0, freeze_class_head=True, init_key="model", init_strict=True,
                          init_trusted=False)
LEGACY_GLOBAL_TRAIN = dict(milestones=[], gamma=0.1)
LEGACY_LOCAL_INTERACTION = dict(max_prompt=10, min_object_voxels=1, first_click="protocol", num_clicks=5,
                                step_loss="mean", lambda_dice=1.0, lambda_ce=1.0)
LEGACY_GLOBAL_INTERACTION = dict(num_steps=5, num_candidates=6, error_sigma=1.0, error_truncated=5.0, top_n=64,
                                 min_threshold=0.3, candidate_weight=None, lambda_dice=1.0, lambda_ce=1.0,
                                 record_masks=False)
LEGACY_LOCAL_DATA = dict(data_dir=None, pattern="*.npz", repeats=1, validate="header", patch_size=128,
                         percentiles=[1.0, 99.0], crop_background_ratio=1.0)
LEGACY_GLOBAL_DATA = dict(data_dir=None, pattern="*.npz", min_foreground=0, max_retries=10)


def _enabled(augment):
    return {k: {"enabled": True, **v} for k, v in augment.items()}


def _trainer(name, cfg):
    return (GlobalRoITrainer if "global" in name else LocalRoITrainer)(cfg)


@pytest.mark.parametrize("name", TRAIN_CONFIGS)
def test_every_train_config_passes_with_its_former_effective_values(name):
    cfg = load_config(REPO / "configs" / name)
    trainer = _trainer(name, cfg)
    is_global = "global" in name
    train = {**LEGACY_TRAIN, **(LEGACY_GLOBAL_TRAIN if is_global else LEGACY_LOCAL_TRAIN), **cfg["train"]}
    if not is_global and not train["freeze_class_head"]:
        train["find_unused_parameters"] = True
    assert trainer.train.to_dict() == train
    interaction = {**(LEGACY_GLOBAL_INTERACTION if is_global else LEGACY_LOCAL_INTERACTION), **cfg["interaction"]}
    got = trainer.interaction if is_global else trainer.icfg
    assert got.to_dict() == interaction
    data = {**(LEGACY_GLOBAL_DATA if is_global else LEGACY_LOCAL_DATA), **cfg["data"]}
    if is_global:  # each global augmentation was on unless ``enabled: false`` (``.get("enabled", True)``)
        data["augment"] = _enabled(data["augment"])
    resolved = trainer.data.to_dict()
    assert resolved == data  # every augment key is written in the configs: the schema's defaults add nothing
    assert trainer.seed == train["seed"] and str(trainer.work_dir) == train["work_dir"]


def test_schema_defaults_are_the_released_augmentations():
    for schema, name in ((GlobalDataConfig, "train_global_roi.yaml"), (LocalDataConfig, "train_local_roi.yaml")):
        released = load_config(REPO / "configs" / name)["data"]["augment"]
        released = _enabled(released) if schema is GlobalDataConfig else released
        assert schema.from_mapping({}, "data").augment.to_dict() == released


@pytest.mark.parametrize("name", ["train_global_roi_reduced.yaml", "train_local_roi_reduced.yaml"])
@pytest.mark.parametrize("override, message", [
    ("+train.lr_encoderr=1e-3", "train: unknown key(s) ['lr_encoderr']"),
    ("train.epochs=0", "train.epochs must be an int >= 1, got 0"),
    ("train.batch_size=-2", "train.batch_size"),
    ("train.device=gpu", "train.device"),
    ("+interaction.num_clickz=3", "interaction: unknown key(s) ['num_clickz']"),
    ("+data.augment.flipp=1", "data.augment: unknown key(s) ['flipp']"),
])
def test_bad_train_config_fails_naming_the_key(name, override, message):
    with pytest.raises(ConfigError) as err:
        _trainer(name, load_config(REPO / "configs" / name, [override]))
    assert message in str(err.value)


@pytest.mark.parametrize("name, override, message", [
    ("train_global_roi.yaml", "train.lr_encoder=0", "train.lr_encoder must be a number > 0"),
    ("train_global_roi.yaml", "train.milestones=[132, 98]", "train.milestones must be increasing"),
    ("train_global_roi.yaml", "data.augment.affine.zoom_draw=sideways", "data.augment.affine.zoom_draw"),
    ("train_global_roi.yaml", "data.augment.flip.prob=1.5", "data.augment.flip.prob"),
    ("train_global_roi.yaml", "interaction.num_candidates=0", "interaction.num_candidates"),
    ("train_global_roi.yaml", "+train.lr=1e-3", "train: unknown key(s) ['lr']"),
    ("train_local_roi.yaml", "train.lr=-1", "train.lr must be a number > 0"),
    ("train_local_roi.yaml", "interaction.first_click=center", "interaction.first_click"),
    ("train_local_roi.yaml", "data.validate=some", "data.validate"),
    ("train_local_roi.yaml", "data.percentiles=[99, 1]", "data.percentiles"),
    ("train_local_roi.yaml", "data.augment.rot90.planes=[[0, 3]]", "data.augment.rot90.planes"),
])
def test_out_of_range_values_fail_naming_the_key(name, override, message):
    with pytest.raises(ConfigError) as err:
        _trainer(name, load_config(REPO / "configs" / name, [override]))
    assert message in str(err.value)


@pytest.mark.parametrize("module, builder, name, script", [
    ("dcm.training.global_roi", "build_sam_med3d", "train_global_roi_reduced.yaml", "train_global_roi"),
    ("dcm.models.vista3d", "build_vista3d", "train_local_roi_reduced.yaml", "train_local_roi"),
])
def test_bad_config_is_refused_before_the_model_is_built(monkeypatch, tmp_path, module, builder, name, script):
    import importlib
    import runpy

    def fail(*args, **kwargs):
        raise AssertionError("the model was built before the config was checked")

    monkeypatch.setattr(importlib.import_module(module), builder, fail)
    cfg = load_config(REPO / "configs" / name, [f"train.work_dir={tmp_path}", "+train.epochz=3"])
    with pytest.raises(ConfigError, match=r"train: unknown key\(s\) \['epochz'\]"):
        _trainer(name, cfg).fit()
    main = runpy.run_path(str(REPO / script / "train.py"))["main"]
    argv = ["--config", name, f"train.work_dir={tmp_path}", "train.epochs=0"]
    if script == "train_local_roi":
        assert main(argv) == 2  # reported as "error: train.epochs ..." and exit code 2
    else:
        with pytest.raises(ConfigError, match="train.epochs must be an int >= 1"):
            main(argv)
    assert not any(tmp_path.iterdir())  # nothing written either
