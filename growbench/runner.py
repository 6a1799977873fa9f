"""Plan a suite into cells (dataset x method x seed), run the missing ones, record each one.

A cell that diverges or whose method raises is recorded as failed with its reason and the suite
goes on; a cell that is killed leaves no record and runs again next time; finished cells are skipped.
"""
from __future__ import annotations

import math
import shutil
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from growbench.config import ConfigError, Suite, cell_config, config_hash
from growbench.data import Dataset, DatasetError, load_dataset
from growbench.methods import MethodSpec, PluginLoadError, resolve_method
from growbench.models import build_model, count_flops
from growbench.records import RecordError, environment, now, read_record, record_path, write_record
from growbench.trainer import Diverged, derived_seed, train

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
            for seed in suite.seeds:
                cfg = cell_config(suite, dataset, name, seed, spec.config())
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


def run_cell(cell: Cell, data: Dataset, device: torch.device, progress: Callable | None = None) -> dict:
    """Train one cell and return its record (status ok, or failed with the reason)."""
    rec = _base_record(cell, data, device)
    try:
        method = cell.method.instantiate()
        torch.manual_seed(derived_seed(cell.seed, "init"))  # same initial weights for every method of a seed
        model = build_model(cell.suite.model, data.input_shape, data.num_outputs, cell.method.hidden)
        result = train(model, method, data, cell.suite, cell.seed, device, progress)
        rec.update(status="ok", failure=None, curve=result.curve, events=result.events, final=result.final,
                   architecture=result.architecture)
    except Diverged as e:
        rec.update(status="failed", failure={"reason": "diverged", "message": str(e)}, curve=[], events=[], final={})
    except PluginLoadError as e:
        rec.update(status="failed", failure={"reason": "plugin", "message": str(e)}, curve=[], events=[], final={})
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # a method's bug must not stop the suite; it is recorded with its traceback
        tb = traceback.format_exception(type(e), e, e.__traceback__)
        rec.update(status="failed", curve=[], events=[], final={},
                   failure={"reason": "error", "message": f"{type(e).__name__}: {e}", "traceback": "".join(tb[-6:])})
    rec["finished_at"] = now()
    return rec


def _set_aside(path: Path) -> None:
    """Keep a failed record when retrying it: results/.../attempts/<name>.<time>.json."""
    dest = path.parent / "attempts" / f"{path.stem}.{int(time.time())}.json"
    dest.parent.mkdir(exist_ok=True)
    shutil.move(str(path), dest)


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


def _time_steps(model, shape, n_out, batch, device, steps: int = 3) -> float:
    model = model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(batch, *shape, device=device)
    y = torch.randint(n_out, (batch,), device=device)
    for i in range(steps + 1):
        if i == 1:
            t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


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
    """Run every missing cell. Datasets are loaded (and checked) before any training starts."""
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
    data = {name: load_data(suite, name).to(device) for name in suite.dataset.names
            if any(c.dataset == name for c in todo)}
    print(f"suite {suite.name}: {len(cells)} cells, {len(cells) - len(todo)} already recorded, "
          f"{len(todo)} to run on {device}", file=out)
    summary = {"ok": 0, "failed": 0, "skipped": len(cells) - len(todo), "records": []}
    disable = None if show_progress is None else not show_progress  # None: only on a terminal
    bar = tqdm(total=len(todo), desc=f"suite {suite.name}", unit="cell", disable=disable, file=sys.stderr)
    for c in todo:
        cell_bar = tqdm(total=None, desc=c.label, unit="step", leave=False, file=sys.stderr,
                        mininterval=0.5, disable=disable)

        def progress(step: int, total: int, cell_bar=cell_bar) -> None:
            if cell_bar.total is None:
                cell_bar.total = total
                cell_bar.refresh()
            if step - cell_bar.n >= 20 or step == total:
                cell_bar.update(step - cell_bar.n)

        t0 = time.perf_counter()
        rec = run_cell(c, data[c.dataset], device, progress)
        cell_bar.close()
        if c.path.exists() and suite.retry_failed:
            _set_aside(c.path)
        write_record(c.path, rec)
        summary[rec["status"]] += 1
        summary["records"].append(str(c.path))
        final = rec["final"]
        if rec["status"] == "failed":
            msg = f"FAILED ({rec['failure']['reason']}: {rec['failure']['message']})"
        elif final["test_acc"] is not None:
            msg = f"test acc {final['test_acc']:.4f}, {final['params']} params"
        else:
            msg = f"test loss {final['test_loss']:.4g}, {final['params']} params"
        bar.update(1)
        tqdm.write(f"{c.label}: {msg}, {time.perf_counter() - t0:.1f} s", file=out)
    bar.close()
    return summary
