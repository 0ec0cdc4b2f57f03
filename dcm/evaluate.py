"""The 6-step interactive evaluation of the CVPR 2025 challenge, reproducing the official numbers.

Per case: step 1 gives the boxes (skipped, scored 0, for cases without boxes); steps 2..6 each add one
click per object at the organisers' next-click location (``dcm.protocol.next_click``) computed from the
previous output. Every step is one predictor call, timed, exactly as the organisers run a container:
a working folder holding ``inputs/<case>.npz`` and ``outputs/``.

    python -m dcm.evaluate --cases DIR --out DIR --predict-cmd "sh predict.sh"
    python -m dcm.evaluate --cases DIR --out DIR --predictor box-fill        # in-process, fast
    python -m dcm.evaluate --cases DIR --out DIR --predictor my.module:predict

Writes ``metrics.csv`` (official columns and order), ``summary.csv`` / ``summary.md`` (per-modality means),
``clicks.csv`` (per case and click step: the clicks given so far and how many the output keeps, see
``dcm.engine.clicks``),
``failures.csv`` (cases that could not be evaluated), and with ``--save-all-segs`` ``all_segs/<case>.npz``.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from dcm.atomic import atomic_path
from dcm.data.cases import Case, atomic_savez, load_case, load_npz, prompts_to_arrays
from dcm.errors import CaseError, ConfigError, DCMError
from dcm.engine.clicks import clicks_kept
from dcm.metrics import case_scores, click_auc
from dcm.prompts import ObjectPrompts
from dcm.protocol import next_clicks
from dcm.tables import markdown_table as _markdown_table

__all__ = [
    "NUM_STEPS",
    "SECONDS_PER_CLASS",
    "METRIC_COLUMNS",
    "CaseResult",
    "CommandPredictor",
    "evaluate_case",
    "evaluate_folder",
    "summarise",
    "main",
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
        """``clicks.csv``: per click step, the clicks given so far and how many the output kept."""
        row: Dict[str, object] = {"CaseName": self.name, "Clicks": sum(self.clicks), "Kept": sum(self.clicks_kept)}
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
    ``DCM_OUTPUT_DIR`` are set too, and the folder holding the ``dcm`` package is put on ``PYTHONPATH``. The
    command runs in its own process group: at a timeout, and when it ends, every process it started is
    killed.
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
        start = time.perf_counter()
        # Its own session (process group): a timeout, or the end of the step, ends every process it started.
        proc = subprocess.Popen(["sh", "-c", self.command], cwd=workdir, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
        try:
            log, _ = proc.communicate(timeout=self.timeout)
            log = log or ""
            if proc.returncode != 0:
                log += f"\n[exit status {proc.returncode}]"
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            proc.communicate()
            log = f"[timed out after {self.timeout} s]"
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


def _exists(value: str) -> bool:
    try:
        return Path(value).exists()
    except (OSError, ValueError):  # a name too long, a NUL byte
        return False


def absolutise_command(command: str) -> str:
    """The command with each word that names an existing relative path (where the evaluator runs) made
    absolute; everything else (shell operators, redirections, variables, quoting) is kept as written, and the
    command runs through ``sh -c``.

    Raises:
        ConfigError: the command is empty or has an unterminated quote.
    """
    try:
        words = _shell_words(command)
    except ValueError as e:
        raise ConfigError(f"--predict-cmd {command!r}: {e}") from None
    if not words:
        raise ConfigError("--predict-cmd: empty command")
    out, last = [], 0
    for start, end, value in words:
        raw = command[start:end]
        if (value and not value.startswith("-") and not Path(value).is_absolute() and "$" not in raw
                and "`" not in raw and _exists(value)):
            out.append(command[last:start] + shlex.quote(str(Path(value).resolve())))
            last = end
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
    """``oracle``, ``box-fill`` or ``module:callable`` (a callable, or a class / factory taking no args)."""
    from dcm.baselines import BoxFillPredictor, OraclePredictor

    if spec == "oracle":
        return OraclePredictor(str(cases_dir))
    if spec == "box-fill":
        return BoxFillPredictor()
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise SystemExit(f"--predictor {spec!r}: expected 'oracle', 'box-fill' or 'module:callable'")
    obj = getattr(importlib.import_module(module_name), attr)
    if isinstance(obj, type):
        obj = obj()
    return obj


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
    result = CaseResult(name=case.name, num_class=len(labels))

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
        if problem:
            result.notes.append(f"step {step}: {problem}" + (f" [{log.strip().splitlines()[-1]}]" if log.strip() else ""))
        dsc, nsd_value = case_scores(gts, segs, spacing)
        result.dsc[step - 1], result.nsd[step - 1] = dsc, nsd_value
        if step > 1:
            result.clicks_kept[step - 1], result.clicks[step - 1] = clicks_kept(segs, prompts)
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


def evaluate_folder(
    cases_dir: Path,
    out_dir: Path,
    run_step: StepRunner,
    nsd_spacing: str = "stored",
    save_all_segs: bool = False,
    limit: Optional[int] = None,
    progress: bool = True,
) -> Tuple[List[Dict[str, object]], List[Tuple[str, str]]]:
    """Evaluate every ``*.npz`` of ``cases_dir`` (sorted by name) and write the result files to ``out_dir``.

    Returns:
        ``(metric_rows, failures)``; a case that cannot be evaluated is listed in ``failures`` and the run
        goes on.
    """
    from tqdm import tqdm

    cases_dir, out_dir = Path(cases_dir), Path(out_dir)
    if not cases_dir.is_dir():
        raise SystemExit(f"{cases_dir}: no such folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in cases_dir.iterdir() if p.suffix == ".npz")[:limit]
    rows: List[Dict[str, object]] = []
    click_rows: List[Dict[str, object]] = []
    failures: List[Tuple[str, str]] = []
    notes: List[str] = []
    bar = tqdm(files, desc="evaluate", unit="case", disable=not progress)
    for path in bar:
        bar.set_postfix_str(path.stem)
        steps: Optional[List[np.ndarray]] = [] if save_all_segs else None
        with tempfile.TemporaryDirectory(prefix="dcm-eval-") as tmp:
            try:
                case = load_case(path, strict=True)
                result = evaluate_case(case, run_step, Path(tmp), nsd_spacing, steps)
            except (DCMError, ValueError) as e:
                # ShapeError: the organisers would abort the whole run here; we record it and go on.
                failures.append((path.stem, " ".join(str(e).split())))
                tqdm.write(f"FAILED {path.name}: {failures[-1][1]}", file=sys.stderr)
                continue
        rows.append(result.row())
        click_rows.append(result.clicks_row())
        notes += [f"{result.name}: {n}" for n in result.notes]
        if result.over_budget:
            notes.append(f"{result.name}: OVER BUDGET {result.total_seconds:.1f} s > {result.runtime_upperbound:.0f} s")
            tqdm.write(notes[-1])
        if steps is not None:
            atomic_savez(out_dir / "all_segs" / f"{path.stem}.npz", all_segs=np.stack(steps))
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dcm.evaluate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", required=True, help="folder of source cases (.npz with gts)")
    parser.add_argument("--out", required=True, help="folder for metrics.csv, summary.md, ...")
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--predict-cmd", help='external command run per step, e.g. "sh predict.sh"')
    who.add_argument("--predictor", help="in-process: oracle, box-fill or module:callable")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per external call")
    parser.add_argument("--nsd-spacing", choices=["stored", "physical"], default="stored",
                        help="stored = organisers' x-y-z spacing on z-y-x axes (official numbers); physical = z-y-x")
    parser.add_argument("--save-all-segs", action="store_true", help="write all_segs/<case>.npz (6, z, y, x)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N cases")
    parser.add_argument("--verbose", action="store_true", help="print the external command's output")
    args = parser.parse_args(argv)

    if args.predict_cmd:
        try:
            runner: StepRunner = CommandPredictor(args.predict_cmd, timeout=args.timeout, verbose=args.verbose)
        except ConfigError as e:
            print(f"evaluate: {e}", file=sys.stderr)
            return 2
    else:
        runner = InProcessPredictor(resolve_predictor(args.predictor, Path(args.cases)))
    rows, failures = evaluate_folder(Path(args.cases), Path(args.out), runner, args.nsd_spacing,
                                     args.save_all_segs, args.limit)
    print((Path(args.out) / "summary.md").read_text(), end="")
    print(f"\n{len(rows)} cases evaluated, {len(failures)} failed; results in {args.out}")
    return 1 if failures or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
