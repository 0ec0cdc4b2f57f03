"""predict.sh start-up: the lean MONAI import changes nothing but the time it takes."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from dcm.data.cases import atomic_savez
from dcm.data.synthetic import generate_case

REPO = Path(__file__).resolve().parent.parent

_PROBE = """
import sys
from dcm.startup import import_monai_networks
import_monai_networks(lean=True)
skipped = [m for m in ("matplotlib", "scipy", "PIL", "pandas", "nibabel") if m in sys.modules]
import scipy.ndimage, nibabel  # still importable afterwards, for everything else
from dcm.models.vista3d import build_vista3d, load_vista3d_config
import torch
model = build_vista3d(load_vista3d_config("vista3d_reduced")).eval()
with torch.inference_mode():
    emb, _ = model.image_encoder(torch.zeros(1, 1, 16, 16, 16), with_point=True, with_label=False)
print("skipped-imported:", skipped, "embedding:", tuple(emb.shape))
"""


def test_lean_import_skips_optional_packages_and_keeps_them_importable():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "skipped-imported: []" in out.stdout


def test_predict_output_is_the_same_with_and_without_lean_imports(tmp_path):
    inputs = tmp_path / "inputs"
    atomic_savez(inputs / "CT_lean_0.npz", **{k: v for k, v in generate_case(
        "CT", seed=3, shape=(16, 32, 32), max_objects=2, with_tube=False).items() if k != "gts"})
    segs = {}
    for lean in ("1", "0"):
        out = tmp_path / f"out{lean}"
        env = dict(os.environ, DCM_LEAN_IMPORTS=lean, PYTHONPATH=str(REPO))
        proc = subprocess.run(["sh", str(REPO / "predict.sh"), "--inputs", str(inputs), "--outputs", str(out),
                               "--config", "configs/dcm_reduced.yaml", "--random-init", "--timings"],
                              capture_output=True, text=True, env=env, cwd=REPO)
        assert proc.returncode == 0, proc.stderr
        assert "timing start-up: imports" in proc.stderr and "timing CT_lean_0.npz: read" in proc.stderr
        segs[lean] = np.load(out / "CT_lean_0.npz")["segs"]
    np.testing.assert_array_equal(segs["1"], segs["0"])
