"""Training checkpoints in DCM's layout, written atomically, with everything needed for an exact resume.

Layout (a superset of the released DCM file, so released tools read ours)::

    {epoch, model_state_dict, optimizer_state_dict, lr_scheduler_state_dict, losses, dices, best_loss,
     best_dice, args,                                   # the released keys
     scaler_state_dict, global_step, batches_done, rng_states, config}   # what exact resume needs

``epoch`` is the epoch being trained and ``batches_done`` how many of its (per-rank) batches are done, so a
mid-epoch checkpoint resumes at the next batch.
"""

from __future__ import annotations

import random
from typing import Any, Dict, List

import numpy as np
import torch

from dcm.atomic import atomic_torch_save  # re-exported: the trainer's checkpoints

__all__ = ["atomic_torch_save", "capture_rng_state", "restore_rng_state"]


def capture_rng_state() -> Dict[str, Any]:
    """This process's Python, NumPy and torch (CPU and CUDA) generator states, in safe-to-load types."""
    np_state = np.random.get_state()
    state: Dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states: List[torch.Tensor] = state["cuda"]
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
