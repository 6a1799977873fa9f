"""Plan a suite into cells (dataset x method x seed), run the missing ones, record each one.

A cell that diverges or whose method raises is recorded as failed with its reason and the suite
goes on; a cell that is killed leaves no record and runs again next time, from its last checkpoint;
finished cells are skipped. `execute_cell` is the unit of work of every executor (in this process,
local worker processes, SLURM jobs): it holds the cell's lock, runs it, writes its record atomically
and removes its checkpoint.
"""
from __future__ import annotations

import math
import shutil
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from growbench import checkpoint as ckpt
from growbench.config import ConfigError, Suite, cell_config, config_hash
from growbench.data import Dataset, DatasetError, load_dataset
from growbench.methods import MethodSpec, PluginLoadError, resolve_method
from growbench.models import build_model, count_flops, from_spec
from growbench.records import (RecordError, RecordWriteError, environment, now, read_record, record_path,
                               remove_stale_temp_files, write_record)
from growbench.trainer import Diverged, Pruned, ResumeError, derived_seed, train

# Sizes used by --dry-run when a dataset's files are not at hand: (input shape, outputs, train, test).
KNOWN_SIZES = {
    "cifar10": ((3, 32, 32), 10, 50000, 10000), "cifar100": ((3, 32, 32), 100, 50000, 10000),
    "mnist": ((1, 28, 28), 10, 60000, 10000), "fashion-mnist": ((1, 28, 28), 10, 60000, 10000),
}


@dataclass
class Cell:
    suite: Suite
    dataset: str
    method: MethodSpec
    seed: int
    config: dict
    hash: str
    path: Path

    @property
    def label(self) -> str:
        return f"{self.dataset}/{self.method.name}/seed{self.seed}"

    @property
    def checkpoint_path(self) -> Path:
        return ckpt.checkpoint_path(self.path)

    def status(self) -> str:
        """done | failed | pending | corrupt (an unreadable file where the record should be)."""
        if not self.path.exists():
            return "pending"
        try:
            rec = read_record(self.path)
        except RecordError:
            return "corrupt"
        return "done" if rec["status"] == "ok" else "failed"


def plan(suite: Suite) -> list[Cell]:
    cells = []
    for dataset in suite.dataset.names:
        for name in suite.methods:
            spec = resolve_method(suite, name)
            resolve = getattr(spec.cls, "resolve_cell", None)
            for seed in suite.seeds:
                cfg = cell_config(suite, dataset, name, seed, spec.config())
                if resolve is not None:  # a cell that depends on files outside the suite (optuna-fixed's searched
                    cfg["resolved"] = resolve(suite, dataset, seed, spec)  # configuration, fixed-matched's records)
                h = config_hash(cfg)
                cells.append(Cell(suite, dataset, spec, seed, cfg, h,
                                  record_path(suite.results_dir, suite.name, dataset, name, seed, h)))
    return cells


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name}: CUDA is not available on this machine; use device=cpu or device=auto")
    return dev


def load_data(suite: Suite, name: str) -> Dataset:
    d = suite.dataset
    return load_dataset(name, d.root, download=d.download, train_subset=d.train_subset,
                        test_subset=d.test_subset, val_size=d.val_size)


def _base_record(cell: Cell, data: Dataset, device: torch.device) -> dict:
    return {
        "schema": 1, "kind": "growbench.cell", "suite": cell.suite.name, "method": cell.method.name,
        "method_target": cell.method.target, "method_config": cell.method.config(), "seed": cell.seed,
        "config_hash": cell.hash, "config": cell.config,
        "dataset": {"name": data.name, "task": data.task, "input_shape": list(data.input_shape),
                    "num_outputs": data.num_outputs, "train": len(data.train),
                    "val": len(data.val) if data.val is not None else 0, "test": len(data.test),
                    "fingerprint": data.fingerprint},
        "env": environment(str(device)), "started_at": now(),
    }


def run_cell(cell: Cell, data: Dataset, device: torch.device, progress: Callable | None = None,
             checkpoint: bool | None = None, on_eval: Callable | None = None) -> dict:
    """Train one cell and return its record (status ok, or failed with the reason). With checkpoints
    (default: the suite's `checkpoint`), its state is saved at every evaluation point and a saved state
    of this cell is resumed from. `on_eval(row)` is the trainer's evaluation-point callback; the
    `growbench.trainer.Pruned` it may raise propagates (no record)."""
    return _run_cell(cell, data, device, progress, checkpoint, on_eval)[0]


def _train_cell(cell: Cell, data: Dataset, device: torch.device, progress, save, state, on_eval=None):
    method = cell.method.instantiate()
    suite, arch = cell.suite, None
    if hasattr(method, "prepare_cell"):  # the suite this cell trains under and, optionally, its network's spec
        suite, arch = method.prepare_cell(cell.suite, cell.config.get("resolved"))
    if state is None:
        torch.manual_seed(derived_seed(cell.seed, "init"))  # same initial weights for every method of a seed
        if arch is not None:
            model = from_spec(arch)
        else:
            model = build_model(suite.model, data.input_shape, data.num_outputs, cell.method.hidden)
    else:
        try:
            model = from_spec(state["model"]["spec"])
        except Exception as e:
            raise ResumeError(f"cannot rebuild the network ({type(e).__name__}: {e})") from e
    result = train(model, method, data, suite, cell.seed, device, progress, checkpoint=save, resume=state,
                   on_eval=on_eval)
    result.final.update(getattr(method, "final_extra", None) or {})  # e.g. optuna-fixed's search cost
    return result


def _run_cell(cell: Cell, data: Dataset, device: torch.device, progress: Callable | None = None,
              checkpoint: bool | None = None, on_eval: Callable | None = None) -> tuple[dict, int | None]:
    """The record, and the step the cell resumed at (None: it started from scratch)."""
    use_ckpt = cell.suite.checkpoint if checkpoint is None else checkpoint
    path = cell.checkpoint_path
    state = ckpt.load(path, cell.hash) if use_ckpt else None
    rec = _base_record(cell, data, device)
    if state is not None:
        rec["started_at"] = state.get("started_at", rec["started_at"])
    save = None
    if use_ckpt:
        def save(st: dict) -> None:
            st.update(format=ckpt.FORMAT, config_hash=cell.hash, started_at=rec["started_at"])
            ckpt.atomic_save(st, path)
    resumed = None if state is None else state["step"]
    try:
        try:
            result = _train_cell(cell, data, device, progress, save, state, on_eval)
        except ResumeError as e:
            warnings.warn(f"{cell.label}: checkpoint {path} cannot be restored ({e}); the cell starts from scratch",
                          stacklevel=2)
            ckpt.remove(path)
            resumed, rec["started_at"] = None, now()
            result = _train_cell(cell, data, device, progress, save, None, on_eval)
        rec.update(status="ok", failure=None, curve=result.curve, events=result.events, final=result.final,
                   architecture=result.architecture)
    except Diverged as e:
        rec.update(status="failed", failure={"reason": "diverged", "message": str(e)}, curve=[], events=[], final={})
    except PluginLoadError as e:
        rec.update(status="failed", failure={"reason": "plugin", "message": str(e)}, curve=[], events=[], final={})
    except (KeyboardInterrupt, SystemExit, Pruned):
        raise
    except Exception as e:  # a method's bug must not stop the suite; it is recorded with its traceback
        tb = traceback.format_exception(type(e), e, e.__traceback__)
        rec.update(status="failed", curve=[], events=[], final={},
                   failure={"reason": "error", "message": f"{type(e).__name__}: {e}", "traceback": "".join(tb[-6:])})
    rec["finished_at"] = now()
    return rec, resumed


def _set_aside(path: Path) -> Path:
    """Keep a failed record when retrying it: a copy in results/.../attempts/<name>.<time>.json (the record
    itself is replaced atomically by the new one, so a failed write loses nothing)."""
    dest = path.parent / "attempts" / f"{path.stem}.{time.time_ns()}.json"
    try:
        dest.parent.mkdir(exist_ok=True)
        shutil.copy2(path, dest)
    except OSError as e:
        raise RecordWriteError(f"cannot keep the failed record {path} under {dest.parent}: {e.strerror or e}; "
                               "free space or fix permissions, then rerun (finished cells are kept)") from None
    return dest


def write_cell_record(cell: Cell, rec: dict) -> None:
    """Write the record (keeping an earlier failed one under attempts/), then drop the cell's checkpoint."""
    aside = _set_aside(cell.path) if cell.path.exists() and cell.suite.retry_failed else None
    try:
        write_record(cell.path, rec)
    except RecordWriteError:
        if aside is not None:
            aside.unlink(missing_ok=True)
        raise
    ckpt.remove(cell.checkpoint_path)


@dataclass
class Outcome:
    """What became of one cell handed to an executor."""

    label: str
    path: str
    status: str  # ok | failed | skipped (recorded meanwhile) | busy (another process runs it) | lost | write_error
    message: str
    seconds: float = 0.0
    resumed_at: int | None = None

    def line(self) -> str:
        if self.status in ("ok", "failed"):
            resumed = f", resumed at step {self.resumed_at}" if self.resumed_at is not None else ""
            return f"{self.label}: {self.message}, {self.seconds:.1f} s{resumed}"
        return f"{self.label}: {self.message}"


def describe(rec: dict) -> str:
    final = rec["final"]
    if rec["status"] == "failed":
        return f"FAILED ({rec['failure']['reason']}: {rec['failure']['message']})"
    if final["test_acc"] is not None:
        return f"test acc {final['test_acc']:.4f}, {final['params']} params"
    return f"test loss {final['test_loss']:.4g}, {final['params']} params"


def execute_cell(cell: Cell, data: Dataset, device: torch.device, progress: Callable | None = None) -> Outcome:
    """Run one cell under its lock, write its record and remove its checkpoint. Raises RecordWriteError
    when the record (or the lock) cannot be written; everything else a cell does wrong is in its record."""
    lock = ckpt.CellLock(cell.checkpoint_path.with_suffix(".lock"))
    try:
        held = lock.acquire()
    except OSError as e:
        raise RecordWriteError(f"cannot write {lock.path}: {e.strerror or e}; free space or fix permissions, "
                               "then rerun (finished cells are kept)") from None
    if not held:
        return Outcome(cell.label, str(cell.path), "busy",
                       f"skipped: another process is running it (it holds {lock.path})")
    try:
        st = cell.status()
        if st in ("done", "corrupt") or (st == "failed" and not cell.suite.retry_failed):
            return Outcome(cell.label, str(cell.path), "skipped", "skipped: recorded meanwhile by another process")
        remove_stale_temp_files(cell.path)  # left by a process killed while writing this cell's files
        remove_stale_temp_files(cell.checkpoint_path)
        t0 = time.perf_counter()
        rec, resumed = _run_cell(cell, data, device, progress)
        write_cell_record(cell, rec)
        return Outcome(cell.label, str(cell.path), rec["status"], describe(rec), time.perf_counter() - t0, resumed)
    finally:
        lock.release()


def estimate(cells: list[Cell], device: torch.device) -> dict:
    """Cost of the pending cells from the starting networks: training FLOPs, and seconds from a short
    timing of a few steps per distinct starting network (a lower bound for methods that grow)."""
    out = {}
    timings: dict[str, float] = {}
    for c in cells:
        shape, n_out, n_train, _ = _sizes(c)
        torch.manual_seed(0)
        model = build_model(c.suite.model, shape, n_out, c.method.hidden)
        b = c.suite.budget
        n_train = min(n_train, c.suite.dataset.train_subset or n_train) - (c.suite.dataset.val_size or 0)
        steps = max(1, round(b.epochs * math.ceil(n_train / b.batch_size)))
        flops = count_flops(model, 8, train=True) / 8 * b.batch_size * steps
        key = repr(model.spec())
        if key not in timings:
            timings[key] = _time_steps(model, shape, n_out, b.batch_size, device)
        out[c.label] = {"steps": steps, "train_flops": flops, "seconds": timings[key] * steps}
    return out


def _sizes(c: Cell) -> tuple[tuple[int, ...], int, int, int]:
    if c.dataset in KNOWN_SIZES:
        return KNOWN_SIZES[c.dataset]
    data = load_data(c.suite, c.dataset)  # synthetic: made in code, cheap
    return data.input_shape, data.num_outputs, len(data.train) + (len(data.val) if data.val else 0), len(data.test)


def _time_steps(model, shape, n_out, batch, device, max_steps: int = 20, max_seconds: float = 1.0) -> float:
    """Median seconds per training step on random data (after a warm-up step), for at most
    `max_steps` steps or about `max_seconds`; the median resists a busy machine's outliers."""
    model = model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(batch, *shape, device=device)
    y = torch.randint(n_out, (batch,), device=device)
    times: list[float] = []
    start = time.perf_counter()
    for i in range(max_steps + 1):
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i > 0:
            times.append(time.perf_counter() - t0)
            if time.perf_counter() - start > max_seconds:
                break
    return sorted(times)[len(times) // 2]


def _fmt_flops(f: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if f >= scale:
            return f"{f / scale:.1f} {unit}"
    return f"{f:.0f} FLOP"


def _fmt_time(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def dry_run(suite: Suite, out=None) -> list[Cell]:
    out = out or sys.stdout
    cells = plan(suite)
    device = resolve_device(suite.device)
    for name in suite.dataset.names:
        try:
            load_data(suite, name)
        except DatasetError as e:
            print(f"warning: {e}", file=out)
    status = {c.label: c.status() for c in cells}
    pending = [c for c in cells if status[c.label] == "pending" or (suite.retry_failed and status[c.label] == "failed")]
    est = estimate(pending, device) if pending else {}
    print(f"suite {suite.name}: {len(cells)} cells, {len(cells) - len(pending)} already recorded, "
          f"{len(pending)} to run on {device}", file=out)
    for c in cells:
        st = status[c.label]
        if st == "pending" and suite.checkpoint and c.checkpoint_path.exists():
            st = "partial"  # killed or preempted: resumes from its checkpoint
        e = est.get(c.label)
        cost = f"{e['steps']} steps, {_fmt_flops(e['train_flops'])}, ~{_fmt_time(e['seconds'])}" if e else ""
        print(f"  {st:8s} {c.label:40s} {cost}", file=out)
    if est:
        tot_f = sum(e["train_flops"] for e in est.values())
        tot_s = sum(e["seconds"] for e in est.values())
        print(f"estimate for the {len(pending)} cells to run: {_fmt_flops(tot_f)} of training, "
              f"~{_fmt_time(tot_s)} on {device} (from the starting sizes; growth makes it more)", file=out)
    return cells


def run_suite(suite: Suite, out=None, show_progress: bool | None = None) -> dict:
    """Run every missing cell with the suite's executor. Datasets are loaded (and checked) before
    anything is written. Returns counts (ok, failed, skipped, busy, lost) and the records written;
    raises RecordWriteError when a record cannot be written (disk full): records already written stay."""
    from growbench.executors import make_executor

    out = out or sys.stdout
    cells = plan(suite)
    device = resolve_device(suite.device)
    todo = []
    for c in cells:
        st = c.status()
        if st == "corrupt":
            print(f"warning: {c.path} is not a valid record; it is left in place and the cell is not run. "
                  "Move it away to rerun the cell.", file=out)
        elif st == "pending" or (st == "failed" and suite.retry_failed):
            todo.append(c)
        else:  # recorded, but killed before its checkpoint and lock file were removed
            if c.checkpoint_path.exists():
                ckpt.remove(c.checkpoint_path)
            lock = ckpt.CellLock(c.checkpoint_path.with_suffix(".lock"))
            if lock.path.exists() and lock.acquire():  # (a live holder keeps its file)
                lock.release()
    data = {name: load_data(suite, name) for name in suite.dataset.names if any(c.dataset == name for c in todo)}
    executor = make_executor(suite, device, len(todo)) if todo else None
    resuming = sum(c.checkpoint_path.exists() for c in todo) if suite.checkpoint else 0
    print(f"suite {suite.name}: {len(cells)} cells, {len(cells) - len(todo)} already recorded, "
          f"{len(todo)} to run on {device}{executor.describe() if executor else ''}"
          + (f" ({resuming} from checkpoints)" if resuming else ""), file=out)
    summary = {"ok": 0, "failed": 0, "skipped": len(cells) - len(todo), "busy": 0, "lost": 0, "records": [],
               "lost_cells": []}
    disable = None if show_progress is None else not show_progress  # None: only on a terminal
    bar = tqdm(total=len(todo), desc=f"suite {suite.name}", unit="cell", disable=disable, file=sys.stderr)
    write_error = None
    try:
        for outcome in executor.run(todo, data, disable) if executor else ():
            bar.update(1)
            if outcome.status == "write_error":
                write_error = write_error or outcome.message
                continue
            key = outcome.status if outcome.status in summary else "skipped"
            summary[key] += 1
            if outcome.status in ("ok", "failed"):
                summary["records"].append(outcome.path)
            if outcome.status == "lost":
                summary["lost_cells"].append(outcome.label)
            tqdm.write(outcome.line(), file=out)
    finally:
        bar.close()
        ckpt.prune_empty_dirs(Path(suite.results_dir) / "checkpoints" / suite.name)
    if write_error is not None:
        raise RecordWriteError(write_error)
    return summary
