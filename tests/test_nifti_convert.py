"""NIfTI I/O (geometry kept exactly, atomic writes, clear errors) and the NIfTI / nnU-Net -> challenge converter."""

import json
import math
import os

import numpy as np
import pytest
import SimpleITK as sitk

from dcm.data.cases import load_case
from dcm.data.convert import (
    convert_nnunet,
    convert_pair,
    main,
    modality_prefix,
    percentile_to_uint8,
    relabel_sequential,
    window_to_uint8,
)
from dcm.data.nifti import Geometry, read_nifti, write_nifti
from dcm.errors import CaseError
from dcm.protocol import boxes_from_labels

SHAPE = (6, 10, 12)  # (z, y, x)
# float32-exact values, as NIfTI stores them
GEOM = Geometry(spacing_xyz=(0.75, 0.8125, 2.5), origin=(-100.5, 20.25, 3.0),
                direction=(-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))


def _ct_pair():
    """A CT-like image (HU) and a label map with non-sequential labels 2 and 5."""
    image = np.full(SHAPE, -1000, dtype=np.int16)
    image[:, 1:9, 1:11] = 40
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[1:4, 2:5, 2:6] = 2
    labels[2:6, 5:9, 6:11] = 5
    image[labels == 5] = 240
    return image, labels


# ---------------------------------------------------------------------------------------------- NIfTI


def test_round_trip_keeps_geometry_exactly(tmp_path):
    array = np.random.default_rng(0).integers(-1000, 2000, size=SHAPE).astype(np.int16)
    path = write_nifti(tmp_path / "img.nii.gz", array, GEOM)
    img = sitk.ReadImage(str(path))
    assert img.GetSize() == SHAPE[::-1]
    assert img.GetSpacing() == GEOM.spacing_xyz
    assert img.GetOrigin() == GEOM.origin
    assert img.GetDirection() == GEOM.direction
    back, geom = read_nifti(path)
    assert back.dtype == np.int16
    np.testing.assert_array_equal(back, array)
    assert geom == GEOM and geom.spacing_zyx == (2.5, 0.8125, 0.75)
    assert [p.name for p in tmp_path.iterdir()] == ["img.nii.gz"]  # no temporary file left
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_read_write_read_is_stable_for_arbitrary_geometry(tmp_path):
    t = 0.3
    rot = (math.cos(t), -math.sin(t), 0.0, math.sin(t), math.cos(t), 0.0, 0.0, 0.0, 1.0)
    g0 = Geometry((0.7, 0.9123456789, 3.3), (-12.3456789, 1.1, 2.2), rot)
    first = write_nifti(tmp_path / "a.nii.gz", np.zeros(SHAPE, dtype=bool), g0)
    arr1, g1 = read_nifti(first)
    assert arr1.dtype == np.uint8
    assert g1.matches(g0)  # float32 storage: close, not equal
    arr2, g2 = read_nifti(write_nifti(tmp_path / "b.nii.gz", arr1, g1))
    assert g2 == g1  # from then on exact


def test_read_errors(tmp_path):
    with pytest.raises(CaseError, match="no such file"):
        read_nifti(tmp_path / "missing.nii.gz")
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not an image")
    with pytest.raises(CaseError, match="bad.nii.gz.*not a readable image"):
        read_nifti(bad)
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((5, 6), np.uint8)), str(tmp_path / "2d.nii.gz"))
    with pytest.raises(CaseError, match="2D image"):
        read_nifti(tmp_path / "2d.nii.gz")
    four_d = sitk.GetImageFromArray(np.zeros((2, 3, 4, 5), np.uint8), isVector=False)
    sitk.WriteImage(four_d, str(tmp_path / "4d.nii.gz"))
    with pytest.raises(CaseError, match="4D image"):
        read_nifti(tmp_path / "4d.nii.gz")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4, 5, 3), np.uint8), isVector=True),
                    str(tmp_path / "rgb.nii.gz"))
    with pytest.raises(CaseError, match="3 components"):
        read_nifti(tmp_path / "rgb.nii.gz")
    # a 4D file holding one volume is squeezed to 3D (MetaImage keeps the 4th dimension, NIfTI drops it)
    for name in ("4d1.nii.gz", "4d1.mha"):
        one = sitk.GetImageFromArray(np.ones((1, 3, 4, 5), np.uint8), isVector=False)
        one.SetSpacing((0.5, 0.75, 2.0, 1.0))
        sitk.WriteImage(one, str(tmp_path / name))
        array, geom = read_nifti(tmp_path / name)
        assert array.shape == (3, 4, 5) and geom.spacing_xyz == (0.5, 0.75, 2.0)
    with pytest.raises(ValueError, match="3D"):
        write_nifti(tmp_path / "x.nii.gz", np.zeros((3, 4)))


# ------------------------------------------------------------------------------------------ intensities


def test_intensity_mappings_and_relabelling():
    hu = np.array([-1000, -160, 40, 240, 3000], dtype=np.int16).reshape(1, 1, 5)
    np.testing.assert_array_equal(window_to_uint8(hu), [[[0, 0, 127, 255, 255]]])
    mr = np.concatenate([np.zeros(100), np.linspace(1, 1000, 1000)]).reshape(1, 10, 110)
    out = percentile_to_uint8(mr)
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255
    assert np.count_nonzero(out == 255) == pytest.approx(5, abs=1)  # top 0.5 % of the positive voxels
    assert percentile_to_uint8(np.full((2, 2, 2), 7.0)).max() == 0

    relabelled, source = relabel_sequential(np.array([0, 5, 2, 5, 9], dtype=np.int32))
    np.testing.assert_array_equal(relabelled, [0, 2, 1, 2, 3])
    assert relabelled.dtype == np.uint8 and source == [2, 5, 9]
    with pytest.raises(CaseError, match="integer"):
        relabel_sequential(np.array([0.0, 1.5]))
    with pytest.raises(CaseError, match="at most 255"):
        relabel_sequential(np.arange(300, dtype=np.uint16))
    assert [modality_prefix(c) for c in ("CT", "MRI", "T2", "t1w", "PET", "US", "microscopy", "XR")] == [
        "CT", "MR", "MR", "MR", "PET", "US", "Microscopy", None]


# ---------------------------------------------------------------------------------------------- pairs


def test_convert_pair(tmp_path):
    image, labels = _ct_pair()
    write_nifti(tmp_path / "img.nii.gz", image, GEOM)
    write_nifti(tmp_path / "seg.nii.gz", labels, GEOM)
    out = convert_pair(tmp_path / "img.nii.gz", tmp_path / "seg.nii.gz", tmp_path / "out", name="CT_tiny",
                       save_meta=True)
    assert out.name == "CT_tiny.npz"
    case = load_case(out)
    assert case.modality == "CT" and case.spacing_xyz == GEOM.spacing_xyz
    assert case.image.dtype == np.uint8 and case.image.shape == SHAPE
    assert case.image[0, 0, 0] == 0 and case.image[0, 1, 1] == 127  # soft-tissue window: -1000 and 40 HU
    np.testing.assert_array_equal(case.gts, np.searchsorted([0, 2, 5], labels))
    assert [o.box.to_dict() for o in case.objects] == boxes_from_labels(case.gts, seed=2025)
    meta = json.loads((tmp_path / "out" / "CT_tiny.json").read_text())
    assert [m["source_value"] for m in meta["labels"]] == [2, 5]

    # CLI: explicit window, no boxes, name from the modality prefix
    assert main(["--image", str(tmp_path / "img.nii.gz"), "--label", str(tmp_path / "seg.nii.gz"),
                 "--out", str(tmp_path / "cli"), "--modality-prefix", "CT", "--window", "140", "200",
                 "--no-boxes"]) == 0
    with np.load(tmp_path / "cli" / "CT_img.npz", allow_pickle=True) as z:
        assert "boxes" not in z.files
        assert z["imgs"][0, 1, 1] == 0 and z["imgs"][2, 6, 7] == 255  # 40 HU and 240 HU in window 40..240

    # non-CT prefix: percentile scaling
    out = convert_pair(tmp_path / "img.nii.gz", tmp_path / "seg.nii.gz", tmp_path / "out", name="MR_tiny")
    assert load_case(out).image.max() == 255


def test_grid_mismatch_names_both_files(tmp_path):
    image, labels = _ct_pair()
    write_nifti(tmp_path / "img.nii.gz", image, GEOM)
    write_nifti(tmp_path / "small.nii.gz", labels[:-1], GEOM)
    other = Geometry((1.0, 1.0, 2.5), GEOM.origin, GEOM.direction)
    write_nifti(tmp_path / "spacing.nii.gz", labels, other)
    for bad in ("small.nii.gz", "spacing.nii.gz"):
        with pytest.raises(CaseError) as err:
            convert_pair(tmp_path / "img.nii.gz", tmp_path / bad, tmp_path / "out", name="CT_x")
        assert bad in str(err.value) and "img.nii.gz" in str(err.value) and "grid" in str(err.value)
    assert main(["--image", str(tmp_path / "img.nii.gz"), "--label", str(tmp_path / "small.nii.gz"),
                 "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


# -------------------------------------------------------------------------------------------- nnU-Net


def _nnunet_dataset(root, channel="T2", n=2):
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": channel},
        "labels": {"background": 0, "gland": 1, "lesion": 2},
        "numTraining": n,
        "file_ending": ".nii.gz",
    }))
    rng = np.random.default_rng(1)
    for i in range(n):
        image = rng.uniform(0, 500, size=SHAPE).astype(np.float32)
        labels = np.zeros(SHAPE, dtype=np.uint8)
        labels[1:5, 2:8, 2:9] = 1
        labels[2:4, 3:6, 3:6] = 2 if i == 0 else 0  # second case lacks label 2
        write_nifti(root / "imagesTr" / f"pro_{i:03d}_0000.nii.gz", image, GEOM)
        write_nifti(root / "labelsTr" / f"pro_{i:03d}.nii.gz", labels, GEOM)


def test_convert_nnunet(tmp_path):
    root = tmp_path / "Dataset001_Prostate"
    _nnunet_dataset(root)
    paths = convert_nnunet(root, tmp_path / "out", save_meta=True, progress=False)
    assert [p.name for p in paths] == ["MR_pro_000.npz", "MR_pro_001.npz"]
    for p in paths:
        case = load_case(p)
        assert case.modality == "MR" and case.spacing_xyz == GEOM.spacing_xyz
        assert [o.box.to_dict() for o in case.objects] == boxes_from_labels(case.gts, seed=2025)
    assert load_case(paths[0]).gts.max() == 2 and load_case(paths[1]).gts.max() == 1
    meta = json.loads((tmp_path / "out" / "MR_pro_000.json").read_text())
    assert [(m["source_value"], m["name"]) for m in meta["labels"]] == [(1, "gland"), (2, "lesion")]

    # the explicit prefix wins over the channel name
    assert main(["--nnunet", str(root), "--out", str(tmp_path / "us"), "--modality-prefix", "US",
                 "--no-progress"]) == 0
    assert sorted(p.name for p in (tmp_path / "us").glob("*.npz")) == ["US_pro_000.npz", "US_pro_001.npz"]


def test_nnunet_errors(tmp_path):
    root = tmp_path / "Dataset002_X"
    _nnunet_dataset(root, channel="XR")
    with pytest.raises(CaseError, match="modality-prefix"):
        convert_nnunet(root, tmp_path / "out", progress=False)
    (root / "imagesTr" / "pro_001_0000.nii.gz").unlink()
    with pytest.raises(CaseError, match="pro_001_0000.nii.gz.*no such file"):
        convert_nnunet(root, tmp_path / "out", modality="MR", progress=False)
    kept = convert_nnunet(root, tmp_path / "out", modality="MR", keep_going=True, progress=False)
    assert [p.name for p in kept] == ["MR_pro_000.npz"]
    with pytest.raises(CaseError, match="dataset.json"):
        convert_nnunet(tmp_path, tmp_path / "out", progress=False)
