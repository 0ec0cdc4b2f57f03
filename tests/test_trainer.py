"""The shared trainer: exact resume (also mid-epoch), atomic checkpoints, schedules, configs.

The 2-process torchrun (gloo) runs are tested per expert in test_train_global_roi.py / test_train_local_roi.py.
"""

import sys
from pathlib import Path

import pytest
import torch

from dcm.checkpoints import load_checkpoint
from dcm.config import apply_overrides, load_config
from dcm.errors import ConfigError
from dcm.training.trainer import sample_seed, warmup_cosine, warmup_multistep

sys.path.insert(0, str(Path(__file__).parent))
from toy_training import ToyTrainer, config  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def test_resume_mid_epoch_reproduces_losses(tmp_path):
    full = ToyTrainer(config(tmp_path / "full")).fit()["step_losses"]
    assert len(full) == 12  # 2 epochs x 12 batches / accumulation 2
    first = ToyTrainer(config(tmp_path / "split", max_steps=3)).fit()["step_losses"]
    ckpt = load_checkpoint(tmp_path / "split" / "latest.pt")
    assert ckpt["global_step"] == 3 and ckpt["epoch"] == 0 and ckpt["batches_done"] == 6
    for key in ("epoch", "model_state_dict", "optimizer_state_dict", "lr_scheduler_state_dict", "losses", "dices",
                "best_loss", "best_dice", "args"):
        assert key in ckpt
    rest = ToyTrainer(config(tmp_path / "split", resume="auto")).fit()["step_losses"]
    assert first + rest == pytest.approx(full, abs=0, rel=0)
    # the epoch history survives the interruption too (running means are checkpointed mid-epoch)
    resumed = load_checkpoint(tmp_path / "split" / "latest.pt")
    uninterrupted = load_checkpoint(tmp_path / "full" / "latest.pt")
    assert resumed["losses"] == pytest.approx(uninterrupted["losses"], rel=1e-12)
    assert resumed["dices"] == pytest.approx(uninterrupted["dices"], rel=1e-12)
    assert (tmp_path / "split" / "best.pt").is_file()
    assert not [p for p in (tmp_path / "split").iterdir() if p.name.endswith(".tmp")]


def test_schedules():
    p = [torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD(p, lr=1.0)
    s = warmup_multistep(opt, warmup_steps=4, milestones=[2], gamma=0.1, steps_per_epoch=5)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0]) and lrs[11] == pytest.approx(0.1)
    opt = torch.optim.SGD(p, lr=1.0)
    s = warmup_cosine(opt, warmup_steps=2, total_steps=10)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)
    assert sample_seed(1, 2, 3) == sample_seed(1, 2, 3) != sample_seed(1, 2, 4)


def test_config_overrides(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("train:\n  lr: 0.1\n  epochs: 2\nmodel:\n  depth: 4\n")
    child = tmp_path / "child.yaml"
    child.write_text("_base_: base.yaml\ntrain:\n  lr: 0.01\n")
    cfg = load_config(child, ["train.epochs=5", "model.depth=[1, 2]", "+train.new=x"])
    assert cfg == {"train": {"lr": 0.01, "epochs": 5, "new": "x"}, "model": {"depth": [1, 2]}}
    with pytest.raises(ConfigError, match="train.epoch"):
        apply_overrides(cfg, ["train.epoch=3"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")
