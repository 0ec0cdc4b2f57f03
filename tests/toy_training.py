"""A tiny trainer on random data, used by tests of the shared training machinery (also under torchrun)."""

import json
import sys

import torch
from torch import nn

from dcm.training.trainer import EpochAwareDataset, Trainer


class NoiseDataset(EpochAwareDataset):
    def __init__(self, n=24, seed=0):
        self.n, self.seed = n, seed

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        rng = self.rng_for(index)
        x = torch.from_numpy(rng.normal(size=(1, 6, 6, 6)).astype("float32"))
        return x, (x.mean() > 0).float()

    @staticmethod
    def collate(batch):
        return torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])


class ToyTrainer(Trainer):
    def build_model(self):
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv3d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4, 1))

    def build_dataset(self):
        return NoiseDataset(seed=self.seed)

    def training_step(self, model, batch, generator):
        x, y = batch
        x = x.to(self.dist.device)
        noise = torch.rand(x.shape[0], generator=generator).to(x.device)  # exercises the step generator
        logits = model(x).squeeze(1)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, y.to(x.device)) + 0.01 * noise.mean()
        return {"loss": loss, "dice": 1 - loss.detach()}


def config(work_dir, **train):
    base = dict(work_dir=str(work_dir), seed=3, epochs=2, batch_size=2, lr=1e-2, accumulation_steps=2,
                checkpoint_every_steps=2, log_every_steps=1, device="cpu", resume=None)
    base.update(train)
    return {"train": base}


if __name__ == "__main__":
    from dcm.config import apply_overrides

    cfg = apply_overrides(config("unused"), sys.argv[1:])
    summary = ToyTrainer(cfg).fit()
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        print("SUMMARY", json.dumps(summary["step_losses"]))
