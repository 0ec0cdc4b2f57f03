"""Synthetic challenge-format cases: determinism, per-flavour properties, the box rule, the CLI."""

import subprocess
import sys

import numpy as np
import pytest

from dcm.data.cases import atomic_savez, load_case
from dcm.data.synthetic import (
    DEFAULT_SHAPE,
    FLAVOURS,
    MIN_OBJECT_VOXELS,
    canonical_flavour,
    generate_case,
    generate_dataset,
    main,
)
from dcm.protocol import boxes_from_labels

SMALL = (16, 32, 32)


def _boxes(arrays):
    return [dict(b) for b in arrays["boxes"]]


def _n_components(mask):
    import cc3d

    return cc3d.connected_components(mask.astype(np.uint8), connectivity=26, return_N=True)[1]


def test_same_seed_same_bytes_other_seed_differs():
    a = generate_case("CT", 7)
    b = generate_case("CT", 7)
    c = generate_case("CT", 8)
    assert a.keys() == b.keys()
    for k in ("imgs", "gts", "spacing"):
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes()
    assert _boxes(a) == _boxes(b)
    assert a["imgs"].tobytes() != c["imgs"].tobytes()


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_flavour_properties(flavour, tmp_path):
    for seed in (0, 1):
        arrays = generate_case(flavour, seed, with_tube=False)
        imgs, gts, spacing = arrays["imgs"], arrays["gts"], arrays["spacing"]
        assert imgs.shape == gts.shape == DEFAULT_SHAPE
        assert imgs.dtype == np.uint8 and gts.dtype == np.uint8
        assert spacing.dtype == np.float64 and spacing.shape == (3,)
        assert spacing[0] == spacing[1]  # (x, y, z): the in-plane pair comes first
        n = int(gts.max())
        assert n >= 1
        np.testing.assert_array_equal(np.unique(gts), np.arange(n + 1))  # sequential labels
        sizes = np.bincount(gts.ravel())[1:]
        assert sizes.min() >= MIN_OBJECT_VOXELS
        for label in range(1, n + 1):
            assert _n_components(gts == label) == 1
        if flavour == "Microscopy":
            assert "boxes" not in arrays
        else:
            assert _boxes(arrays) == boxes_from_labels(gts, seed=2025)

        path = atomic_savez(tmp_path / f"{flavour}_synthetic_{seed:04d}.npz", **arrays)
        case = load_case(path)
        assert case.modality == flavour
        assert case.spacing_xyz == tuple(spacing)
        np.testing.assert_array_equal(case.gts, gts)
        assert case.num_objects == (0 if flavour == "Microscopy" else n)
        if flavour != "Microscopy":
            assert [o.box.to_dict() for o in case.objects] == boxes_from_labels(gts)


def test_spacing_per_flavour():
    for seed in range(3):
        ct = generate_case("CT", seed, shape=SMALL)["spacing"]
        assert ct[2] >= 2.5 * ct[0]  # thick slices
        pet = generate_case("PET", seed, shape=SMALL)["spacing"]
        assert min(pet) >= 2.0
        mic = generate_case("Microscopy", seed, shape=SMALL)["spacing"]
        assert 1.0 <= mic[2] / mic[0] <= 2.0
        us = generate_case("US", seed, shape=SMALL)["spacing"]
        assert us[0] == us[1] == us[2]


@pytest.mark.parametrize("flavour", ["CT", "MR"])
def test_tube_makes_the_case_boxless(flavour):
    arrays = generate_case(flavour, 3, shape=(32, 64, 64), n_objects=3, with_tube=True)
    assert "boxes" not in arrays
    gts = arrays["gts"]
    tube = gts == gts.max()  # the tube is the last object
    zs, ys, xs = np.nonzero(tube)
    span = max((np.ptp(v) + 1) / n for v, n in zip((zs, ys, xs), gts.shape))
    assert span >= 0.5  # long ...
    assert tube.sum() < 0.02 * tube.size  # ... and thin


def test_ct_organs_touch():
    touching = 0
    for seed in range(3):
        gts = generate_case("CT", seed, with_tube=False)["gts"]
        a, b = gts[:, :, 1:], gts[:, :, :-1]
        touching += int(np.any((a != b) & (a != 0) & (b != 0)))
    assert touching >= 2


def test_microscopy_many_instances_and_object_limits():
    gts = generate_case("Microscopy", 0, n_objects=25)["gts"]
    assert gts.max() >= 20
    for seed in range(3):
        assert 1 <= generate_case("Microscopy", seed, shape=SMALL, max_objects=4)["gts"].max() <= 4
        assert generate_case("US", seed, shape=SMALL)["gts"].max() <= 2


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown flavour"):
        generate_case("XR", 0)
    with pytest.raises(ValueError, match="shape"):
        generate_case("CT", 0, shape=(4, 32, 32))
    assert canonical_flavour("mri") == "MR" and canonical_flavour("microscopy") == "Microscopy"


def test_generate_dataset_is_deterministic(tmp_path):
    a = generate_dataset(tmp_path / "a", 5, seed=3, shape=SMALL, progress=False)
    b = generate_dataset(tmp_path / "b", 5, seed=3, shape=SMALL, progress=False)
    assert [p.name for p in a] == [f"{f}_synthetic_{i:04d}.npz" for i, f in enumerate(FLAVOURS)]
    for pa, pb in zip(a, b):
        ca, cb = load_case(pa), load_case(pb)
        assert ca.image.tobytes() == cb.image.tobytes() and ca.gts.tobytes() == cb.gts.tobytes()
    assert not list((tmp_path / "a").glob(".*"))  # no temporary files left


def test_cli_writes_n_files(tmp_path):
    assert main(["--out", str(tmp_path / "x"), "--cases", "3", "--seed", "1", "--shape", "12", "24", "24",
                 "--flavours", "ct,Microscopy", "--no-progress"]) == 0
    names = sorted(p.name for p in (tmp_path / "x").glob("*.npz"))
    assert names == ["CT_synthetic_0000.npz", "CT_synthetic_0002.npz", "Microscopy_synthetic_0001.npz"]
    assert main(["--out", str(tmp_path / "y"), "--flavours", "XR"]) == 2

    out = tmp_path / "m"
    subprocess.run([sys.executable, "-m", "dcm.data.synthetic", "--out", str(out), "--cases", "2", "--shape",
                    "8", "16", "16", "--max-objects", "2", "--no-progress"], check=True, capture_output=True)
    files = sorted(out.glob("*.npz"))
    assert len(files) == 2
    assert all(load_case(f).gts.max() <= 2 for f in files)


# ---------------------------------------------------------------------------------------- rich variety


def test_rich_is_deterministic_and_basic_is_the_default():
    a = generate_case("CT", 5, variety="rich")
    b = generate_case("CT", 5, variety="rich")
    for k in ("imgs", "gts", "spacing"):
        assert a[k].tobytes() == b[k].tobytes()
    basic, default = generate_case("MR", 5, variety="basic"), generate_case("MR", 5)
    assert all(basic[k].tobytes() == default[k].tobytes() for k in ("imgs", "gts", "spacing"))
    assert a["imgs"].tobytes() != generate_case("CT", 5)["imgs"].tobytes()
    with pytest.raises(ValueError, match="unknown variety"):
        generate_case("CT", 0, variety="fancy")


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_rich_cases_valid(flavour, tmp_path):
    for seed in range(4):
        arrays = generate_case(flavour, seed, variety="rich")
        gts = arrays["gts"]
        n = int(gts.max())
        assert n >= 1 and arrays["imgs"].dtype == np.uint8 and arrays["imgs"].shape == DEFAULT_SHAPE
        np.testing.assert_array_equal(np.unique(gts), np.arange(n + 1))  # sequential labels
        assert np.bincount(gts.ravel())[1:].min() >= MIN_OBJECT_VOXELS
        for label in range(1, n + 1):
            assert _n_components(gts == label) == 1
        if "boxes" in arrays:
            assert _boxes(arrays) == boxes_from_labels(gts, seed=2025)
        path = atomic_savez(tmp_path / f"{flavour}_rich_{seed}.npz", **arrays)
        assert load_case(path, strict=True).gts.max() == n


def test_rich_kinds_all_appear_and_trees_have_no_boxes():
    from dcm.data.synthetic import FLAVOUR_SPECS, RICH_KINDS, _rich_layout

    seen = set()
    for flavour in ("CT", "MR"):
        for seed in range(8):
            rng = np.random.default_rng(seed)
            layout = _rich_layout(rng, flavour, FLAVOUR_SPECS[flavour], DEFAULT_SHAPE, 6, tree=seed % 2 == 0)
            seen.update(layout.kinds)
            assert len(layout.kinds) == 6 and layout.labels.max() <= 6
            for patch, label in layout.tissue_of.items():  # an unlabelled patch touches its object
                grown = ndimage_dilate(layout.labels == label)
                assert np.any(grown & (layout.tissue == patch))
    assert seen == set(RICH_KINDS)
    arrays = generate_case("CT", 3, n_objects=4, with_tube=True, variety="rich")
    assert "boxes" not in arrays  # a vessel tree, like the challenge's vessel cases


def ndimage_dilate(mask):
    from scipy import ndimage

    return ndimage.binary_dilation(mask, structure=np.ones((3, 3, 3), dtype=bool))


def test_rich_sizes_span_tiny_to_most_of_the_volume():
    sizes = []
    for flavour in ("CT", "MR", "PET"):
        for seed in range(8):
            gts = generate_case(flavour, seed, variety="rich")["gts"]
            sizes += np.bincount(gts.ravel())[1:].tolist()
    volume = int(np.prod(DEFAULT_SHAPE))
    assert min(sizes) < 40  # a few voxels
    assert max(sizes) > 0.25 * volume  # a large part of the volume


def test_rich_look_low_contrast_imitating_tissue_and_blurred_edges():
    from dcm.data.synthetic import _Look, _look_image

    labels = np.zeros((8, 16, 16), dtype=np.uint8)
    labels[2:6, 4:12, 4:8] = 1
    labels[3:5, 6:9, 5:7] = 2  # a lesion in object 1
    labels[2:6, 4:12, 8:12] = 3  # tissue touching object 1
    mean = np.array([20.0, 150.0, 60.0, 90.0])
    image = _look_image(np.random.default_rng(0), labels, mean, _Look({2: 1}, {3: 1}, 0.8))
    assert 5 <= abs(mean[2] - mean[1]) <= 14 and abs(mean[3] - mean[1]) <= 4
    assert 20 < image[4, 8, 0:4].max() < 150 or image[4, 8, 3] > 20  # partial volume at the edge
    assert len(np.unique(image)) > 4


def test_cli_rich(tmp_path):
    assert main(["--out", str(tmp_path), "--cases", "2", "--shape", "12", "24", "24", "--variety", "rich",
                 "--no-progress"]) == 0
    assert len(list(tmp_path.glob("*.npz"))) == 2
