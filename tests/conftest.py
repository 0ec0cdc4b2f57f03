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

# The entry points (predict.sh, the training scripts under torchrun, the benchmarks) import the installed dcm
# package (README: `pip install -e .`). Their subprocesses here import it from this checkout instead: the code
# under test is then the code they run, whether dcm is installed from this checkout (CI), from another one, or
# not at all (`python -m pytest` in a clone finds dcm in the current folder, but a subprocess would not).
_INHERITED_PYTHONPATH = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + _INHERITED_PYTHONPATH)


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
