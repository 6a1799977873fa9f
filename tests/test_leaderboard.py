"""Leaderboards: tables, statistics, figures, determinism, --all and the results index.

Records come from the real toy suite (tiny budget) run once through the CLI; tests that change records
work on a copy.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pandas as pd
import pytest

from growbench.cli import main
from growbench.report.plots import FIGURES, METHOD_COLORS, method_color
from growbench.report.stats import average_ranks, bootstrap_ci, matched_fixed, pareto_front, win_rates
from growbench.report.tables import tex_escape

# the methods are pinned so these tests neither slow down nor change when the toy suite gains methods
OV = ["seeds=[0,1,2]", "budget.epochs=4", "methods=[fixed,fixed-large,random]"]
DATASETS = ("toy-spirals", "toy-regression")


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lb")
    assert main(["run", "suite=toy", f"results_dir={root}", *OV, "--quiet"]) == 0
    return root


def copy_of(toy: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "results"
    shutil.copytree(toy / "runs", dest / "runs")
    return dest


def leaderboard(root: Path, *extra: str, figures: bool = False) -> None:
    assert main(["leaderboard", "suite=toy", f"results_dir={root}", *OV, *extra,
                 *([] if figures else ["--no-figures"])]) == 0


def tables(root: Path, suite: str = "toy") -> tuple[str, pd.DataFrame, str]:
    lb = root / "leaderboards"
    return (lb / f"{suite}.md").read_text(), pd.read_csv(lb / f"{suite}.csv"), (lb / f"{suite}.tex").read_text()


def md_row(md: str, dataset: str, method: str) -> str:
    section = md.split(f"## {dataset}:", 1)[1].split("\n## ", 1)[0]
    return next(line for line in section.splitlines() if line.startswith(f"| {method} "))


def record_file(root: Path, dataset: str, method: str, seed: int) -> Path:
    (path,) = (root / "runs" / "toy" / dataset / method).glob(f"seed{seed}-*.json")
    return path


def test_tables_columns_counts_best_and_header(toy, tmp_path, capsys):
    root = copy_of(toy, tmp_path)
    leaderboard(root)
    out = capsys.readouterr().out
    md, df, tex = tables(root)
    assert out.startswith(md)  # the printed table is the file
    assert len(df) == 6 and set(df["dataset"]) == set(DATASETS)
    assert (df["cells_ok"] == 3).all() and (df["cells_expected"] == 3).all() and (df["cells_failed"] == 0).all()
    for col in ("metric_mean", "metric_std", "ci_low", "ci_high", "avg_rank", "win_rate", "params",
                "inference_flops", "train_flops", "growth_flops", "wall_train", "wall_growth", "search_wall",
                "total_wall", "growth_share"):
        assert col in df.columns
    assert set(df.loc[df["dataset"] == "toy-spirals", "metric"]) == {"test_acc"}
    assert set(df.loc[df["dataset"] == "toy-regression", "metric"]) == {"test_loss"}
    for head in ("| method", "cells", "test acc % ↑", "test loss ↓", "95% CI", "avg rank", "wins vs fixed", "params",
                 "inf. FLOPs", "growth FLOPs", "train s", "growth s", "total s"):
        assert head in md
    assert "search s" not in md  # no record has a search: the column is left out of md/tex (kept in the CSV)
    for key in ("hardware:", "torch:", "growbench:", "protocol:", f"overrides: `{' '.join(OV)}`"):
        assert key in md
    for ds in DATASETS:  # sorted by the primary metric, best first, and the best is bold
        d = df[df["dataset"] == ds]
        higher = ds == "toy-spirals"
        means = d["metric_mean"].tolist()
        assert means == sorted(means, reverse=higher)
        assert "**" in md_row(md, ds, d["method"].iloc[0]).split("|")[3]
        assert "**" not in md_row(md, ds, d["method"].iloc[-1]).split("|")[3]
        assert "3/3" in md_row(md, ds, d["method"].iloc[0])
    assert tex.count(r"\toprule") == 2 and tex.count(r"\bottomrule") == 2 and r"\textbf{" in tex
    assert r"test acc (\%)" in tex and r"$\pm$" in tex and "±" not in tex


def test_bootstrap_interval(toy, tmp_path):
    root = copy_of(toy, tmp_path)
    leaderboard(root)
    _, df, _ = tables(root)
    assert ((df["ci_low"] <= df["metric_mean"]) & (df["metric_mean"] <= df["ci_high"])).all()
    assert (df["ci_low"] < df["ci_high"]).all()
    xs = [0.61, 0.64, 0.70]
    lo, hi = bootstrap_ci(xs)
    assert lo <= sum(xs) / 3 <= hi and min(xs) <= lo and hi <= max(xs)
    assert bootstrap_ci(xs) == (lo, hi)  # fixed RNG seed: the same interval every time
    assert bootstrap_ci([0.5]) == (0.5, 0.5)


def _cells(rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["method", "seed", "status", "metric", "params", "is_fixed"])


def test_rank_and_win_arithmetic_by_hand():
    # accuracy, 2 seeds. seed 0: big .90 > grow .80 > small .70 > bad (failed); gone missing
    #                     seed 1: grow .85 > big .84 > gone .70 > small .60 > bad .50
    cells = _cells([
        ("small", 0, "ok", 0.70, 100, True), ("small", 1, "ok", 0.60, 100, True),
        ("big", 0, "ok", 0.90, 10_000, True), ("big", 1, "ok", 0.84, 10_000, True),
        ("grow", 0, "ok", 0.80, 9_000, False), ("grow", 1, "ok", 0.85, 8_000, False),
        ("bad", 0, "failed", float("nan"), float("nan"), False), ("bad", 1, "ok", 0.50, 150, False),
        ("gone", 0, "missing", float("nan"), float("nan"), False), ("gone", 1, "ok", 0.70, 100, False),
    ])
    ranks = average_ranks(cells, higher=True)
    # seed 0: big 1, grow 2, small 3, bad 4 (a failed cell ranks last); seed 1: grow 1, big 2, gone 3, small 4, bad 5
    assert ranks == {"small": 3.5, "big": 1.5, "grow": 1.5, "bad": 4.5, "gone": 3.0}
    wins = win_rates(cells, higher=True)
    assert set(wins) == {"grow", "bad", "gone"}  # fixed baselines get no win rate
    # grow (8-9k params) is matched with big (10k): loses seed 0, wins seed 1
    assert wins["grow"] == {"wins": 1.0, "seeds": 2, "rate": 0.5, "vs": ["big"]}
    # bad: seed 0 failed = a loss; seed 1 (150 params) vs small (100): .50 < .60, a loss
    assert wins["bad"] == {"wins": 0.0, "seeds": 2, "rate": 0.0, "vs": ["small"]}
    # gone: seed 0 missing is left out; seed 1 (100 params) vs small: .70 > .60, a win
    assert wins["gone"] == {"wins": 1.0, "seeds": 1, "rate": 1.0, "vs": ["small"]}
    # a tie counts one half; lower is better for a loss
    tie = _cells([("f", 0, "ok", 0.3, 10, True), ("g", 0, "ok", 0.3, 12, False), ("g", 1, "ok", 0.2, 12, False),
                  ("f", 1, "ok", 0.25, 10, True)])
    assert win_rates(tie, higher=False)["g"]["wins"] == 1.5
    assert average_ranks(tie, higher=False) == {"f": 1.75, "g": 1.25}
    # matched size is a log-scale distance: 3,000 is closer to 10,000 (3.3x) than to 100 (30x)
    assert matched_fixed(3_000, {"small": 100, "big": 10_000}) == "big"
    assert matched_fixed(500, {"only": 10_000}) == "only"
    assert pareto_front([(100, 0.7), (10_000, 0.9), (1_000, 0.6), (5_000, 0.9)], higher=True) == \
        [(100, 0.7), (5_000, 0.9)]


def test_missing_and_failed_cells_are_counted_and_named(toy, tmp_path, capsys):
    root = copy_of(toy, tmp_path)
    record_file(root, "toy-spirals", "fixed", 1).unlink()
    failed = record_file(root, "toy-regression", "random", 2)
    rec = json.loads(failed.read_text())
    rec.update(status="failed", failure={"reason": "diverged", "message": "training loss became nan at step 7"},
               curve=[], events=[], final={})
    failed.write_text(json.dumps(rec))
    (root / "runs" / "toy" / "toy-spirals" / "fixed" / "junk.json").write_text("{not json")
    leaderboard(root)
    md, df, _ = tables(root)
    assert "2/3 (missing seed1)" in md_row(md, "toy-spirals", "fixed")
    assert "- toy-spirals/fixed: missing seed1" in md
    assert "2/3 (1 failed)" in md_row(md, "toy-regression", "random")
    assert "- toy-regression/random/seed2: failed (diverged: training loss became nan at step 7)" in md
    assert "runs/toy/toy-spirals/fixed/junk.json: unreadable" in md and str(root) not in md
    assert "cells: 16 ok, 1 failed, 1 missing of 18 expected" in md
    row = df[(df["dataset"] == "toy-regression") & (df["method"] == "random")].iloc[0]
    assert row["cells_failed"] == 1 and row["failed"] == "seed2" and row["cells_ok"] == 2
    assert df.loc[(df["dataset"] == "toy-spirals") & (df["method"] == "fixed"), "missing"].iloc[0] == "seed1"


def test_diverged_run_is_listed(tmp_path, capsys):
    bad = ["seeds=[0]", "methods=[random]", "budget.epochs=2", "optimizer.name=sgd", "optimizer.lr=1e6",
           "optimizer.momentum=0.0"]
    assert main(["run", "suite=toy", f"results_dir={tmp_path}", *bad, "--quiet"]) == 0
    capsys.readouterr()
    assert main(["leaderboard", "suite=toy", f"results_dir={tmp_path}", *bad]) == 0
    out = capsys.readouterr().out
    md, df, _ = tables(tmp_path)
    assert out.startswith(md)
    failed = df[df["cells_failed"] > 0]
    assert len(failed) >= 1 and (failed["cells_ok"] == 0).all()
    for _, r in failed.iterrows():
        assert "0/1 (1 failed)" in md_row(md, r["dataset"], "random")
        assert f"- {r['dataset']}/random/seed0: failed (diverged: " in md


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def _digest(folder: Path, patterns: tuple[str, ...]) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for pat in patterns for p in sorted(folder.rglob(pat))}


def test_figures_and_byte_identical_rerun(toy, tmp_path, capsys):
    root = copy_of(toy, tmp_path)
    leaderboard(root, figures=True)
    lb = root / "leaderboards"
    for ds in DATASETS:  # one set of figures per dataset, PNG + PDF
        for name in FIGURES:
            png, pdf = lb / "toy" / f"{ds}-{name}.png", lb / "toy" / f"{ds}-{name}.pdf"
            assert png.stat().st_size > 5000 and pdf.read_bytes().startswith(b"%PDF")
            w, _ = _png_size(png)
            assert 600 <= w <= 760  # 3.4 in at 200 dpi: paper-column width
            assert b"CreationDate" not in pdf.read_bytes()
    patterns = ("*.md", "*.csv", "*.tex", "*.pdf")
    first = _digest(lb, patterns)
    assert len(first) == 3 + len(DATASETS) * len(FIGURES)
    leaderboard(root, figures=True)
    assert _digest(lb, patterns) == first  # tables (and PDFs) byte-identical on rerun
    index = (root / "README.md").read_text()
    for ds in DATASETS:
        for name in FIGURES:
            assert f"leaderboards/toy/{ds}-{name}.png" in index and f"leaderboards/toy/{ds}-{name}.pdf" in index


def test_all_regenerates_every_suite_and_the_index(toy, tmp_path, capsys):
    root = copy_of(toy, tmp_path)
    (root / "runs" / "no-such-suite" / "x").mkdir(parents=True)
    (root / "runs" / "no-such-suite" / "x" / "r.json").write_text("{}")
    leaderboard(root)
    before = _digest(root / "leaderboards", ("*.md", "*.csv", "*.tex"))
    (root / "leaderboards" / "toy.md").unlink()
    capsys.readouterr()
    assert main(["leaderboard", "--all", f"results_dir={root}", *OV, "--no-figures"]) == 0
    out = capsys.readouterr().out
    assert "toy: 18 ok" in out and "skipped runs/no-such-suite/" in out
    assert _digest(root / "leaderboards", ("*.md", "*.csv", "*.tex")) == before
    index = (root / "README.md").read_text()
    assert "## toy" in index and "(leaderboards/toy.md)" in index and "(leaderboards/toy.tex)" in index
    assert "**toy-spirals** (classification): 9/9 cells; best: **" in index
    assert "no-such-suite" not in index
    assert main(["leaderboard", "--all", "suite=toy", f"results_dir={root}"]) == 2


def test_colours_are_fixed_per_method_and_deterministic_otherwise():
    assert method_color("fixed") == METHOD_COLORS["fixed"] and method_color("tiny") == METHOD_COLORS["tiny"]
    known = ["fixed", "fixed-large", "fixed-matched", "optuna-fixed", "random", "tiny", "senn", "senn-sgd",
             "firefly", "splitting", "splitting-fast", "gradmax"]
    assert len({method_color(m) for m in known}) == len(known)
    assert method_color("my-new-method") == method_color("my-new-method")
    assert method_color("my-new-method").startswith("#")


def test_tex_escape():
    assert tex_escape("a_b & 5% #1 {x} ~^$") == r"a\_b \& 5\% \#1 \{x\} \textasciitilde{}\textasciicircum{}\$"
    assert tex_escape("<0.001 ± 1") == r"$<$0.001 $\pm$ 1"


def test_a_method_run_outside_the_suite_list_is_shown_with_its_missing_seeds(toy, tmp_path):
    """`growbench run suite=toy methods=[gradmax]` (a plugin, say) shows up on the suite's leaderboard."""
    root = copy_of(toy, tmp_path)
    assert main(["run", "suite=toy", f"results_dir={root}", *OV, "methods=[tiny]", "seeds=[0]", "--quiet"]) == 0
    leaderboard(root)
    md, df, _ = tables(root)
    assert "also run on this suite (`methods=[...]`, not in its list): tiny" in md
    row = df[(df["dataset"] == "toy-spirals") & (df["method"] == "tiny")].iloc[0]
    assert row["cells_ok"] == 1 and row["cells_expected"] == 3
    assert "toy-spirals/tiny: missing seed1, seed2" in md
    # records of another protocol stay out
    assert main(["run", "suite=toy", f"results_dir={root}", *OV, "methods=[senn-sgd]", "seeds=[0]",
                 "budget.epochs=3", "--quiet"]) == 0
    leaderboard(root)
    md, df, _ = tables(root)
    assert "senn-sgd" not in set(df["method"]) and "belong to another configuration" in md


def test_fixed_size_baselines_are_the_methods_that_do_not_grow():
    from growbench.report.collect import is_fixed

    assert is_fixed("fixed-large", "fixed") and is_fixed("tiny-matched", "fixed-matched")
    assert is_fixed("optuna-fixed", "optuna-fixed")
    assert not is_fixed("tiny", "tiny") and not is_fixed("random-1-64", "random")
    assert is_fixed("my-fixed", "not-installed") and not is_fixed("mine", "not-installed")  # by name
