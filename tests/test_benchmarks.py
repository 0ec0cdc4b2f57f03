"""The benchmark scripts run (tiny sizes) and write their CSVs; timings are never asserted here."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _run(script, *args):
    proc = subprocess.run([sys.executable, script, *args], cwd=BENCH, capture_output=True, text=True)
    return proc


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_bench_experts_small_rows(tmp_path):
    out = tmp_path / "experts.csv"
    proc = _run("bench_experts.py", "--rows", "small", "--shape", "32", "48", "48", "--repeats", "1",
                "--threads", "1", "--csv", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = _rows(out)
    assert [(r["expert"], r["model"]) for r in rows] == [("global", "sam_med3d_64_small"), ("local", "vista3d_small")]
    assert all(float(r["first_s"]) > 0 and float(r["further_s"]) > 0 and float(r["peak_mb"]) > 0 for r in rows)
    assert rows[1]["new_window_s"] != "-"


def test_bench_experts_paths_and_step(tmp_path):
    """--paths / --onednn select the precision rows; --step times a predict.sh click step per path."""
    out = tmp_path / "experts.csv"
    proc = _run("bench_experts.py", "--rows", "small", "--paths", "fp32", "bf16-cl", "--onednn", "off", "--step",
                "--shape", "24", "48", "48", "--repeats", "1", "--threads", "1", "--csv", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = _rows(out)
    assert [(r["expert"], r["precision"], r["channels_last"], r["onednn"]) for r in rows] == [
        ("global", "fp32", "False", "False"), ("global", "bf16", "True", "False"),
        ("local", "fp32", "False", "False"), ("local", "bf16", "True", "False")]
    assert "speed-up over fp32" not in proc.stdout  # no fp32 / oneDNN-on row to compare with
    steps = _rows(tmp_path / "experts_step.csv")
    assert [(r["config"], r["precision"]) for r in steps] == [("dcm_small", "fp32"), ("dcm_small", "bf16")]
    assert all(float(r["call_s"]) > 0 and float(r["predict_s"]) >= 0 for r in steps)


@pytest.mark.parametrize("mode", [[], ["--ops"], ["--ab-linear"]])
def test_profile_first_click_runs_on_the_small_model(mode):
    """The first-click profiler runs end to end (small model, small image); its timings are not checked."""
    path = ["--path", "bf16"] if mode == ["--ab-linear"] else ["--path", "fp32"]
    proc = _run("profile_first_click.py", "--model", "sam_med3d_64_small", "--shape", "24", "40", "40",
                "--repeats", "1", "--threads", "1", "--top", "5", *path, *mode)
    out = proc.stdout + proc.stderr
    if mode == ["--ab-linear"] and proc.returncode == 1:
        assert "no packed linear layers" in out
        pytest.skip("no oneDNN bf16 linear kernels on this CPU")
    assert proc.returncode == 0, out
    assert "sam_med3d_64_small on a (24, 40, 40) image" in out
    expected = {"--ops": "self CPU time per first click", "--ab-linear": "answers bit for bit equal: True"}
    assert (expected[mode[0]] if mode else "first click s:") in out


def test_bench_nsd_values_match(tmp_path):
    out = tmp_path / "nsd.csv"
    proc = _run("bench_nsd.py", "--shape", "24", "48", "48", "--radii", "6", "--repeats", "1", "--csv", str(out))
    assert proc.returncode in (0, 1), proc.stderr  # 1: the 5x target is for full-size volumes
    (row,) = _rows(out)
    assert float(row["abs_diff"]) == 0.0 and 0 < float(row["nsd_crop"]) <= 1


@pytest.mark.slow
def test_bench_protocol_tiny(tmp_path):
    out = tmp_path / "protocol.csv"
    proc = _run("bench_protocol.py", "--shape", "24", "48", "48", "--objects", "2", "--csv", str(out))
    assert proc.returncode in (0, 1), proc.stderr
    rows = _rows(out)
    assert [r["step"] for r in rows] == ["1", "2", "3", "4", "5", "6", "total"]
    assert all(float(r["imports_s"]) > 0 for r in rows[:6])


@pytest.mark.slow
def test_bench_training_tiny(tmp_path):
    out = tmp_path / "training.csv"
    proc = _run("bench_training.py", "--steps", "2", "--cases", "3", "--procs", "1", "2", "--csv", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = _rows(out)
    assert [(r["expert"], r["procs"]) for r in rows] == [("global", "1"), ("global", "2"),
                                                         ("local", "1"), ("local", "2")]


def test_bench_clicks_counts_kept_clicks_per_variant(tmp_path):
    from dcm.data.cases import atomic_savez
    from dcm.data.synthetic import generate_case

    cases = tmp_path / "cases"
    atomic_savez(cases / "CT_tiny.npz", **generate_case("CT", seed=5, shape=(16, 32, 32), n_objects=2))
    out = tmp_path / "clicks.csv"
    proc = _run("bench_clicks.py", "--cases", str(cases), "--config", "dcm_small", "--threads", "1", "--csv", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {r["variant"]: r for r in _rows(out)}
    assert set(rows) == {"rule off", "rule on"}
    assert int(rows["rule on"]["clicks"]) > 0 and rows["rule on"]["clicks_kept"] == rows["rule on"]["clicks"]
    # (on a tiny case the errors, hence the clicks, are thin shells at the border: the reference may keep none)
    assert 0 <= int(rows["rule off"]["kept_by_reference"]) <= int(rows["rule off"]["clicks"])
    assert "| rule on |" in proc.stdout


@pytest.mark.parametrize("points", [[], ["--points", "0", "2"]])
def test_probe_local_expert_tables(tmp_path, points):
    """The probe prints its per-object table, or with --points the oracle-point Dice per count over the cases."""
    from dcm.data.cases import atomic_savez
    from dcm.data.synthetic import generate_case

    cases = [tmp_path / f"CT_tiny_{i}.npz" for i in range(2)]
    for i, path in enumerate(cases):
        atomic_savez(path, **generate_case("CT", seed=5 + i, shape=(16, 32, 32), n_objects=2))
    proc = _run("probe_local_expert.py", "--case", *map(str, cases), *points)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if points:
        rows = [line for line in proc.stdout.splitlines() if line.startswith("| 0 |") or line.startswith("| 2 |")]
        assert len(rows) == 2 and all("| 4 |" in line for line in rows)  # 2 objects in each of the 2 cases
    else:
        assert "| voxels p > 0.5 |" in proc.stdout


def test_trace_click_steps_traces_every_object_step(tmp_path):
    """trace_click_steps wraps the engine's click rule as the predictor calls it (every setting passed on)."""
    from dcm.data.cases import atomic_savez
    from dcm.data.synthetic import generate_case

    cases = tmp_path / "cases"
    atomic_savez(cases / "CT_tiny.npz", **generate_case("CT", seed=5, shape=(16, 32, 32), n_objects=2))
    out = tmp_path / "steps.csv"
    proc = _run("trace_click_steps.py", "--cases", str(cases), "--csv", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = _rows(out)
    assert len(rows) == 2 * 5 and {r["step"] for r in rows} == {"1", "2", "3", "4", "5"}
    assert "prediction failed" not in proc.stdout + proc.stderr


def test_bench_point_head_tiny(tmp_path):
    out = tmp_path / "point_head.csv"
    proc = _run("bench_point_head.py", "--model", "vista3d_reduced", "--window", "32", "--repeats", "1",
                "--threads", "1", "--csv", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {r["component"]: r for r in _rows(out)}
    assert "cached mode bit-equal: True" in rows["point head call, measured"]["note"]
    assert float(rows["further click, LocalRoIExpert.predict"]["fast_s"]) > 0
    assert float(rows["image features: feat_downsample"]["fast_s"]) == 0.0  # once per window, not per click


def test_bench_real_runs_sharing_an_out_folder_get_their_own_case_links(tmp_path, monkeypatch):
    import json

    monkeypatch.syspath_prepend(str(BENCH))
    from bench_real import select_cases

    cases = tmp_path / "cases"
    cases.mkdir()
    split = {}
    for i, name in enumerate(["MR_a_val_000", "MR_a_val_001", "MR_a_test_000"]):
        (cases / f"{name}.npz").write_bytes(b"")
        split[name] = {"split": "val" if i < 2 else "test", "source_image": "a", "atlas": "b"}
    (cases / "splits.json").write_text(json.dumps({"cases": split}))
    out = tmp_path / "out"
    out.mkdir()
    first, datasets = select_cases(cases, "val", out, None)
    second, _ = select_cases(cases, "val", out, None)
    assert first != second and datasets == {"MR_a_val_000": "a/b", "MR_a_val_001": "a/b"}
    for folder in (first, second):
        assert sorted(p.name for p in folder.iterdir()) == ["MR_a_val_000.npz", "MR_a_val_001.npz"]
        assert all(p.resolve().parent == cases.resolve() for p in folder.iterdir())
    assert select_cases(cases, None, out, None)[0] == cases  # the whole folder: used as it is
