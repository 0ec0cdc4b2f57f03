"""The package: the ``dcm`` command, the old module paths, entry points without sys.path tricks, and
pyproject.toml against requirements.txt."""

import importlib
import json
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path
from typing import List

import pytest

from dcm.cli.main import COMMANDS, main

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())

#: each subcommand and the module ``python -m`` ran before the ``dcm`` command existed
OLD_MODULES = {"demo": "dcm.demo", "evaluate": "dcm.evaluate", "segment": "dcm.segment", "ablate": "dcm.ablate",
               "convert": "dcm.data.convert", "checkpoints": "dcm.checkpoints", "serve": "dcm.serve",
               "info": "dcm.info"}


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, cwd=REPO, timeout=120)


def _command_lines(help_text: str) -> List[str]:
    return [line.split()[0] for line in help_text.split("commands:\n", 1)[1].split("\n\n", 1)[0].splitlines()]


def test_dcm_help_lists_every_subcommand_on_one_line(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert _command_lines(out) == list(OLD_MODULES) == list(COMMANDS)
    assert _run(sys.executable, "-m", "dcm", "--help").stdout == out  # python -m dcm is the same command


def test_pyproject_script_is_the_dcm_command():
    module, _, name = PYPROJECT["project"]["scripts"]["dcm"].partition(":")
    assert getattr(importlib.import_module(module), name) is main


def test_missing_or_unknown_command_exits_2_with_one_error_line(capsys):
    for argv in ([], ["nonsense"]):
        assert main(argv) == 2
        usage, error = capsys.readouterr().err.splitlines()
        assert usage.startswith("usage: dcm ") and error.startswith("dcm: error: ")


@pytest.mark.parametrize("command", list(OLD_MODULES))
def test_subcommand_help_equals_the_module_help(command):
    via_dcm = _run(sys.executable, "-m", "dcm", command, "--help")
    via_module = _run(sys.executable, "-m", OLD_MODULES[command], "--help")
    assert via_dcm.returncode == via_module.returncode == 0, via_dcm.stderr + via_module.stderr
    assert via_dcm.stdout == via_module.stdout and f"usage: python -m {OLD_MODULES[command]}" in via_dcm.stdout


def test_installed_dcm_script_runs_the_command():
    script = Path(sys.executable).parent / "dcm"
    if not script.is_file():
        pytest.skip("the dcm command is not installed next to this interpreter (README: pip install -e .)")
    listed = _run(str(script), "--help")
    assert listed.returncode == 0 and _command_lines(listed.stdout) == list(COMMANDS)
    assert _run(str(script), "demo", "--help").stdout == _run(sys.executable, "-m", "dcm.demo", "--help").stdout


def test_old_module_paths_still_import():
    from dcm.ablate import run_ablation, variant_configs, variant_predictor
    from dcm.cli import check_device, parse_seed
    from dcm.cli.common import check_device as common_check_device
    from dcm.demo import MNI_TRAIN_CROPS, NILEARN_REQUIREMENT, find_mni_files, make_cases, write_mni_cases
    from dcm.segment import box_from_bounds

    import dcm.cli.ablate
    import dcm.cli.demo
    import dcm.cli.segment

    assert check_device is common_check_device and parse_seed("7") == 7
    assert (make_cases, find_mni_files, write_mni_cases) == (dcm.cli.demo.make_cases, dcm.cli.demo.find_mni_files,
                                                            dcm.cli.demo.write_mni_cases)
    assert MNI_TRAIN_CROPS is dcm.cli.demo.MNI_TRAIN_CROPS and NILEARN_REQUIREMENT == dcm.cli.demo.NILEARN_REQUIREMENT
    assert (run_ablation, variant_configs, variant_predictor) == (dcm.cli.ablate.run_ablation,
                                                                 dcm.cli.ablate.variant_configs,
                                                                 dcm.cli.ablate.variant_predictor)
    assert box_from_bounds is dcm.cli.segment.box_from_bounds
    for shim in ("dcm.demo", "dcm.ablate", "dcm.segment"):
        assert importlib.import_module(shim).main is importlib.import_module(shim.replace("dcm.", "dcm.cli.")).main


def _entry_points() -> List[Path]:
    scripts = [REPO / "predict.sh"]
    for folder in ("inference", "train_global_roi", "train_local_roi", "benchmarks", "dcm"):
        scripts += sorted((REPO / folder).rglob("*.py"))
    return scripts


def test_no_entry_point_edits_sys_path():
    assert len(_entry_points()) > 10
    for path in _entry_points():
        text = path.read_text()
        assert not re.search(r"sys\.path\.(insert|append)", text), f"{path.relative_to(REPO)} edits sys.path"


def _requirement_lines(path: Path) -> List[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def test_pyproject_dependencies_are_requirements_txt():
    project = PYPROJECT["project"]
    assert project["name"] == "dcm" and "dependencies" not in project and "dependencies" in project["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["dependencies"] == {"file": ["requirements.txt"]}
    runtime = _requirement_lines(REPO / "requirements.txt")
    # setuptools reads the file as a plain list: one exact pin per line, no pip options (-r, -e, --index-url)
    assert runtime and all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*==[0-9][0-9A-Za-z.+!-]*", r) for r in runtime)
    assert "torch==2.13.0" in runtime
    assert _requirement_lines(REPO / "requirements-test.txt")[0] == "-r requirements.txt"


def test_installed_metadata_matches_requirements_txt():
    try:
        dist = metadata.distribution("dcm")
    except metadata.PackageNotFoundError:
        pytest.skip("dcm is not installed in this interpreter (README: pip install -e .)")
    # pip's record of an install from this checkout, or the dcm.egg-info an editable build leaves in it
    origin = json.loads(dist.read_text("direct_url.json") or "{}").get("url", "").rstrip("/")
    if origin != REPO.as_uri() and Path(dist.locate_file("")).resolve() != REPO:
        pytest.skip(f"the installed dcm comes from {origin or dist.locate_file('')}, not this checkout")
    assert dist.requires == _requirement_lines(REPO / "requirements.txt")


def test_package_data_covers_the_files_the_package_reads():
    package_data = PYPROJECT["tool"]["setuptools"]["package-data"]
    files = [p for p in (REPO / "dcm").rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc")]
    for path in files:
        package = ".".join(path.parent.relative_to(REPO).parts)
        assert path.name in package_data.get(package, []), f"{path.relative_to(REPO)} is not package data"
    assert (REPO / "dcm" / "models" / "manifests.json") in files
