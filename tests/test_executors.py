"""Executors: local worker processes, submitit (its local and debug clusters run the SLURM code path on
this machine), and the per-cell lock that keeps two processes from running the same cell."""
from __future__ import annotations

import io
import subprocess
import sys
import time

import pytest
import torch

from growbench.checkpoint import CellLock
from growbench.cli import main
from growbench.config import load_suite
from growbench.executors import CellJob, LocalProcesses, cpu_count, make_executor
from growbench.records import scan
from growbench.runner import plan, run_cell, run_suite, load_data

from test_harness import _write_plugin
from test_robustness import comparable

CPU = torch.device("cpu")
FAST = ["dataset.name=toy-regression", "budget.epochs=6", "budget.eval_every=2", "growth.start_epoch=1",
        "growth.every_epochs=2", "growth.stop_epoch=5"]


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def references(suite) -> dict[str, dict]:
    """label -> comparable record of a straight run in this process."""
    out = {}
    for c in plan(suite):
        if c.method.error is None and c.method.name != "raising":
            out[c.label] = comparable(run_cell(c, load_data(suite, c.dataset), CPU, checkpoint=False))
    return out


def label(rec: dict) -> str:
    return f"{rec['dataset']['name']}/{rec['method']}/seed{rec['seed']}"


def test_threads_per_worker_share_the_cores():
    assert LocalProcesses(3, CPU).threads == max(1, cpu_count() // 3)
    assert LocalProcesses(10 * cpu_count(), CPU).threads == 1
    suite = load_suite("toy", ["workers=2"])
    assert type(make_executor(suite, CPU, 5)).__name__ == "LocalProcesses"
    assert type(make_executor(suite, CPU, 1)).__name__ == "InProcess"  # one cell: no process to spawn


def test_local_workers_run_each_cell_once_and_record_failures(tmp_path, monkeypatch):
    """workers=2: every cell runs exactly once, in spawned processes that load their own data; a method
    that raises and one that fails to import are recorded as failed, as in the sequential path; the
    records equal those of straight runs in this process."""
    plugins = tmp_path / "site"
    _write_plugin(plugins)
    monkeypatch.syspath_prepend(str(plugins))  # spawned workers get this sys.path too
    args = [f"results_dir={tmp_path / 'res'}", "seeds=[0,1]", "methods=[fixed,random,raising,broken]", "workers=2",
            *FAST]
    suite = load_suite("toy", args)
    out = io.StringIO()
    summary = run_suite(suite, out=out, show_progress=False)
    text = out.getvalue()
    assert "8 to run on cpu, 2 worker processes with" in text
    assert summary["ok"] == 4 and summary["failed"] == 4 and summary["lost"] == 0 and summary["busy"] == 0
    lines = [ln.split(":")[0] for ln in text.splitlines()[1:]]
    assert sorted(lines) == sorted(c.label for c in plan(suite))  # each cell reported once
    recs, problems = scan(tmp_path / "res", "toy")
    assert not problems and len(recs) == 8
    by = {label(r): r for r in recs}
    for seed in (0, 1):
        raising, broken = by[f"toy-regression/raising/seed{seed}"], by[f"toy-regression/broken/seed{seed}"]
        assert raising["failure"]["reason"] == "error" and "boom inside grow" in raising["failure"]["message"]
        assert broken["failure"]["reason"] == "plugin" and "not_a_real_module_xyz" in broken["failure"]["message"]
        assert raising["env"]["torch_threads"] == max(1, cpu_count() // 2)
    refs = references(load_suite("toy", [*args[:2], "methods=[fixed,random]", *FAST]))
    for lab, ref in refs.items():
        assert comparable(by[lab]) == ref, lab
    assert not (tmp_path / "res" / "checkpoints").exists()


def test_cell_lock_excludes_other_processes_and_dies_with_its_holder(tmp_path):
    path = tmp_path / "a" / "cell.lock"
    first = CellLock(path)
    assert first.acquire() and path.read_text().strip() == str(__import__("os").getpid())
    assert not CellLock(path).acquire()  # another holder (flock: per open file, even in one process)
    first.release()
    assert not path.exists()
    # a holder killed with -9 leaves the file, but not the lock
    holder = subprocess.Popen([sys.executable, "-c",
                               "import fcntl, os, sys, time\n"
                               f"fd = os.open({str(path)!r}, os.O_RDWR | os.O_CREAT)\n"
                               "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(60)\n"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert not CellLock(path).acquire()
    finally:
        holder.kill()
        holder.wait()
    again = CellLock(path)
    assert again.acquire()
    again.release()


def test_a_cell_running_elsewhere_is_skipped(tmp_path, capsys):
    args = ["suite=toy", f"results_dir={tmp_path}", "seeds=[0]", "methods=[fixed,random]", *FAST, "--quiet"]
    fixed, rand = plan(load_suite("toy", args[:-1]))
    lock = CellLock(fixed.checkpoint_path.with_suffix(".lock"))
    assert lock.acquire()
    try:
        assert main(["run", *args]) == 1
    finally:
        lock.release()
    captured = capsys.readouterr()
    assert f"{fixed.label}: skipped: another process is running it (it holds {lock.path})" in captured.out
    assert "1 cell(s) not finished (0 lost when their process died, 1 running in another process)" in captured.err
    assert rand.path.exists() and not fixed.path.exists()
    assert main(["run", *args]) == 0 and fixed.path.exists()
    # a process killed between writing its record and removing its files: the next run tidies up
    for p in (rand.checkpoint_path, rand.checkpoint_path.with_suffix(".lock")):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"stale")
    assert main(["run", *args]) == 0
    assert not (tmp_path / "checkpoints").exists()


def test_submitit_debug_cluster_runs_cells_through_cell_job(tmp_path, capsys):
    submitit = pytest.importorskip("submitit")
    args = ["suite=toy", f"results_dir={tmp_path / 'res'}", "seeds=[0]", "methods=[fixed,random]", *FAST,
            "executor=submitit", "submitit.cluster=debug", "--quiet"]
    assert main(["run", *args]) == 0
    out = capsys.readouterr().out
    assert "as submitit jobs on debug" in out
    recs, _ = scan(tmp_path / "res", "toy")
    refs = references(load_suite("toy", args[:-1]))
    assert {label(r): comparable(r) for r in recs} == refs
    # on preemption or timeout submitit calls checkpoint(): the same cell is requeued, to resume from its file
    cell = plan(load_suite("toy", args[:-1]))[0]
    job = CellJob("cpu", 1)
    resubmission = job.checkpoint(cell)
    assert isinstance(resubmission, submitit.helpers.DelayedSubmission)
    assert resubmission.function is job and resubmission.args == (cell,)


def test_submitit_local_cluster_runs_cells_as_separate_jobs(tmp_path, capsys):
    """The SLURM code path (map_array of CellJob over pickled cells, jobs in other processes writing the
    records, the parent waiting for them) on submitit's local cluster; rerunning skips what is done."""
    pytest.importorskip("submitit")
    args = ["suite=toy", f"results_dir={tmp_path / 'res'}", "seeds=[0]", "methods=[fixed,random]", *FAST,
            "executor=submitit", "submitit.cluster=local", "submitit.cpus_per_task=1", "submitit.time=5",
            f"submitit.folder={tmp_path / 'logs'}", "--quiet"]
    t0 = time.time()
    assert main(["run", *args]) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    assert "2 to run on cpu, as submitit jobs on local" in out and "done: 2 ok" in out
    assert list((tmp_path / "logs").glob("*_0_log.out"))  # submitit's own files went to the folder asked for
    recs, problems = scan(tmp_path / "res", "toy")
    assert not problems and {label(r): comparable(r) for r in recs} == references(load_suite("toy", args[:-1]))
    assert all(r["env"]["torch_threads"] == 1 for r in recs)
    assert time.time() - t0 < 120
    assert main(["run", *args]) == 0
    assert "2 already recorded, 0 to run" in capsys.readouterr().out
