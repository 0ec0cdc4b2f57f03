"""The 6-step interactive evaluation of the CVPR 2025 challenge, reproducing the official numbers.

Per case: step 1 gives the boxes (skipped, scored 0, for cases without boxes); steps 2..6 each add one
click per object at the organisers' next-click location (``dcm.protocol.next_click``) computed from the
previous output. Every step is one predictor call, timed, exactly as the organisers run a container:
a working folder holding ``inputs/<case>.npz`` and ``outputs/``.

    python -m dcm.evaluate --cases DIR --out DIR --predict-cmd "sh predict.sh"
    python -m dcm.evaluate --cases DIR --out DIR --predictor box-fill        # in-process, fast
    python -m dcm.evaluate --cases DIR --out DIR --predictor my.module:predict
    python -m dcm.evaluate --cases DIR --out DIR --predictor dcm --config dcm_small --weights W --workers 2
    python -m dcm.evaluate --cases DIR --out DIR --predictor dcm --ray ADDRESS --workers 8 --resume
    python -m dcm.evaluate --cases DIR --out PART_I --predict-cmd "sh predict.sh" --num-parts K --part-id I
    python -m dcm.evaluate merge PART_0 PART_1 ... --out DIR

Each case's result is written as it finishes (``cases/<case>.json``, atomically): ``--resume`` skips the cases
finished before. ``--workers N`` / ``--ray`` run cases in parallel (``dcm.evaluate.parallel``);
``metrics.csv`` is the same as a sequential run's, apart from the time columns.

Writes ``metrics.csv`` (official columns and order; ``CaseName`` is the file name with ``.npz``, as the
organisers' evaluator writes it), ``summary.csv`` / ``summary.md`` (per-modality means),
``clicks.csv`` (per case and click step: the clicks given so far and how many the output keeps, see
``dcm.engine.clicks``; per case also how many the reference label map itself keeps),
``failures.csv`` (cases that could not be evaluated), ``notes.txt`` (per-step problems, with the last lines a
failing predict command printed), and with ``--save-all-segs`` ``all_segs/<case>.npz``.
"""

from __future__ import annotations

import csv
import importlib
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from dcm.atomic import atomic_path
from dcm.data.cases import Case, atomic_savez, load_case, load_npz, prompts_to_arrays
from dcm.errors import CaseError, ConfigError, DCMError
from dcm.engine.clicks import clicks_kept, promises_of
from dcm.metrics import case_scores, click_auc
from dcm.prompts import ObjectPrompts
from dcm.protocol import next_clicks
from dcm.tables import markdown_table as _markdown_table

__all__ = [
    "NUM_STEPS",
    "SECONDS_PER_CLASS",
    "METRIC_COLUMNS",
    "CaseResult",
    "CaseRecord",
    "CommandPredictor",
    "InProcessPredictor",
    "PredictorSpec",
    "build_step_runner",
    "evaluate_case",
    "evaluate_file",
    "evaluate_folder",
    "select_case_files",
    "load_records",
    "write_results",
    "summarise",
]

NUM_STEPS = 6
#: the organisers' budget: 90 s per class, summed over the 6 calls of a case.
SECONDS_PER_CLASS = 90.0
METRIC_COLUMNS = (
    ["CaseName", "TotalRunningTime"]
    + [f"RunningTime_{i}" for i in range(1, NUM_STEPS + 1)]
    + ["DSC_AUC", "NSD_AUC", "DSC_Final", "NSD_Final"]
    + [f"DSC_{i}" for i in range(1, NUM_STEPS + 1)]
    + [f"NSD_{i}" for i in range(1, NUM_STEPS + 1)]
    + ["num_class", "runtime_upperbound"]
)
SUMMARY_METRICS = ["DSC_AUC", "NSD_AUC", "DSC_Final", "NSD_Final"]


class ShapeError(DCMError):
    """A predictor returned ``segs`` of the wrong shape (the organisers abort the whole run on this)."""


@dataclass
class CaseResult:
    """Scores and timings of one case over the 6 steps (index 0 = step 1)."""

    name: str
    num_class: int
    dsc: List[float] = field(default_factory=lambda: [0.0] * NUM_STEPS)
    nsd: List[float] = field(default_factory=lambda: [0.0] * NUM_STEPS)
    seconds: List[float] = field(default_factory=lambda: [0.0] * NUM_STEPS)
    clicks: List[int] = field(default_factory=lambda: [0] * NUM_STEPS)  # clicks given so far, per step
    clicks_kept: List[int] = field(default_factory=lambda: [0] * NUM_STEPS)  # of those, kept by the output
    # of those, kept by the reference label map itself: the most an output that equals the reference keeps
    clicks_kept_by_reference: List[int] = field(default_factory=lambda: [0] * NUM_STEPS)
    notes: List[str] = field(default_factory=list)

    @property
    def total_seconds(self) -> float:
        return float(sum(self.seconds))

    @property
    def runtime_upperbound(self) -> float:
        return SECONDS_PER_CLASS * self.num_class

    @property
    def over_budget(self) -> bool:
        return self.total_seconds > self.runtime_upperbound

    def clicks_row(self) -> Dict[str, object]:
        """``clicks.csv``: per click step, the clicks given so far and how many the output kept; over all steps
        also how many the reference kept (``Kept_by_reference``)."""
        row: Dict[str, object] = {"CaseName": self.name, "Clicks": sum(self.clicks), "Kept": sum(self.clicks_kept),
                                  "Kept_by_reference": sum(self.clicks_kept_by_reference)}
        for i in range(1, NUM_STEPS):
            row[f"Clicks_{i + 1}"], row[f"Kept_{i + 1}"] = self.clicks[i], self.clicks_kept[i]
        return row

    def row(self) -> Dict[str, object]:
        row: Dict[str, object] = {"CaseName": self.name, "TotalRunningTime": self.total_seconds}
        for i in range(NUM_STEPS):
            row[f"RunningTime_{i + 1}"] = self.seconds[i]
        row["DSC_AUC"] = click_auc(self.dsc)
        row["NSD_AUC"] = click_auc(self.nsd)
        row["DSC_Final"] = self.dsc[-1]
        row["NSD_Final"] = self.nsd[-1]
        for i in range(NUM_STEPS):
            row[f"DSC_{i + 1}"] = self.dsc[i]
        for i in range(NUM_STEPS):
            row[f"NSD_{i + 1}"] = self.nsd[i]
        row["num_class"] = self.num_class
        row["runtime_upperbound"] = self.runtime_upperbound
        return row


# ------------------------------------------------------------------------------------------ predictors

#: A step predictor: ``(input_file, workdir) -> (seconds, log)``; it writes ``workdir/outputs/<input name>``.
StepRunner = Callable[[Path, Path], Tuple[float, str]]


class CommandPredictor:
    """Runs a shell command per step in a working folder holding ``inputs/`` and ``outputs/``.

    The command runs through ``sh -c`` (shell syntax works) with that folder as its working directory (as
    ``/workspace`` in the organisers' container); relative paths in the command that name existing files
    where the evaluator was started (``predict.sh``) are made absolute. ``DCM_INPUT_DIR`` /
    ``DCM_OUTPUT_DIR`` are set too, the folder holding the ``dcm`` package is put on ``PYTHONPATH``, and
    ``PYTHON`` (the interpreter ``predict.sh`` runs) is this evaluator's own (``sys.executable``) unless it is
    set already. The command runs in its own process group: at a timeout, and when it ends, every process it
    started is killed. The log it returns is the command's stdout, then its stderr, then ``[exit status N]``
    when it failed.
    """

    def __init__(self, command: str, timeout: Optional[float] = None, verbose: bool = False):
        self.command = absolutise_command(command)
        self.timeout = timeout
        self.verbose = verbose

    def __call__(self, case_file: Path, workdir: Path) -> Tuple[float, str]:
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["DCM_INPUT_DIR"] = str(workdir / "inputs")
        env["DCM_OUTPUT_DIR"] = str(workdir / "outputs")
        env.setdefault("PYTHON", sys.executable)
        start = time.perf_counter()
        # Its own session (process group): a timeout, or the end of the step, ends every process it started.
        proc = subprocess.Popen(["sh", "-c", self.command], cwd=workdir, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, errors="replace", start_new_session=True)
        try:
            out, err = proc.communicate(timeout=self.timeout)
            log = (out or "") + ("\n" if out and not out.endswith("\n") and err else "") + (err or "")
            if proc.returncode != 0:
                log += f"\n{_COMMAND_FAILED} {proc.returncode}]"
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            proc.communicate()
            log = f"{_COMMAND_TIMED_OUT} {self.timeout} s]"
        except BaseException:  # Ctrl-C: leave nothing running
            _kill_group(proc.pid)
            proc.wait()
            raise
        finally:
            _kill_group(proc.pid)
        seconds = time.perf_counter() - start
        if self.verbose and log.strip():
            print(log, file=sys.stderr)
        return seconds, log


#: how a step's log says that the command failed (then its last lines go to ``notes.txt``).
_COMMAND_FAILED = "[exit status"
_COMMAND_TIMED_OUT = "[timed out after"
#: how many of a failed command's last output lines go to ``notes.txt``.
LOG_TAIL_LINES = 8


def _log_tail(log: str, lines: int = LOG_TAIL_LINES) -> List[str]:
    """The last ``lines`` non-empty lines of a step's log (a failing command's stderr ends it)."""
    return [line.rstrip() for line in log.splitlines() if line.strip()][-lines:]


def case_file_name(name: str) -> str:
    """A case's ``CaseName`` as the organisers' evaluator writes it: the file name, with ``.npz``."""
    return name if name.endswith(".npz") else f"{name}.npz"


def _kill_group(pgid: int) -> None:
    """SIGKILL every process of a process group (gone already: nothing to do)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


_SHELL_BREAKS = set(";&|<>()")


def _shell_words(command: str) -> List[Tuple[int, int, str]]:
    """``(start, end, value)`` of each word of a ``sh`` command line: quotes and backslashes removed from the
    value, the span covering the word as written; operators (``&&``, ``|``, ``>``, ``;``, ...) are not words.

    Raises:
        ValueError: an unterminated quote.
    """
    words, i, n = [], 0, len(command)
    while i < n:
        if command[i].isspace() or command[i] in _SHELL_BREAKS:
            i += 1
            continue
        start, value = i, []
        while i < n and not (command[i].isspace() or command[i] in _SHELL_BREAKS):
            c = command[i]
            if c == "'":
                end = command.find("'", i + 1)
                if end < 0:
                    raise ValueError("unterminated ' quote")
                value.append(command[i + 1:end])
                i = end + 1
            elif c == '"':
                i += 1
                while i < n and command[i] != '"':
                    if command[i] == "\\" and i + 1 < n and command[i + 1] in '"\\$`':
                        i += 1
                    value.append(command[i])
                    i += 1
                if i >= n:
                    raise ValueError('unterminated " quote')
                i += 1
            elif c == "\\":
                value.append(command[i + 1:i + 2])
                i += 2
            else:
                value.append(c)
                i += 1
        words.append((start, i, "".join(value)))
    return words


def _names_path(value: str) -> bool:
    """Whether a word names an existing file, or a folder written as a path (with a ``/``)."""
    try:
        path = Path(value)
        return path.is_file() or ("/" in value and path.exists())
    except (OSError, ValueError):  # a name too long, a NUL byte
        return False


def _names_command_path(value: str, after: Optional[str]) -> bool:
    """Whether a command word names an existing path here: a file or a folder; the word after ``--config``
    only as a file or a path written with a ``/`` (``--config dcm`` from the repository root is the preset
    ``configs/dcm.yaml``, not the package folder ``dcm/``)."""
    if after == "--config":
        return _names_path(value)
    try:
        return Path(value).exists()
    except (OSError, ValueError):  # a name too long, a NUL byte
        return False


def absolutise_command(command: str) -> str:
    """The command with each word that names an existing relative path (where the evaluator runs; after
    ``--config`` a file, so that a preset name stays a preset) made absolute; everything else (shell
    operators, redirections, variables, quoting) is kept as written, and the command runs through ``sh -c``.

    Raises:
        ConfigError: the command is empty or has an unterminated quote.
    """
    try:
        words = _shell_words(command)
    except ValueError as e:
        raise ConfigError(f"--predict-cmd {command!r}: {e}") from None
    if not words:
        raise ConfigError("--predict-cmd: empty command")
    out, last, after = [], 0, None
    for start, end, value in words:
        raw = command[start:end]
        if (value and not value.startswith("-") and not Path(value).is_absolute() and "$" not in raw
                and "`" not in raw and _names_command_path(value, after)):
            out.append(command[last:start] + shlex.quote(str(Path(value).resolve())))
            last = end
        after = value
    return "".join(out) + command[last:]


class InProcessPredictor:
    """Calls ``predict_fn(case) -> segs`` on the step's input file, timing only the call."""

    def __init__(self, predict_fn: Callable[[Case], np.ndarray]):
        self.predict_fn = predict_fn

    def __call__(self, case_file: Path, workdir: Path) -> Tuple[float, str]:
        from dcm.runner import predict_folder

        start = time.perf_counter()
        result = predict_folder(case_file.parent, workdir / "outputs", self.predict_fn)
        seconds = time.perf_counter() - start
        return seconds, "; ".join(r for _, r in result.failed)


def resolve_predictor(spec: str, cases_dir: Path) -> Callable[[Case], np.ndarray]:
    """``oracle``, ``box-fill`` or ``module:callable`` (a callable, or a class / factory taking no args);
    ``dcm`` (which needs a config) is built by :func:`build_step_runner`."""
    from dcm.baselines import BoxFillPredictor, OraclePredictor

    if spec == "oracle":
        return OraclePredictor(str(cases_dir))
    if spec == "box-fill":
        return BoxFillPredictor()
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise ConfigError(f"--predictor {spec!r}: expected 'oracle', 'box-fill', 'dcm' or 'module:callable'")
    obj = getattr(importlib.import_module(module_name), attr)
    if isinstance(obj, type):
        obj = obj()
    return obj


@dataclass(frozen=True)
class PredictorSpec:
    """What a worker needs to build its step runner: picklable, so that worker processes and Ray actors build
    their own (the experts load once per worker, at its first case).

    Exactly one of ``command`` (``--predict-cmd``), ``predictor`` (``oracle``, ``box-fill``, ``dcm`` or
    ``module:callable``) or ``variant_config`` (one variant of ``dcm.ablate``: a whole config dict) is set.
    """

    command: Optional[str] = None
    timeout: Optional[float] = None
    verbose: bool = False
    predictor: Optional[str] = None
    cases_dir: Optional[str] = None  # for the oracle
    config: Optional[str] = None  # --predictor dcm: config file or preset name (default configs/dcm.yaml)
    overrides: Tuple[str, ...] = ()
    weights: Optional[str] = None
    device: Optional[str] = None
    random_init: bool = False
    trusted: bool = False
    seed: int = 0
    variant_config: Optional[Dict[str, Any]] = field(default=None, hash=False, compare=False)

    def key(self) -> str:
        """A string naming the predictor: workers keep one built runner per key."""
        return json.dumps({k: v for k, v in self.__dict__.items()}, sort_keys=True, default=str)


def dcm_predictor(spec: PredictorSpec) -> Callable[[Case], np.ndarray]:
    """DCM's predictor built as ``predict.sh`` builds it (same config, overrides, seed, weights): the same
    outputs, bit for bit. The torch random state right after building is restored before every call, as
    each ``predict.sh`` call starts from it.

    Raises:
        DCMError: a bad config, device, seed or weights file (one line).
    """
    import torch

    from dcm.checks import check_device
    from dcm.config import load_config
    from dcm.engine.predictor import DCMPredictor
    from dcm.experts import build_experts_from_config

    cfg = load_config(spec.config or "dcm", tuple(spec.overrides))
    check_device(spec.device or cfg.get("device"), "--device" if spec.device else "device")
    torch.manual_seed(spec.seed)
    cfg, experts = build_experts_from_config(cfg, spec.weights, spec.device, (), trusted=spec.trusted,
                                             random_init=spec.random_init)
    return _FixedRandomState(DCMPredictor(experts, cfg.get("engine")), torch.get_rng_state())


class _FixedRandomState:
    """Calls ``predict_fn`` with torch's random state reset to ``state`` each time (a fresh process's)."""

    def __init__(self, predict_fn: Callable[[Case], np.ndarray], state: Any):
        self.predict_fn, self.state = predict_fn, state

    def __call__(self, case: Case) -> np.ndarray:
        import torch

        torch.set_rng_state(self.state)
        return self.predict_fn(case)


def check_predictor_spec(spec: PredictorSpec) -> None:
    """The checks that can be made before any worker starts, so that a bad setting is one line at once.

    Raises:
        DCMError: a bad command, config, device, seed or weights path.
    """
    from dcm.errors import CheckpointError

    if spec.command is not None:
        absolutise_command(spec.command)
    elif spec.predictor not in (None, "dcm", "oracle", "box-fill"):
        module_name, _, attr = str(spec.predictor).partition(":")
        if not attr:
            raise ConfigError(f"--predictor {spec.predictor!r}: expected 'oracle', 'box-fill', 'dcm' or "
                              f"'module:callable'")
        try:
            getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"--predictor {spec.predictor}: {type(e).__name__}: {e}") from None
    elif spec.predictor == "dcm":
        from dcm.checks import check_device
        from dcm.config import load_config, resolve_repo_path
        from dcm.engine.predictor import check_engine_config

        cfg = load_config(spec.config or "dcm", tuple(spec.overrides))
        check_engine_config(cfg.get("engine"))
        check_device(spec.device or cfg.get("device"), "--device" if spec.device else "device")
        if not spec.random_init:
            weights = resolve_repo_path(spec.weights or cfg.get("weights"))
            if weights is None:
                raise CheckpointError("no weights given: pass --weights FILE, or --random-init for a test run")
            if not Path(weights).is_file():
                raise CheckpointError(f"{weights}: weights file not found")


def build_step_runner(spec: PredictorSpec, cache: Optional[Dict[str, Any]] = None) -> StepRunner:
    """The step runner ``spec`` describes. ``cache`` (one per worker) keeps the experts that ablation
    variants share (see ``dcm.cli.ablate.variant_predictor``)."""
    if spec.command is not None:
        return CommandPredictor(spec.command, timeout=spec.timeout, verbose=spec.verbose)
    if spec.variant_config is not None:
        from dcm.engine.predictor import variant_predictor

        built = (cache if cache is not None else {}).setdefault("ablation_experts", {})
        return InProcessPredictor(variant_predictor(spec.variant_config, spec.weights, built, spec.device,
                                                    spec.random_init))
    if spec.predictor == "dcm":
        return InProcessPredictor(dcm_predictor(spec))
    return InProcessPredictor(resolve_predictor(str(spec.predictor), Path(spec.cases_dir or ".")))


# ------------------------------------------------------------------------------------------ evaluation


def _read_segs(path: Path, shape: Tuple[int, ...]) -> Tuple[np.ndarray, Optional[str]]:
    """The step's output as written (no cast: labels are compared as the integers they are, as the organisers
    do, so an int64 label 257 does not pass for label 1); a missing or unreadable file counts as all zeros
    (the organisers' rule). The note says what was wrong, or that ``segs`` is not uint8."""
    if not path.is_file():
        return np.zeros(shape, dtype=np.uint8), "no output file (scored as empty)"
    try:
        arrays = load_npz(path)
    except CaseError as e:
        return np.zeros(shape, dtype=np.uint8), f"{e} (scored as empty)"
    if "segs" not in arrays:
        return np.zeros(shape, dtype=np.uint8), f"{path}: no 'segs' key (scored as empty)"
    segs = np.asarray(arrays["segs"])
    if segs.shape != tuple(shape):
        raise ShapeError(f"{path}: segs shape {segs.shape} differs from imgs {tuple(shape)}")
    if segs.dtype != np.uint8:
        return segs, f"{path}: segs dtype {segs.dtype}, not uint8 (labels scored as they are, without a cast)"
    return segs, None


def evaluate_case(
    case: Case,
    run_step: StepRunner,
    workdir: Path,
    nsd_spacing: str = "stored",
    all_segs: Optional[List[np.ndarray]] = None,
) -> CaseResult:
    """Run the 6 steps of one source case (which must hold ``gts``) and score them.

    Args:
        case: the source case with ground truth.
        run_step: the predictor, called once per step with the step's input file.
        workdir: an empty folder; ``inputs/`` and ``outputs/`` are created in it.
        nsd_spacing: ``stored`` (the organisers' x-y-z spacing applied to z-y-x axes: official numbers) or
            ``physical`` (z-y-x: the geometrically correct NSD).
        all_segs: if given, receives the output of each step (zeros for a skipped box step).
    """
    if case.gts is None:
        raise CaseError(case.path or case.name, "gts", "missing (evaluation needs ground truth)")
    gts = case.gts
    labels = [int(v) for v in np.unique(gts) if v != 0]
    if labels != list(range(1, len(labels) + 1)):
        raise CaseError(case.path or case.name, "gts", f"labels must be sequential 1..N, got {labels[:10]}")
    has_boxes = case.has_boxes
    if has_boxes and len(case.objects) != len(labels):
        raise CaseError(case.path or case.name, "boxes", f"{len(case.objects)} boxes for {len(labels)} labels")
    spacing = case.spacing_xyz if nsd_spacing == "stored" else case.spacing_zyx
    result = CaseResult(name=case_file_name(case.name), num_class=len(labels))

    in_dir, out_dir = workdir / "inputs", workdir / "outputs"
    in_dir.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    in_file, out_file = in_dir / f"{case.name}.npz", out_dir / f"{case.name}.npz"
    # What the predictor is given (boxes, then one click per object and step) and what the clicks-kept check
    # reads; ``clicked[i]``: per click step, whether object i got a click (None in its clicks_order if not).
    prompts = [ObjectPrompts(label, box=case.objects[label - 1].box if has_boxes else None) for label in labels]
    clicked: List[List[bool]] = [[] for _ in labels]
    segs = np.zeros(case.shape, dtype=np.uint8)

    for step in range(1, NUM_STEPS + 1):
        if step == 1 and not has_boxes:
            if all_segs is not None:
                all_segs.append(np.zeros(case.shape, dtype=np.uint8))
            continue
        if step == 1:
            arrays = prompts_to_arrays(case.image, case.spacing_xyz, prompts, with_clicks=False)
        else:
            for obj, given, click in zip(prompts, clicked, next_clicks(gts, segs, labels)):
                given.append(click is not None)
                if click is not None:
                    obj.clicks.append(click)
            arrays = prompts_to_arrays(case.image, case.spacing_xyz, prompts, clicked=clicked, prev_pred=segs)
            arrays["prev_pred"] = segs  # as the predictor wrote it (a uint8 cast would wrap labels > 255)
        atomic_savez(in_file, compress=False, **arrays)
        # A stale output of the previous step must not be mistaken for this step's answer.
        out_file.unlink(missing_ok=True)
        seconds, log = run_step(in_file, workdir)
        segs, problem = _read_segs(out_file, case.shape)
        result.seconds[step - 1] = seconds
        failed = _COMMAND_FAILED in log or _COMMAND_TIMED_OUT in log
        if problem or failed:
            note = f"step {step}: {problem or 'the predictor failed'}"
            tail = _log_tail(log) if failed or problem else []
            result.notes.append(note + "".join(f"\n    {line}" for line in tail))
        dsc, nsd_value = case_scores(gts, segs, spacing)
        result.dsc[step - 1], result.nsd[step - 1] = dsc, nsd_value
        if step > 1:
            promises = promises_of(prompts, case.shape)
            result.clicks_kept[step - 1], result.clicks[step - 1] = clicks_kept(segs, prompts, promises)
            result.clicks_kept_by_reference[step - 1] = clicks_kept(gts, prompts, promises)[0]
        if all_segs is not None:
            all_segs.append(segs.copy())
    in_file.unlink(missing_ok=True)
    return result


def summarise(rows: Sequence[Dict[str, object]],
              click_rows: Optional[Sequence[Dict[str, object]]] = None) -> List[Dict[str, object]]:
    """Per-modality means (modality = case-name prefix) of the AUC and final metrics, plus ``All``; with
    ``click_rows`` (``CaseResult.clicks_row``) also the fraction of clicks kept over all click steps."""
    from dcm.data.cases import modality_of

    groups: Dict[str, List[Dict[str, object]]] = {}
    for row in rows:
        groups.setdefault(modality_of(str(row["CaseName"])), []).append(row)
    kept_by_case = {str(r["CaseName"]): (int(r["Kept"]), int(r["Clicks"])) for r in click_rows or ()}
    out = []
    for modality in sorted(groups) + (["All"] if rows else []):
        members = rows if modality == "All" else groups[modality]
        entry: Dict[str, object] = {"Modality": modality, "Cases": len(members)}
        for metric in SUMMARY_METRICS:
            entry[metric] = float(np.mean([float(r[metric]) for r in members]))
        entry["Over_budget"] = sum(float(r["TotalRunningTime"]) > float(r["runtime_upperbound"]) for r in members)
        if click_rows is not None:
            counts = [kept_by_case.get(str(r["CaseName"]), (0, 0)) for r in members]
            total = sum(n for _, n in counts)
            entry["Clicks_kept"] = sum(k for k, _ in counts) / total if total else 1.0
        out.append(entry)
    return out


def markdown_table(summary: Sequence[Dict[str, object]]) -> str:
    """The :func:`summarise` rows as a markdown table (written by :func:`dcm.tables.markdown_table`)."""
    cols = ["Modality", "Cases"] + SUMMARY_METRICS + ["Over_budget"]
    if summary and "Clicks_kept" in summary[0]:
        cols.append("Clicks_kept")
    return _markdown_table(cols, ([entry[c] for c in cols] for entry in summary))


def _write_csv(path: Path, rows: Sequence[Dict[str, object]], columns: Sequence[str]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        for row in rows:
            writer.writerow(row)


@dataclass
class CaseRecord:
    """The outcome of one case file: what ``cases/<case>.json`` holds.

    ``status``: ``ok`` (scored), ``error`` (the case cannot be evaluated: bad input, a wrong output shape; the
    same again on a rerun) or ``crash`` (the worker running it died, or an unexpected error, ``retries`` times
    over; ``--resume`` tries it again).
    """

    case: str  # file name, with .npz
    status: str
    row: Optional[Dict[str, object]] = None
    clicks_row: Optional[Dict[str, object]] = None
    notes: List[str] = field(default_factory=list)
    error: str = ""
    attempts: int = 1
    all_segs: Optional[np.ndarray] = None  # (6, z, y, x) with save_all_segs; not part of the JSON

    @property
    def finished(self) -> bool:
        """Whether ``--resume`` keeps this result instead of evaluating the case again."""
        return self.status in ("ok", "error")

    def to_json(self) -> str:
        data = {k: v for k, v in self.__dict__.items() if k != "all_segs"}
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "CaseRecord":
        data = json.loads(text)
        return cls(**{k: data[k] for k in ("case", "status", "row", "clicks_row", "notes", "error", "attempts")
                      if k in data})


RECORDS_DIR = "cases"


def record_path(out_dir: Path, case: str) -> Path:
    """Where the record of ``case`` (a file name) lives in a run folder."""
    return Path(out_dir) / RECORDS_DIR / f"{case_file_name(case)}.json"


def save_record(out_dir: Path, record: CaseRecord) -> None:
    """Write a finished case (``all_segs`` first, then its record, each atomically): a record on disk means
    the case is done, whatever stops the run afterwards."""
    if record.all_segs is not None:
        atomic_savez(Path(out_dir) / "all_segs" / record.case, all_segs=record.all_segs)
    with atomic_path(record_path(out_dir, record.case)) as tmp:
        tmp.write_text(record.to_json() + "\n")
    record.all_segs = None  # on disk now: a long run must not keep every case's arrays in memory


def load_records(out_dir: Path, cases: Optional[Sequence[str]] = None,
                 need_all_segs: bool = False) -> Dict[str, CaseRecord]:
    """The records of a run folder (only those of ``cases`` when given), by case file name. A record that
    cannot be read, or (``need_all_segs``) whose ``all_segs`` file is missing, is left out: that case runs
    again."""
    records: Dict[str, CaseRecord] = {}
    folder = Path(out_dir) / RECORDS_DIR
    wanted = None if cases is None else {case_file_name(c) for c in cases}
    if not folder.is_dir():
        return records
    for path in sorted(folder.glob("*.npz.json")):
        try:
            record = CaseRecord.from_json(path.read_text())
        except (OSError, ValueError, TypeError, KeyError):
            continue
        if wanted is not None and record.case not in wanted:
            continue
        if need_all_segs and record.status == "ok" and not (Path(out_dir) / "all_segs" / record.case).is_file():
            continue
        records[record.case] = record
    return records


def evaluate_file(path: Path, run_step: StepRunner, nsd_spacing: str = "stored",
                  save_all_segs: bool = False) -> CaseRecord:
    """The whole 6-step protocol on one case file, in a temporary working folder: the unit of work of the
    sequential run and of every worker (``dcm.evaluate.parallel``). A case that cannot be evaluated (bad input, a
    wrong output shape) is an ``error`` record; other exceptions propagate."""
    steps: Optional[List[np.ndarray]] = [] if save_all_segs else None
    name = case_file_name(Path(path).name)
    with tempfile.TemporaryDirectory(prefix="dcm-eval-") as tmp:
        try:
            case = load_case(Path(path), strict=True)
            result = evaluate_case(case, run_step, Path(tmp), nsd_spacing, steps)
        except (DCMError, ValueError) as e:
            # ShapeError: the organisers would abort the whole run here; we record it and go on.
            return CaseRecord(name, "error", error=" ".join(str(e).split()))
    notes = list(result.notes)
    if result.over_budget:
        notes.append(f"OVER BUDGET {result.total_seconds:.1f} s > {result.runtime_upperbound:.0f} s")
    return CaseRecord(name, "ok", row=result.row(), clicks_row=result.clicks_row(), notes=notes,
                      all_segs=np.stack(steps) if steps is not None else None)


def select_case_files(cases_dir: Path, limit: Optional[int] = None, num_parts: int = 1,
                      part_id: int = 0) -> List[Path]:
    """The case files a run evaluates: ``*.npz`` of ``cases_dir`` sorted by name, the first ``limit``, and of
    those part ``part_id`` of ``num_parts`` (every ``num_parts``-th file from the ``part_id``-th: a
    deterministic split that mixes modalities evenly).

    Raises:
        ConfigError: no such folder, or a bad part.
    """
    cases_dir = Path(cases_dir)
    if not cases_dir.is_dir():
        raise ConfigError(f"{cases_dir}: no such folder")
    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise ConfigError(f"--num-parts {num_parts} --part-id {part_id}: need num-parts >= 1 and "
                          f"0 <= part-id < num-parts")
    files = sorted(p for p in cases_dir.iterdir() if p.suffix == ".npz")[:limit]
    return files[part_id::num_parts]


def report_record(record: CaseRecord, write: Callable[..., None] = print) -> None:
    """The lines a finished case prints: ``FAILED <case>: <error>``, or its over-budget note."""
    if not record.status == "ok":
        write(f"FAILED {record.case}: {record.error}", file=sys.stderr)
    for note in record.notes:
        if note.startswith("OVER BUDGET"):
            write(f"{record.case}: {note}")


def write_results(out_dir: Path,
                  records: Sequence[CaseRecord]) -> Tuple[List[Dict[str, object]], List[Tuple[str, str]]]:
    """Write ``metrics.csv``, ``clicks.csv``, ``summary.csv`` / ``summary.md``, ``failures.csv`` and
    ``notes.txt`` from the records, in case-name order (whatever order they finished in).

    Returns:
        ``(metric_rows, failures)``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ordered = sorted(records, key=lambda r: r.case)
    rows = [dict(r.row) for r in ordered if r.status == "ok" and r.row is not None]
    click_rows = [dict(r.clicks_row) for r in ordered if r.status == "ok" and r.clicks_row is not None]
    failures = [(r.case, r.error) for r in ordered if r.status != "ok"]
    notes = [f"{r.case}: {n}" for r in ordered for n in r.notes]
    _write_csv(out_dir / "metrics.csv", rows, METRIC_COLUMNS)
    _write_csv(out_dir / "clicks.csv", click_rows, list(CaseResult("", 0).clicks_row()))
    summary = summarise(rows, click_rows)
    _write_csv(out_dir / "summary.csv", summary,
               ["Modality", "Cases"] + SUMMARY_METRICS + ["Over_budget", "Clicks_kept"])
    with atomic_path(out_dir / "summary.md") as tmp:
        tmp.write_text(markdown_table(summary) + "\n")
    _write_csv(out_dir / "failures.csv", [{"CaseName": n, "Error": e} for n, e in failures], ["CaseName", "Error"])
    with atomic_path(out_dir / "notes.txt") as tmp:
        tmp.write_text("\n".join(notes) + ("\n" if notes else ""))
    return rows, failures


def evaluate_folder(
    cases_dir: Path,
    out_dir: Path,
    run_step: StepRunner,
    nsd_spacing: str = "stored",
    save_all_segs: bool = False,
    limit: Optional[int] = None,
    progress: bool = True,
    resume: bool = False,
    files: Optional[Sequence[Path]] = None,
) -> Tuple[List[Dict[str, object]], List[Tuple[str, str]]]:
    """Evaluate every ``*.npz`` of ``cases_dir`` (sorted by name) one after another in this process and
    write the result files to ``out_dir``; each case's record is written as it finishes.

    Args:
        resume: keep the records of cases finished by an earlier run into ``out_dir``.
        files: the case files to evaluate (default: :func:`select_case_files` of ``cases_dir``, ``limit``).

    Returns:
        ``(metric_rows, failures)``; a case that cannot be evaluated is listed in ``failures`` and the run
        goes on.
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    try:
        files = list(files) if files is not None else select_case_files(Path(cases_dir), limit)
    except ConfigError as e:
        raise SystemExit(str(e)) from None
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [case_file_name(p.name) for p in files]
    done = {k: r for k, r in load_records(out_dir, names, save_all_segs).items() if r.finished} if resume else {}
    records = list(done.values())
    bar = tqdm([p for p in files if case_file_name(p.name) not in done], desc="evaluate", unit="case",
               disable=not progress, total=len(files), initial=len(done))
    for path in bar:
        bar.set_postfix_str(path.stem)
        record = evaluate_file(path, run_step, nsd_spacing, save_all_segs)
        save_record(out_dir, record)
        report_record(record, tqdm.write)
        records.append(record)
    return write_results(out_dir, records)


MANIFEST = "run.json"


def write_manifest(out_dir: Path, files: Sequence[Path], num_parts: int = 1, part_id: int = 0) -> None:
    """``run.json``: the cases a run (or part of a split run) evaluates, for ``merge`` to check coverage."""
    data = {"cases": [case_file_name(p.name) for p in files], "num_parts": num_parts, "part_id": part_id}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    with atomic_path(Path(out_dir) / MANIFEST) as tmp:
        tmp.write_text(json.dumps(data, indent=1) + "\n")


def load_manifest(out_dir: Path) -> Dict[str, Any]:
    """A run folder's ``run.json`` (empty if it has none)."""
    try:
        return json.loads((Path(out_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
