"""Real cases from packaged templates (dcm.data.realsets): format, labels, boxes, splits, determinism."""

import json

import numpy as np
import pytest

from dcm.data import load_case
from dcm.data import realsets
from dcm.demo import find_mni_files
from dcm.protocol import boxes_from_labels

needs_nilearn = pytest.mark.skipif(find_mni_files() is None, reason="nilearn is not installed (requirements.txt)")
needs_mricron = pytest.mark.skipif(realsets.find_mricron_dir() is None,
                                   reason="Debian mricron-data is not installed (apt-get install mricron-data)")


def _check_case_files(out_dir, summary):
    """Every case: valid challenge file, MR_ name, sequential labels, organisers' boxes, voxel counts recorded."""
    assert summary["cases"], "no cases written"
    for name, meta in summary["cases"].items():
        case = load_case(out_dir / f"{name}.npz", strict=True)
        assert name.startswith("MR_") and case.modality == "MR"
        assert case.image.dtype == np.uint8 and case.image.shape == tuple(meta["shape_zyx"])
        assert max(case.image.shape) <= realsets.MAX_SIDE
        assert case.spacing_xyz == tuple(meta["spacing_xyz"])
        n = len(meta["objects"])
        assert 2 <= n <= max(realsets.OBJECTS_CYCLE) or meta["atlas"] == "tissue"
        np.testing.assert_array_equal(np.unique(case.gts), np.arange(n + 1))
        assert [o.box.to_dict() for o in case.objects] == boxes_from_labels(case.gts)
        counts = np.bincount(case.gts.ravel(), minlength=n + 1)[1:]
        assert counts.tolist() == [o["voxels"] for o in meta["objects"]]
        assert counts.min() >= realsets.MIN_REGION_VOXELS
        assert case.image[case.gts > 0].max() > 0  # objects lie on the image, not on its zero background


@pytest.fixture(scope="module")
def nilearn_only_build(tmp_path_factory):
    """The MNI152 grey / white matter cases alone (what a machine without mricron-data can build)."""
    if find_mni_files() is None:
        pytest.skip("nilearn is not installed (requirements.txt)")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(realsets, "find_mricron_dir", lambda: None)
        out = tmp_path_factory.mktemp("realsets_nilearn")
        summary = realsets.build_realsets(out, sources=("mni152",), progress=False)
        again = tmp_path_factory.mktemp("realsets_nilearn_again")
        realsets.build_realsets(again, sources=("mni152",), progress=False)
    return out, again, summary


@needs_nilearn
def test_nilearn_tissue_cases_valid_and_deterministic(nilearn_only_build):
    out, again, summary = nilearn_only_build
    _check_case_files(out, summary)
    assert summary["counts"] == {"train": 1, "val": 2, "test": 0}  # middle zone; anterior and posterior zones
    assert set(summary["atlases"]) == {"tissue"}
    for name, meta in summary["cases"].items():
        assert meta["atlas"] == "tissue" and meta["source_image"] == "mni152"
        zones = {o["zone"] for o in meta["objects"]}
        assert zones == ({"middle"} if meta["split"] == "train" else zones & {"anterior", "posterior"})
        assert len(zones) == 1
        with np.load(out / f"{name}.npz", allow_pickle=True) as a, np.load(again / f"{name}.npz",
                                                                            allow_pickle=True) as b:
            for key in ("imgs", "gts", "spacing"):
                assert a[key].tobytes() == b[key].tobytes()
    assert json.loads((out / "splits.json").read_text())["cases"] == summary["cases"]


def test_missing_packages_one_line_exit_2(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(realsets, "find_mni_files", lambda: None)
    assert realsets.main(["--out", str(tmp_path), "--sources", "mni152", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pip install nilearn==0.14.1" in err
    monkeypatch.setattr(realsets, "find_mricron_dir", lambda: None)
    assert realsets.main(["--out", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "apt-get install mricron-data" in err
    assert not list(tmp_path.glob("*.npz"))


def test_aal_is_never_read(tmp_path):
    with pytest.raises(ValueError, match="held out"):
        realsets._read_zyx(tmp_path / "aal.nii.gz")


@pytest.fixture(scope="module")
def full_plan():
    if realsets.find_mricron_dir() is None or find_mni_files() is None:
        pytest.skip("needs nilearn and Debian mricron-data (apt-get install mricron-data)")
    return realsets.plan_cases()


@needs_mricron
@needs_nilearn
def test_split_rule_disjoint(full_plan):
    plans, grids, report = full_plan
    splits_of_region = {}
    for plan in plans:
        for part in plan.parts:
            splits_of_region.setdefault(part.region_key, set()).add(plan.split)
        if plan.grid_key.startswith("colin27"):
            assert plan.split == "test"  # Colin27: test only
        else:
            assert plan.grid_key in ("mni152", "inia19")
    crossing = {k: v for k, v in splits_of_region.items() if len(v) > 1}
    assert not crossing, f"regions in two splits: {sorted(crossing)[:5]}"
    assert not any("aal" in str(g.image_file).lower() for g in grids.values())
    assert not any("aal" in str(r["file"]).lower() for r in report.values())
    counts = {s: sum(p.split == s for p in plans) for s in realsets.SPLITS}
    assert counts["train"] >= 40 and counts["val"] >= 8 and counts["test"] >= 8
    # Small and elongated objects are there.
    voxels = np.array([part.voxels for p in plans for part in p.parts])
    assert (voxels < 1000).sum() >= 50 and voxels.max() > 20000
    extents = np.array([[hi - lo + 1 for lo, hi in part.bounds] for p in plans for part in p.parts])
    assert (extents.max(axis=1) >= 6 * extents.min(axis=1)).sum() >= 10


@needs_mricron
@needs_nilearn
def test_mni_training_and_validation_voxels_barely_overlap(full_plan):
    """Different atlases on one template: validation objects lie (>= ZONE_MAJORITY) outside training's zone."""
    plans, grids, _ = full_plan
    grid = grids["mni152"]
    labelled = {s: np.zeros(grid.image.shape, dtype=bool) for s in ("train", "val")}
    for plan in plans:
        if plan.grid_key != "mni152" or plan.atlas == "tissue":
            continue
        sl = tuple(slice(a, b) for a, b in plan.crop)
        labels, left = grid.label_maps[plan.atlas][sl], grid.left[sl]
        for part in plan.parts:
            labelled[plan.split][sl] |= (labels == part.atlas_id) & (left if part.hemisphere == "left" else ~left)
    overlap = np.count_nonzero(labelled["train"] & labelled["val"]) / np.count_nonzero(labelled["val"])
    assert overlap < 1 - realsets.ZONE_MAJORITY


@needs_mricron
@needs_nilearn
def test_build_small_set_all_sources(tmp_path, full_plan):
    summary = realsets.build_realsets(tmp_path, max_cases_per_split=2, progress=False)
    _check_case_files(tmp_path, summary)
    assert summary["counts"] == {"train": 2, "val": 2, "test": 2}
    for meta in summary["cases"].values():
        assert summary["atlases"][meta["atlas"]]["used"]
        assert meta["atlas_terms"]
    # Deterministic: the same plan again.
    again, _, _ = realsets.plan_cases()
    assert [(p.name, p.crop, p.parts) for p in again] == [(p.name, p.crop, p.parts) for p in full_plan[0]]
    assert realsets.main(["--out", str(tmp_path / "val"), "--splits", "val", "--max-cases-per-split", "1",
                          "--no-progress"]) == 0
    written = json.loads((tmp_path / "val" / "splits.json").read_text())
    assert written["counts"] == {"val": 1} and len(list((tmp_path / "val").glob("MR_*.npz"))) == 1


def test_split_cases_reads_the_folder_index(tmp_path):
    import json

    import pytest

    from dcm.data.realsets import split_cases

    for name in ("MR_a_val_001", "MR_a_val_000", "MR_a_test_000"):
        (tmp_path / f"{name}.npz").write_bytes(b"")
    assert [p.name for p in split_cases(tmp_path)[0]] == ["MR_a_test_000.npz", "MR_a_val_000.npz", "MR_a_val_001.npz"]
    with pytest.raises(FileNotFoundError, match="no splits.json for --split val"):
        split_cases(tmp_path, "val")
    index = {"MR_a_val_000": {"split": "val"}, "MR_a_val_001": {"split": "val"}, "MR_a_test_000": {"split": "test"}}
    (tmp_path / "splits.json").write_text(json.dumps({"cases": index}))
    files, info = split_cases(tmp_path, "val")
    assert [p.name for p in files] == ["MR_a_val_000.npz", "MR_a_val_001.npz"] and info == index
