"""End-to-end behaviour of the harness as a user meets it: the CLI, suites, records, resume, failures."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from growbench.cli import main
from growbench.config import load_suite
from growbench.records import read_record, scan, validate
from growbench.runner import plan

REPO = Path(__file__).resolve().parent.parent
FAST_TOY = ["budget.epochs=6", "budget.eval_every=2", "growth.start_epoch=1", "growth.every_epochs=2",
            "growth.stop_epoch=5", "--quiet"]
BASELINES = "methods=[fixed,fixed-large,random]"  # the harness's own methods; growth methods have their own tests


def run_cli(*args: str) -> int:
    return main(["run", *args])


def records_of(results: Path, suite: str) -> list[dict]:
    recs, problems = scan(results, suite)
    assert not problems, problems
    return recs


def test_toy_suite_end_to_end(tmp_path, capsys):
    rc = run_cli("suite=toy", f"results_dir={tmp_path}", "seeds=[0,1]", BASELINES, *FAST_TOY)
    assert rc == 0
    recs = records_of(tmp_path, "toy")
    assert len(recs) == 2 * 3 * 2  # datasets x methods x seeds
    for r in recs:
        assert validate(r) == [] and r["status"] == "ok"
        assert r["dataset"]["fingerprint"]["release"] == "synthetic"
        steps = [row["step"] for row in r["curve"]]
        assert steps == sorted(steps) and steps[0] == 0 and steps[-1] == r["final"]["steps"]
        assert r["final"]["wall_total"] == pytest.approx(r["final"]["wall_train"] + r["final"]["wall_growth"])
        assert r["final"]["train_flops"] > 0 and r["final"]["inference_flops"] > 0
    random_recs = [r for r in recs if r["method"] == "random"]
    for r in random_recs:  # random grows on the shared schedule: epochs 1, 3 (stop 5, exclusive)
        assert len(r["events"]) == 2 and r["final"]["params"] > r["curve"][0]["params"]
        for ev in r["events"]:  # zero out-weights: the function is preserved at growth
            assert ev["probe_loss_after"] == pytest.approx(ev["probe_loss_before"], rel=1e-5, abs=1e-6)
            assert ev["params_after"] > ev["params_before"]
    for r in recs:
        if r["method"] == "fixed":
            assert r["events"] == [] and r["final"]["wall_growth"] < 0.05

    capsys.readouterr()
    assert main(["leaderboard", "suite=toy", f"results_dir={tmp_path}", "seeds=[0,1]", BASELINES, *FAST_TOY[:-1]]) == 0
    out = capsys.readouterr().out
    assert "toy-spirals" in out and "fixed-large" in out and "2/2" in out and "±" in out

    # rerunning skips every finished cell and leaves the records byte-identical
    before = {r["_path"]: Path(r["_path"]).read_bytes() for r in recs}
    assert run_cli("suite=toy", f"results_dir={tmp_path}", "seeds=[0,1]", BASELINES, *FAST_TOY) == 0
    assert "0 to run" in capsys.readouterr().out
    assert {p: Path(p).read_bytes() for p in before} == before


def test_same_seed_same_start_and_data_for_every_method(tmp_path):
    """Fairness: every method of a seed starts from the same weights (same step-0 loss at the same size),
    and a growth method's run is deterministic on CPU."""
    run_cli("suite=toy", f"results_dir={tmp_path}", "seeds=[3]", "dataset.name=toy-regression",
            "methods=[fixed,random]", *FAST_TOY)
    recs = {r["method"]: r for r in records_of(tmp_path, "toy")}
    assert recs["fixed"]["curve"][0]["test_loss"] == recs["random"]["curve"][0]["test_loss"]
    again = tmp_path / "again"
    run_cli("suite=toy", f"results_dir={again}", "seeds=[3]", "dataset.name=toy-regression",
            "methods=[random]", *FAST_TOY)
    (r2,) = records_of(again, "toy")
    strip = lambda curve: [{k: v for k, v in row.items() if not k.startswith("wall")} for row in curve]  # noqa: E731
    assert strip(r2["curve"]) == strip(recs["random"]["curve"])
    assert r2["config_hash"] == recs["random"]["config_hash"]


def test_diverging_cell_is_recorded_as_failed_and_suite_goes_on(tmp_path, capsys):
    rc = run_cli("suite=toy", f"results_dir={tmp_path}", "seeds=[0]", "dataset.name=toy-regression",
                 "optimizer.name=sgd", "optimizer.lr=1e6", "optimizer.momentum=0.0", BASELINES, *FAST_TOY)
    assert rc == 0
    recs = records_of(tmp_path, "toy")
    assert len(recs) == 3
    assert all(r["status"] == "failed" and r["failure"]["reason"] == "diverged" for r in recs)
    assert "FAILED (diverged" in capsys.readouterr().out


@pytest.mark.parametrize("args, needle", [
    (["suite=nope"], "valid suites: "),
    (["budget.epoch=3"], "valid keys under budget: epochs"),
    (["budget.epochs=abc"], "budget.epochs: expected float"),
    (["budget.epochs=0"], "budget.epochs must be > 0"),
    (["budget.batch_size=-4"], "budget.batch_size must be > 0"),
    (["methods=[fixed,nosuch]"], "valid methods: "),
    (["model.family=cnn"], "valid choices: mlp, vgg, resnet"),
    (["dataset.name=imagenet"], "valid choices: cifar10"),
    (["seeds=0,1"], "write lists in brackets"),
    (["epochs"], "expected key=value"),
    (["method_settings.random.nope=1"], "valid keys under method_settings.random: units_per_step"),
    (["method_settings.random.layers=some"], "valid choices: all, one"),
    (["device=cuda:7"] if not __import__("torch").cuda.is_available() else ["device=tpu"], "device"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, args, needle):
    results = tmp_path / "res"
    assert run_cli(f"results_dir={results}", *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("growbench: error: ") and needle in err
    assert not results.exists()


def test_missing_dataset_files_name_the_fix(tmp_path, capsys):
    assert run_cli("suite=smoke", f"dataset.root={tmp_path / 'empty'}", f"results_dir={tmp_path / 'r'}") == 2
    err = capsys.readouterr().err
    assert "train-images-idx3-ubyte" in err and "dataset.root" in err
    assert not (tmp_path / "r").exists()


def test_dry_run_prints_plan_and_runs_nothing(tmp_path, capsys):
    run_cli("suite=toy", f"results_dir={tmp_path}", "seeds=[0]", "methods=[fixed]", *FAST_TOY)
    capsys.readouterr()
    assert run_cli("suite=toy", f"results_dir={tmp_path}", "seeds=[0,1]", "methods=[fixed]", "--dry-run",
                   *FAST_TOY) == 0
    out = capsys.readouterr().out
    assert "4 cells, 2 already recorded, 2 to run" in out
    assert out.count("done ") == 2 and out.count("pending ") == 2 and "FLOP" in out and "estimate" in out
    assert len(records_of(tmp_path, "toy")) == 2


def test_changed_suite_does_not_mix_records(tmp_path, capsys):
    run_cli("suite=toy", f"results_dir={tmp_path}", "seeds=[0]", "methods=[fixed]", *FAST_TOY)
    capsys.readouterr()
    main(["leaderboard", "suite=toy", f"results_dir={tmp_path}", "seeds=[0]", "methods=[fixed]",
          "budget.epochs=7", *FAST_TOY[1:-1]])
    out = capsys.readouterr().out
    assert "belong to another configuration" in out and "missing seed0" in out


def test_corrupt_record_is_reported_and_kept(tmp_path, capsys):
    suite = load_suite("toy", [f"results_dir={tmp_path}", "seeds=[0]", "methods=[fixed]", *FAST_TOY[:-1]])
    cells = plan(suite)
    cells[0].path.parent.mkdir(parents=True)
    cells[0].path.write_text('{"kind": "growbench.cell", "schema": 1, "trunc')
    foreign = tmp_path / "runs" / "toy" / "notes.json"
    foreign.write_text(json.dumps({"hello": 1}))
    assert run_cli("suite=toy", f"results_dir={tmp_path}", "seeds=[0]", "methods=[fixed]", *FAST_TOY) == 0
    out = capsys.readouterr().out
    assert "is not a valid record" in out
    assert cells[0].path.read_text().endswith("trunc")  # left alone
    recs, problems = scan(tmp_path, "toy")
    assert len(recs) == 1 and len(problems) == 2 and any("notes.json" in p for p in problems)


def _write_plugin(root: Path) -> None:
    """A real installed distribution (dist-info + entry points) with a method that raises in a hook
    and one whose module fails to import."""
    pkg = root / "gb_test_plugins"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "raising.py").write_text(
        "from growbench.methods.base import GrowthMethod\n"
        "class Raising(GrowthMethod):\n"
        "    name = 'raising'\n"
        "    def grow(self, model, ctx):\n"
        "        raise RuntimeError('boom inside grow')\n")
    (pkg / "broken.py").write_text("import not_a_real_module_xyz\n")
    dist = root / "gb_test_plugins-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: gb-test-plugins\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[growbench.methods]\nraising = gb_test_plugins.raising:Raising\nbroken = gb_test_plugins.broken:Broken\n")


def test_failing_plugins_are_contained(tmp_path):
    plugins = tmp_path / "site"
    _write_plugin(plugins)
    env = {**os.environ, "PYTHONPATH": f"{plugins}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    res = tmp_path / "res"
    cmd = [sys.executable, "-m", "growbench.cli", "run", "suite=toy", f"results_dir={res}", "seeds=[0]",
           "dataset.name=toy-regression", "methods=[fixed,raising,broken]", *FAST_TOY]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    recs = {r["method"]: r for r in records_of(res, "toy")}
    assert recs["fixed"]["status"] == "ok"
    assert recs["raising"]["failure"]["reason"] == "error"
    assert "boom inside grow" in recs["raising"]["failure"]["message"]
    assert "raising.py" in recs["raising"]["failure"]["traceback"]
    assert recs["broken"]["failure"]["reason"] == "plugin"
    assert "not_a_real_module_xyz" in recs["broken"]["failure"]["message"]
    lst = subprocess.run([sys.executable, "-m", "growbench.cli", "list"], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=120)
    assert "raising" in lst.stdout and "broken" in lst.stdout and "BROKEN" in lst.stdout


@pytest.mark.slow
def test_smoke_suite_on_real_data_killed_and_resumed(tmp_path, real_data_root):
    """`growbench run suite=smoke` (every method) on real data; kill it after its first record, rerun:
    only the missing cells run and the finished record is untouched."""
    res = tmp_path / "res"
    env = {**os.environ, "GROWBENCH_DATA": str(real_data_root)}
    n_cells = len(plan(load_suite("smoke", [f"results_dir={res}"])))
    cmd = [sys.executable, "-m", "growbench.cli", "run", "suite=smoke", f"results_dir={res}", "--quiet"]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    runs = res / "runs" / "smoke"
    deadline = time.time() + 240
    while time.time() < deadline and not list(runs.rglob("seed*.json")):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    assert list(runs.rglob("seed*.json")), "no record appeared in time"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {p: p.read_bytes() for p in runs.rglob("seed*.json")}
    assert 1 <= len(done) < n_cells
    out = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    assert f"{len(done)} already recorded, {n_cells - len(done)} to run" in out.stdout
    assert {p: p.read_bytes() for p in done} == done
    recs = records_of(res, "smoke")
    assert len(recs) == n_cells
    failed = [(r["method"], r["failure"]) for r in recs if r["status"] != "ok"]
    assert not failed, failed
    by = {(r["dataset"]["name"], r["method"]): r for r in recs}
    assert by[("mnist", "fixed")]["dataset"]["fingerprint"]["release"] == "canonical"
    assert by[("cifar10", "fixed")]["dataset"]["fingerprint"]["release"] == "cifar10-jpeg-q75-copy"
    for (dataset, method), r in by.items():
        assert r["dataset"]["train"] == 1000 and r["dataset"]["test"] == 500
        assert read_record(Path(r["_path"]))["config_hash"] == r["config_hash"]
        if method != "fixed" and r["events"]:  # every growth method that grew made the network bigger
            assert r["final"]["params"] > by[(dataset, "fixed")]["final"]["params"]
    assert by[("cifar10", "random")]["events"]
