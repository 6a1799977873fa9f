"""Does a study's storage hold under several worker processes? `python -m baselines.storage_check`

K spawned workers share one study through `baselines.search.ask_loop` (the coordination `growbench search`
uses: ask lock, flock leases or heartbeats, stale-trial failing) with a synthetic objective: each trial
sleeps 10-40 ms, reports 3 intermediate values and sets a cost attribute (the writes a real trial makes,
at a far higher rate), and each worker logs the trials it ran to its own file. Checks: the study ends with
exactly N counted trials, numbered 0..N-1 (journal) or N plus failed surplus trials (RDB), every one told
by exactly one worker with the value that worker computed, nothing left RUNNING. `--kill` SIGKILLs one
worker in the middle of a trial: exactly its running trial must end FAIL and the others still reach N.

    python -m baselines.storage_check --workers 4 --trials 200                  # journal file (default)
    python -m baselines.storage_check --workers 4 --trials 200 --kill
    python -m baselines.storage_check --storage sqlite --workers 4 --trials 200 [--no-lock]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

from baselines.search import Storage, _optuna, ask_loop


def _value(number: int) -> float:
    return ((number * 2654435761) % 1000) / 1000.0


def _worker(url: str, kind: str, path: str | None, name: str, n: int, log: str, heartbeat: float) -> None:
    optuna = _optuna()
    storage = Storage(url, kind, Path(path) if path else None, heartbeat)
    study = optuna.load_study(study_name=name, storage=storage.open())
    rng = random.Random(os.getpid())

    def run_one(trial) -> str:
        with open(log, "a") as f:
            f.write(json.dumps({"start": trial.number}) + "\n")
        for step in range(3):
            time.sleep(rng.uniform(0.01, 0.04) / 3)
            trial.report(_value(trial.number) * (step + 1) / 3, step)
        trial.set_user_attr("growbench_cost", {"wall": 0.01, "flops": 1})
        with open(log, "a") as f:  # before tell: a worker killed after this line is caught by the check
            f.write(json.dumps({"number": trial.number, "value": _value(trial.number)}) + "\n")
        study.tell(trial, _value(trial.number))
        return ""

    with open(os.devnull, "w") as devnull:
        ask_loop(study, storage, n, run_one, out=devnull)


def check(kind: str, workers: int, trials: int, kill: bool, folder: Path, no_lock: bool = False) -> dict:
    optuna = _optuna()
    TrialState = optuna.trial.TrialState
    if kind == "journal":
        storage = Storage(str(folder / "study.journal"), "journal", folder / "study.journal")
    else:
        # no_lock: as an RDB on a server (no shared folder): no ask lock, surplus trials failed at once
        storage = Storage(f"sqlite:///{folder / 'study.db'}", "rdb", None if no_lock else folder / "study.db",
                          heartbeat=1.0)
    name = "storage-check"
    optuna.create_study(study_name=name, storage=storage.open(), direction="maximize")
    ctx = mp.get_context("spawn")
    logs = [folder / f"worker{i}.log" for i in range(workers)]
    path = None if storage.path is None else str(storage.path)
    procs = [ctx.Process(target=_worker, args=(storage.url, storage.kind, path, name, trials,
                                               str(log), storage.heartbeat)) for log in logs]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    killed = None
    if kill:  # kill worker 0 once it has run a few trials, in the middle of one (just after it started one)
        while True:
            lines = logs[0].read_text().splitlines() if logs[0].exists() else []
            if len(lines) >= 2 * max(2, trials // (4 * workers)) and "start" in json.loads(lines[-1]):
                break
            time.sleep(0.001)
        time.sleep(0.002)
        os.kill(procs[0].pid, signal.SIGKILL)
        killed = procs[0].pid
    for p in procs:
        p.join()
    seconds = time.perf_counter() - t0
    study = optuna.load_study(study_name=name, storage=storage.open())
    all_trials = study.get_trials(deepcopy=False)
    told: dict[int, list[float]] = {}
    for log in logs:
        if log.exists():
            for line in log.read_text().splitlines():
                r = json.loads(line)
                if "start" in r:
                    continue
                told.setdefault(r["number"], []).append(r["value"])
    complete = [t for t in all_trials if t.state == TrialState.COMPLETE]
    fails = [t for t in all_trials if t.state == TrialState.FAIL]
    surplus = [t for t in fails if t.user_attrs.get("growbench_surplus")]
    lost = [t for t in fails if not t.user_attrs.get("growbench_surplus")]
    problems = []
    if len(complete) != trials:
        problems.append(f"{len(complete)} complete trials, expected {trials}")
    if sorted(t.number for t in all_trials) != list(range(len(all_trials))):
        problems.append("trial numbers are not 0..n-1")
    if any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in all_trials):
        problems.append("trials left RUNNING/WAITING")
    dup = [n for n, v in told.items() if len(v) > 1]
    if dup:
        problems.append(f"trials told by several workers: {dup[:5]}")
    for t in complete:
        if told.get(t.number) != [t.value]:
            problems.append(f"trial {t.number}: storage value {t.value}, workers logged {told.get(t.number)}")
            break
    if storage.path is not None and surplus:
        problems.append(f"{len(surplus)} surplus trials with an ask lock")
    if len(lost) != (1 if kill else 0):
        problems.append(f"{len(lost)} failed (lost) trials, expected {1 if kill else 0}")
    return {"storage": kind + (" (no ask lock)" if no_lock else ""), "workers": workers, "trials": trials,
            "killed_worker": killed, "seconds": round(seconds, 2), "trials_per_s": round(trials / seconds, 1),
            "complete": len(complete), "lost": len(lost), "surplus": len(surplus), "total_trials": len(all_trials),
            "ok": not problems, "problems": problems}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--storage", choices=("journal", "sqlite"), default="journal")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--kill", action="store_true", help="SIGKILL one worker mid-trial")
    ap.add_argument("--no-lock", action="store_true", help="sqlite without the ask lock, as a database server")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        res = check(args.storage, args.workers, args.trials, args.kill, Path(d), args.no_lock)
    print(json.dumps(res))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
