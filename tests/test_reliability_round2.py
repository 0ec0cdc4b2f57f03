"""Reliability, round 2 (issue 16): crafted pickles, data loss, silent wrong results, tracebacks.

* Crafted pickles in case files (every object key) and checkpoints are refused with one line and never crash
  the reader (it runs in a subprocess, so a segfault fails the test instead of killing pytest).
* Outputs: the input folder as output, two runs on one folder, an output path that is a folder, paths that
  cannot be written (checked before the work).
* Silent wrong results: truncated NIfTI files, float64 images beyond float32, evaluator labels above 255,
  shell syntax in ``--predict-cmd``, NaN weights.
* One line and exit 2 for bad devices, seeds and state dicts; ITK's reason and the file in messages; the
  evaluator's timeout ends the command's children too.

Models are the reduced experts with random weights; volumes are small.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import os
import pickle
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from dcm.atomic import atomic_path, check_writable
from dcm.checkpoints import load_checkpoint, load_state_dict
from dcm.checkpoints import main as checkpoints_main
from dcm.data.cases import case_from_arrays, case_to_arrays, load_case
from dcm.data.nifti import read_nifti, write_nifti
from dcm.errors import CaseError, CheckpointError, OutputError
from dcm.evaluate import CommandPredictor, evaluate_folder
from dcm.evaluate.core import absolutise_command
from dcm.runner import predict_folder

REPO = Path(__file__).resolve().parent.parent
SHAPE = (6, 16, 16)
BOX = dict(z_min=1, z_max=4, z_mid=2, z_mid_x_min=3, z_mid_y_min=3, z_mid_x_max=9, z_mid_y_max=9)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _case_arrays(**changes) -> Dict[str, object]:
    image = np.random.default_rng(0).integers(0, 200, SHAPE, dtype=np.uint8)
    arrays = case_to_arrays(image, (1.0, 1.0, 2.0), boxes=[BOX])
    arrays.update(changes)
    return arrays


def _write_case(path: Path, **changes) -> Path:
    np.savez(path, **_case_arrays(**changes))
    return path


def _run(args: List[str], timeout: float = 240, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable)
    env.update(kwargs.pop("env", {}))
    return subprocess.run(args, env=env, cwd=str(REPO), capture_output=True, text=True, timeout=timeout, **kwargs)


# ------------------------------------------------------------------------------ crafted pickles (finding 1)
# Pickle opcodes written by hand: the gadgets use only allow-listed names, which pickle.dumps cannot produce.

def _g(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _u(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _i(v: int) -> bytes:
    return b"J" + struct.pack("<i", v)


MARK, TUPLE, TUPLE1, TUPLE2, TUPLE3, REDUCE, BUILD, NONE, NEWFALSE, NEWTRUE, STOP = (
    b"(", b"t", b"\x85", b"\x86", b"\x87", b"R", b"b", b"N", b"\x89", b"\x88", b".")
MA = ("numpy._core.multiarray", "numpy.core.multiarray")


def _bytes3(raw: bytes) -> bytes:  # protocol 3 (case files)
    return b"B" + struct.pack("<I", len(raw)) + raw


def _bytes2(raw: bytes) -> bytes:  # protocol 2 (torch.save)
    return _g("_codecs", "encode") + _u(raw.decode("latin1")) + _u("latin1") + TUPLE2 + REDUCE


def _dtype(descr: str = "O8", flags: int = 0, names: bytes = NONE, fields: bytes = NONE) -> bytes:
    return (_g("numpy", "dtype") + _u(descr) + NEWFALSE + NEWTRUE + TUPLE3 + REDUCE
            + MARK + _i(3) + _u("|") + NONE + names + fields + _i(-1) + _i(-1) + _i(flags) + TUPLE + BUILD)


def _structured_with_object() -> bytes:
    fields = b"}" + _u("a") + _dtype() + _i(0) + TUPLE2 + b"s"
    return _dtype("V8", 0, names=_u("a") + TUPLE1, fields=fields)


def _array(dtype: bytes, raw: bytes, b=_bytes3, module: str = MA[0], shape: int = 1) -> bytes:
    return (_g(module, "_reconstruct") + _g("numpy", "ndarray") + _i(0) + TUPLE1 + b(b"b") + TUPLE3 + REDUCE
            + MARK + _i(1) + _i(shape) + TUPLE1 + dtype + NEWFALSE + b(raw) + TUPLE + BUILD)


def _object_array(items: bytes, n: int) -> bytes:
    """A genuine object array (list state) of ``n`` items given as pickle opcodes."""
    return (_g(MA[0], "_reconstruct") + _g("numpy", "ndarray") + _i(0) + TUPLE1 + _bytes3(b"b") + TUPLE3 + REDUCE
            + MARK + _i(1) + _i(n) + TUPLE1 + _dtype("O8", 63) + NEWFALSE + b"]" + MARK + items + b"e"
            + TUPLE + BUILD)


def _system(marker: Path, module: str = "os", name: str = "system") -> bytes:
    return _g(module, name) + _u(f"mkdir {marker}") + TUPLE1 + REDUCE


def _legit_object_pickle(value: object) -> bytes:
    arr = np.empty(1, dtype=object)
    arr[0] = value
    return pickle.dumps(arr, protocol=3)


def _case_payloads(marker: Path) -> Dict[str, bytes]:
    """name -> the pickle of an object member (what follows the .npy header)."""
    ptr = b"\x41" * 8
    deep: list = []
    for _ in range(200):
        deep = [deep]
    laughs: list = ["x"]
    for _ in range(40):
        laughs = [laughs, laughs]
    cycle: list = []
    cycle.append(cycle)
    out = {
        f"gadget_{m.split('.')[0]}{m.split('.')[1]}": b"\x80\x03" + _array(_dtype(), ptr, module=m) + STOP for m in MA
    }
    out.update({
        "gadget_null": b"\x80\x03" + _array(_dtype(), b"\0" * 8) + STOP,
        "gadget_flags63": b"\x80\x03" + _array(_dtype("O8", 63), ptr) + STOP,
        "gadget_structured": b"\x80\x03" + _array(_structured_with_object(), ptr) + STOP,
        "gadget_scalar": b"\x80\x03" + _object_array(
            _g(MA[0], "scalar") + _dtype() + _bytes3(ptr) + TUPLE2 + REDUCE, 1) + STOP,
        "gadget_nested": b"\x80\x03" + _object_array(b"}" + _u("fg") + _array(_dtype(), ptr) + b"s", 1) + STOP,
        "gadget_datetime": b"\x80\x03" + _array(_dtype("M8", 0), ptr) + STOP,
        "os_system": b"\x80\x03" + _object_array(_system(marker), 1) + STOP,
        "posix_system": b"\x80\x03" + _system(marker, "posix") + STOP,
        "builtins_eval": b"\x80\x03" + _g("builtins", "eval") + _u(f"__import__('os').mkdir({str(marker)!r})")
                         + TUPLE1 + REDUCE + STOP,
        "in_dict": b"\x80\x03" + _object_array(b"}" + _u("z_min") + _system(marker, "subprocess", "getoutput")
                                               + b"s", 1) + STOP,
        "deep_pickle": b"\x80\x03" + _object_array(b"]" * 100_000 + b"a" * 99_999, 1) + STOP,
        "deep_lists": _legit_object_pickle(deep),
        "billion_laughs": _legit_object_pickle(laughs),
        "cycle": _legit_object_pickle(cycle),
        "huge_numeric": b"\x80\x03" + _array(_dtype("i8", 0), b"\0" * 8, shape=10 ** 9) + STOP,
        "huge_bytes": b"\x80\x03" + b"B" + struct.pack("<I", 2 ** 31 - 1) + b"\0" * 16,
        "wrong_length": b"\x80\x03" + _object_array(NONE, 1).replace(_i(1) + TUPLE1, _i(10 ** 9) + TUPLE1, 1) + STOP,
    })
    return out


def _npy(payload: bytes, descr: object = "|O", shape=(1,)) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue() + payload


def _zip_case(path: Path, members: Dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for key, value in _case_arrays().items():
            if key not in members:
                buf = io.BytesIO()
                np.lib.format.write_array(buf, np.asanyarray(value), allow_pickle=True)
                zf.writestr(f"{key}.npy", buf.getvalue())
        for key, data in members.items():
            zf.writestr(f"{key}.npy", data)
    return path


def _checkpoint(path: Path, pickled: bytes) -> Path:
    """A torch.save zip archive whose data.pkl is ``pickled``."""
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    with zipfile.ZipFile(path, "w") as zf:
        for name in src.namelist():
            zf.writestr(name, pickled if name.endswith("/data.pkl") else src.read(name))
    return path


_LOADER = """
import sys
from dcm.checkpoints import load_state_dict
from dcm.data.cases import load_case
from dcm.errors import DCMError
for path in sys.argv[1:]:
    print("FILE", path, flush=True)
    try:
        load_state_dict(path) if path.endswith(".pt") else load_case(path)
    except DCMError as e:
        print("REFUSED", str(e), flush=True)
    else:
        print("LOADED", flush=True)
"""


def test_crafted_pickles_are_refused_in_one_line_without_crash(tmp_path):
    marker = tmp_path / "marker"
    files: List[Path] = []
    for name, payload in _case_payloads(marker).items():
        for key in ("boxes", "clicks", "clicks_order"):
            files.append(_zip_case(tmp_path / f"{name}-{key}.npz", {key: _npy(payload)}))
    legit = _legit_object_pickle(dict(BOX))
    files += [
        _zip_case(tmp_path / "huge_header-boxes.npz", {"boxes": _npy(legit, shape=(10 ** 12,))}),
        _zip_case(tmp_path / "structured_header-boxes.npz", {"boxes": _npy(legit, descr=[("a", "|O")])}),
        _zip_case(tmp_path / "huge_imgs.npz", {"imgs": _npy(b"\0" * 64, descr="|u1", shape=(10 ** 4,) * 3)}),
    ]
    for name, pickled in {
        "gadget": _array(_dtype(), b"\x41" * 8, b=_bytes2),
        "gadget_core": _array(_dtype(), b"\x41" * 8, b=_bytes2, module=MA[1]),
        "gadget_structured": _array(_structured_with_object(), b"\x41" * 8, b=_bytes2),
        "gadget_scalar": _g(MA[0], "scalar") + _dtype() + _bytes2(b"\x41" * 8) + TUPLE2 + REDUCE,
        "dtype_class": _g("numpy.dtypes", "ObjectDType") + b")" + REDUCE,
        "os_system": _system(marker),
        "huge_numeric": _array(_dtype("f4", 0), b"\0" * 4, b=_bytes2, shape=10 ** 9),
        "deep": b"]" * 100_000 + b"a" * 99_999,
    }.items():
        files.append(_checkpoint(tmp_path / f"ckpt-{name}.pt", b"\x80\x02}" + _u("model") + pickled + b"s" + STOP))
    proc = _run([sys.executable, "-c", _LOADER] + [str(f) for f in files], timeout=300)
    assert proc.returncode == 0, f"the loader died ({proc.returncode}) on:\n" + proc.stdout[-500:] + proc.stderr[-2000:]
    results = proc.stdout.split("FILE ")[1:]
    assert len(results) == len(files)
    for block in results:
        path, _, rest = block.partition("\n")
        lines = rest.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("REFUSED ") and path in lines[0], (path, lines)
    assert not marker.exists()


def test_a_crafted_case_gets_one_line_and_the_next_case_is_predicted(tmp_path):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    gadget = b"\x80\x03" + _array(_dtype(), b"\x41" * 8) + STOP
    _zip_case(inputs / "CT_a_gadget.npz", {"boxes": _npy(gadget)})
    _write_case(inputs / "CT_b_good.npz")
    proc = _run([sys.executable, "-m", "dcm.baselines", "box-fill", "--inputs", str(inputs), "--outputs", str(outputs)])
    assert proc.returncode == 1, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "CT_a_gadget" in ln]
    assert len(lines) == 1 and "boxes" in lines[0], proc.stderr
    assert sorted(p.name for p in outputs.iterdir()) == ["CT_b_good.npz"]


def test_legitimate_object_arrays_still_load(tmp_path):
    order = np.empty((1, 2), dtype=object)
    order[0, 0], order[0, 1] = "fg", None
    arrays = _case_arrays(clicks=np.array([{"fg": np.array([[2, 5, 5]]), "bg": [[3, 6, 6]]}], dtype=object),
                          clicks_order=order, boxes=np.array([{k: np.int64(v) for k, v in BOX.items()}], dtype=object))
    case = load_case(_write_case(tmp_path / "CT_x.npz", **arrays))
    assert case.objects[0].box.to_dict() == BOX
    assert [c.zyx for c in case.objects[0].clicks] == [(2, 5, 5), (3, 6, 6)]


# ------------------------------------------------------------------------------------ data loss (3, 4, 5)


def _box_fill(case):
    from dcm.baselines import BoxFillPredictor

    return BoxFillPredictor()(case)


def _predict_main():
    spec = importlib.util.spec_from_file_location("dcm_predict_cli", REPO / "inference" / "predict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture
def predict_main(monkeypatch):
    """``inference/predict.py``'s ``main`` in this process (its SIGTERM handler restored afterwards).

    With the plain MONAI import: the lean one (dcm/startup.py) would leave MONAI believing SciPy absent for
    the rest of the test process, and the evaluator's NSD needs it.
    """
    monkeypatch.setenv("DCM_LEAN_IMPORTS", "0")
    handler = signal.getsignal(signal.SIGTERM)
    yield _predict_main()
    signal.signal(signal.SIGTERM, handler)


def _one_line(text: str, *needles: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1, text
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in text
    return lines[0]


def test_outputs_folder_equal_to_inputs_is_refused(tmp_path, predict_main, capsys):
    inputs = tmp_path / "cases"
    inputs.mkdir()
    case = _write_case(inputs / "CT_a.npz")
    before = case.read_bytes()
    (tmp_path / "link").symlink_to(inputs)
    for outputs in (inputs, tmp_path / "link"):
        code = predict_main(["--inputs", str(inputs), "--outputs", str(outputs), "--random-init",
                             "--config", "dcm_reduced"])
        assert code == 2
        _one_line(capsys.readouterr().err, str(outputs), "input folder")
        assert case.read_bytes() == before


def test_two_runs_on_one_outputs_folder_keep_each_others_files(tmp_path):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    outputs.mkdir()
    _write_case(inputs / "CT_a.npz")
    _write_case(inputs / "CT_b.npz", spacing=np.array([0.0, 1.0, 1.0]))  # fails in this run
    other = subprocess.Popen(["sleep", "60"])
    try:
        # the other run is writing CT_c.npz right now
        live_tmp = outputs / f".CT_c.npz.{other.pid}.k1l2m3.tmp"
        live_tmp.write_bytes(b"being written")
        dead_tmp = outputs / ".CT_d.npz.999999999.k1l2m3.tmp"  # its writer is gone
        dead_tmp.write_bytes(b"left by a killed call")

        def predict(case):
            if case.name == "CT_a":  # meanwhile the other run finishes CT_b
                np.savez(outputs / "CT_b.npz", segs=np.ones(SHAPE, np.uint8))
            return _box_fill(case)

        result = predict_folder(inputs, outputs, predict)
        assert [Path(f).name for f, _ in result.failed] == ["CT_b.npz"]
        assert live_tmp.exists() and not dead_tmp.exists()
        assert (outputs / "CT_b.npz").exists()  # the other run's answer stays
        # a stale CT_b.npz from an earlier call is still removed when this call fails on it
        predict_folder(inputs, outputs, _box_fill)
        assert not (outputs / "CT_b.npz").exists() and (outputs / "CT_a.npz").exists()
    finally:
        other.kill()
        other.wait()
    with atomic_path(outputs / "x.npz") as tmp:
        assert f".x.npz.{os.getpid()}." in tmp.name
        tmp.write_bytes(b"x")


def test_an_output_path_that_is_a_folder_fails_that_case_only(tmp_path, capsys):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    _write_case(inputs / "CT_a.npz")
    _write_case(inputs / "CT_b.npz")
    (outputs / "CT_a.npz").mkdir(parents=True)
    result = predict_folder(inputs, outputs, _box_fill)
    assert [Path(f).name for f, _ in result.failed] == ["CT_a.npz"]
    assert (outputs / "CT_b.npz").is_file()
    _one_line(capsys.readouterr().err, "CT_a.npz", "folder")


# --------------------------------------------------------------------------------- truncated NIfTI (7, 15)


def _nifti(tmp_path: Path, name: str) -> Path:
    labels = np.zeros((10, 12, 14), np.uint8)
    labels[1:4, 2:5, 2:5] = 1
    labels[6:9, 6:10, 7:12] = 2
    return write_nifti(tmp_path / name, labels)


def test_truncated_nifti_is_refused_naming_the_file(tmp_path, capsys):
    for name in ("lbl.nii.gz", "lbl.nii"):
        path = _nifti(tmp_path, name)
        data = path.read_bytes()
        bad = tmp_path / f"cut_{name}"
        bad.write_bytes(data[: len(data) * 57 // 100] if name.endswith(".gz") else data[:700])
        assert read_nifti(path)[0].sum() > 0
        with pytest.raises(CaseError, match=f"cut_{name}.*truncated"):
            read_nifti(bad)
    from dcm.data.convert import main as convert_main

    image = write_nifti(tmp_path / "img.nii.gz", np.ones((10, 12, 14), np.int16) * 50)
    code = convert_main(["--image", str(image), "--label", str(tmp_path / "cut_lbl.nii.gz"),
                         "--out", str(tmp_path / "o")])
    assert code != 0
    _one_line(capsys.readouterr().err, "cut_lbl.nii.gz", "truncated")


def test_sheared_nifti_keeps_itks_reason(tmp_path):
    raw = bytearray(gzip.decompress(_nifti(tmp_path, "a.nii.gz").read_bytes()))
    struct.pack_into("<hh", raw, 252, 0, 1)  # qform off, sform on, with a shear
    struct.pack_into("<12f", raw, 280, 1, 0.5, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0)
    sheared = tmp_path / "sheared.nii.gz"
    sheared.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(CaseError) as err:
        read_nifti(sheared)
    assert "sheared.nii.gz" in str(err.value) and "orthonormal" in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------------ silent wrong results (8, 9, 10, 11)


def test_float64_image_beyond_float32_is_refused():
    image = np.full(SHAPE, 1e300)
    with pytest.raises(CaseError, match="imgs.*float32"):
        case_from_arrays(_case_arrays(imgs=image), name="CT_big")
    case_from_arrays(_case_arrays(imgs=np.full(SHAPE, 1e30)), name="CT_ok")


def test_evaluator_compares_labels_without_a_uint8_cast(tmp_path):
    cases = tmp_path / "cases"
    cases.mkdir()
    gts = np.zeros(SHAPE, np.uint8)
    gts[1:5, 3:10, 3:10] = 1
    np.savez(cases / "CT_a.npz", **case_to_arrays(_case_arrays()["imgs"], (1.0, 1.0, 2.0), boxes=[BOX], gts=gts))

    def wrapped_labels(case_file: Path, workdir: Path):
        np.savez(workdir / "outputs" / case_file.name, segs=gts.astype(np.int64) * 257)  # 257 -> 1 as uint8
        return 0.01, ""

    rows, failures = evaluate_folder(cases, tmp_path / "res", wrapped_labels, progress=False)
    assert not failures and float(rows[0]["DSC_Final"]) == 0.0 and float(rows[0]["DSC_1"]) == 0.0
    assert "segs dtype int64" in (tmp_path / "res" / "notes.txt").read_text()


def test_predict_cmd_runs_shell_syntax_and_resolves_relative_paths(tmp_path, monkeypatch):
    here, there, workdir = tmp_path / "here", tmp_path / "there", tmp_path / "work"
    for d in (here, there, workdir / "outputs"):
        d.mkdir(parents=True)
    (here / "step.sh").write_text("echo ran > outputs/ran.txt\n")
    monkeypatch.chdir(here)
    CommandPredictor("sh step.sh && echo second > outputs/second.txt")(workdir / "inputs" / "a.npz", workdir)
    assert (workdir / "outputs" / "ran.txt").read_text() == "ran\n"
    assert (workdir / "outputs" / "second.txt").read_text() == "second\n"
    seconds, log = CommandPredictor(f"cd {there} && echo x > made.txt; echo to-log 2>&1")(workdir / "a.npz", workdir)
    assert (there / "made.txt").exists() and "to-log" in log


def test_predict_cmd_keeps_a_config_preset_that_is_also_a_folder_here(tmp_path, monkeypatch):
    """``--config dcm`` run from the repository root names the preset, not the package folder ``dcm/`` (the
    evaluator made it ``/repo/dcm`` before 2026-12-02 and every step failed); files and folders elsewhere in
    the command, bare or not, are still made absolute."""
    for folder in ("dcm", "runs", "train_global_roi"):
        (tmp_path / folder).mkdir()
    (tmp_path / "predict.sh").write_text("")
    (tmp_path / "my.yaml").write_text("")
    monkeypatch.chdir(tmp_path)
    command = absolutise_command("sh predict.sh --config dcm --out runs --cases ./runs && cd train_global_roi")
    assert command == (f"sh {tmp_path / 'predict.sh'} --config dcm --out {tmp_path / 'runs'} "
                       f"--cases {tmp_path / 'runs'} && cd {tmp_path / 'train_global_roi'}")
    assert absolutise_command("sh predict.sh --config my.yaml") == (f"sh {tmp_path / 'predict.sh'} "
                                                                      f"--config {tmp_path / 'my.yaml'}")


def test_nan_weights_are_refused_naming_file_and_tensor(tmp_path):
    sd = {"encoder.weight": torch.ones(3, 3), "decoder.weight": torch.tensor([1.0, float("nan")])}
    path = tmp_path / "nan.pt"
    torch.save({"model_state_dict": sd}, path)
    with pytest.raises(CheckpointError, match=r"nan\.pt.*decoder\.weight.*NaN"):
        load_checkpoint(path)
    from safetensors.torch import save_file

    save_file({"w": torch.tensor([float("inf")])}, str(tmp_path / "inf.safetensors"))
    with pytest.raises(CheckpointError, match=r"inf\.safetensors.*'w'"):
        load_checkpoint(tmp_path / "inf.safetensors")


# ------------------------------------------------------------------------------ tracebacks, exit codes (12, 13, 15)


def test_check_writable_names_the_users_path(tmp_path):
    a_file = tmp_path / "file.npz"
    a_file.write_bytes(b"x")
    check_writable(tmp_path / "new" / "deeper" / "out.nii.gz")
    check_writable(a_file)
    for bad, folder in ((tmp_path, False), (a_file / "sub.nii.gz", False), (a_file, True),
                        (Path("/proc/x.npz"), False)):
        with pytest.raises(OutputError) as err:
            check_writable(bad, folder=folder)
        assert str(err.value).startswith(f"{bad}: cannot be written") and "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.npz"]


def test_unwritable_outputs_are_refused_before_the_work(tmp_path, predict_main, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    _write_case(inputs / "CT_a.npz")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for bad in (a_file, a_file / "sub", Path("/proc/dcm-out")):
        assert predict_main(["--inputs", str(inputs), "--outputs", str(bad), "--random-init",
                             "--config", "dcm_reduced"]) == 2
        _one_line(capsys.readouterr().err, str(bad), "cannot be written")
    from dcm.segment import main as segment_main

    for bad in (tmp_path, a_file / "m.nii.gz", Path("/proc/m.nii.gz")):  # the image does not even exist: not read
        assert segment_main([str(tmp_path / "missing.nii.gz"), "--box", "0", "1", "0", "1", "0", "1",
                             "--out", str(bad), "--random-init", "--config", "dcm_reduced"]) == 2
        _one_line(capsys.readouterr().err, str(bad), "cannot be written")
        assert checkpoints_main(["combine", "--global", "missing.pt", "--local", "missing.pt", "--out", str(bad)]) == 2
        _one_line(capsys.readouterr().err, str(bad), "cannot be written")


def test_bad_device_seed_and_state_dict_get_one_line_and_exit_2(tmp_path, predict_main, capsys, monkeypatch):
    inputs = tmp_path / "in"
    inputs.mkdir()
    _write_case(inputs / "CT_a.npz")
    base = ["--inputs", str(inputs), "--outputs", str(tmp_path / "out"), "--config", "dcm_reduced"]
    devices = ["tpu", "nonsense:3"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in devices:
        assert predict_main(base + ["--random-init", "--device", device]) == 2
        _one_line(capsys.readouterr().err, repr(device))
    monkeypatch.setenv("DCM_SEED", "abc")
    assert predict_main(base + ["--random-init"]) == 2
    _one_line(capsys.readouterr().err, "DCM_SEED", "'abc'")
    monkeypatch.delenv("DCM_SEED")
    holder = tmp_path / "objects.pt"
    torch.save({"model_state_dict": {"w": np.array([{"a": 1}, None], dtype=object)}}, holder)
    with pytest.raises(CheckpointError, match="w.*dtype object"):
        load_state_dict(holder)
    assert predict_main(base + ["--weights", str(holder)]) == 2
    _one_line(capsys.readouterr().err, "objects.pt", "dtype object")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_wrong_shape_safetensors_names_the_file_not_strict_false(tmp_path, predict_main, capsys):
    from safetensors.torch import save_file

    path = tmp_path / "wrong.safetensors"
    save_file({"image_encoder.patch_embed.proj.weight": torch.zeros(2, 2)}, str(path))
    inputs = tmp_path / "in"
    inputs.mkdir()
    _write_case(inputs / "CT_a.npz")
    code = predict_main(["--inputs", str(inputs), "--outputs", str(tmp_path / "out"), "--config", "dcm_reduced",
                         "--weights", str(path)])
    assert code == 2
    line = _one_line(capsys.readouterr().err, str(path), "does not fit")
    assert "<state dict>" not in line and "strict=False" not in line


def test_a_layout_error_names_the_file_for_every_caller_of_build_experts(tmp_path):
    """The demo, dcm.ablate and the session build their experts through build_experts too."""
    from safetensors.torch import save_file

    from dcm.config import load_config
    from dcm.errors import CheckpointError
    from dcm.experts import build_experts

    path = tmp_path / "wrong.safetensors"
    save_file({"image_encoder.patch_embed.proj.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(CheckpointError) as e:
        build_experts(load_config("dcm_reduced"), path)
    assert str(e.value).startswith(f"{path}: ") and "<state dict>" not in str(e.value)


# ------------------------------------------------------------------------------------ timeout (finding 16)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def test_evaluator_timeout_kills_the_commands_children(tmp_path):
    workdir = tmp_path / "work"
    (workdir / "outputs").mkdir(parents=True)
    pids = tmp_path / "pids"
    script = tmp_path / "kids.sh"
    script.write_text(f"sleep 60 & echo $! >> {pids}\nsleep 60 & echo $! >> {pids}\nsleep 60\n")
    start = time.monotonic()
    seconds, log = CommandPredictor(f"sh {script}", timeout=1.5)(workdir / "a.npz", workdir)
    assert "timed out" in log and time.monotonic() - start < 30
    children = [int(p) for p in pids.read_text().split()]
    assert len(children) == 2
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in children)
