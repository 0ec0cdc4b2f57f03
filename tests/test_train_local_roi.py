"""Local-RoI expert training: click simulation from the current prediction, checkpoints, torchrun resume, bad cases.

Reduced VISTA3D on tiny synthetic cases (16 x 32 x 32, 16^3 patches).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dcm.checkpoints import load_checkpoint
from dcm.config import load_config
from dcm.data.cases import atomic_savez
from dcm.data.synthetic import generate_case, generate_dataset
from dcm.errors import CheckpointError
from dcm.experts.local_roi import LocalRoIExpert
from dcm.models.vista3d import build_vista3d, load_vista3d_config
from dcm.protocol import next_click
from dcm.training.local_roi import LABEL_BRANCH_PREFIXES, LocalRoIDataset, LocalRoITrainer, SkippedCaseWarning

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "train_local_roi_reduced.yaml"
SMALL = ["data.patch_size=16", "interaction.max_prompt=2", "interaction.num_clicks=2", "train.epochs=1",
         "train.checkpoint_every_steps=0", "train.device=cpu"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("local_roi_data")
    generate_dataset(out, 6, seed=0, shape=(16, 32, 32), max_objects=3, progress=False)
    return out

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_config(data_dir, work_dir, *extra):
    return load_config(CONFIG, [f"data.data_dir={data_dir}", f"train.work_dir={work_dir}", *SMALL, *extra])


def test_corrective_clicks_follow_the_current_prediction(data_dir, tmp_path):
    trainer = LocalRoITrainer(small_config(data_dir, tmp_path, "interaction.num_clicks=4", "interaction.max_prompt=3"))
    model = trainer.build_model()
    assert list(model.state_dict()) == list(build_vista3d(load_vista3d_config("vista3d_reduced")).state_dict())
    runs = {"encoder": 0, "point_head": 0}
    model.image_encoder.register_forward_hook(lambda *_: runs.__setitem__("encoder", runs["encoder"] + 1))
    model.point_head.register_forward_hook(lambda *_: runs.__setitem__("point_head", runs["point_head"] + 1))
    model.record = True
    batch = [trainer.build_dataset()[0]]
    out = trainer.training_step(model, batch, torch.Generator().manual_seed(1))
    assert runs == {"encoder": 1, "point_head": 5}  # the encoder output is reused by every click step
    record = model.last_interaction[0]
    gts, preds, clicks = record["gts"], record["preds"], out["clicks"][0]
    assert len(clicks) == len(gts) >= 2 and len(preds) == 5
    moved = 0
    for k, object_clicks in enumerate(clicks):
        assert len(object_clicks) == 5
        assert object_clicks[0] == (next_click(gts[k], np.zeros_like(gts[k])).zyx, 1)  # first click: the protocol's
        for step in range(1, 5):
            expected = next_click(gts[k], preds[step - 1][k])  # from the prediction of the step before
            want = ((0, 0, 0), -1) if expected is None else (expected.zyx, 1 if expected.positive else 0)
            assert object_clicks[step] == want
        moved += len({zyx for zyx, _ in object_clicks}) > 2
    assert moved >= 1  # not one point repeated (the released bug)
    assert 0.0 <= float(out["dice"]) <= 1.0 and torch.isfinite(out["loss"])
    out["loss"].backward()  # every trainable tensor gets a gradient: DDP needs no find_unused_parameters
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad == (not name.startswith(LABEL_BRANCH_PREFIXES)), name
    assert model.image_encoder.encoder.conv_init.weight.grad.abs().sum() > 0  # the encoder is trained

    rnd = LocalRoITrainer(small_config(data_dir, tmp_path, "interaction.first_click=random"))
    mask = batch[0]["label"][0].numpy() == 1
    zyx, label = rnd.first_click(mask, torch.Generator().manual_seed(0))
    assert mask[zyx] and label == 1


def test_single_process_fit_writes_checkpoints_and_tensorboard(data_dir, tmp_path):
    work = tmp_path / "run"
    summary = LocalRoITrainer(small_config(data_dir, work)).fit()
    assert summary["steps"] == 6 and all(np.isfinite(summary["step_losses"]))
    ckpt = load_checkpoint(work / "latest.pt")
    for key in ("epoch", "model_state_dict", "optimizer_state_dict", "lr_scheduler_state_dict", "losses", "dices",
                "best_loss", "best_dice", "args"):
        assert key in ckpt
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == 6 and (work / "best.pt").is_file()
    events = list((work / "tb").glob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    assert {"train/loss", "train/dice", "epoch/loss"} <= set(acc.Tags()["scalars"])
    assert "train/interaction" in acc.Tags()["images"]
    # The checkpoint is VISTA3D's layout: the expert and init_from load it strictly.
    LocalRoIExpert.from_config({"model": "vista3d_reduced", "window_size": 16}, weights=work / "latest.pt")
    trainer = LocalRoITrainer(small_config(data_dir, tmp_path / "init"))
    model = trainer.build_model()
    trainer.init_weights(model, str(work / "best.pt"))
    state = dict(ckpt["model_state_dict"])
    # DCM's combined file: the global expert under model_state_dict, VISTA3D under model.
    torch.save({"model_state_dict": {"global.weight": torch.zeros(1)}, "model": state}, tmp_path / "combined.pt")
    trainer.init_weights(model, str(tmp_path / "combined.pt"))
    state.pop("point_head.pe_layer.positional_encoding_gaussian_matrix")
    torch.save({"model": state}, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="partial.pt: .*1 missing"):
        trainer.init_weights(model, str(tmp_path / "partial.pt"))


def _torchrun(work_dir, data_dir, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531",
           str(REPO / "train_local_roi" / "train.py"), "--config", str(CONFIG), f"train.work_dir={work_dir}",
           f"data.data_dir={data_dir}", *SMALL, "train.figure_every_epochs=100", *extra]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=str(work_dir.parent))
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads((work_dir / "summary.json").read_text())["step_losses"]


def test_torchrun_two_processes_save_resume_matches_uninterrupted(data_dir, tmp_path):
    split = tmp_path / "split"
    split.mkdir()
    first = _torchrun(split, data_dir, "+train.max_steps=2")
    ckpt = load_checkpoint(split / "latest.pt")
    assert ckpt["world_size"] == 2 and len(ckpt["rng_states"]) == 2 and ckpt["global_step"] == 2
    assert ckpt["epoch"] == 0 and ckpt["batches_done"] == 2  # mid-epoch: 6 cases / 2 ranks = 3 batches
    rest = _torchrun(split, data_dir, "train.resume=auto")
    full_dir = tmp_path / "full"
    full_dir.mkdir()
    full = _torchrun(full_dir, data_dir)
    assert len(first) == 2 and len(full) == 3
    assert first + rest == pytest.approx(full, rel=1e-5)


def test_unusable_cases_are_skipped_with_a_warning(tmp_path):
    for i in range(3):
        atomic_savez(tmp_path / f"CT_good_{i}.npz", **generate_case("CT", i, shape=(16, 32, 32), max_objects=2))
    (tmp_path / "CT_corrupt.npz").write_bytes(b"PK\x03\x04 not really a zip file")
    case = generate_case("MR", 7, shape=(16, 32, 32))
    atomic_savez(tmp_path / "MR_no_gts.npz", imgs=case["imgs"], spacing=case["spacing"])
    atomic_savez(tmp_path / "MR_empty.npz", imgs=case["imgs"], spacing=case["spacing"], gts=case["gts"] * 0)
    cfg = {"data_dir": str(tmp_path), "patch_size": 16}
    with pytest.warns(SkippedCaseWarning) as caught:
        ds = LocalRoIDataset(cfg, seed=5)
    assert sorted(p.name for p in ds.paths) == ["CT_good_0.npz", "CT_good_1.npz", "CT_good_2.npz", "MR_empty.npz"]
    assert {str(w.message).split(":")[0] for w in caught} == {str(tmp_path / "CT_corrupt.npz"),
                                                               str(tmp_path / "MR_no_gts.npz")}
    empty = [p.name for p in ds.paths].index("MR_empty.npz")  # passes the header check, fails on reading
    with pytest.warns(SkippedCaseWarning, match="no labelled object"):
        item = ds[empty]
    assert item["name"] == "CT_good_0" and item["image"].shape == (1, 16, 16, 16)  # the next case stands in
    again = ds[empty]
    assert torch.equal(again["image"], item["image"]) and torch.equal(again["label"], item["label"])
    assert item["label"].any() and torch.isfinite(item["image"]).all() and float(item["image"].abs().max()) < 2
    ds.set_epoch(1)
    assert not torch.equal(ds[empty]["image"], item["image"])  # augmentation depends on the epoch
