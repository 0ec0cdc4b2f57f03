"""Predictors for tests/test_eval_workers.py that misbehave on purpose, importable by spawned workers
(``--predictor eval_worker_predictors:crash_once``): box-fill, except on the case named by ``DCM_TEST_CRASH_CASE``.

``DCM_TEST_MARK_DIR``: a folder where each call leaves a file named after its case, so a test can tell which
cases were predicted (and whether the crash already happened).
"""

import os
from pathlib import Path

import numpy as np

from dcm.baselines import BoxFillPredictor
from dcm.data.cases import Case

_box_fill = BoxFillPredictor()


def _mark(case: Case) -> Path:
    folder = Path(os.environ["DCM_TEST_MARK_DIR"])
    folder.mkdir(parents=True, exist_ok=True)
    return folder / case.name


def counting(case: Case) -> np.ndarray:
    """Box-fill that leaves a mark per case it predicts."""
    _mark(case).touch()
    return _box_fill(case)


def crash_once(case: Case) -> np.ndarray:
    """Box-fill; the first call on the crash case ends the worker process at once (as a kill would)."""
    mark = _mark(case)
    if case.name == os.environ.get("DCM_TEST_CRASH_CASE") and not mark.exists():
        mark.touch()
        os._exit(7)
    mark.touch()
    return _box_fill(case)


def crash_always(case: Case) -> np.ndarray:
    """Box-fill; every call on the crash case ends the worker process."""
    if case.name == os.environ.get("DCM_TEST_CRASH_CASE"):
        os._exit(7)
    return _box_fill(case)
