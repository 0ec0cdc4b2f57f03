"""Evaluation on several workers: local processes, Ray actors, or parts of a run on a scheduler's nodes.

One task is one case file through the whole 6-step protocol (:func:`dcm.evaluate.evaluate_file`, the unit
of the sequential run too). Each worker builds its predictor once, at its first task (DCM's experts load
once per worker), with a fixed number of CPU threads and, where there are GPUs, one GPU of its own. The
main process hands out one task at a time per worker, writes each case's record as it arrives
(``OUT/cases/<case>.json``, atomically: ``--resume`` continues from there), shows one progress bar over all
workers, and writes the result files in case-name order at the end: ``metrics.csv`` is the same as a
sequential run's apart from the time columns, whatever the number of workers.

A worker that dies (killed, out of memory, ``os._exit``) is replaced and its case tried again, up to
``retries`` times; then the case goes to ``failures.csv`` and the others finish. A predictor that cannot be
built (bad config, weights) stops the run with its one-line error; finished cases stay written.

    python -m dcm.evaluate ... --workers 4                   # local processes (spawned)
    python -m dcm.evaluate ... --workers 8 --ray ADDRESS     # Ray actors (`ray start --head` first)
    python -m dcm.evaluate ... --num-parts 10 --part-id $SLURM_ARRAY_TASK_ID   # then: merge
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import sys
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait as wait_connections
from pathlib import Path
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

from dcm.errors import DCMError
from dcm.evaluate.core import (CaseRecord, PredictorSpec, build_step_runner, case_file_name, evaluate_file,
                          load_records, report_record, save_record, write_results)

__all__ = [
    "CaseTask",
    "WorkerSetupError",
    "CaseWorker",
    "LocalProcessBackend",
    "RayBackend",
    "run_tasks",
    "evaluate_parallel",
    "merge_runs",
    "default_threads",
]

#: what a worker answers for a task: ``("record", CaseRecord)``, ``("fatal", message)`` (the predictor
#: cannot be built: stop the run), ``("crash", message)`` (an unexpected error: try the case again) or, from
#: the backend, ``("died", message)`` (the worker process is gone: replace it, try the case again).
Outcome = Tuple[str, Any]


class WorkerSetupError(DCMError):
    """A worker could not build its predictor (bad config, weights, device): the run stops."""


@dataclass
class CaseTask:
    """One case file through the protocol with one predictor, its record going to ``out_dir``."""

    case_path: str
    out_dir: str
    spec: PredictorSpec
    nsd_spacing: str = "stored"
    save_all_segs: bool = False
    attempts: int = 0

    @property
    def case(self) -> str:
        """The case's file name (its ``CaseName``)."""
        return case_file_name(Path(self.case_path).name)


# ------------------------------------------------------------------------------------------ workers


def cpu_count() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_threads(workers: int, cpus: Optional[int] = None) -> int:
    """CPU threads per worker: the CPUs shared evenly, at least one."""
    return max(1, (cpus or cpu_count()) // max(1, workers))


def configure_threads(threads: int, gpu: Optional[str] = None) -> None:
    """Fix this worker's CPU threads (torch, and the OpenMP / BLAS of commands it starts) and its GPU.

    Call before torch is imported (the environment variables are read then); ``torch.set_num_threads`` is
    applied too if it is imported already.
    """
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


class CaseWorker:
    """What a worker keeps between tasks: one step runner per predictor (built at its first task, so the
    experts load once) and its thread setting. The same class runs in a local process and as a Ray actor."""

    def __init__(self, threads: int, gpu: Optional[str] = None):
        self.threads = threads
        configure_threads(threads, gpu)
        self.runners: Dict[str, Any] = {}
        self.cache: Dict[str, Any] = {}

    def run(self, task: CaseTask) -> Outcome:
        """Evaluate one case; never raises (see :data:`Outcome`)."""
        key = task.spec.key()
        if key not in self.runners:
            try:
                self.runners[key] = build_step_runner(task.spec, self.cache)
            except DCMError as e:
                return "fatal", " ".join(str(e).split())
            except Exception as e:  # an import error, a module:callable that raised
                return "fatal", f"the predictor could not be built ({type(e).__name__}: {e})"
            configure_threads(self.threads)
        try:
            return "record", evaluate_file(Path(task.case_path), self.runners[key], task.nsd_spacing,
                                           task.save_all_segs)
        except Exception as e:
            return "crash", f"{type(e).__name__}: {' '.join(str(e).split())}"


def _process_worker_main(conn: Connection, threads: int, gpu: Optional[str]) -> None:
    """A local worker process: tasks in, outcomes out, until ``None`` or the main process goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    worker = CaseWorker(threads, gpu)
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        conn.send(worker.run(task))


class LocalProcessBackend:
    """Workers as spawned local processes, each fed through its own pipe (so a dead worker's case is known)."""

    def __init__(self, threads: int, gpus: Sequence[str] = ()):
        self.threads = threads
        self.gpus = list(gpus)
        self.context = multiprocessing.get_context("spawn")
        self.workers: Dict[int, Tuple[Any, Connection]] = {}
        self.busy: Dict[int, bool] = {}

    def start(self, slot: int) -> None:
        parent, child = self.context.Pipe()
        gpu = self.gpus[slot % len(self.gpus)] if self.gpus else None
        proc = self.context.Process(target=_process_worker_main, args=(child, self.threads, gpu),
                                    name=f"dcm-eval-worker-{slot}", daemon=True)
        proc.start()
        child.close()  # only the worker holds it now: its death reads as EOF here
        self.workers[slot] = (proc, parent)

    def submit(self, slot: int, task: CaseTask) -> None:
        proc, conn = self.workers[slot]
        try:
            conn.send(task)
        except (BrokenPipeError, OSError):
            pass  # dead already: wait() reports it
        self.busy[slot] = True

    def wait(self) -> List[Tuple[int, Outcome]]:
        by_conn = {self.workers[slot][1]: slot for slot in self.busy}
        outcomes = []
        for conn in wait_connections(list(by_conn)):
            slot = by_conn[conn]  # type: ignore[index]
            proc = self.workers[slot][0]
            try:
                outcome: Outcome = conn.recv()  # type: ignore[union-attr]
            except (EOFError, OSError):
                proc.join(10)
                code = proc.exitcode
                how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
                outcome = ("died", f"the worker died ({how})")
            del self.busy[slot]
            outcomes.append((slot, outcome))
        return outcomes

    def restart(self, slot: int) -> None:
        self._stop(slot)
        self.start(slot)

    def _stop(self, slot: int) -> None:
        proc, conn = self.workers.pop(slot)
        try:
            conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()
        conn.close()

    def close(self) -> None:
        for slot in list(self.workers):
            self._stop(slot)


class RayBackend:
    """Workers as Ray actors: one CPU share (``threads``) each and one GPU each where the cluster has GPUs.

    ``address``: ``local`` starts a Ray of this machine's own for the run; ``default`` is ``ray.init()``'s
    choice (``RAY_ADDRESS``, a Ray started on this machine, else a local one); anything else is a cluster
    address (``HEAD:6379``, ``ray://HEAD:10001``). The case files must be readable at the same path on every
    node; records and result files are written by this process only.
    """

    def __init__(self, address: str, workers: int, threads: Optional[int]):
        try:
            import ray
        except ImportError:
            raise DCMError("--ray: ray is not installed (pip install -r requirements.txt)") from None
        self.ray = ray
        package_root = str(Path(__file__).resolve().parent.parent)
        inherited = os.environ.get("PYTHONPATH")
        env = {"PYTHONPATH": package_root + (os.pathsep + inherited if inherited else "")}
        kwargs: Dict[str, Any] = {"runtime_env": {"env_vars": env}, "include_dashboard": False,
                                  "log_to_driver": False, "configure_logging": False}
        if address == "local":
            kwargs["num_cpus"] = max(cpu_count(), workers * (threads or 1))
        try:
            ray.init(address=None if address in ("local", "default") else address, **kwargs)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise DCMError(f"--ray {address}: cannot connect ({' '.join(str(e).split())})") from None
        resources = ray.cluster_resources()
        node_cpus = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
        total = int(resources.get("CPU", 1))
        self.threads = threads or max(1, min(int(max(node_cpus or [total])), total // max(1, workers)))
        self.use_gpu = resources.get("GPU", 0) > 0
        self.actor_class = ray.remote(num_cpus=self.threads, num_gpus=1 if self.use_gpu else 0,
                                      max_restarts=0)(CaseWorker)
        self.actors: Dict[int, Any] = {}
        self.pending: Dict[Any, int] = {}

    def start(self, slot: int) -> None:
        self.actors[slot] = self.actor_class.remote(self.threads)

    def submit(self, slot: int, task: CaseTask) -> None:
        self.pending[self.actors[slot].run.remote(task)] = slot

    def wait(self) -> List[Tuple[int, Outcome]]:
        ready, _ = self.ray.wait(list(self.pending), num_returns=1)
        outcomes = []
        for ref in ready:
            slot = self.pending.pop(ref)
            try:
                outcome: Outcome = self.ray.get(ref)
            except self.ray.exceptions.RayActorError as e:
                outcome = ("died", f"the worker died ({' '.join(str(e).split())[:300]})")
            except self.ray.exceptions.RayError as e:
                outcome = ("crash", " ".join(str(e).split())[:300])
            outcomes.append((slot, outcome))
        return outcomes

    def restart(self, slot: int) -> None:
        self.ray.kill(self.actors.pop(slot), no_restart=True)
        self.start(slot)

    def close(self) -> None:
        for actor in self.actors.values():
            try:
                self.ray.kill(actor, no_restart=True)
            except Exception:  # gone already
                pass
        self.actors.clear()
        self.ray.shutdown()


# ------------------------------------------------------------------------------------------ scheduling


def run_tasks(tasks: Sequence[CaseTask], backend: Any, workers: int, retries: int,
              on_record: Callable[[CaseTask, CaseRecord], None],
              on_retry: Optional[Callable[[CaseTask, str], None]] = None) -> None:
    """Run every task on ``workers`` workers of ``backend``, one task at a time per worker, calling
    ``on_record`` in the main process as each finishes. A task whose worker died or crashed is tried again
    (first in line) up to ``retries`` times, then recorded as a ``crash``. The backend is closed at the end,
    whatever happens.

    Raises:
        WorkerSetupError: a worker could not build its predictor (the tasks that finished were recorded).
    """
    pending: Deque[CaseTask] = deque(tasks)
    busy: Dict[int, CaseTask] = {}
    free: List[int] = []
    try:
        for slot in range(min(workers, len(pending))):
            backend.start(slot)
            free.append(slot)
        while pending or busy:
            while free and pending:
                slot, task = free.pop(), pending.popleft()
                task.attempts += 1
                backend.submit(slot, task)
                busy[slot] = task
            for slot, (kind, payload) in backend.wait():
                task = busy.pop(slot)
                if kind == "record":
                    payload.attempts = task.attempts
                    on_record(task, payload)
                elif kind == "fatal":
                    raise WorkerSetupError(payload)
                else:
                    if kind == "died":
                        backend.restart(slot)
                    if task.attempts > retries:
                        on_record(task, CaseRecord(task.case, "crash", attempts=task.attempts,
                                                   error=f"{payload}; gave up after {task.attempts} attempts"))
                    else:
                        if on_retry is not None:
                            on_retry(task, payload)
                        pending.appendleft(task)
                free.append(slot)
    finally:
        backend.close()


def visible_gpus() -> List[str]:
    """The GPUs local workers are spread over: ``CUDA_VISIBLE_DEVICES`` when set, else those the NVIDIA driver
    lists (none without it)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip() and g.strip() != "-1"]
    if "torch" in sys.modules:
        return [str(i) for i in range(sys.modules["torch"].cuda.device_count())]
    driver = Path("/proc/driver/nvidia/gpus")  # the NVIDIA driver's list: no 5 s torch import to count them
    try:
        return [str(i) for i in range(sum(1 for _ in driver.iterdir()))]
    except OSError:  # no NVIDIA driver: CPU workers
        return []


def make_backend(workers: int, ray_address: Optional[str], threads: Optional[int]) -> Any:
    """Ray actors when ``ray_address`` is given, else spawned local processes (one GPU each, round robin)."""
    if ray_address is not None:
        return RayBackend(ray_address, workers, threads)
    gpus = visible_gpus()
    if gpus and workers > len(gpus):
        print(f"evaluate: {workers} workers share {len(gpus)} GPU(s)", file=sys.stderr)
    return LocalProcessBackend(threads or default_threads(workers), gpus)


def execute(tasks: Sequence[CaseTask], workers: int, ray_address: Optional[str], threads: Optional[int],
            retries: int, total: int, done: int, progress: bool = True, desc: str = "evaluate") -> None:
    """Run ``tasks`` with one progress bar (``done`` of ``total`` finished before), each record written to
    its task's ``out_dir`` as it arrives."""
    from tqdm import tqdm

    if not tasks:
        return
    bar = tqdm(total=total, initial=done, desc=desc, unit="case", disable=not progress)

    def on_record(task: CaseTask, record: CaseRecord) -> None:
        save_record(Path(task.out_dir), record)
        report_record(record, tqdm.write)
        bar.update(1)
        bar.set_postfix_str(Path(task.case_path).stem)

    def on_retry(task: CaseTask, reason: str) -> None:
        tqdm.write(f"{task.case}: {reason}; trying again", file=sys.stderr)

    try:
        run_tasks(tasks, make_backend(workers, ray_address, threads), workers, retries, on_record, on_retry)
    finally:
        bar.close()


def evaluate_parallel(files: Sequence[Path], out_dir: Path, spec: PredictorSpec, nsd_spacing: str = "stored",
                      save_all_segs: bool = False, workers: int = 2, ray_address: Optional[str] = None,
                      threads: Optional[int] = None, retries: int = 2, resume: bool = False,
                      progress: bool = True) -> Tuple[List[Dict[str, object]], List[Tuple[str, str]]]:
    """The parallel counterpart of :func:`dcm.evaluate.evaluate_folder` over ``files``.

    With ``resume``, cases with a record in ``out_dir`` are kept; with none left, no worker starts.

    Raises:
        WorkerSetupError: the predictor could not be built; the result files of the finished cases are
            written first.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [case_file_name(p.name) for p in files]
    done = {k: r for k, r in load_records(out_dir, names, save_all_segs).items() if r.finished} if resume else {}
    tasks = [CaseTask(str(Path(p).resolve()), str(out_dir), spec, nsd_spacing, save_all_segs)
             for p in files if case_file_name(p.name) not in done]
    try:
        execute(tasks, workers, ray_address, threads, retries, len(files), len(done), progress)
    except BaseException:  # the finished cases are on disk; their result files too
        write_results(out_dir, list(load_records(out_dir, names).values()))
        raise
    return write_results(out_dir, list(load_records(out_dir, names).values()))


# ------------------------------------------------------------------------------------------ parts


def merge_runs(part_dirs: Sequence[Path],
               out_dir: Path) -> Tuple[List[Dict[str, object]], List[Tuple[str, str]], List[str]]:
    """Merge the run folders of a split run (``--num-parts K --part-id I``) into ``out_dir``: the records
    (and ``all_segs``) are copied and the result files written from all of them, as a single run writes them.

    Returns:
        ``(metric_rows, failures, warnings)``; a warning names parts or cases missing from the folders given.

    Raises:
        DCMError: a folder that is not a run folder.
    """
    from dcm.evaluate.core import RECORDS_DIR, load_manifest

    out_dir = Path(out_dir)
    records: Dict[str, CaseRecord] = {}
    expected: List[str] = []
    parts_seen, num_parts = set(), set()
    for part in map(Path, part_dirs):
        if not (part / RECORDS_DIR).is_dir():
            raise DCMError(f"{part}: not a run folder of dcm.evaluate (no {RECORDS_DIR}/ folder)")
        manifest = load_manifest(part)
        if manifest:
            expected += manifest.get("cases", [])
            parts_seen.add(manifest.get("part_id", 0))
            num_parts.add(manifest.get("num_parts", 1))
        for name, record in load_records(part).items():
            if name in records and records[name].status == "ok":
                continue
            records[name] = record
            src = part / "all_segs" / name
            if src.is_file() and Path(out_dir).resolve() != part.resolve():
                (out_dir / "all_segs").mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, out_dir / "all_segs" / name)
    warnings = []
    if len(num_parts) > 1:
        warnings.append(f"the folders come from runs split differently (num-parts {sorted(num_parts)})")
    elif num_parts:
        missing = sorted(set(range(next(iter(num_parts)))) - parts_seen)
        if missing:
            warnings.append(f"part(s) {', '.join(map(str, missing))} of {next(iter(num_parts))} not given")
    unfinished = sorted(set(expected) - set(records))
    if unfinished:
        warnings.append(f"{len(unfinished)} case(s) without a result (first: {unfinished[0]}): "
                        f"run that part again with --resume")
    for record in records.values():
        save_record(out_dir, record)
    rows, failures = write_results(out_dir, list(records.values()))
    return rows, failures, warnings
