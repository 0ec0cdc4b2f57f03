"""The evaluator on several workers (dcm.evaluate.parallel): the same metrics.csv as a sequential run, resume, retries
of a dead worker's case, parts + merge, Ray; and the organisers' CSV details (CaseName with .npz, a failing
command's stderr in notes.txt, predict.sh on the evaluator's Python)."""

import csv
import os
import sys
import time
from pathlib import Path

import pytest

from dcm.data.cases import atomic_savez
from dcm.evaluate import METRIC_COLUMNS, main as evaluate_main

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))  # eval_worker_predictors, for the spawned workers too

NOT_TIMES = [c for c in METRIC_COLUMNS if "Time" not in c]


@pytest.fixture(scope="module")
def cases_dir(tmp_path_factory):
    from dcm.data.synthetic import generate_case

    out = tmp_path_factory.mktemp("cases")
    for i, flavour in enumerate(["CT", "MR", "Microscopy"]):
        arrays = generate_case(flavour, seed=20 + i, shape=(8, 24, 24), max_objects=2, with_tube=False)
        atomic_savez(out / f"{flavour}_tiny_{i}.npz", **arrays)
    return out


def _run(cases, out, *args):
    return evaluate_main(["--cases", str(cases), "--out", str(out), "--no-progress", *map(str, args)])


def _table(out, name="metrics.csv", columns=None):
    with open(Path(out) / name, newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: r[k] for k in (columns or r)} for r in rows]


@pytest.fixture(scope="module")
def sequential_box_fill(cases_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sequential")
    assert _run(cases_dir, out, "--predictor", "box-fill") == 0
    return out


def test_two_workers_equal_sequential_box_fill_and_case_name_has_npz(cases_dir, sequential_box_fill, tmp_path):
    assert _run(cases_dir, tmp_path, "--predictor", "box-fill", "--workers", 2) == 0
    rows = _table(tmp_path, columns=NOT_TIMES)
    assert rows == _table(sequential_box_fill, columns=NOT_TIMES)
    assert [r["CaseName"] for r in rows] == sorted(p.name for p in cases_dir.glob("*.npz"))  # with .npz
    assert _table(tmp_path, "clicks.csv") == _table(sequential_box_fill, "clicks.csv")
    assert (tmp_path / "summary.md").read_text() == (sequential_box_fill / "summary.md").read_text()
    assert sorted(p.name for p in (tmp_path / "cases").iterdir()) == [f"{r['CaseName']}.json" for r in rows]


def test_two_workers_equal_sequential_dcm(cases_dir, tmp_path):
    dcm = ["--predictor", "dcm", "--config", "dcm_reduced", "--random-init", "--threads", 1]
    assert _run(cases_dir, tmp_path / "seq", *dcm) == 0
    assert _run(cases_dir, tmp_path / "par", *dcm, "--workers", 2) == 0
    seq = _table(tmp_path / "seq", columns=NOT_TIMES)
    assert _table(tmp_path / "par", columns=NOT_TIMES) == seq and len(seq) == 3
    assert _table(tmp_path / "par", "clicks.csv") == _table(tmp_path / "seq", "clicks.csv")


@pytest.mark.slow
def test_dcm_in_process_equals_predict_sh(cases_dir, tmp_path, monkeypatch):
    """Same config, seed and thread count: the in-process DCM predictor writes what predict.sh writes."""
    import shutil

    import numpy as np

    two = tmp_path / "cases"
    two.mkdir()
    for p in sorted(cases_dir.glob("*.npz"))[1:]:  # one case with boxes, one without
        shutil.copy(p, two)
    monkeypatch.chdir(REPO)
    cmd = "sh predict.sh --config configs/dcm_reduced.yaml --random-init"
    assert _run(two, tmp_path / "sh", "--predict-cmd", cmd, "--threads", 1, "--save-all-segs") == 0
    assert _run(two, tmp_path / "inproc", "--predictor", "dcm", "--config", "configs/dcm_reduced.yaml",
                "--random-init", "--threads", 1, "--save-all-segs") == 0
    assert _table(tmp_path / "inproc", columns=NOT_TIMES) == _table(tmp_path / "sh", columns=NOT_TIMES)
    for p in two.glob("*.npz"):
        with np.load(tmp_path / "sh" / "all_segs" / p.name) as a, \
                np.load(tmp_path / "inproc" / "all_segs" / p.name) as b:
            assert np.array_equal(a["all_segs"], b["all_segs"])


def test_resume_skips_finished_cases_and_with_nothing_left_starts_no_worker(cases_dir, sequential_box_fill,
                                                                            tmp_path, monkeypatch):
    import dcm.evaluate.parallel

    marks = tmp_path / "marks"
    monkeypatch.setenv("DCM_TEST_MARK_DIR", str(marks))
    out = tmp_path / "out"
    assert _run(cases_dir, out, "--predictor", "box-fill") == 0
    first = sorted(cases_dir.glob("*.npz"))[0].name
    (out / "cases" / f"{first}.json").unlink()  # as if the run had been stopped before that case finished
    assert _run(cases_dir, out, "--predictor", "eval_worker_predictors:counting", "--workers", 2, "--resume") == 0
    assert sorted(p.name for p in marks.iterdir()) == [Path(first).stem]
    assert _table(out, columns=NOT_TIMES) == _table(sequential_box_fill, columns=NOT_TIMES)

    def no_worker(*args, **kwargs):
        raise AssertionError("a worker was started with nothing left to do")

    monkeypatch.setattr(dcm.evaluate.parallel, "make_backend", no_worker)
    start = time.perf_counter()
    # nothing left: not even the predictor is looked at
    assert _run(cases_dir, out, "--predictor", "no_such_module:predict", "--workers", 2, "--resume") == 0
    assert time.perf_counter() - start < 5
    assert _table(out, columns=NOT_TIMES) == _table(sequential_box_fill, columns=NOT_TIMES)


def test_a_dead_workers_case_is_tried_again(cases_dir, sequential_box_fill, tmp_path, monkeypatch, capsys):
    crash = sorted(cases_dir.glob("*.npz"))[1].stem
    monkeypatch.setenv("DCM_TEST_MARK_DIR", str(tmp_path / "marks"))
    monkeypatch.setenv("DCM_TEST_CRASH_CASE", crash)
    assert _run(cases_dir, tmp_path / "out", "--predictor", "eval_worker_predictors:crash_once", "--workers", 2) == 0
    assert f"{crash}.npz: the worker died (exit code 7); trying again" in capsys.readouterr().err
    assert _table(tmp_path / "out", columns=NOT_TIMES) == _table(sequential_box_fill, columns=NOT_TIMES)


def test_a_case_that_always_kills_its_worker_is_a_failure_and_the_others_finish(cases_dir, sequential_box_fill,
                                                                                tmp_path, monkeypatch):
    crash = sorted(cases_dir.glob("*.npz"))[1].name
    monkeypatch.setenv("DCM_TEST_CRASH_CASE", Path(crash).stem)
    out = tmp_path / "out"
    assert _run(cases_dir, out, "--predictor", "eval_worker_predictors:crash_always", "--workers", 2,
                "--retries", 1) == 1
    failures = _table(out, "failures.csv")
    assert [f["CaseName"] for f in failures] == [crash]
    assert "the worker died (exit code 7); gave up after 2 attempts" in failures[0]["Error"]
    expected = [r for r in _table(sequential_box_fill, columns=NOT_TIMES) if r["CaseName"] != crash]
    assert _table(out, columns=NOT_TIMES) == expected
    # --resume tries a crashed case again (the others are kept)
    monkeypatch.setenv("DCM_TEST_CRASH_CASE", "none")
    assert _run(cases_dir, out, "--predictor", "eval_worker_predictors:crash_always", "--workers", 2,
                "--resume") == 0
    assert _table(out, columns=NOT_TIMES) == _table(sequential_box_fill, columns=NOT_TIMES)


def test_parts_then_merge_equal_a_single_run(cases_dir, sequential_box_fill, tmp_path, capsys):
    parts = [tmp_path / f"part{i}" for i in range(2)]
    for i, part in enumerate(parts):
        assert _run(cases_dir, part, "--predictor", "box-fill", "--num-parts", 2, "--part-id", i) == 0
    assert [len(_table(p)) for p in parts] == [2, 1]
    assert evaluate_main(["merge", *map(str, parts), "--out", str(tmp_path / "merged")]) == 0
    assert _table(tmp_path / "merged", columns=NOT_TIMES) == _table(sequential_box_fill, columns=NOT_TIMES)
    assert _table(tmp_path / "merged", "clicks.csv") == _table(sequential_box_fill, "clicks.csv")
    # a part left out: merged anyway, with a warning and exit status 1
    assert evaluate_main(["merge", str(parts[0]), "--out", str(tmp_path / "half")]) == 1
    assert "part(s) 1 of 2 not given" in capsys.readouterr().err
    assert evaluate_main(["merge", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2


def test_ray_local_two_workers(cases_dir, sequential_box_fill, tmp_path):
    try:
        import ray  # noqa: F401
    except ImportError:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("ray is not installed (requirements.txt pins it)")
        pytest.skip("ray is not installed: pip install -r requirements.txt")
    assert _run(cases_dir, tmp_path, "--predictor", "box-fill", "--ray", "local", "--workers", 2) == 0
    assert _table(tmp_path, columns=NOT_TIMES) == _table(sequential_box_fill, columns=NOT_TIMES)


def test_failing_command_stderr_tail_in_notes_and_evaluator_python(cases_dir, tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    first = sorted(cases_dir.glob("*.npz"))[0]
    (one / first.name).write_bytes(first.read_bytes())
    # $PYTHON is what predict.sh runs: the evaluator's own interpreter unless set
    cmd = '"$PYTHON" -c "import sys; print(sys.executable, file=sys.stderr); sys.exit(\'model exploded\')"'
    assert _run(one, tmp_path / "out", "--predict-cmd", cmd) == 0
    notes = (tmp_path / "out" / "notes.txt").read_text()
    assert "step 1: no output file (scored as empty)" in notes
    assert "    model exploded" in notes and "[exit status 1]" in notes
    assert f"    {sys.executable}" in notes


def test_bad_settings_are_one_line_errors_before_any_worker(cases_dir, tmp_path, capsys):
    assert _run(cases_dir, tmp_path, "--predictor", "dcm", "--config", "no_such_config", "--random-init",
                "--workers", 2) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("evaluate: ") and "no_such_config" in err and "\n" not in err
    assert _run(cases_dir, tmp_path, "--predictor", "box-fill", "--workers", 0) == 2
    assert _run(cases_dir, tmp_path, "--predictor", "no_such_module:f", "--workers", 2) == 2
    assert _run(cases_dir, tmp_path, "--predictor", "box-fill", "--num-parts", 2, "--part-id", 2) == 2
    assert "evaluate: " in capsys.readouterr().err


def test_ablation_on_two_workers_equals_sequential_and_resumes(cases_dir, tmp_path, monkeypatch):
    import torch

    import dcm.evaluate.parallel
    from dcm.cli.ablate import run_ablation

    two = tmp_path / "cases"
    two.mkdir()
    for p in sorted(cases_dir.glob("*.npz"))[:2]:
        (two / p.name).write_bytes(p.read_bytes())
    ablation = {"base": "dcm_reduced", "variants": {"global": ["engine.policy=global_only"], "dual": []}}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seq = run_ablation(ablation, two, tmp_path / "seq", random_init=True, progress=False)
    finally:
        torch.set_num_threads(threads)
    par = run_ablation(ablation, two, tmp_path / "par", random_init=True, progress=False, workers=2, threads=1)
    untimed = [{k: v for k, v in r.items() if k != "Seconds_per_case"} for r in seq]
    assert [{k: v for k, v in r.items() if k != "Seconds_per_case"} for r in par] == untimed
    for variant in ("global", "dual"):
        assert (_table(tmp_path / "par" / variant, columns=NOT_TIMES)
                == _table(tmp_path / "seq" / variant, columns=NOT_TIMES))
    monkeypatch.setattr(dcm.evaluate.parallel, "make_backend", lambda *a, **k: pytest.fail("a worker was started"))
    again = run_ablation(ablation, two, tmp_path / "par", random_init=True, progress=False, workers=2, resume=True)
    assert [{k: v for k, v in r.items() if k != "Seconds_per_case"} for r in again] == untimed


def test_a_predictor_workers_cannot_build_stops_the_run_in_one_line_and_keeps_finished_cases(
        cases_dir, sequential_box_fill, tmp_path, capsys):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(sequential_box_fill, out)
    first = sorted(cases_dir.glob("*.npz"))[0].name
    (out / "cases" / f"{first}.json").unlink()
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    capsys.readouterr()
    assert _run(cases_dir, out, "--predictor", "dcm", "--config", "dcm_reduced", "--weights", bad,
                "--workers", 2, "--resume") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("evaluate: ")]
    assert len(err) == 1 and str(bad) in err[0]
    kept = _table(out, columns=NOT_TIMES)
    assert kept == [r for r in _table(sequential_box_fill, columns=NOT_TIMES) if r["CaseName"] != first]
