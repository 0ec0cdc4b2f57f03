"""Global-RoI expert training: interaction loop, parameter groups, checkpoints, 2-process resume, corrupt crops."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from dcm.checkpoints import load_checkpoint
from dcm.config import load_config
from dcm.training.global_roi import (
    GlobalRoICropDataset,
    GlobalRoITrainer,
    error_region,
    sample_candidate_clicks,
)

REPO = Path(__file__).resolve().parent.parent
REDUCED = REPO / "configs" / "train_global_roi_reduced.yaml"
S = 64

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def blob(rng: np.random.Generator) -> np.ndarray:
    """A random ellipsoid label (S, S, S) uint8 near the centre."""
    zz, yy, xx = np.mgrid[:S, :S, :S]
    c = 31 + rng.integers(-5, 6, 3)
    r = rng.uniform(7, 13, 3)
    return ((((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2) <= 1).astype(np.uint8)


def write_crops(folder: Path, n: int, seed: int = 0) -> Path:
    """``n`` cached crops in the preprocess format (raw positive intensities, binary label)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        label = blob(rng)
        image = (80 + 50 * label + rng.normal(0, 8, label.shape)).clip(1).astype(np.float32)
        np.savez_compressed(folder / f"case{i:02d}_obj{1:03d}.npz", image=image, label=label,
                            spacing_zyx=np.ones(3, np.float32), roi_center=np.full(3, 31.0), roi_size=np.full(3, 64.0))
    return folder


def small_cfg(tmp_path: Path, *overrides: str) -> dict:
    return load_config(REDUCED, [f"train.work_dir={tmp_path / 'work'}", f"data.data_dir={tmp_path / 'crops'}",
                                 "train.batch_size=1", "train.epochs=1", *overrides])


def test_interaction_loop_mechanics(tmp_path):
    k, steps = 3, 2
    trainer = GlobalRoITrainer(small_cfg(tmp_path, f"interaction.num_candidates={k}",
                                         f"interaction.num_steps={steps}", "interaction.record_masks=true"))
    model = trainer.build_model()
    calls = []
    model.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    rng = np.random.default_rng(1)
    gt = torch.from_numpy(np.stack([blob(rng), blob(rng)])[:, None].astype(np.float32))
    image = gt * 2 + torch.randn(gt.shape, generator=torch.Generator().manual_seed(0)) * 0.3
    out = trainer.training_step(model, {"image": image, "label": gt}, torch.Generator().manual_seed(5))
    assert len(calls) == 1  # one embedding per batch, shared by every step and candidate
    assert set(out) >= {"loss", "dice"} and torch.isfinite(out["loss"]) and 0 <= float(out["dice"]) <= 1
    out["loss"].backward()
    assert model.image_encoder.patch_embed.proj.weight.grad.abs().sum() > 0  # through the shared embedding

    rec = trainer.last_clicks
    gt_bool = gt > 0.5
    assert len(rec["steps"]) == steps
    assert rec["points"].shape == (2, steps + 1, 3) and rec["labels"].shape == (2, steps + 1)
    assert (rec["points"][:, 0] == 31).all() and (rec["labels"][:, 0] == 1).all()  # centre click, positive
    for s, step in enumerate(rec["steps"]):
        region, prev = step["region"], step["prev_pred"]
        assert torch.equal(region, error_region(prev, gt_bool))
        smooth = ndimage.gaussian_filter((prev != gt_bool).float().numpy(), sigma=(0, 0, 1, 1, 1), truncate=5.0,
                                         mode="constant")
        assert region.any() and smooth[region.numpy()].min() >= 0.29  # independent check of the threshold
        pts, lbl = step["candidates"], step["candidate_labels"]
        assert pts.shape == (2, k, 3) and not step["fallback"].any()
        for b in range(2):
            z, y, x = pts[b].T
            assert region[b, 0, z, y, x].all()
            assert torch.equal(lbl[b], gt_bool[b, 0, z, y, x].long())
            assert len({tuple(p) for p in pts[b].tolist()}) == k  # without replacement
        # the chain continues with candidate 0: its click and its binarised mask
        assert torch.equal(rec["points"][:, s + 1], pts[:, 0]) and torch.equal(rec["labels"][:, s + 1], lbl[:, 0])
        nxt = rec["steps"][s + 1]["prev_pred"] if s + 1 < steps else rec["final_pred"]
        assert torch.equal(nxt, step["candidate_preds"][0::k])


def test_candidate_sampling_edge_cases():
    gen = torch.Generator().manual_seed(0)
    gt = torch.zeros(1, 1, 8, 8, 8, dtype=torch.bool)
    gt[0, 0, 2:5, 2:5, 2:5] = True
    region = torch.zeros_like(gt)
    region[0, 0, 3, 3, 2:4] = True  # 2 voxels < K: drawn with replacement
    pts, lbl, fb = sample_candidate_clicks(region, gt, 5, gen)
    assert not fb.any() and region[0, 0, pts[0, :, 0], pts[0, :, 1], pts[0, :, 2]].all() and (lbl == 1).all()
    pts, lbl, fb = sample_candidate_clicks(torch.zeros_like(gt), gt, 6, gen)  # perfect prediction
    assert fb.all() and torch.equal(lbl[0], gt[0, 0, pts[0, :, 0], pts[0, :, 1], pts[0, :, 2]].long())
    assert len({tuple(p) for p in pts[0].tolist()}) == 6
    a = sample_candidate_clicks(region | gt, gt, 4, torch.Generator().manual_seed(3))[0]
    assert torch.equal(a, sample_candidate_clicks(region | gt, gt, 4, torch.Generator().manual_seed(3))[0])
    perfect = error_region(gt, gt)
    assert not perfect.any()


def test_parameter_groups_and_schedule(tmp_path):
    ref = load_config(REPO / "configs" / "train_global_roi.yaml", ["model.preset=sam_med3d_64_reduced"])
    t = ref["train"]
    assert (t["lr_encoder"], t["lr_decoder"], t["weight_decay"], t["warmup_steps"], t["milestones"], t["epochs"],
            t["batch_size"], t["accumulation_steps"]) == (8e-4, 8e-5, 1e-4, 50, [98, 132], 144, 4, 8)
    assert (ref["interaction"]["num_steps"], ref["interaction"]["num_candidates"]) == (5, 6)
    trainer = GlobalRoITrainer(ref)
    model = trainer.build_model()
    groups = trainer.param_groups(model)
    assert [g["lr"] for g in groups] == [8e-4, 8e-5]
    ids = [{id(p) for p in g["params"]} for g in groups]
    assert ids[0] == {id(p) for p in model.image_encoder.parameters()}
    assert not ids[0] & ids[1] and ids[0] | ids[1] == {id(p) for p in model.parameters()}
    opt = torch.optim.AdamW(groups, weight_decay=t["weight_decay"])
    sched = trainer.build_scheduler(opt, steps_per_epoch=1)
    lrs = []
    for _ in range(133):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx([8e-4 / 50, 8e-5 / 50]) and lrs[49] == lrs[97] == pytest.approx([8e-4, 8e-5])
    assert lrs[98] == pytest.approx([8e-5, 8e-6]) and lrs[132] == pytest.approx([8e-6, 8e-7])  # epochs 98, 132


def test_init_from_turbo_like_checkpoint_by_name_and_shape(tmp_path, capsys):
    trainer = GlobalRoITrainer(small_cfg(tmp_path))
    model = trainer.build_model()
    with torch.random.fork_rng():
        torch.manual_seed(123)
        donor = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    # turbo (128^3, patch 16, 4 mask tokens): these two keep their fresh values
    donor["image_encoder.patch_embed.proj.weight"] = torch.randn(96, 1, 16, 16, 16)
    donor["mask_decoder.mask_tokens.weight"] = torch.randn(4, 48)
    torch.save({"model_state_dict": donor}, tmp_path / "turbo.pth")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.init_weights(model, str(tmp_path / "turbo.pth"))
    after = model.state_dict()
    for key, value in after.items():
        expected = before[key] if key in ("image_encoder.patch_embed.proj.weight", "mask_decoder.mask_tokens.weight") \
            else donor[key]
        assert torch.equal(value, expected), key


def test_single_process_run_writes_checkpoints_and_events(tmp_path):
    write_crops(tmp_path / "crops", 2)
    summary = GlobalRoITrainer(small_cfg(tmp_path, "interaction.num_steps=1")).fit()
    assert len(summary["step_losses"]) == 2 and all(np.isfinite(summary["step_losses"]))
    work = tmp_path / "work"
    for name in ("latest.pt", "best.pt"):
        ckpt = load_checkpoint(work / name)
        for key in ("epoch", "model_state_dict", "optimizer_state_dict", "lr_scheduler_state_dict", "losses",
                    "dices", "best_loss", "best_dice", "args"):
            assert key in ckpt, key
        assert ckpt["epoch"] == 1 and len(ckpt["losses"]) == 1 and 0 <= ckpt["dices"][0] <= 1
        assert any(k.startswith("image_encoder.") for k in ckpt["model_state_dict"])
        assert not any(k.startswith(("module.", "sam.")) for k in ckpt["model_state_dict"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(work / "tb"), size_guidance={"images": 0}).Reload()
    assert {"train/loss", "train/dice", "lr/group0", "lr/group1"} <= set(events.Tags()["scalars"])
    assert "train/interaction" in events.Tags()["images"]


def test_torchrun_two_processes_save_and_resume(tmp_path):
    write_crops(tmp_path / "crops", 4)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541",
            str(REPO / "train_global_roi" / "train.py"), "--config", str(REDUCED),
            f"data.data_dir={tmp_path / 'crops'}",
            "train.epochs=1", "train.batch_size=1", "interaction.num_steps=1", "interaction.num_candidates=2",
            "train.figure_every_epochs=100"]

    def run(*extra: str) -> list:
        out = subprocess.run(base + list(extra), env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.split("SUMMARY", 1)[1].splitlines()[0])

    split = tmp_path / "split"
    first = run(f"train.work_dir={split}", "+train.max_steps=1")
    ckpt = load_checkpoint(split / "latest.pt")
    assert ckpt["world_size"] == 2 and ckpt["global_step"] == 1 and ckpt["batches_done"] == 1
    rest = run(f"train.work_dir={split}", "train.resume=auto")
    full = run(f"train.work_dir={tmp_path / 'full'}")
    assert len(full) == 2  # 4 crops / 2 ranks / batch 1, accumulation 1
    assert first + rest == pytest.approx(full, rel=1e-5)
    assert (split / "best.pt").is_file()


def test_corrupt_crop_is_skipped_and_augmentation_is_deterministic(tmp_path):
    crops = write_crops(tmp_path / "crops", 3)
    (crops / "case97_obj001.npz").write_bytes(b"not a zip file")
    np.savez(crops / "case98_obj001.npz", image=np.ones((8, 8, 8), np.float32), label=np.ones((8, 8, 8), np.uint8))
    cfg = small_cfg(tmp_path)
    ds = GlobalRoICropDataset(crops, size=S, augment=cfg["data"]["augment"], seed=7, pattern="*_obj*.npz")
    assert len(ds) == 5
    bad = [i for i, f in enumerate(ds.files) if f.name.startswith(("case97", "case98"))]
    for index in bad:
        with pytest.warns(RuntimeWarning, match="skipping crop"):
            item = ds[index]
        assert item["image"].shape == item["label"].shape == (1, S, S, S)
        assert set(torch.unique(item["label"]).tolist()) <= {0.0, 1.0} and item["label"].sum() > 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            assert torch.equal(ds[index]["image"], item["image"])  # same fallback, same augmentation
    a, b = ds[0], ds[0]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["image"], a["image"])
    # z-norm over voxels > 0 (all of them here): mean 0, std 1
    only_znorm = {k: dict(v, enabled=False) for k, v in cfg["data"]["augment"].items() if k != "znorm"}
    only_znorm["znorm"] = {"enabled": True}
    plain = GlobalRoICropDataset(crops, size=S, augment=only_znorm, pattern="case0*.npz")[0]["image"]
    assert float(plain.mean()) == pytest.approx(0, abs=1e-4) and float(plain.std()) == pytest.approx(1, abs=1e-3)
