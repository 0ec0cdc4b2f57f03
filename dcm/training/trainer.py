"""One trainer for both experts: DDP, AMP, gradient accumulation, atomic checkpoints, exact resume, logging.

Each expert subclasses :class:`Trainer` and supplies only what differs: its model, its dataset, its
optimizer parameter groups, its learning-rate schedule and its ``training_step`` (the interaction loop).

Determinism and exact resume: every random choice is a function of ``(seed, epoch, index)`` (samples, via
:func:`sample_seed`) or ``(seed, global_step, rank)`` (the step generator passed to ``training_step``), not
of process history. Resuming from a checkpoint written after step ``k`` therefore reproduces step ``k + 1``
of an uninterrupted run exactly (same losses), also mid-epoch.

Config keys read here (section ``train``)::

    work_dir, seed, epochs, batch_size, num_workers, accumulation_steps, amp (CUDA only), grad_clip,
    weight_decay, checkpoint_every_steps (0 = end of epoch only), log_every_steps, figure_every_epochs,
    resume (path | 'auto' | null), init_from (path, loaded by name + shape), max_steps (stop early; tests),
    device (auto | cpu | cuda), find_unused_parameters, steps_per_patch

``steps_per_patch`` (default 1): optimizer steps per micro-batch (:meth:`Trainer.training_steps` yields one
output per step; the default repeats ``training_step`` on the same batch, an expert may instead cut its
interaction into parts). It needs ``accumulation_steps: 1``. Checkpoints and ``max_steps`` take effect at
the end of a micro-batch (the first end at or after the step), so a resume never starts inside one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any, ClassVar, Dict, Iterable, Iterator, List, Optional, Sequence, Type

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler

from dcm.atomic import atomic_path
from dcm.errors import ConfigError
from dcm.training.checkpointing import atomic_torch_save, capture_rng_state, restore_rng_state
from dcm.training.config_schema import SingleLRTrainConfig, TrainConfig
from dcm.training.distributed import (
    DistInfo,
    all_gather_objects,
    all_reduce_mean,
    barrier,
    cleanup_distributed,
    setup_distributed,
)

__all__ = ["Trainer", "sample_seed", "EpochAwareDataset", "SkipSampler", "warmup_multistep", "warmup_cosine"]


def sample_seed(*parts: int) -> int:
    """A 63-bit seed derived from integers (seed, epoch, index, ...), stable across processes and runs."""
    digest = hashlib.blake2b(json.dumps([int(p) for p in parts]).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class EpochAwareDataset(Dataset):
    """A dataset whose random augmentation depends on ``(seed, epoch, index)`` only.

    Subclasses implement ``__getitem__(index)`` and draw every random choice of that sample from
    ``rng_for(index)``, a ``numpy.random.Generator`` seeded from ``(seed, epoch, index)``; :meth:`set_epoch` is
    called by the trainer before each epoch's loader is created.
    """

    seed: int = 0
    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def rng_for(self, index: int):
        """The generator of sample ``index`` this epoch (:func:`sample_seed` of seed, epoch and index)."""
        import numpy as np

        return np.random.default_rng(sample_seed(self.seed, self.epoch, index))


class SkipSampler(Sampler):
    """Yields the indices of ``sampler`` after skipping the first ``skip`` (resume inside an epoch)."""

    def __init__(self, sampler: Sampler, skip: int):
        self.sampler = sampler
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        for i, index in enumerate(self.sampler):
            if i >= self.skip:
                yield index

    def __len__(self) -> int:
        return max(len(self.sampler) - self.skip, 0)  # type: ignore[arg-type]


class _SequentialSampler(Sampler):
    """Deterministic per-epoch shuffle for the single-process case (mirrors DistributedSampler)."""

    def __init__(self, n: int, shuffle: bool, seed: int):
        self.n, self.shuffle, self.seed, self.epoch = n, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def warmup_multistep(optimizer, warmup_steps: int, milestones: Sequence[int], gamma: float, steps_per_epoch: int):
    """Linear warm-up over ``warmup_steps`` optimizer steps, then ×gamma at each epoch milestone."""
    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / max(warmup_steps, 1)) if warmup_steps > 0 else 1.0
        epoch = step // max(steps_per_epoch, 1)
        return warm * gamma ** sum(epoch >= m for m in milestones)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def warmup_cosine(optimizer, warmup_steps: int, total_steps: int, min_factor: float = 0.0):
    """Linear warm-up, then cosine decay to ``min_factor`` at ``total_steps`` optimizer steps."""
    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(total_steps - warmup_steps, 1))
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _collate_list(batch: List[Any]) -> List[Any]:
    return batch


class Trainer:
    """Base trainer. Subclasses implement the hooks marked "subclass"."""

    #: DCM's released checkpoint keys come first; the rest is for exact resume.
    checkpoint_name = "latest.pt"
    #: the schema of the ``train`` section (subclasses with other ``train`` keys name theirs).
    train_schema: ClassVar[Type[TrainConfig]] = SingleLRTrainConfig
    best_name = "best.pt"

    def __init__(self, cfg: Dict[str, Any]):
        self.cfg = cfg
        #: the checked ``train`` section (:attr:`train_schema`): unknown keys and bad values fail here,
        #: before any model is built or data is read.
        self.train = self.train_schema.from_mapping(cfg.get("train"), "train")
        self.seed = int(self.train.seed)
        self.work_dir = Path(self.train.work_dir)
        self.dist: DistInfo = DistInfo()
        self.writer = None
        self.losses: List[float] = []
        self.dices: List[float] = []
        self.best_loss = float("inf")
        self.best_dice = 0.0
        self.global_step = 0
        self.start_epoch = 0
        self.batches_done = 0
        self.epoch_progress: Dict[str, Any] = {}

    # ------------------------------------------------------------------ subclass hooks
    def build_model(self) -> nn.Module:  # subclass
        raise NotImplementedError

    def build_dataset(self) -> Dataset:  # subclass
        raise NotImplementedError

    def param_groups(self, model: nn.Module) -> List[Dict[str, Any]]:
        """Optimizer parameter groups; default one group at ``train.lr``."""
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": float(self.train.lr)}]

    def build_scheduler(self, optimizer, steps_per_epoch: int):
        return warmup_cosine(optimizer, self.train.warmup_steps, steps_per_epoch * self.train.epochs)

    def training_step(self, model: nn.Module, batch: Any, generator: torch.Generator) -> Dict[str, torch.Tensor]:
        """One micro-batch forward pass; returns ``{'loss': tensor, ...}`` (other entries are logged)."""
        raise NotImplementedError

    def training_steps(self, model: nn.Module, batch: Any, generator: torch.Generator,
                       parts: int) -> Iterable[Dict[str, torch.Tensor]]:
        """The forward passes of one micro-batch, one per optimizer step (``train.steps_per_patch`` = ``parts``).

        The trainer back-propagates each yielded ``loss`` and steps the optimizer before asking for the next,
        so a later part sees the updated weights. Default: :meth:`training_step` ``parts`` times on the same
        batch, the generator continuing.
        """
        for _ in range(parts):
            yield self.training_step(model, batch, generator)

    def init_weights(self, model: nn.Module, path: str) -> None:
        """Initialise from a pretrained checkpoint by name + shape (reports what was skipped)."""
        from dcm.checkpoints import load_into

        load_into(model, path, strict=False, verbose=self.dist.is_main)

    def log_figure(self, model: nn.Module, batch: Any, epoch: int) -> None:  # optional
        """Write a slice figure to TensorBoard (``self.writer``); default none."""

    # ------------------------------------------------------------------ machinery
    def _log(self, msg: str) -> None:
        if self.dist.is_main:
            from tqdm import tqdm

            tqdm.write(msg)

    def _loader(self, dataset: Dataset, epoch: int, skip_batches: int) -> DataLoader:
        batch_size = self.train.batch_size
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        if self.dist.distributed:
            sampler: Sampler = DistributedSampler(dataset, num_replicas=self.dist.world_size, rank=self.dist.rank,
                                                  shuffle=True, seed=self.seed, drop_last=True)
        else:
            sampler = _SequentialSampler(len(dataset), shuffle=True, seed=self.seed)
        sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        if skip_batches:
            sampler = SkipSampler(sampler, skip_batches * batch_size)
        workers = self.train.num_workers
        # An explicit generator: creating the iterator must not draw from the global one (exact resume).
        generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, self.dist.rank, skip_batches))
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, generator=generator,
                          collate_fn=getattr(dataset, "collate", None) or _collate_list, drop_last=True,
                          pin_memory=self.dist.device.type == "cuda", persistent_workers=False)

    def _batches_per_epoch(self, dataset: Dataset) -> int:
        n = len(dataset)
        if self.dist.distributed:
            n = n // self.dist.world_size
        return n // self.train.batch_size

    def save_checkpoint(self, path: Path, model: nn.Module, optimizer, scheduler, scaler, epoch: int,
                        batches_done: int, epoch_progress: Optional[Dict[str, Any]] = None) -> None:
        """Gather every rank's RNG state and write the checkpoint from rank 0 (atomically)."""
        rng_states = all_gather_objects(capture_rng_state())
        if self.dist.is_main:
            module = model.module if hasattr(model, "module") else model
            state = {
                "epoch": epoch,
                "model_state_dict": module.state_dict(),
                "optimizer_state_dict": optimizer.state_dict(),
                "lr_scheduler_state_dict": scheduler.state_dict(),
                "losses": list(self.losses),
                "dices": list(self.dices),
                "best_loss": self.best_loss,
                "best_dice": self.best_dice,
                "args": self.cfg,
                "scaler_state_dict": scaler.state_dict(),
                "global_step": self.global_step,
                "batches_done": batches_done,
                "rng_states": rng_states,
                "world_size": self.dist.world_size,
                "epoch_progress": epoch_progress or {},
            }
            atomic_torch_save(state, path)
        barrier()

    def load_resume(self, path: Path, model: nn.Module, optimizer, scheduler, scaler) -> None:
        from dcm.checkpoints import load_checkpoint

        state = load_checkpoint(path)
        module = model.module if hasattr(model, "module") else model
        module.load_state_dict(state["model_state_dict"], strict=True)
        optimizer.load_state_dict(state["optimizer_state_dict"])
        scheduler.load_state_dict(state["lr_scheduler_state_dict"])
        if "scaler_state_dict" in state and state["scaler_state_dict"]:
            scaler.load_state_dict(state["scaler_state_dict"])
        self.losses, self.dices = list(state.get("losses", [])), list(state.get("dices", []))
        self.best_loss, self.best_dice = float(state.get("best_loss", math.inf)), float(state.get("best_dice", 0.0))
        self.global_step = int(state.get("global_step", 0))
        self.start_epoch = int(state["epoch"])
        self.batches_done = int(state.get("batches_done", 0))
        self.epoch_progress = dict(state.get("epoch_progress") or {})
        rngs = state.get("rng_states") or []
        if int(state.get("world_size", 1)) == self.dist.world_size and self.dist.rank < len(rngs):
            restore_rng_state(rngs[self.dist.rank])
        self._log(f"resumed from {path}: epoch {self.start_epoch}, batch {self.batches_done}, step {self.global_step}")

    def _resume_path(self) -> Optional[Path]:
        resume = self.train.resume
        if resume in (None, False, ""):
            return None
        if resume == "auto":
            latest = self.work_dir / self.checkpoint_name
            return latest if latest.is_file() else None
        return Path(resume)

    def fit(self) -> Dict[str, Any]:
        """Train; returns a summary (final losses, steps, seconds). Call under ``torchrun`` for DDP."""
        from tqdm import tqdm

        self.dist = setup_distributed(self.train.device)
        torch.manual_seed(sample_seed(self.seed, self.dist.rank))
        try:
            return self._fit(tqdm)
        finally:
            if self.writer is not None:
                self.writer.close()
            cleanup_distributed()

    def _optimizer_step(self, model: nn.Module, optimizer, scheduler, scaler, grad_clip: Optional[float]) -> None:
        """Clip (optional), step, zero the gradients, step the schedule, count the step."""
        if grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), float(grad_clip))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        self.global_step += 1

    def _log_step(self, step_loss: float, out: Dict[str, Any], optimizer) -> None:
        """TensorBoard scalars of one optimizer step: the loss, the step's other scalar outputs, each group's lr."""
        self.writer.add_scalar("train/loss", step_loss, self.global_step)
        for k, v in out.items():
            if k != "loss" and torch.is_tensor(v) and v.numel() == 1:
                self.writer.add_scalar(f"train/{k}", float(v), self.global_step)
        for gi, group in enumerate(optimizer.param_groups):
            self.writer.add_scalar(f"lr/group{gi}", group["lr"], self.global_step)

    def _fit(self, tqdm) -> Dict[str, Any]:
        device = self.dist.device
        model = self.build_model().to(device)
        init_from = self.train.init_from
        resume_path = self._resume_path()
        if init_from and resume_path is None:
            self.init_weights(model, str(init_from))
        if self.dist.distributed:
            model = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=self.train.find_unused_parameters)
        module = model.module if hasattr(model, "module") else model
        optimizer = torch.optim.AdamW(self.param_groups(module), weight_decay=float(self.train.weight_decay))
        dataset = self.build_dataset()
        batches_per_epoch = self._batches_per_epoch(dataset)
        if batches_per_epoch == 0:
            raise ValueError(f"dataset of {len(dataset)} samples is too small for batch size "
                             f"{self.train.batch_size} x {self.dist.world_size} processes")
        accumulation = self.train.accumulation_steps
        parts = self.train.steps_per_patch
        if parts < 1 or (parts > 1 and accumulation > 1):
            raise ConfigError(f"train.steps_per_patch must be >= 1, and 1 with train.accumulation_steps > 1; got "
                              f"{parts} with accumulation {accumulation}")
        steps_per_epoch = math.ceil(batches_per_epoch / accumulation) * parts
        scheduler = self.build_scheduler(optimizer, steps_per_epoch)
        use_amp = self.train.amp and device.type == "cuda"
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
        if resume_path is not None:
            self.load_resume(resume_path, model, optimizer, scheduler, scaler)
        if self.dist.is_main:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            # Temporary files of saves interrupted by a kill (each as big as a checkpoint) are garbage.
            for stale in self.work_dir.glob(".*.tmp"):
                stale.unlink(missing_ok=True)
            (self.work_dir / "config.json").write_text(json.dumps(self.cfg, indent=2, default=str))
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.work_dir / "tb"))

        epochs = self.train.epochs
        max_steps = self.train.max_steps
        ckpt_every = self.train.checkpoint_every_steps
        log_every = self.train.log_every_steps or 10  # 0: the default 10
        grad_clip = self.train.grad_clip
        start = time.time()
        step_losses: List[float] = []
        samples = 0
        # After the first optimizer step (one-off costs: allocator warm-up, DDP's first bucket rebuild).
        steady_start: Optional[float] = None
        steady_samples = 0
        stop = False
        for epoch in range(self.start_epoch, epochs):
            skip = self.batches_done if epoch == self.start_epoch else 0
            loader = self._loader(dataset, epoch, skip)
            model.train()
            # a mid-epoch resume continues the interrupted epoch's running means
            progress = self.epoch_progress if skip else {}
            epoch_loss = float(progress.get("loss_sum", 0.0))
            epoch_count = int(progress.get("count", 0))
            dice_values = list(progress.get("dice_values", []))
            batch = None
            bar = tqdm(total=batches_per_epoch, initial=skip, desc=f"epoch {epoch}", disable=not self.dist.is_main,
                       dynamic_ncols=True)
            micro_losses: List[torch.Tensor] = []
            for i, batch in enumerate(loader, start=skip):
                sync = (i + 1) % accumulation == 0 or i + 1 == batches_per_epoch
                generator = torch.Generator(device="cpu").manual_seed(
                    sample_seed(self.seed, self.global_step, i % accumulation, self.dist.rank))
                # the last group of an epoch may hold fewer micro-batches than `accumulation`
                group = min(accumulation, batches_per_epoch - (i // accumulation) * accumulation)
                steps_before = self.global_step
                outputs = iter(self.training_steps(model, batch, generator, parts))
                for part in range(parts):
                    with model.no_sync() if self.dist.distributed and not sync else contextlib.nullcontext():
                        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                            out = next(outputs, None)
                        if out is None:
                            raise RuntimeError(f"training_steps gave {part} outputs, train.steps_per_patch is {parts}")
                        loss = out["loss"]
                        scaler.scale(loss / group).backward()
                    micro_losses.append(loss.detach())
                    if sync:
                        self._optimizer_step(model, optimizer, scheduler, scaler, grad_clip)
                        if steady_start is None:
                            steady_start, steady_samples = time.time(), samples
                        step_loss = all_reduce_mean(torch.stack(micro_losses).mean()).item()
                        micro_losses = []
                        step_losses.append(step_loss)
                        epoch_loss += step_loss
                        epoch_count += 1
                        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
                        if self.writer is not None and (self.global_step % log_every == 0 or self.global_step == 1):
                            self._log_step(step_loss, out, optimizer)
                if "dice" in out:
                    dice_values.append(float(out["dice"]))
                samples += self.train.batch_size
                bar.update(1)
                if self.global_step == steps_before:
                    continue
                if ckpt_every and self.global_step // ckpt_every > steps_before // ckpt_every \
                        and i + 1 < batches_per_epoch:
                    self.save_checkpoint(self.work_dir / self.checkpoint_name, model, optimizer, scheduler, scaler,
                                         epoch, i + 1, {"loss_sum": epoch_loss, "count": epoch_count,
                                                        "dice_values": dice_values})
                if max_steps is not None and self.global_step >= int(max_steps):
                    stop = True
                    break
            bar.close()
            if stop and i + 1 < batches_per_epoch:
                self.save_checkpoint(self.work_dir / self.checkpoint_name, model, optimizer, scheduler, scaler,
                                     epoch, i + 1, {"loss_sum": epoch_loss, "count": epoch_count,
                                                    "dice_values": dice_values})
                break
            mean_loss = epoch_loss / max(epoch_count, 1)
            self.losses.append(mean_loss)
            dice = (float(all_reduce_mean(torch.tensor(sum(dice_values) / len(dice_values), device=device)))
                    if dice_values else float("nan"))
            self.dices.append(dice)
            self.best_dice = max(self.best_dice, dice) if dice == dice else self.best_dice
            improved = mean_loss < self.best_loss
            self.best_loss = min(self.best_loss, mean_loss)
            self._log(f"epoch {epoch}: loss {mean_loss:.4f} ({self.global_step} steps, {time.time() - start:.0f} s)")
            if self.writer is not None:
                self.writer.add_scalar("epoch/loss", mean_loss, epoch)
                if dice == dice:
                    self.writer.add_scalar("epoch/dice", dice, epoch)
                if batch is not None and (epoch + 1) % (self.train.figure_every_epochs or 1) == 0:
                    self.log_figure(module, batch, epoch)
            self.batches_done = 0
            self.save_checkpoint(self.work_dir / self.checkpoint_name, model, optimizer, scheduler, scaler,
                                 epoch + 1, 0)
            if improved and self.dist.is_main:
                import shutil

                with atomic_path(self.work_dir / self.best_name) as tmp:
                    shutil.copyfile(self.work_dir / self.checkpoint_name, tmp)
            if stop:
                break
        end = time.time()
        seconds = end - start
        world = self.dist.world_size
        steady = ((samples - steady_samples) * world / (end - steady_start)
                  if steady_start and end > steady_start else None)
        # samples_per_second: everything (checkpoints, first step); steady_samples_per_second: after step 1.
        summary = {"steps": self.global_step, "step_losses": step_losses, "seconds": seconds,
                   "samples_per_second": samples * world / max(seconds, 1e-9),
                   "steady_samples_per_second": steady}
        if self.dist.is_main:
            (self.work_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary
