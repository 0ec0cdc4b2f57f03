"""The one-command demo (``python -m dcm.demo``) on a tiny setting with the bundled weights."""

import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = REPO_ROOT / "weights" / "dcm_small.pt"


@pytest.mark.skipif(not WEIGHTS.is_file(), reason="weights/dcm_small.pt (bundled demo weights) is absent")
def test_demo_tiny_run_writes_tables_and_figure(tmp_path, capsys):
    from dcm.demo import main

    figure = tmp_path / "demo.png"
    start = time.perf_counter()
    rc = main(["--out", str(tmp_path / "demo"), "--cases", "1", "--flavours", "PET", "--no-mri",
               "--shape", "32", "48", "48", "--figure", str(figure), "--no-progress"])
    seconds = time.perf_counter() - start
    out = capsys.readouterr().out
    assert rc == 0
    for policy in ("dual", "global_only", "local_only"):
        assert f"### {policy}" in out
        assert (tmp_path / "demo" / policy / "metrics.csv").is_file()
    assert "| Modality | Cases | DSC_AUC | NSD_AUC | DSC_Final | NSD_Final |" in out
    assert "| PET | 1 |" in out
    assert "### comparison" in out and "| dual | 1 |" in out
    assert (tmp_path / "demo" / "comparison.md").is_file()
    assert figure.is_file() and figure.stat().st_size > 10_000
    assert seconds < 120  # ~15 s on an idle 2-core CPU; generous for shared CI machines


def test_demo_mri_case_is_skipped_with_one_line_without_nilearn(tmp_path, capsys, monkeypatch):
    import dcm.cli.demo as demo  # the defining module: monkeypatching the dcm.demo shim would not reach make_cases

    monkeypatch.setattr(demo, "find_mni_files", lambda: None)
    paths = demo.make_cases(tmp_path, 1, 1, (16, 32, 32), ["CT"], mri=True)
    out = capsys.readouterr().out
    assert len(paths) == 1 and paths[0].name.startswith("CT_")
    assert out.count("\n") == 1 and "MRI case skipped: nilearn is not installed" in out


def test_demo_cases_only_writes_the_cases_and_stops(tmp_path, capsys):
    """--cases-only: the same cases as a full run with those settings (a synthetic validation set), no run."""
    import dcm.cli.demo as demo
    import numpy as np

    rc = demo.main(["--out", str(tmp_path / "val"), "--cases", "1", "--seed", "7", "--flavours", "CT,US",
                    "--no-mri", "--shape", "16", "32", "32", "--cases-only", "--no-progress"])
    assert rc == 0
    written = sorted((tmp_path / "val" / "cases").glob("*.npz"))
    assert len(written) == 2 and not (tmp_path / "val" / "dual").exists()
    assert "2 demo cases in" in capsys.readouterr().out
    assert demo.main(["--out", str(tmp_path / "other"), "--cases", "1", "--flavours", "CT", "--no-mri",
                      "--shape", "16", "32", "32", "--cases-only", "--no-progress", "--policies", "dual",
                      "engine.fusion=average"]) == 0
    assert "--policies, config overrides had no effect" in capsys.readouterr().out
    again = demo.make_cases(tmp_path / "again", 1, 7, (16, 32, 32), ["CT", "US"], mri=False)
    for a, b in zip(written, sorted(again)):
        with np.load(a) as x, np.load(b) as y:
            assert np.array_equal(x["imgs"], y["imgs"]) and np.array_equal(x["gts"], y["gts"])
