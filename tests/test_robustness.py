"""Robustness: checkpoints and resume, kill -9 of a worker and of a whole suite, corrupt and foreign
files, a full disk, bad input (every row of docs/errors.md), determinism of every registered method."""
from __future__ import annotations

import copy
import dataclasses
import errno
import gzip
import json
import os
import pickle
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import growbench.records as records
from growbench import checkpoint as ckpt
from growbench.cli import main
from growbench.config import load_suite
from growbench.methods import MethodSpec, method_names, resolve_method
from growbench.methods.base import GrowthEvent, GrowthMethod
from growbench.records import read_record, scan
from growbench.runner import execute_cell, load_data, plan, run_cell

REPO = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
# toy-spirals, 30 steps per epoch: evaluation (and checkpoints) at steps 0, 60, 120, 180; growth at 30 and 90
FAST = ["dataset.name=toy-spirals", "budget.epochs=6", "budget.eval_every=2", "growth.start_epoch=1",
        "growth.every_epochs=2", "growth.stop_epoch=5"]
# the same schedule on 200 examples (4 steps per epoch: checkpoints at 8 and 16, growth at 4 and 12)
SMALL = FAST + ["budget.batch_size=50", "dataset.train_subset=200", "dataset.test_subset=100"]
# Cheaper settings for methods whose defaults cost tens of seconds even on the toy suite; keys the method
# does not (or no longer) have are left out, so this never breaks a method's tests.
QUICK = {"proposals": 4, "layer_proposals": 4, "ascent_steps": 10, "stats_examples": 200,
         "validation_examples": 200}


@pytest.fixture(autouse=True)
def one_thread():
    """2 shared cores: torch's default of 2 threads per process makes tiny networks ~20x slower under load."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def is_wall_clock(key: str) -> bool:
    """Fields that hold seconds: the harness's wall_*, and the timings methods put in an event's `extra`."""
    return key.startswith(("wall", "time")) or key.endswith(("_s", "_sec", "_seconds", "_time"))


def comparable(rec: dict, env: bool = False) -> dict:
    """A record without what may differ between two runs of the same cell: wall-clock, timestamps, paths
    (and the environment, when runs in different processes with different thread counts are compared)."""
    r = copy.deepcopy(rec)
    for k in ("started_at", "finished_at", "_path"):
        r.pop(k, None)
    if not env:
        r.pop("env", None)
    for d in [*r.get("curve", []), r.get("final", {}), *r.get("events", []),
              *(ev.get("extra") or {} for ev in r.get("events", []))]:
        for k in [k for k in d if is_wall_clock(k)]:
            del d[k]
    return r


class Preempted(BaseException):
    """Raised from the progress callback: the cell stops as if its process had been preempted."""


def preempt_at(step: int):
    def progress(s: int, total: int) -> None:
        if s == step:
            raise Preempted
    return progress


def quick_settings(name: str, suite_overrides: list[str]) -> list[str]:
    cls = resolve_method(load_suite("toy", [f"methods=[{name}]"]), name).cls
    fields = {f.name for f in dataclasses.fields(cls.Settings)} if dataclasses.is_dataclass(cls.Settings) else set()
    return [f"method_settings.{name}.{k}={v}" for k, v in QUICK.items() if k in fields]


def one_cell(tmp_path: Path, method: str, *extra: str):
    suite = load_suite("toy", [f"results_dir={tmp_path}", "seeds=[0]", f"methods=[{method}]", *extra])
    (cell,) = plan(suite)
    return cell, load_data(suite, cell.dataset)


# --------------------------------------------------------------------------- determinism and resume
# optuna-fixed and fixed-matched train what a search or another method's records give them: tests/test_search.py
STANDALONE = [m for m in method_names() if m not in ("optuna-fixed", "fixed-matched")]


@pytest.mark.parametrize("method", STANDALONE)
def test_same_cell_twice_is_identical_and_resume_equals_straight(tmp_path, method):
    """Every registered method: the same cell twice on CPU gives the same record (wall-clock and timestamps
    aside), with or without checkpoints; and a cell preempted after a checkpoint that follows a growth
    event resumes to that same record, and its checkpoint is gone once the record is written."""
    cell, data = one_cell(tmp_path, method, *SMALL, *quick_settings(method, SMALL))
    straight = run_cell(cell, data, CPU, checkpoint=False)
    assert straight["status"] == "ok", straight.get("failure")
    again = run_cell(cell, data, CPU, checkpoint=True)  # writes checkpoints at steps 8 and 16 on the way
    assert comparable(again, env=True) == comparable(straight, env=True)
    ckpt.remove(cell.checkpoint_path)  # (execute_cell removes it once the record is written)

    with pytest.raises(Preempted):
        run_cell(cell, data, CPU, progress=preempt_at(14))
    state = torch.load(cell.checkpoint_path, weights_only=False)
    assert state["step"] == 8 and state["config_hash"] == cell.hash
    if method == "random":
        assert len(state["events"]) == 1  # the checkpoint follows a growth event (step 4)
    outcome = execute_cell(cell, data, CPU)
    assert outcome.status == "ok" and outcome.resumed_at == 8
    assert not cell.checkpoint_path.exists() and not cell.checkpoint_path.with_suffix(".lock").exists()
    assert comparable(read_record(cell.path), env=True) == comparable(straight, env=True)


class Inserting(GrowthMethod):
    """Inserts an identity layer, then adds units: sync_optimizer appends the inserted layer's parameters
    at the end of the optimizer's groups, so its order is no longer model.parameters()'."""

    name = "inserting"

    def grow(self, model, ctx):
        if self.events_done == 0:
            model.insert_identity_layer("fc0")
            return [GrowthEvent(where="fc0", kind="insert", units_added=0)]
        h = model.hidden("fc1")
        w_in = torch.randn(2, h.inp.weight.shape[1], generator=ctx.generator) * 0.1
        model.add_units("fc1", w_in, torch.zeros(2), torch.zeros(h.out.weight.shape[0], 2))
        return [GrowthEvent(where="fc1", kind="add", units_added=2)]


def test_resume_restores_optimizer_order_after_an_inserted_layer(tmp_path):
    cell, data = one_cell(tmp_path, "random", *FAST, "optimizer.name=sgd", "optimizer.lr=0.05",
                          "optimizer.momentum=0.9", "optimizer.weight_decay=0.001")
    spec = cell.method
    cell = dataclasses.replace(cell, method=MethodSpec("inserting", "inserting", Inserting, spec.settings,
                                                       spec.growth))
    straight = run_cell(cell, data, CPU, checkpoint=False)
    assert straight["status"] == "ok", straight.get("failure")
    assert [e["kind"] for e in straight["events"]] == ["insert", "add"]
    with pytest.raises(Preempted):
        run_cell(cell, data, CPU, progress=preempt_at(100))
    state = torch.load(cell.checkpoint_path, weights_only=False)
    assert state["step"] == 60 and len(state["events"]) == 1
    model_order = [n for n in state["model"]["weights"] if n.endswith(("weight", "bias"))]
    opt_order = [n for group in state["optimizer"]["names"] for n in group]
    assert sorted(opt_order) == sorted(model_order) and opt_order != model_order  # the case this test is about
    assert any(state["optimizer"]["state"]["state"].values())  # momentum buffers to put back in place
    rec = run_cell(cell, data, CPU)
    assert comparable(rec, env=True) == comparable(straight, env=True)


def test_unusable_checkpoints_start_the_cell_from_scratch(tmp_path):
    cell, data = one_cell(tmp_path, "random", *FAST)
    straight = run_cell(cell, data, CPU, checkpoint=False)
    path = cell.checkpoint_path
    path.parent.mkdir(parents=True)
    for content in (b"\x80\x04garbage", None):
        if content is None:  # a real checkpoint of another configuration (hash) at this path
            other, _ = one_cell(tmp_path / "other", "random", *FAST, "optimizer.lr=0.02")
            with pytest.raises(Preempted):
                run_cell(other, data, CPU, progress=preempt_at(100))
            path.write_bytes(other.checkpoint_path.read_bytes())
        else:
            path.write_bytes(content)
        with pytest.warns(UserWarning, match="cannot be used"):
            rec = run_cell(cell, data, CPU)
        assert comparable(rec, env=True) == comparable(straight, env=True)
    # one that loads but cannot be restored (its network cannot be rebuilt)
    ckpt.remove(path)
    with pytest.raises(Preempted):
        run_cell(cell, data, CPU, progress=preempt_at(100))
    state = torch.load(path, weights_only=False)
    state["model"]["spec"]["family"] = "transformer"
    torch.save(state, path)
    with pytest.warns(UserWarning, match="cannot be restored"):
        rec = run_cell(cell, data, CPU)
    assert comparable(rec, env=True) == comparable(straight, env=True)


def test_checkpoint_write_failure_is_not_fatal_and_checkpoint_false_writes_none(tmp_path, monkeypatch):
    cell, data = one_cell(tmp_path, "random", *FAST)
    straight = run_cell(cell, data, CPU, checkpoint=False)
    assert not (tmp_path / "checkpoints").exists()

    def full(obj, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "atomic_save", full)
    with pytest.warns(UserWarning, match="not written .*No space left on device.*without checkpoints"):
        rec = run_cell(cell, data, CPU)
    assert comparable(rec, env=True) == comparable(straight, env=True)


def test_writing_checkpoints_is_charged_to_no_clock(tmp_path, monkeypatch):
    """A clock that jumps 1000 s whenever a checkpoint is written: none of it shows in the record."""
    import types

    import growbench.trainer as trainer

    now = [0.0]

    def perf_counter():
        now[0] += 1e-6
        return now[0]

    real_save = ckpt.atomic_save

    def slow_save(obj, path):
        real_save(obj, path)
        now[0] += 1000.0

    monkeypatch.setattr(trainer, "time", types.SimpleNamespace(perf_counter=perf_counter))
    monkeypatch.setattr(ckpt, "atomic_save", slow_save)
    cell, data = one_cell(tmp_path, "random", *FAST)
    rec = run_cell(cell, data, CPU)
    assert now[0] > 2000  # two checkpoints were written (steps 60 and 120)
    final = rec["final"]
    assert final["wall_train"] + final["wall_growth"] + final["wall_eval"] < 1.0


# --------------------------------------------------------------------------- kill -9
# 4 cells of 480 steps, checkpoints every 60 steps
KILL_CELLS = ["suite=toy", "seeds=[0,1]", "methods=[fixed,random]", "dataset.name=toy-spirals",
              "budget.epochs=16", "budget.eval_every=2", "growth.stop_epoch=12"]


@pytest.fixture(scope="module")
def kill_references(tmp_path_factory) -> dict[str, dict]:
    """The records of KILL_CELLS from straight runs in this process: label -> comparable record."""
    root = tmp_path_factory.mktemp("refs")
    torch.set_num_threads(1)
    suite = load_suite("toy", [f"results_dir={root}", *KILL_CELLS[1:]])
    out = {}
    for c in plan(suite):
        out[c.label] = comparable(run_cell(c, load_data(suite, c.dataset), CPU, checkpoint=False))
    return out


def _start(results: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "growbench.cli", "run", *KILL_CELLS, f"results_dir={results}", "--quiet", *extra]
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(proc: subprocess.Popen, cond, what: str, timeout: float = 120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = cond()
        if got:
            return got
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {what}: {proc.communicate()}")
        time.sleep(0.005)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


def _running_cell(results: Path) -> tuple[Path, int] | None:
    """A checkpoint of a cell still running, and the pid of the process running it (from its lock)."""
    for pt in (results / "checkpoints").rglob("*.pt"):
        try:
            pid = int(pt.with_suffix(".lock").read_text().strip() or 0)
        except (OSError, ValueError):
            continue
        if pid:
            return pt, pid
    return None


def _snapshot(results: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in (results / "runs").rglob("seed*.json")}


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _finish_and_check(results: Path, before: dict[Path, bytes], refs: dict[str, dict], capsys) -> str:
    """Rerun in this process; the records written before are untouched, every cell is done, nothing is
    left behind, and every record equals its straight run's."""
    capsys.readouterr()
    assert main(["run", *KILL_CELLS, f"results_dir={results}", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert {p: p.read_bytes() for p in before} == before
    recs, problems = scan(results, "toy")
    assert not problems and len(recs) == len(refs) == 4
    for r in recs:
        assert r["status"] == "ok"
        label = f"{r['dataset']['name']}/{r['method']}/seed{r['seed']}"
        assert comparable(r) == refs[label], label
    leftovers = [p for p in results.rglob("*") if p.is_file() and (p.suffix in (".pt", ".lock") or
                                                                   p.name.startswith(".tmp-"))]
    assert leftovers == [] and not (results / "checkpoints").exists()
    return out


def test_kill_9_of_a_worker_loses_only_its_cell(tmp_path, kill_references, capsys):
    res = tmp_path / "res"
    proc = _start(res, "workers=2")
    pt, pid = _wait_for(proc, lambda: _running_cell(res), "a cell's first checkpoint")
    assert pid != proc.pid
    os.kill(pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 1, (out, err)
    assert "LOST: its worker process was killed by SIGKILL" in out and "resumes from its last checkpoint" in out
    assert "1 cell(s) not finished (1 lost" in err and "rerun the same command" in err
    before = _snapshot(res)
    assert len(before) == 3 and pt.exists()  # the others went on; the lost cell kept its checkpoint
    out = _finish_and_check(res, before, kill_references, capsys)
    assert "3 already recorded, 1 to run on cpu (1 from checkpoints)" in out and "resumed at step" in out


def test_kill_9_of_the_whole_suite_then_rerun(tmp_path, kill_references, capsys):
    res = tmp_path / "res"
    proc = _start(res, "workers=2")
    _wait_for(proc, lambda: _snapshot(res) and _running_cell(res), "a record and a running cell")
    workers = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    assert workers
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    deadline = time.time() + 20
    while any(_alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(_alive(w) for w in workers), "worker processes outlived the killed suite"
    before = _snapshot(res)
    assert 1 <= len(before) < 4
    for p in before:  # what was written is complete
        read_record(p)
    out = _finish_and_check(res, before, kill_references, capsys)
    assert f"{len(before)} already recorded, {4 - len(before)} to run" in out


# --------------------------------------------------------------------------- corrupt and foreign files
def test_corrupt_and_foreign_files_are_reported_and_left_alone(tmp_path, capsys):
    args = ["suite=toy", f"results_dir={tmp_path}", "seeds=[0]", "methods=[fixed,random]", *FAST, "--quiet"]
    suite = load_suite("toy", args[:-1])
    fixed, rand = plan(suite)
    runs = tmp_path / "runs" / "toy"
    fixed.path.parent.mkdir(parents=True)
    fixed.path.write_bytes(b'{"kind": "growbench.cell", "schema": 1, "cur')  # a truncated record
    (runs / "notes.json").write_text(json.dumps({"hello": 1}))  # foreign JSON
    (runs / "junk.json").write_bytes(os.urandom(64))  # binary garbage
    (runs / "old.json").write_text(json.dumps({"kind": "growbench.cell", "schema": 99}))  # another schema
    (runs / "README.txt").write_text("not a record")
    rand.path.parent.mkdir(parents=True)
    stale = rand.path.parent / f"{records.temp_prefix(rand.path)}abc.json"  # left by a write killed mid-way
    stale.write_text('{"half')
    rand.checkpoint_path.parent.mkdir(parents=True)
    rand.checkpoint_path.write_bytes(b"PK\x03\x04 not a checkpoint")
    with pytest.warns(UserWarning, match="cannot be used"):
        assert main(["run", *args]) == 0
    out = capsys.readouterr().out
    assert f"{fixed.path} is not a valid record; it is left in place" in out
    assert fixed.path.read_bytes().endswith(b'"cur')  # left alone, not run
    assert read_record(rand.path)["status"] == "ok" and not stale.exists()
    recs, problems = scan(tmp_path, "toy")
    assert [r["method"] for r in recs] == ["random"]
    assert sorted(Path(p.split(": ")[0].split(" ", 1)[1]).name for p in problems) == \
        ["junk.json", "notes.json", "old.json", fixed.path.name]
    assert (runs / "README.txt").read_text() == "not a record"


# --------------------------------------------------------------------------- a full disk
class _FullFile:
    """A file object on a disk that fills up after a few hundred bytes."""

    def __init__(self, f):
        self.f, self.n = f, 0

    def write(self, s):
        self.n += len(s)
        if self.n > 300:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.f.write(s)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


class _OsWithFullDisk:
    def __getattr__(self, name):
        return getattr(os, name)

    @staticmethod
    def fdopen(fd, *a, **k):
        return _FullFile(os.fdopen(fd, *a, **k))


def _check_disk_full(tmp_path, args, capsys, message_path: Path | None = None) -> None:
    err = capsys.readouterr().err
    assert "growbench: error: cannot write " in err and "No space left on device" in err, err
    assert "free space or fix permissions, then rerun (finished cells are kept)" in err
    if message_path is not None:
        assert str(message_path) in err


def test_disk_full_while_writing_a_record_keeps_everything_recorded(tmp_path, capsys, monkeypatch):
    args = ["suite=toy", f"results_dir={tmp_path}", "methods=[fixed]", "dataset.name=toy-regression",
            *FAST[1:], "--quiet"]
    assert main(["run", *args, "seeds=[0]"]) == 0
    before = _snapshot(tmp_path)
    (new,) = [c for c in plan(load_suite("toy", [*args[:-1], "seeds=[0,1]"])) if c.seed == 1]
    capsys.readouterr()
    monkeypatch.setattr(records, "os", _OsWithFullDisk())
    assert main(["run", *args, "seeds=[0,1]"]) == 1
    _check_disk_full(tmp_path, args, capsys, new.path)
    assert _snapshot(tmp_path) == before and not new.path.exists()
    assert not [p for p in tmp_path.rglob(".tmp-*")]
    assert new.checkpoint_path.exists()  # the trained cell's last checkpoint: the rerun resumes from it
    monkeypatch.undo()
    assert main(["run", *args, "seeds=[0,1]"]) == 0
    assert "1 already recorded, 1 to run on cpu (1 from checkpoints)" in capsys.readouterr().out
    assert _snapshot(tmp_path).items() >= before.items() and read_record(new.path)["status"] == "ok"


@pytest.fixture
def tiny_tmpfs(tmp_path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_on_a_real_filesystem(tiny_tmpfs, capsys):
    res = tiny_tmpfs / "results"
    args = ["suite=toy", f"results_dir={res}", "methods=[fixed]", "dataset.name=toy-regression", *FAST[1:],
            "--quiet"]
    assert main(["run", *args, "seeds=[0]"]) == 0
    before = _snapshot(res)
    with open(tiny_tmpfs / "filler", "wb", buffering=0) as f:  # fill the disk
        with pytest.raises(OSError) as full:
            while True:
                f.write(b"\0" * 4096)
        assert full.value.errno == errno.ENOSPC
    capsys.readouterr()
    with pytest.warns(UserWarning, match="No space left on device"):  # the checkpoints cannot be written either
        assert main(["run", *args, "seeds=[0,1]"]) == 1
    _check_disk_full(res, args, capsys)
    assert _snapshot(res) == before and len(before) == 1
    assert not [p for p in res.rglob(".tmp-*")]


# --------------------------------------------------------------------------- bad input (docs/errors.md)
def _idx(arr: np.ndarray) -> bytes:
    return struct.pack(">I", 0x0800 + arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + \
        arr.astype(np.uint8).tobytes()


def _mnist(root: Path, gz: bool = False) -> Path:
    d = root / "MNIST" / "raw"
    d.mkdir(parents=True)
    rs = np.random.RandomState(0)
    arrays = {"train-images-idx3-ubyte": rs.randint(0, 256, (40, 28, 28)),
              "train-labels-idx1-ubyte": np.arange(40) % 10,
              "t10k-images-idx3-ubyte": rs.randint(0, 256, (20, 28, 28)),
              "t10k-labels-idx1-ubyte": np.arange(20) % 10}
    for name, a in arrays.items():
        (d / (name + ".gz" if gz else name)).write_bytes(gzip.compress(_idx(a)) if gz else _idx(a))
    return d


def _cifar(root: Path) -> Path:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rs = np.random.RandomState(0)
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rs.randint(0, 256, (10, 3072)).astype(np.uint8), "labels": list(range(10))}
        (d / f).write_bytes(pickle.dumps(batch, protocol=2))
    (d / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}, protocol=2))
    return d


def _suite_file(tmp: Path, text: str) -> list[str]:
    p = tmp / "suite.yaml"
    p.write_text(text)
    return [f"suite={p}"]


def _mutate(path: Path, change) -> None:
    path.write_bytes(change(path.read_bytes()))


def _data_case(kind: str):
    """args for a run on tiny dataset files under tmp/data, broken as `kind` says."""
    def make(tmp: Path) -> list[str]:
        root = tmp / "data"
        ds = "cifar10" if kind == "pickle" else "mnist"
        if kind == "pickle":
            _mutate(_cifar(root) / "data_batch_3", lambda b: b[: len(b) // 2])
        elif kind == "gzip":
            def flip_crc(b: bytes) -> bytes:
                b = bytearray(b)
                b[-8] ^= 0xFF
                return bytes(b)
            _mutate(_mnist(root, gz=True) / "t10k-labels-idx1-ubyte.gz", flip_crc)
        elif kind == "missing":
            root.mkdir()
        else:
            d = _mnist(root)
            if kind == "magic":
                _mutate(d / "train-images-idx3-ubyte", lambda b: b"\x00\x00\x08\x04" + b[4:])
            elif kind == "truncated":
                _mutate(d / "t10k-images-idx3-ubyte", lambda b: b[:-100])
        return [f"dataset.name={ds}", f"dataset.root={root}", "methods=[fixed]", "seeds=[0]", "budget.epochs=1"]
    return make


def _without_submitit(monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)
    return ["executor=submitit"]


# row id of docs/errors.md -> how to produce it: args, or a function of (tmp_path[, monkeypatch]) returning args
BAD_INPUT = {
    "malformed-yaml": lambda t: _suite_file(t, "dataset:\n  name: toy-spirals\nbudget: {epochs: 3\nseeds: [0]\n"),
    "not-a-mapping": lambda t: _suite_file(t, "- a\n- b\n"),
    "unknown-key-in-file": lambda t: _suite_file(t, "budgett:\n  epochs: 3\n"),
    "wrong-type-in-file": lambda t: _suite_file(t, "seeds: zero\n"),
    "negative-eval-every": ["budget.eval_every=-1"],
    "negative-lr": ["optimizer.lr=-0.1"],
    "unknown-executor": ["executor=slurm"],
    "zero-workers": ["workers=0"],
    "bad-checkpoint": ["checkpoint=maybe"],
    "unknown-submitit-key": ["submitit.partitions=gpu"],
    "zero-submitit-time": ["submitit.time=0"],
    "submitit-missing": "monkeypatch",
    "subset-too-large": ["dataset.name=toy-spirals", "dataset.train_subset=100000"],
    "missing-dataset": _data_case("missing"),
    "idx-bad-header": _data_case("magic"),
    "idx-truncated": _data_case("truncated"),
    "gzip-bad-checksum": _data_case("gzip"),
    "pickle-truncated": _data_case("pickle"),
    "noncanonical-dataset": _data_case("valid"),
}
# rows of docs/errors.md tested elsewhere: id -> the test function that covers it
COVERED_BY = {
    "disk-full": "test_disk_full_while_writing_a_record_keeps_everything_recorded",
    "cells-lost": "test_kill_9_of_a_worker_loses_only_its_cell",
    "cell-busy": "test_executors.py::test_a_cell_running_elsewhere_is_skipped",
    "corrupt-record": "test_corrupt_and_foreign_files_are_reported_and_left_alone",
    "foreign-file": "test_corrupt_and_foreign_files_are_reported_and_left_alone",
    "corrupt-checkpoint": "test_unusable_checkpoints_start_the_cell_from_scratch",
    "checkpoint-not-written": "test_checkpoint_write_failure_is_not_fatal_and_checkpoint_false_writes_none",
}


def doc_rows() -> dict[str, dict]:
    """The rows of the tables in docs/errors.md: id -> {input, message, exit, harness}."""
    rows = {}
    for line in (REPO / "docs" / "errors.md").read_text().splitlines():
        m = re.match(r"\| `([a-z0-9-]+)` \|(.*)\|\s*$", line)
        if not m:
            continue
        cols = [c.strip() for c in m.group(2).split(" | ")]
        messages = re.findall(r"`([^`]*)`", cols[1] if len(cols) > 1 else "")
        rows[m.group(1)] = {"input": cols[0], "message": messages[0] if messages else "",
                            "exit": cols[2] if len(cols) > 2 else "", "harness": "*(harness)*" in cols[0]}
    return rows


def fragments(message: str) -> list[str]:
    """The literal pieces of a documented message around its placeholders (<...> and …)."""
    return [f.strip() for f in re.split(r"<[a-z]+>|…", message) if f.strip()]


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_exits_2_with_the_documented_message(tmp_path, capsys, monkeypatch, case):
    row = doc_rows()[case]
    how = BAD_INPUT[case]
    args = _without_submitit(monkeypatch) if how == "monkeypatch" else how(tmp_path) if callable(how) else how
    results = tmp_path / "res"
    rc = main(["run", f"results_dir={results}", "--quiet", *args])
    err = capsys.readouterr().err
    if case == "noncanonical-dataset":  # parses, but matches no known release: not an error
        assert rc == 0, err
        (rec,) = scan(results)[0]
        assert rec["dataset"]["fingerprint"]["release"] == "unknown" and not rec["dataset"]["fingerprint"]["canonical"]
        return
    assert rc == 2 and row["exit"] == "2"
    assert err.startswith("growbench: error: ") and err.count("growbench: error: ") == 1
    flat = " ".join(err.split())
    for piece in fragments(row["message"]):
        assert " ".join(piece.split()) in flat, (piece, err)
    assert not results.exists()


def test_docs_errors_table_is_covered():
    """Every row of docs/errors.md is run by a test; the harness's rows document the text it checks."""
    from test_harness import test_bad_input_exits_2_and_writes_nothing as harness

    (mark,) = [m for m in harness.pytestmark if m.name == "parametrize"]
    harness_needles = {tuple(args): needle for args, needle in mark.args[1]}
    rows = doc_rows()
    for case, row in rows.items():
        if row["harness"]:
            (given,) = re.findall(r"`([^`]*)`", row["input"])[:1]
            needle = harness_needles.get((given,))
            if given.startswith("device="):  # the harness picks the device case by machine
                needle = next(n for a, n in harness_needles.items() if a[0].startswith("device="))
            assert needle is not None, f"{case}: {given} is not in test_harness's cases"
            assert needle in row["message"] or case == "device-unavailable", (case, needle)
        elif case in BAD_INPUT:
            continue
        else:
            test = COVERED_BY.get(case)
            assert test, f"docs/errors.md row {case} is covered by no test"
            if "::" not in test:
                assert callable(globals().get(test)), test
    assert set(BAD_INPUT) <= set(rows) | {"noncanonical-dataset"}
