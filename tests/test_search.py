"""The Optuna-searched fixed-size baselines: `growbench search`, `optuna-fixed`, `fixed-matched`.

Every test runs in a fresh working directory (best files go to ./baselines/best, records to ./results)
on the toy spirals with a budget of a few dozen steps per trial.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from baselines.search import FlockLock, make_plans, parse_args  # noqa: E402
from growbench.cli import main  # noqa: E402
from growbench.config import ConfigError, load_suite  # noqa: E402
from growbench.records import read_record, scan  # noqa: E402
from growbench.runner import load_data, plan, run_cell  # noqa: E402

TrialState = optuna.trial.TrialState
# toy spirals: 2400 training examples after the 600 validation ones, 24 steps per epoch
TOY = ["suite=toy", "dataset.name=toy-spirals", "budget.batch_size=100"]
QUICK = [*TOY, "budget.epochs=2", "budget.eval_every=0.5"]  # 48 steps, evaluated every 12


def plan_of(args: list[str]):
    """The StudyPlan `growbench search` makes of these arguments."""
    name, overrides, opts = parse_args([a for a in args if not a.startswith("--")])
    (p,) = make_plans(load_suite(name, overrides), opts)
    return p


@pytest.fixture(autouse=True)
def workdir(tmp_path, monkeypatch):
    import torch

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # subprocesses: tiny networks, shared CI machines
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path
    torch.set_num_threads(threads)


def study_of(root: Path, suite: str = "toy"):
    from optuna.storages.journal import JournalFileBackend

    path = root / "results" / "search" / f"{suite}.journal"
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(path), lock_obj=FlockLock(f"{path}.flock")))
    names = optuna.study.get_all_study_names(storage)
    assert len(names) == 1, names
    return optuna.load_study(study_name=names[0], storage=storage)


def counted(study) -> list:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))


def test_search_end_to_end_then_optuna_fixed_carries_the_search_cost(workdir, capsys):
    args = [*QUICK, "seeds=[0,1]", "trials=4", "prune_startup=1"]
    # A study seeded with a good and a hopeless configuration: the median pruner stops the second at its
    # first evaluation point (its validation accuracy is below the first trial's there).
    p = plan_of(args)
    study = optuna.create_study(study_name=p.name, storage=p.storage.open(), direction="maximize")
    study.enqueue_trial({"depth": 1, "width_0": 32, "lr": 0.05, "weight_decay": 1e-5})
    study.enqueue_trial({"depth": 1, "width_0": 2, "lr": 0.001, "weight_decay": 1e-5})

    assert main(["search", *args, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "trial 1: pruned at epoch 0.5" in out and "optuna-fixed: 2 ok" in out

    study = study_of(workdir)
    trials = study.get_trials(deepcopy=False)
    assert [t.number for t in trials] == [0, 1, 2, 3] and len(counted(study)) == 4
    assert trials[1].state == TrialState.PRUNED and trials[0].state == TrialState.COMPLETE
    assert all(len(t.intermediate_values) >= 1 for t in trials)  # the pruner was fed every evaluation point
    for t in trials:  # validation metrics, never test: reported values are val_acc of the trial's curve
        if t.state == TrialState.COMPLETE:
            rec = read_record(p.trials_dir / f"trial{t.number:04d}.json")
            assert rec["dataset"]["val"] == 600 and rec["dataset"]["train"] == 2400
            assert t.value == rec["final"]["val_acc"] == rec["curve"][-1]["val_acc"]
            assert t.intermediate_values[12] == rec["curve"][1]["val_acc"]

    best = __import__("yaml").safe_load((workdir / "baselines/best/toy-toy-spirals.yaml").read_text())
    s = best["search"]
    pruned = sum(t.state == TrialState.PRUNED for t in trials)
    assert s["trials"] == 4 and s["pruned"] == pruned >= 1 and s["failed"] == 0
    assert s["wall"] > 0 and s["flops"] > 0 and s["elapsed"] >= s["wall"]
    assert best["best"]["value"] == max(t.value for t in trials if t.state == TrialState.COMPLETE)
    assert best["config"] == study.best_trial.user_attrs["growbench_config"]

    recs = [r for r in scan(workdir / "results", "toy")[0] if r["method"] == "optuna-fixed"]
    assert sorted(r["seed"] for r in recs) == [0, 1]
    for r in recs:  # the searched network, lr and weight decay, trained on the full training set
        assert r["status"] == "ok" and r["dataset"]["val"] == 0 and r["dataset"]["train"] == 3000
        assert {k: r["final"]["search"][k] for k in ("trials", "pruned", "wall", "flops")} == {
            k: s[k] for k in ("trials", "pruned", "wall", "flops")}
        assert list(r["final"]["widths"].values()) == best["config"]["hidden"]
        assert r["curve"][0]["lr"] == pytest.approx(best["config"]["lr"])
        assert r["config"]["resolved"]["config"] == best["config"]

    # rerunning resumes: nothing new to search, the retrained cells are already recorded
    assert main(["search", *args, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "4 of 4 trials done" in out and "2 already recorded" in out
    assert len(study_of(workdir).get_trials(deepcopy=False)) == 4

    # the leaderboard adds the search to optuna-fixed's total cost
    assert main(["leaderboard", *QUICK, "seeds=[0,1]", "methods=[fixed,optuna-fixed]", "--no-figures"]) == 0
    table = capsys.readouterr().out
    assert "search trials" in table and f"4 ({pruned} pruned)" in table


def test_killed_worker_loses_only_its_running_trial(workdir):
    """A search process killed (SIGKILL) in the middle of a trial: the rerun marks that trial failed, keeps
    the finished ones, and completes the study to the asked number of trials."""
    args = [*TOY, "budget.epochs=10", "budget.eval_every=1", "trials=3", "retrain=false", "pruner=none"]
    proc = subprocess.Popen([sys.executable, "-m", "growbench.cli", "search", *args], cwd=workdir,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    journal = workdir / "results" / "search" / "toy.journal"
    deadline = time.monotonic() + 90
    try:
        while True:
            assert proc.poll() is None, f"the search ended before it was killed: {proc.stderr.read().decode()}"
            assert time.monotonic() < deadline, "no trial finished in 90 s"
            if journal.exists() and journal.stat().st_size:
                study = study_of(workdir)
                running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                if counted(study) and running and running[0].intermediate_values:
                    break  # one trial finished, the next one is half-way
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    study = study_of(workdir)
    finished = {t.number: t.value for t in counted(study)}
    (killed,) = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))

    assert main(["search", *args]) == 0
    study = study_of(workdir)
    after = {t.number: t for t in study.get_trials(deepcopy=False)}
    assert after[killed.number].state == TrialState.FAIL and "growbench_lost" in after[killed.number].user_attrs
    assert {n: after[n].value for n in finished} == finished  # finished trials kept as they were
    assert len(counted(study)) == 3 and not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    best = __import__("yaml").safe_load((workdir / "baselines/best/toy-toy-spirals.yaml").read_text())
    assert best["search"]["trials"] == 3 and best["search"]["failed"] == 1
    lost_cost = after[killed.number].user_attrs["growbench_cost"]  # charged up to its last evaluation point
    assert best["search"]["wall"] >= lost_cost["wall"] > 0


def test_two_workers_finish_exactly_n_trials(workdir, capsys):
    args = [*TOY, "budget.epochs=6", "budget.eval_every=1", "trials=6", "workers=2", "retrain=false"]
    assert main(["search", *args]) == 0
    study = study_of(workdir)
    trials = study.get_trials(deepcopy=False)
    assert [t.number for t in trials] == list(range(6))  # none lost, none extra, none twice
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    assert len({t.user_attrs["growbench_worker"] for t in trials}) == 2  # both workers ran trials
    files = sorted(plan_of(args).trials_dir.glob("trial*.json"))
    complete = [t.number for t in trials if t.state == TrialState.COMPLETE]
    assert [f.stem for f in files if json.loads(f.read_text())["status"] == "ok"] == [f"trial{n:04d}" for n in complete]


def test_optuna_fixed_without_or_with_a_stale_search_fails_clearly(workdir):
    suite = load_suite("toy", ["dataset.name=toy-spirals", "methods=[optuna-fixed]", "seeds=[0]"])
    (cell,) = plan(suite)
    rec = run_cell(cell, load_data(suite, "toy-spirals"), __import__("torch").device("cpu"), checkpoint=False)
    assert rec["status"] == "failed"
    assert "no search result" in rec["failure"]["message"] and "growbench search suite=toy" in rec["failure"]["message"]

    best = workdir / "baselines" / "best" / "toy-toy-spirals.yaml"
    best.parent.mkdir(parents=True)
    from growbench.methods.optuna_fixed import protocol

    other = protocol(load_suite("toy", ["budget.epochs=3"]), "toy-spirals")
    best.write_text(__import__("yaml").safe_dump({"study": "s", "config": {"hidden": [4], "lr": 0.01,
                                                                            "weight_decay": 0.0},
                                                  "search": {"trials": 1}, "protocol": other}))
    (cell2,) = plan(suite)
    assert cell2.hash != cell.hash  # the search result is part of the cell's identity
    rec = run_cell(cell2, load_data(suite, "toy-spirals"), __import__("torch").device("cpu"), checkpoint=False)
    now = float(suite.budget.epochs)
    assert rec["status"] == "failed" and f"budget.epochs: 3.0 when searched, {now} now" in rec["failure"]["message"]


def test_fixed_matched_trains_the_final_size_of_a_growth_method(workdir, capsys):
    fm = ["method_settings.fm.method=fixed-matched", "method_settings.fm.match=random"]
    args = ["run", *TOY, "--quiet", "budget.epochs=4", "budget.eval_every=2", "growth.start_epoch=1",
            "growth.every_epochs=1", "seeds=[0]", *fm]
    assert main([*args, "methods=[fm]"]) == 0  # random has not run: the cell fails and says what to run
    (rec,) = [r for r in scan(workdir / "results", "toy")[0] if r["method"] == "fm"]
    assert rec["status"] == "failed" and "random has no record yet" in rec["failure"]["message"]
    assert "growbench run suite=toy methods=[random]" in rec["failure"]["message"]

    assert main([*args, "methods=[random]"]) == 0
    assert main([*args, "methods=[random,fm]"]) == 0
    recs = {r["method"]: r for r in scan(workdir / "results", "toy")[0] if r["status"] == "ok"}
    grown, matched = recs["random"], recs["fm"]
    assert grown["events"] and not matched["events"]
    assert matched["architecture"] == grown["architecture"] and matched["final"]["params"] == grown["final"]["params"]
    assert matched["curve"][0]["params"] == grown["final"]["params"] > grown["curve"][0]["params"]  # from the start
    assert matched["final"]["matched"]["method"] == "random"
    assert matched["final"]["steps"] == grown["final"]["steps"]  # the same budget

    with pytest.raises(ConfigError, match="does not grow"):
        plan(load_suite("toy", ["methods=[fm]", "method_settings.fm.method=fixed-matched",
                                "method_settings.fm.match=fixed"]))


def test_bad_search_options_exit_2_and_write_nothing(workdir, capsys):
    for bad, needle in [("trials=0", "trials must be > 0"), ("pruner=asha", "valid choices: median, hyperband"),
                        ("space=nope", "no search space nope.yaml"), ("storage=redis://x", "unknown scheme"),
                        ("val_size=0", "selects on a validation split"), ("budget.epoch=2", "unknown key")]:
        assert main(["search", *TOY, bad]) == 2, bad
        assert needle in capsys.readouterr().err, bad
    assert not (workdir / "results").exists() and not (workdir / "baselines").exists()


def test_registered_with_valid_settings():
    from growbench.testing import MethodConformance

    for name in ("optuna-fixed", "fixed-matched"):
        MethodConformance().test_registered(name)
        MethodConformance().test_settings_and_search_space(name, {})
