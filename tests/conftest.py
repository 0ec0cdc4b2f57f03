"""Shared test helpers. Fixtures (golden values from the original third-party code) live in tests/fixtures/."""

import contextlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures"
REPO_ROOT = Path(__file__).resolve().parent.parent

# Two cores in CI: keep torch from oversubscribing them when several workers run.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def protocol_golden():
    """(json dict, npz arrays) of the organisers' evaluator outputs."""
    meta = json.loads((FIXTURES / "protocol_golden.json").read_text())
    with np.load(FIXTURES / "protocol_golden.npz") as z:
        arrays = {k: z[k] for k in z.files}
    return meta, arrays


@contextlib.contextmanager
def _torch_threads(n):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def two_torch_threads():
    """Run a module's model tests with 2 torch threads (the CI machine's cores), then restore the setting."""
    with _torch_threads(2):
        yield


@pytest.fixture
def one_torch_thread():
    """One intra-op thread per test: on 2 shared cores more threads per process only oversubscribe them
    (and one thread is the condition under which outputs are bitwise stable)."""
    with _torch_threads(1):
        yield
