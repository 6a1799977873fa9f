"""Where a suite's cells run: in this process, in N local worker processes, or as SLURM jobs (submitit).

    executor=local workers=1     one cell after the other in this process (the default)
    executor=local workers=N     N spawned worker processes, one cell each at a time, with
                                 max(1, cpu_count // N) torch threads each; datasets are loaded in each worker
    executor=submitit            one job-array task per cell through submitit (`submitit:` section of the
                                 suite: cluster, partition, time, gpus_per_node, cpus_per_task, mem_gb,
                                 array_parallelism, folder, parameters); `submitit.cluster=local|debug`
                                 runs the same code path on this machine (tests)

Every executor runs a cell through `growbench.runner.execute_cell`: under the cell's lock (two processes
never run the same cell, even from two invocations), with checkpoints at every evaluation point, and
the record written atomically by the process that ran the cell. A cell whose process dies (kill -9,
out of memory, node failure) is reported as lost and nothing else is: it resumes from its checkpoint
at the next run. A worker process dies with the process that started it.
"""
from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections import deque
from multiprocessing.connection import wait
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm

from growbench.config import ConfigError, Suite
from growbench.data import Dataset
from growbench.records import RecordWriteError
from growbench.runner import Cell, Outcome, execute_cell, load_data

RERUN = "rerun the same command to finish it (it resumes from its last checkpoint)"


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def make_executor(suite: Suite, device: torch.device, n_cells: int) -> "Executor":
    if suite.executor == "submitit":
        return SubmititExecutor(suite, device)
    if suite.workers > 1 and n_cells > 1:
        return LocalProcesses(suite.workers, device)
    return InProcess(device)


class Executor:
    def describe(self) -> str:
        return ""

    def run(self, todo: list[Cell], data: dict[str, Dataset], quiet: bool | None) -> Iterator[Outcome]:
        """Run the cells; yield one Outcome per cell as it ends. `data` holds the datasets the parent
        loaded (and so checked); executors that run cells elsewhere drop them."""
        raise NotImplementedError


# --------------------------------------------------------------------------- in this process
class InProcess(Executor):
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def run(self, todo, data, quiet):
        on_device = {name: d.to(self.device) for name, d in data.items()}
        for c in todo:
            bar = tqdm(total=None, desc=c.label, unit="step", leave=False, file=sys.stderr, mininterval=0.5,
                       disable=quiet)

            def progress(step: int, total: int, bar=bar) -> None:
                if bar.total is None:
                    bar.total = total
                    bar.refresh()
                if step - bar.n >= 20 or step == total:
                    bar.update(step - bar.n)

            try:
                outcome = execute_cell(c, on_device[c.dataset], self.device, progress)
            finally:
                bar.close()
            yield outcome


# --------------------------------------------------------------------------- local worker processes
def _die_with_parent(parent_pid: int) -> None:
    """Have the kernel kill this worker when its parent dies (Linux), else poll for it."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) != 0:  # PR_SET_PDEATHSIG
            raise OSError(ctypes.get_errno(), "prctl")
    except Exception:
        def watch() -> None:
            while os.getppid() == parent_pid:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent_pid:  # the parent died before prctl
        os._exit(1)


def _worker_main(conn, threads: int, parent_pid: int) -> None:
    """A worker: receive (cell, device) pairs, run each with execute_cell, send back its Outcome."""
    _die_with_parent(parent_pid)
    torch.set_num_threads(threads)
    datasets: dict[str, Dataset] = {}
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError, KeyboardInterrupt):
            return
        if msg is None:
            return
        cell, device_name = msg
        try:
            device = torch.device(device_name)
            if cell.dataset not in datasets:
                datasets[cell.dataset] = load_data(cell.suite, cell.dataset).to(device)
            outcome = execute_cell(cell, datasets[cell.dataset], device)
        except RecordWriteError as e:
            outcome = Outcome(cell.label, str(cell.path), "write_error", str(e))
        except KeyboardInterrupt:
            return
        except BaseException as e:  # the harness's own failure (a cell's failures are in its record)
            outcome = Outcome(cell.label, str(cell.path), "lost",
                              f"LOST (worker error {type(e).__name__}: {e}); {RERUN}")
        try:
            conn.send(outcome)
        except (OSError, ValueError):
            return


@dataclasses.dataclass
class _Worker:
    proc: mp.process.BaseProcess
    conn: object
    device: str
    cell: Cell | None = None


def _death(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class LocalProcesses(Executor):
    def __init__(self, workers: int, device: torch.device) -> None:
        self.workers = workers
        self.device = device
        self.threads = max(1, cpu_count() // workers)

    def describe(self) -> str:
        return f", {self.workers} worker processes with {self.threads} torch thread(s) each"

    def _device_for(self, i: int) -> str:
        if self.device.type == "cuda" and self.device.index is None and torch.cuda.device_count() > 1:
            return f"cuda:{i % torch.cuda.device_count()}"
        return str(self.device)

    def _start(self, ctx, i: int) -> _Worker:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker_main, args=(child, self.threads, os.getpid()),
                           name=f"growbench-worker-{i}", daemon=True)
        proc.start()
        child.close()
        return _Worker(proc, parent, self._device_for(i))

    def run(self, todo, data, quiet):
        data.clear()  # each worker loads its own copy
        ctx = mp.get_context("spawn")
        pending = deque(todo)
        workers = [self._start(ctx, i) for i in range(min(self.workers, len(todo)))]
        restarts = 0
        try:
            while True:
                for i, w in enumerate(workers):  # hand a cell to every idle worker, replacing dead ones
                    if w.cell is not None or not pending:
                        continue
                    if not w.proc.is_alive():
                        restarts += 1
                        if restarts > 4 * len(workers) + len(todo):
                            raise RuntimeError("growbench worker processes keep dying before they run a cell; "
                                               "see the messages above")
                        w.conn.close()
                        workers[i] = w = self._start(ctx, i)
                    cell = pending.popleft()
                    try:
                        w.conn.send((cell, w.device))
                        w.cell = cell
                    except (OSError, ValueError):  # it died just now: it is replaced on the next round
                        pending.appendleft(cell)
                        w.proc.kill()
                        w.proc.join()
                busy = [w for w in workers if w.cell is not None]
                if not busy:
                    if pending:
                        continue
                    return
                ready = set(wait([w.conn for w in busy] + [w.proc.sentinel for w in busy]))
                for w in busy:
                    if w.conn not in ready and w.proc.sentinel not in ready:
                        continue
                    outcome = None
                    try:
                        if w.conn.poll():
                            outcome = w.conn.recv()
                    except (EOFError, OSError):
                        pass
                    if outcome is None:
                        w.proc.join(timeout=10)
                        if w.proc.is_alive():
                            continue  # the pipe broke but the process lives on: wait for its sentinel
                        outcome = Outcome(w.cell.label, str(w.cell.path), "lost",
                                          f"LOST: its worker process {_death(w.proc.exitcode)}; {RERUN}")
                    w.cell = None
                    yield outcome
                    if outcome.status == "write_error":  # disk full: stop; running cells keep their checkpoints
                        return
        finally:
            self._shutdown(workers)

    @staticmethod
    def _shutdown(workers: list[_Worker]) -> None:
        for w in workers:
            if w.proc.is_alive():
                if w.cell is None:
                    try:
                        w.conn.send(None)
                    except (OSError, ValueError):
                        w.proc.terminate()
                else:
                    w.proc.terminate()
        deadline = time.monotonic() + 10
        for w in workers:
            w.proc.join(timeout=max(0.1, deadline - time.monotonic()))
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join()
            try:
                w.conn.close()
            except OSError:
                pass


# --------------------------------------------------------------------------- submitit / SLURM
class CellJob:
    """The callable a submitit job runs: one cell, through execute_cell. On preemption or timeout
    submitit calls `checkpoint`, which requeues the same cell; it resumes from its last checkpoint."""

    def __init__(self, device: str, threads: int) -> None:
        self.device = device
        self.threads = threads

    def __call__(self, cell: Cell) -> Outcome:
        from growbench.runner import resolve_device

        torch.set_num_threads(self.threads)
        device = resolve_device(self.device)
        try:
            data = load_data(cell.suite, cell.dataset).to(device)
            return execute_cell(cell, data, device)
        except RecordWriteError as e:
            return Outcome(cell.label, str(cell.path), "write_error", str(e))

    def checkpoint(self, cell: Cell):
        import submitit

        return submitit.helpers.DelayedSubmission(self, cell)


def _absolute(suite: Suite) -> Suite:
    """Paths a job on another node (or in another folder) reads the same way."""
    root = suite.dataset.root
    ds = dataclasses.replace(suite.dataset, root=str(Path(root).expanduser().resolve()) if root else None)
    return dataclasses.replace(suite, results_dir=str(Path(suite.results_dir).resolve()), dataset=ds)


class SubmititExecutor(Executor):
    poll_s = 1.0

    def __init__(self, suite: Suite, device: torch.device) -> None:
        import submitit

        cfg = suite.submitit
        self.suite = suite
        self.device = suite.device  # resolved on the node that runs the job
        self.folder = Path(cfg.folder) if cfg.folder else Path(suite.results_dir) / "submitit"
        try:
            self.ex = submitit.AutoExecutor(folder=self.folder, cluster=cfg.cluster)
            params = {"name": f"growbench-{suite.name}", "gpus_per_node": cfg.gpus_per_node,
                      "cpus_per_task": cfg.cpus_per_task, "slurm_array_parallelism": cfg.array_parallelism,
                      "timeout_min": cfg.time}
            if cfg.partition:
                params["slurm_partition"] = cfg.partition
            if cfg.mem_gb:
                params["mem_gb"] = cfg.mem_gb
            params.update(cfg.parameters)
            self.ex.update_parameters(**params)
        except (ValueError, TypeError, AssertionError, RuntimeError) as e:
            raise ConfigError(f"submitit: {e}") from None

    def describe(self) -> str:
        return f", as submitit jobs on {self.ex.cluster} (logs in {self.folder})"

    def run(self, todo, data, quiet):
        data.clear()
        suite = _absolute(self.suite)
        cells = [dataclasses.replace(c, suite=suite, path=c.path.resolve()) for c in todo]
        threads = self.suite.submitit.cpus_per_task
        if self.ex.cluster != "slurm":  # local jobs all run at once on this machine: share its cores
            threads = min(threads, max(1, cpu_count() // min(len(cells), self.suite.submitit.array_parallelism)))
        jobs = self.ex.map_array(CellJob(self.device, threads), cells)
        pending = dict(zip(jobs, cells))
        while pending:
            for job, cell in list(pending.items()):
                if self.ex.cluster != "debug" and not job.done():
                    continue
                try:
                    outcome = job.result()
                except Exception as e:  # the job died (killed, out of memory, node failure)
                    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                    outcome = Outcome(cell.label, str(cell.path), "lost",
                                      f"LOST: job {job.job_id} failed ({first}); logs: {job.paths.stderr}; {RERUN}")
                del pending[job]
                yield outcome
            if pending:
                time.sleep(self.poll_s)
