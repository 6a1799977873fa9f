"""A cell's state at an evaluation point, saved atomically so a killed or preempted cell resumes there.

`<results_dir>/checkpoints/<suite>/<dataset>/<method>/seed<seed>-<hash12>.pt` holds everything the
rest of the cell depends on: the network's architecture (`spec()`) and weights, the optimizer state
with the parameter names of each group (growth can leave the optimizer's order different from
`model.parameters()`), every random generator (data order, augmentation, the method's, torch's global
one, Python's and numpy's), the current epoch's permutation, running-loss accumulators, counters,
clocks, FLOP counters, the curve and growth events so far, and the method's `state_dict()`.
A resumed cell ends with the record a straight run gives (on CPU identical, wall-clock aside).
The file is deleted when the cell's record is written.

Next to it, `<...>.lock` is held (flock) by the process running the cell, so two processes, on
this machine or on cluster nodes sharing the folder, never run the same cell at once; the lock is
released by the kernel when its process dies, so a killed run never leaves a stale lock behind.
"""
from __future__ import annotations

import os
import random
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from growbench.records import temp_prefix

FORMAT = 1


class CheckpointError(Exception):
    """A checkpoint that cannot be used (unreadable, another format, another cell)."""


def checkpoint_path(record_path: str | Path) -> Path:
    """results/runs/<s>/<d>/<m>/seedN-h.json -> results/checkpoints/<s>/<d>/<m>/seedN-h.pt"""
    p = Path(record_path)
    parts = list(p.parts)
    i = len(parts) - 1 - parts[::-1].index("runs")  # the last "runs": the results dir itself may contain one
    parts[i] = "checkpoints"
    return Path(*parts).with_suffix(".pt")


def atomic_save(obj: object, path: Path) -> None:
    """torch.save through a temporary file in the same folder, fsynced and renamed into place."""
    fd, tmp = _retry_missing_dir(path, lambda: tempfile.mkstemp(prefix=temp_prefix(path), suffix=".pt",
                                                                dir=path.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _retry_missing_dir(path: Path, create):
    """mkdir + create, again if another process pruned the (empty) folder in between."""
    for attempt in range(3):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return create()
        except FileNotFoundError:
            if attempt == 2:
                raise


def prune_empty_dirs(root: Path) -> None:
    """Remove the empty folders under `root` (and `root` itself and its parents up to results_dir/checkpoints,
    when empty), bottom-up; folders in use are not empty and stay."""
    root = Path(root)
    if not root.is_dir():
        return
    for d in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        try:
            d.rmdir()
        except OSError:
            pass
    for d in (root, *root.parents):
        try:
            d.rmdir()
        except OSError:
            break
        if d.name == "checkpoints":
            break


def _fsync_dir(d: Path) -> None:
    try:
        dfd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def load(path: Path, config_hash: str) -> dict | None:
    """The saved state of the cell with this hash, or None when there is none. A file that cannot be
    used is reported (warning), removed, and the cell starts from scratch."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location=None, weights_only=False)
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise CheckpointError("not a growbench checkpoint of this format")
        if state.get("config_hash") != config_hash:
            raise CheckpointError("it belongs to another configuration")
    except Exception as e:  # truncated, garbage, another torch's pickle, a device that is not here
        warnings.warn(f"checkpoint {path} cannot be used ({type(e).__name__}: {e}); the cell starts from scratch",
                      stacklevel=2)
        remove(path)
        return None
    return state


def remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as e:
        warnings.warn(f"cannot remove checkpoint {path}: {e}", stacklevel=2)


# --------------------------------------------------------------------------- RNG states
def rng_state(device: torch.device) -> dict:
    st = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    if "cuda" in st:
        torch.cuda.set_rng_state_all(st["cuda"])


# --------------------------------------------------------------------------- optimizer
def optimizer_state(opt: torch.optim.Optimizer, model: torch.nn.Module) -> dict:
    """The optimizer's state_dict plus the parameter names of each group, in the optimizer's order."""
    names = {id(p): n for n, p in model.named_parameters()}
    missing = [i for g in opt.param_groups for i, p in enumerate(g["params"]) if id(p) not in names]
    if missing:
        raise CheckpointError("the optimizer holds parameters that are not the network's")
    return {"state": opt.state_dict(), "names": [[names[id(p)] for p in g["params"]] for g in opt.param_groups]}


def load_optimizer_state(opt: torch.optim.Optimizer, model: torch.nn.Module, saved: dict) -> None:
    """Put the network's parameters into the optimizer's groups in the saved order, then load the state."""
    params = dict(model.named_parameters())
    groups = saved["names"]
    if len(groups) != len(opt.param_groups):
        raise CheckpointError(f"the optimizer has {len(opt.param_groups)} parameter groups, "
                              f"the checkpoint {len(groups)}")
    try:
        for g, names in zip(opt.param_groups, groups):
            g["params"] = [params[n] for n in names]
    except KeyError as e:
        raise CheckpointError(f"the checkpoint's optimizer names parameter {e} the network lacks") from None
    opt.state.clear()
    opt.load_state_dict(saved["state"])


# --------------------------------------------------------------------------- cell lock
try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no cross-process guard
    fcntl = None


class CellLock:
    """An exclusive, non-blocking flock on `<checkpoint>.lock`; released by the kernel if the holder dies."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.fd: int | None = None

    def acquire(self) -> bool:
        """True when this process now holds the cell; False when another live process does."""
        if fcntl is None:
            return True
        while True:
            fd = _retry_missing_dir(self.path, lambda: os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644))
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                return False
            try:  # the holder before us may have unlinked the file after we opened it: lock the current one
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                try:
                    os.ftruncate(fd, 0)
                    os.write(fd, f"{os.getpid()}\n".encode())
                except OSError:
                    pass
                return True
            os.close(fd)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # while still holding it (see acquire)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "CellLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
