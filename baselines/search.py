"""`growbench search suite=NAME [trials=N] [storage=URL] [workers=K] [key=value ...]`: Optuna-searched
fixed-size baselines.

Per dataset of the suite, one Optuna study (seeded TPE sampler, median or Hyperband pruner) over the
search space of the suite's model family (baselines/spaces/, see baselines/space.py). Each trial is a
normal harness cell, a `fixed` network with the trial's widths, lr and weight decay, trained through
`growbench.runner.run_cell` (same data pipeline, budget, clocks and FLOP meter as every method) on the
training set minus a validation split; the pruner is fed the validation metric at the harness's
evaluation points, and the trial's value is the final validation accuracy (validation loss for
regression). Selection never sees the test set.

Validation split: the suite's `dataset.val_size` when > 0, else `val_size=` of the search, else 5000
examples for the image data sets (as in docs/methods/baselines.md) and 20 % of the training set for the
others (toy: 600 of 3000).

Storage: by default a JournalStorage file `<results_dir>/search/<suite>.journal` (one per suite, a study
per dataset) safe for several worker processes on one machine or on a shared file system with working
flock (appends under an flock, not Optuna's symlink lock, so a killed worker never leaves the journal
locked); `storage=path` for another file; `storage=sqlite:///...` or `postgresql://...` for an RDB (many
machines). The study name is deterministic, `<suite>-<dataset>-<hash>` (hash of the protocol, space,
validation size and training seed), and studies are loaded if they exist: rerunning resumes, and
`trials=N` means "until the study has N finished trials" (complete + pruned).

Dead workers: with a journal or SQLite file, each worker holds an flock lease file for its lifetime and
stamps its trials with it; before every new trial, a worker marks RUNNING trials whose lease is free
(their process died) as FAIL. So a killed worker loses at most its running trial, whose cost up to its
last evaluation point is still charged. With an RDB URL, Optuna's heartbeat does the same
(`heartbeat=` seconds, stale after two missed beats). New trials are asked under an flock (files), so K
workers finish exactly N trials; with an RDB URL a surplus trial is failed at once and not counted.

At the end: the best configuration and the whole search's cost (trials, pruned, wall-clock and FLOPs of
every trial, pruned and failed ones included) go to `baselines/best/<suite>-<dataset>.yaml`, and
`optuna-fixed` is trained for every seed of the suite (`retrain=false` skips it).
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import math
import multiprocessing as mp
import os
import socket
import sys
import tempfile
import threading
import time
import uuid
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml

from baselines.space import SearchSpace
from growbench.config import ConfigError, Suite, _build, load_suite, parse_override
from growbench.data import DatasetError
from growbench.methods.optuna_fixed import best_path, protocol
from growbench.records import write_record

IMAGE_DATASETS = ("mnist", "fashion-mnist", "cifar10", "cifar100")
IMAGE_VAL_SIZE = 5000
OTHER_VAL_FRACTION = 0.2
PRUNERS = ("median", "hyperband", "none")
ATTR_WORKER, ATTR_COST, ATTR_CONFIG = "growbench_worker", "growbench_cost", "growbench_config"


@dataclass(frozen=True)
class SearchOptions:
    trials: int = 20  # the study's finished trials (complete + pruned) to reach; a rerun resumes towards it
    storage: str | None = None  # journal file, sqlite:/// or postgresql:// URL; default results/search/<suite>.journal
    workers: int = 1  # worker processes on this machine sharing the study (also the retraining's workers)
    pruner: str = "median"  # median | hyperband | none
    prune_startup: int = 5  # median: trials finished before pruning starts
    val_size: int | None = None  # validation examples (default: the suite's, else 5000 for images, else 20 %)
    train_seed: int = 1000  # the training seed of every trial (not one of the suites' evaluation seeds)
    sampler_seed: int = 0  # TPE's seed (worker k uses sampler_seed + k)
    space: str | None = None  # a space name under baselines/spaces/ or a YAML path (default: <suite>, else <family>)
    retrain: bool = True  # train optuna-fixed for every seed of the suite after the search
    heartbeat: float = 60.0  # RDB storages: seconds between heartbeats


OPTION_KEYS = tuple(f.name for f in dataclasses.fields(SearchOptions))


def parse_args(items: list[str]) -> tuple[str, list[str], SearchOptions]:
    """Split `suite=NAME`, the search's own options and the suite overrides."""
    suite, rest, opts = "toy", [], {}
    for it in items:
        key = it.split("=", 1)[0].strip()
        if key == "suite":
            suite = it.split("=", 1)[1]
        elif key in OPTION_KEYS:
            k, v = parse_override(it)
            opts[k] = v
        else:
            rest.append(it)
    o = _build(SearchOptions, opts, "")
    for k in ("trials", "workers", "heartbeat"):
        if getattr(o, k) <= 0:
            raise ConfigError(f"{k} must be > 0, got {getattr(o, k)}")
    if o.prune_startup < 0:
        raise ConfigError(f"prune_startup must be >= 0, got {o.prune_startup}")
    if o.val_size is not None and o.val_size <= 0:
        raise ConfigError(f"val_size must be > 0, got {o.val_size}: the search selects on a validation split")
    if o.pruner not in PRUNERS:
        raise ConfigError(f"pruner: unknown value {o.pruner!r}; valid choices: {', '.join(PRUNERS)}")
    return suite, rest, o


def _optuna():
    try:
        import optuna
    except ImportError:
        raise ConfigError("growbench search needs optuna, which is not installed here: "
                          "pip install 'growbench[search]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # ask/tell with an RDB heartbeat: the heartbeat thread and stale-trial failing are ours (ask_loop)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    return optuna


# --------------------------------------------------------------------------- storage


class FlockLock:
    """A journal file lock through flock(2): released by the kernel when its process dies, so a worker
    killed while appending never leaves the journal locked (Optuna's symlink lock waits 30 s, then
    breaks it). Implements optuna.storages.journal.BaseJournalFileLock."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._fd: int | None = None
        self._local = threading.Lock()

    def acquire(self) -> bool:
        self._local.acquire()
        fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        self._fd = fd
        return True

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        self._local.release()


@contextmanager
def flock(path: Path) -> Iterator[None]:
    lock = FlockLock(path)
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


@dataclass
class Storage:
    """Where the studies live, and how workers coordinate there."""

    url: str  # as given (RDB) or the journal path
    kind: str  # journal | rdb
    path: Path | None = None  # the journal or SQLite file (coordination files sit next to it)
    heartbeat: float = 60.0

    @property
    def grace(self) -> float:
        """RDB: seconds without a heartbeat after which a RUNNING trial's worker counts as dead."""
        return max(2, int(round(2 * self.heartbeat)))

    @classmethod
    def parse(cls, text: str | None, suite: Suite, heartbeat: float) -> "Storage":
        if not text:
            return cls(str(Path(suite.results_dir) / "search" / f"{suite.name}.journal"), "journal",
                       Path(suite.results_dir) / "search" / f"{suite.name}.journal")
        if "://" in text:
            scheme = text.split("://", 1)[0].split("+", 1)[0]
            if scheme not in ("sqlite", "postgresql", "mysql"):
                raise ConfigError(f"storage={text}: unknown scheme {scheme!r}; give a journal file path, "
                                  "sqlite:///path.db, postgresql://... or mysql://...")
            path = Path(text.split(":///", 1)[1]) if scheme == "sqlite" and ":///" in text else None
            return cls(text, "rdb", path, heartbeat)
        return cls(text, "journal", Path(text))

    @property
    def shown(self) -> str:
        """The URL without a password."""
        if "@" in self.url and "://" in self.url:
            scheme, rest = self.url.split("://", 1)
            cred, host = rest.rsplit("@", 1)
            return f"{scheme}://{cred.split(':', 1)[0]}:***@{host}"
        return self.url

    def exists(self) -> bool:
        return self.path is None or self.path.exists()

    def open(self):
        optuna = _optuna()
        if self.kind == "journal":
            from optuna.storages.journal import JournalFileBackend

            self.path.parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.JournalStorage(
                JournalFileBackend(str(self.path), lock_obj=FlockLock(str(self.path) + ".flock")))
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return optuna.storages.RDBStorage(self.url, heartbeat_interval=max(1, int(round(self.heartbeat))),
                                              grace_period=self.grace)
        except ImportError as e:
            raise ConfigError(f"storage={self.shown}: {e} (install the database driver, e.g. psycopg2)") from None

    @property
    def leases(self) -> Path | None:
        """Folder of the workers' flock leases (journal files; RDB storages use heartbeats)."""
        return None if self.kind != "journal" else self.path.with_name(self.path.name + ".workers")

    def ask_lock(self):
        """Held while a worker fails dead trials, counts and asks (file storages: K workers make exactly N
        trials; an RDB on a server has no shared folder for it, see ask_loop's surplus rule)."""
        return flock(self.path.with_name(self.path.name + ".ask.lock")) if self.path is not None else nullcontext()


class Lease:
    """A worker's liveness: an flock held on <storage>.workers/<id>.lock for the process's lifetime."""

    def __init__(self, folder: Path | None) -> None:
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.path, self.fd = None, None
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            self.path = folder / f"{self.id}.lock"
            self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def release(self) -> None:
        if self.fd is not None:
            try:
                self.path.unlink()
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None


def lease_alive(folder: Path, worker: str | None) -> bool:
    if not worker:
        return False
    p = folder / f"{worker}.lock"
    try:
        fd = os.open(p, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        try:
            p.unlink()
        except OSError:
            pass
        return False
    finally:
        os.close(fd)


def fail_dead_trials(study: Any, storage: Storage) -> list[int]:
    """Mark RUNNING trials of dead workers FAIL; returns their numbers. Call under the ask lock (files).

    Journal: a trial's worker is dead when its flock lease is free (or the trial has no worker stamp: it is
    stamped under the ask lock, so its worker died right after asking). RDB: Optuna's heartbeat rule (no
    beat for `grace`), plus unstamped trials older than `grace` (ask_loop beats once before stamping)."""
    optuna = _optuna()
    TrialState = optuna.trial.TrialState
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if not running:
        return []
    if storage.kind == "rdb":
        optuna.storages.fail_stale_trials(study)
        now = datetime.now()
        dead = [t for t in running if ATTR_WORKER not in t.user_attrs and t.datetime_start is not None
                and (now - t.datetime_start).total_seconds() > storage.grace]
    else:
        dead = [t for t in running if not lease_alive(storage.leases, t.user_attrs.get(ATTR_WORKER))]
    for t in dead:
        try:
            study._storage.set_trial_user_attr(t._trial_id, "growbench_lost",
                                               "its worker process died; the trial was marked failed")
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass
    still = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    return sorted(t.number for t in running if t.number not in still)


# --------------------------------------------------------------------------- one study


@dataclass
class StudyPlan:
    suite: Suite  # the suite as configured (retraining, protocol)
    search_suite: Suite  # the trials' suite: the validation split added
    dataset: str
    task: str
    metric: str  # val_acc | val_loss
    direction: str  # maximize | minimize
    val_size: int
    name: str
    storage: Storage
    space: SearchSpace
    opts: SearchOptions
    n_train: int

    @property
    def total_steps(self) -> int:
        b = self.search_suite.budget
        return max(1, round(b.epochs * math.ceil(self.n_train / b.batch_size)))

    @property
    def eval_steps(self) -> int:
        b = self.search_suite.budget
        return max(1, round(b.eval_every * math.ceil(self.n_train / b.batch_size)))

    @property
    def trials_dir(self) -> Path:
        return Path(self.suite.results_dir) / "search" / self.suite.name / self.dataset / self.name

    def study_key(self) -> dict:
        return {"protocol": protocol(self.search_suite, self.dataset), "val_size": self.val_size,
                "train_seed": self.opts.train_seed, "space": self.space.spec, "metric": self.metric}


def default_val_size(suite: Suite, dataset: str, opts: SearchOptions) -> int:
    """The suite's val_size, else val_size=, else 5000 (image data sets) or 20 % of the training set."""
    if suite.dataset.val_size > 0:
        return suite.dataset.val_size
    if opts.val_size:
        return opts.val_size
    if dataset in IMAGE_DATASETS:
        return IMAGE_VAL_SIZE
    from growbench.data import load_dataset

    d = suite.dataset
    full = load_dataset(dataset, d.root, download=d.download)  # synthetic data: made in code, cheap
    return max(1, round(OTHER_VAL_FRACTION * len(full.train)))


def make_plans(suite: Suite, opts: SearchOptions) -> list[StudyPlan]:
    """Check everything (space, storage, data) before anything is written."""
    from growbench.data import load_dataset

    space = SearchSpace.load(suite, opts.space)
    storage = Storage.parse(opts.storage, suite, opts.heartbeat)
    plans = []
    d = suite.dataset
    if d.val_size > 0 and opts.val_size and opts.val_size != d.val_size:
        raise ConfigError(f"val_size={opts.val_size} differs from the suite's dataset.val_size={d.val_size}; "
                          "give one of them")
    for name in d.names:
        val = default_val_size(suite, name, opts)
        data = load_dataset(name, d.root, download=d.download, train_subset=d.train_subset,
                            test_subset=d.test_subset, val_size=val)
        search_suite = dataclasses.replace(suite, dataset=dataclasses.replace(d, val_size=val))
        task = data.task
        metric, direction = ("val_acc", "maximize") if task == "classification" else ("val_loss", "minimize")
        plan = StudyPlan(suite, search_suite, name, task, metric, direction, val, "", storage, space, opts,
                         len(data.train))
        key = hashlib.sha256(json.dumps(plan.study_key(), sort_keys=True, default=str).encode()).hexdigest()
        plan.name = f"{suite.name}-{name}-{key[:10]}"
        plans.append(plan)
    return plans


def _sampler(plan: StudyPlan, worker: int):
    optuna = _optuna()
    return optuna.samplers.TPESampler(seed=plan.opts.sampler_seed + worker, constant_liar=True)


def _pruner(plan: StudyPlan):
    optuna = _optuna()
    if plan.opts.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=plan.opts.prune_startup, n_warmup_steps=0)
    if plan.opts.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=plan.eval_steps, max_resource=plan.total_steps,
                                              reduction_factor=3)
    return optuna.pruners.NopPruner()


def load_study(plan: StudyPlan, worker: int = 0, storage: Any = None):
    optuna = _optuna()
    return optuna.create_study(study_name=plan.name, storage=storage or plan.storage.open(),
                               direction=plan.direction, sampler=_sampler(plan, worker), pruner=_pruner(plan),
                               load_if_exists=True)


def _counted(study: Any) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING,
                                                        TrialState.WAITING)))


def _fmt_config(cfg: dict) -> str:
    return f"hidden {cfg['hidden']}, lr {cfg['lr']:.3g}, wd {cfg['weight_decay']:.3g}"


def run_trial(plan: StudyPlan, study: Any, trial: Any, data: Any, device: torch.device, out) -> str:
    """Train one trial as a harness cell and tell the study; returns a one-line summary."""
    from optuna.trial import TrialState

    from growbench.runner import plan as plan_cells
    from growbench.runner import run_cell
    from growbench.trainer import Pruned

    t0 = time.perf_counter()
    cfg = plan.space.suggest(trial, plan.suite)
    trial.set_user_attr(ATTR_CONFIG, cfg)
    s = plan.search_suite
    tsuite = dataclasses.replace(
        s, model=dataclasses.replace(s.model, hidden=cfg["hidden"], max_hidden=None),
        optimizer=dataclasses.replace(s.optimizer, lr=cfg["lr"], weight_decay=cfg["weight_decay"]),
        methods=["fixed"], method_settings={}, seeds=[plan.opts.train_seed], checkpoint=False,
        dataset=dataclasses.replace(s.dataset, name=plan.dataset))
    (cell,) = plan_cells(tsuite)
    cost = {"wall": 0.0, "flops": 0, "wall_eval": 0.0}
    last = {"value": None, "epoch": 0.0}

    def on_eval(row: dict) -> None:
        cost.update(wall=row["wall_train"] + row["wall_growth"], flops=row["train_flops"] + row["growth_flops"],
                    wall_eval=row["wall_eval"])
        if row["step"] == 0:
            return
        value = row.get(plan.metric)
        trial.set_user_attr(ATTR_COST, dict(cost))
        if value is None or not math.isfinite(value):
            return
        last.update(value=value, epoch=row["epoch"])
        trial.report(value, row["step"])
        if row["step"] < plan.total_steps and trial.should_prune():
            raise Pruned(f"pruned at epoch {row['epoch']:g}")

    try:
        rec = run_cell(cell, data, device, checkpoint=False, on_eval=on_eval)
    except Pruned:
        trial.set_user_attr(ATTR_COST, dict(cost))
        study.tell(trial, state=TrialState.PRUNED)
        v = f", {plan.metric} {last['value']:.4g}" if last["value"] is not None else ""
        return (f"trial {trial.number}: pruned at epoch {last['epoch']:g}{v} ({_fmt_config(cfg)}), "
                f"{time.perf_counter() - t0:.1f} s")
    if rec["status"] == "ok":
        fin = rec["final"]
        cost.update(wall=fin["wall_total"], flops=fin["train_flops"] + fin["growth_flops"], wall_eval=fin["wall_eval"])
    trial.set_user_attr(ATTR_COST, dict(cost))
    try:
        write_record(plan.trials_dir / f"trial{trial.number:04d}.json", rec)
    except Exception as e:  # an audit copy; the study holds what the search needs
        print(f"warning: trial {trial.number}: its record was not written ({e})", file=out)
    took = time.perf_counter() - t0
    if rec["status"] == "ok":
        value = rec["final"][plan.metric]
        study.tell(trial, value)
        return f"trial {trial.number}: {plan.metric} {value:.4g} ({_fmt_config(cfg)}), {took:.1f} s"
    f = rec["failure"]
    trial.set_user_attr("growbench_failure", f"{f['reason']}: {f['message']}")
    if f["reason"] == "diverged":  # a signal for the sampler (too large a learning rate), not a lost trial
        study.tell(trial, state=TrialState.PRUNED)
        return f"trial {trial.number}: diverged, counted as pruned ({_fmt_config(cfg)}), {took:.1f} s"
    study.tell(trial, state=TrialState.FAIL)
    return f"trial {trial.number}: FAILED ({f['reason']}: {f['message']})"


def _beat_thread(study: Any, trial: Any, storage: Storage) -> threading.Event | None:
    """RDB storages: record the trial's heartbeat every `storage.heartbeat` seconds until the event is set."""
    if storage.kind != "rdb":
        return None
    stop = threading.Event()
    backend, tid = study._storage, trial._trial_id

    def beat() -> None:
        while True:
            try:
                backend.record_heartbeat(tid)
            except Exception:
                pass
            if stop.wait(storage.heartbeat):
                return

    threading.Thread(target=beat, daemon=True).start()
    return stop


def work(plan: StudyPlan, worker: int, out=None) -> int:
    """One worker of a study: load the data, then run trials until the study has `trials` of them. Returns
    the number of trials this worker ran."""
    from growbench.runner import load_data, resolve_device

    out = out or sys.stdout
    device = resolve_device(plan.suite.device)
    study = load_study(plan, worker)
    data = load_data(plan.search_suite, plan.dataset).to(device)
    prefix = f"[worker {worker}] " if plan.opts.workers > 1 else ""
    return ask_loop(study, plan.storage, plan.opts.trials,
                    lambda trial: run_trial(plan, study, trial, data, device, out), out, prefix)


def ask_loop(study: Any, storage: Storage, n_trials: int, run_one, out=None, prefix: str = "") -> int:
    """The coordination every worker runs (also driven by baselines/storage_check.py): under the ask lock,
    fail the RUNNING trials of dead workers; while the study counts fewer than `n_trials` (complete, pruned,
    running or waiting), ask a trial and stamp it with this worker's lease; then `run_one(trial)`, which
    tells the study and returns a line to print. Once the count is reached, wait while other workers'
    trials run (one that dies is failed and replaced), then stop. Returns the trials this worker ran."""
    from optuna.trial import TrialState

    out = out or sys.stdout
    lease = Lease(storage.leases)
    poll = 0.5 if storage.kind == "journal" else min(5.0, storage.heartbeat)
    done = 0
    try:
        while True:
            trial = None
            with storage.ask_lock():
                for n in fail_dead_trials(study, storage):
                    print(f"  {prefix}trial {n}: its worker died; marked failed", file=out, flush=True)
                if _counted(study) < n_trials:
                    trial = study.ask()
                    if storage.kind == "rdb":  # a first beat before the stamp: a stamped trial has a heartbeat
                        study._storage.record_heartbeat(trial._trial_id)
                    trial.set_user_attr(ATTR_WORKER, lease.id)
                elif not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                    break
            if trial is None:  # others' trials still running: one of them may die and need replacing
                time.sleep(poll)
                continue
            if storage.kind == "rdb" and _surplus(study, trial, n_trials):
                trial.set_user_attr("growbench_surplus", True)
                study.tell(trial, state=TrialState.FAIL)
                continue
            beat = _beat_thread(study, trial, storage)
            try:
                line = run_one(trial)
            finally:
                if beat is not None:
                    beat.set()
            if line:
                print(f"  {prefix}{line}", file=out, flush=True)
            done += 1
    finally:
        lease.release()
    return done


def _surplus(study: Any, trial: Any, n: int) -> bool:
    from optuna.trial import TrialState

    before = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number and t.state != TrialState.FAIL]
    return len(before) >= n


def _worker_main(plan: StudyPlan, worker: int, threads: int, parent: int) -> None:
    from growbench.executors import _die_with_parent

    _die_with_parent(parent)
    torch.set_num_threads(threads)
    work(plan, worker)


def run_workers(plan: StudyPlan, out) -> list[int]:
    """Run the study's workers (in this process when workers=1); exit codes of worker processes that failed."""
    k = plan.opts.workers
    if k == 1:
        work(plan, 0, out)
        return []
    from growbench.executors import cpu_count

    threads = max(1, cpu_count() // k)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker_main, args=(plan, i, threads, os.getpid()), daemon=False) for i in range(k)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join()
    except KeyboardInterrupt:
        for p in procs:
            p.kill()
        raise
    return [p.exitcode for p in procs if p.exitcode != 0]


# --------------------------------------------------------------------------- summary and best file


def summarize(plan: StudyPlan, study: Any) -> dict:
    """Counts and the whole search's cost: every trial's training wall-clock and FLOPs (pruned, diverged and
    lost trials up to their last evaluation point); `elapsed` adds evaluation and set-up (seconds)."""
    from optuna.trial import TrialState

    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("growbench_surplus")]
    by = {s: [t for t in trials if t.state == s] for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    costs = [t.user_attrs.get(ATTR_COST) or {} for t in trials]
    elapsed = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in trials
                  if t.datetime_complete is not None and t.datetime_start is not None)
    return {"trials": len(by[TrialState.COMPLETE]) + len(by[TrialState.PRUNED]), "pruned": len(by[TrialState.PRUNED]),
            "wall": round(sum(float(c.get("wall", 0.0)) for c in costs), 3),
            "flops": int(sum(int(c.get("flops", 0)) for c in costs)),
            "complete": len(by[TrialState.COMPLETE]), "failed": len(by[TrialState.FAIL]),
            "diverged": sum(1 for t in by[TrialState.PRUNED] if "growbench_failure" in t.user_attrs),
            "wall_eval": round(sum(float(c.get("wall_eval", 0.0)) for c in costs), 3), "elapsed": round(elapsed, 3)}


def best_record(plan: StudyPlan, study: Any) -> dict | None:
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        return None
    best = study.best_trial
    summary = summarize(plan, study)
    top = sorted(done, key=lambda t: t.value, reverse=plan.direction == "maximize")[:5]
    return {
        "suite": plan.suite.name, "dataset": plan.dataset, "study": plan.name, "storage": plan.storage.shown,
        "objective": {"metric": plan.metric, "direction": plan.direction, "val_size": plan.val_size,
                      "train_seed": plan.opts.train_seed, "pruner": plan.opts.pruner,
                      "sampler": f"TPE, seed {plan.opts.sampler_seed} (+ worker index)"},
        "config": best.user_attrs[ATTR_CONFIG],
        "best": {"trial": best.number, "value": best.value, "params": dict(best.params)},
        "search": summary,
        "top": [{"trial": t.number, "value": t.value, "config": t.user_attrs.get(ATTR_CONFIG)} for t in top],
        "space": {"file": plan.space.path.name, **plan.space.spec},
        "protocol": protocol(plan.suite, plan.dataset),
        "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def write_best(path: Path, best: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = ("# Written by `growbench search`; the best configuration of the study, trained as method optuna-fixed.\n"
            "# search: trials = complete + pruned; wall = training + growth seconds of every trial (pruned and\n"
            "# failed ones up to their last evaluation point); flops = their training FLOPs; elapsed = wall-clock\n"
            "# of the trials with evaluation. protocol: the suite settings the retraining must keep.\n"
            + yaml.safe_dump(best, sort_keys=False, default_flow_style=None, width=110))
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.stem}-", suffix=".yaml", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fmt_flops(f: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if f >= scale:
            return f"{f / scale:.1f} {unit}"
    return f"{f:.0f} FLOP"


# --------------------------------------------------------------------------- the command


def search(suite: Suite, opts: SearchOptions, out=None, dry_run: bool = False, quiet: bool = False) -> int:
    out = out or sys.stdout
    _optuna()
    plans = make_plans(suite, opts)
    if dry_run:
        for p in plans:
            done = "no study yet"
            if p.storage.exists():
                try:
                    study = _optuna().load_study(study_name=p.name, storage=p.storage.open())
                    done = f"{summarize(p, study)['trials']} trials done"
                except KeyError:
                    pass
            print(f"search {suite.name}/{p.dataset}: study {p.name} in {p.storage.shown} ({done}); "
                  f"up to {opts.trials} trials; "
                  f"{p.metric} ({p.direction}) on {p.val_size} validation examples, {p.n_train} training; "
                  f"{p.total_steps} steps per trial; space {p.space.path.name}: {p.space.describe()}", file=out)
        return 0
    unfinished = []
    for p in plans:
        storage = p.storage.open()
        study = load_study(p, 0, storage)
        with p.storage.ask_lock():
            fail_dead_trials(study, p.storage)
            fresh = not study.get_trials(deepcopy=False)
            if fresh:
                study.enqueue_trial(p.space.default_params(suite), user_attrs={"growbench_default": True})
        n0 = summarize(p, study)["trials"]
        print(f"search {suite.name}/{p.dataset}: study {p.name} in {p.storage.shown}; {n0} of {opts.trials} trials "
              f"done; {opts.workers} worker(s); {p.metric} on {p.val_size} validation examples ({p.direction}); "
              f"space {p.space.path.name}: {p.space.describe()}", file=out, flush=True)
        dead = run_workers(p, out)
        with p.storage.ask_lock():
            fail_dead_trials(study, p.storage)
        best = best_record(p, study)
        summ = summarize(p, study)
        if dead or summ["trials"] < opts.trials:
            unfinished.append(f"{p.dataset}: {summ['trials']} of {opts.trials} trials"
                              + (f" ({len(dead)} worker(s) died)" if dead else ""))
        if best is None:
            print(f"{suite.name}/{p.dataset}: no complete trial yet; nothing written", file=out)
            continue
        path = best_path(suite.name, p.dataset)
        write_best(path, best)
        print(f"best of {summ['trials']} trials ({summ['pruned']} pruned, {summ['failed']} failed): trial "
              f"{best['best']['trial']}, {p.metric} {best['best']['value']:.4g}: {_fmt_config(best['config'])}; "
              f"search cost {summ['wall']:.1f} s training, {_fmt_flops(summ['flops'])} "
              f"({summ['elapsed']:.1f} s with evaluation) -> {path}", file=out, flush=True)
    if unfinished:
        print(f"growbench: error: the search is not finished ({'; '.join(unfinished)}); rerun the same command to "
              "finish it (finished trials are kept)", file=sys.stderr)
        return 1
    if opts.retrain:
        from growbench.runner import run_suite

        retrain = dataclasses.replace(suite, methods=["optuna-fixed"], workers=opts.workers)
        summary = run_suite(retrain, out, show_progress=False if quiet else None)
        print(f"optuna-fixed: {summary['ok']} ok, {summary['failed']} failed, {summary['skipped']} already recorded; "
              f"records under {suite.results_dir}/runs/{suite.name}/", file=out)
        if "optuna-fixed" not in suite.methods:
            print(f"table: growbench leaderboard suite={suite.name} methods=[{','.join(suite.methods)},optuna-fixed]",
                  file=out)
        if summary.get("lost", 0) or summary.get("busy", 0):
            return 1
    return 0


def main(items: list[str], dry_run: bool = False, quiet: bool = False) -> int:
    name, overrides, opts = parse_args(items)
    suite = load_suite(name, overrides)
    try:
        return search(suite, opts, dry_run=dry_run, quiet=quiet)
    except DatasetError as e:
        raise ConfigError(str(e)) from None
