"""Gather a suite's records into tidy tables: one row per expected cell, per evaluation point, per event.

Only records whose config hash matches the suite's current plan are used, so editing a suite never
mixes protocols; expected cells without a record are kept as `missing` rows so they are counted and
named. Paths in notes are relative to the results folder, so outputs do not depend on where it lives.
"""
from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from growbench.config import Suite
from growbench.records import scan
from growbench.runner import plan

FIXED_TARGETS = ("fixed",)


@dataclass
class Board:
    """Everything the tables and figures of one suite are made from."""

    suite: Suite
    overrides: list[str]
    datasets: list[str]
    tasks: dict[str, str]  # dataset -> classification | regression
    cells: pd.DataFrame  # one row per expected (dataset, method, seed)
    curves: pd.DataFrame  # one row per evaluation point of an ok record
    events: pd.DataFrame  # one row per growth event of an ok record
    notes: list[str] = field(default_factory=list)
    env: dict[str, list[str]] = field(default_factory=dict)

    def higher(self, dataset: str) -> bool:
        return self.tasks.get(dataset, "classification") == "classification"

    def metric_name(self, dataset: str) -> str:
        return "test_acc" if self.higher(dataset) else "test_loss"


def is_fixed(name: str, target: str, cls: type | None = None) -> bool:
    """A fixed-size baseline: a method class that declares `grows = False` (fixed, fixed-matched,
    optuna-fixed, under any alias; `cls`, else looked up in the registry), or, for a method not installed
    here, a name that says so."""
    if cls is None:
        from growbench.methods import load_method_class

        try:
            cls = load_method_class(target)
        except Exception:  # noqa: BLE001 - a plugin that is not installed: fall back on its name
            return target in FIXED_TARGETS or "fixed" in name
    return not cls.grows


def _rel(text: str, results_dir: str) -> str:
    root = str(Path(results_dir)).rstrip("/") + "/"
    return text.replace(root, "")


def _num(x: object) -> float:
    return math.nan if x is None else float(x)


def collect(suite: Suite, overrides: list[str] | None = None) -> Board:
    """Read the records of `suite` under its results_dir and line them up with its plan."""
    cells = plan(suite)
    records, problems = scan(suite.results_dir, suite.name)
    by_hash = {r["config_hash"]: r for r in records}
    notes = [_rel(p, suite.results_dir) for p in problems]
    cells += _extra_cells(suite, records, {c.hash for c in cells}, notes)
    expected = {c.hash for c in cells}
    stale = [r for r in records if r["config_hash"] not in expected]
    if stale:
        notes.append(f"{len(stale)} record(s) of suite {suite.name} belong to another configuration and are not shown")
    tasks: dict[str, str] = {}
    rows, curve_rows, event_rows, envs = [], [], [], []
    for c in cells:
        rec = by_hash.get(c.hash)
        name, target = c.method.name, c.method.target
        row = {"dataset": c.dataset, "method": name, "target": target, "seed": c.seed,
               "is_fixed": is_fixed(name, target, c.method.cls), "status": "missing", "failure": ""}
        if rec is None:
            rows.append(row)
            continue
        tasks.setdefault(c.dataset, rec["dataset"].get("task", "classification"))
        envs.append(rec["env"])
        row["status"] = rec["status"]
        if rec["status"] != "ok":
            f = rec.get("failure") or {}
            row["failure"] = " ".join(f"{f.get('reason', 'failed')}: {f.get('message', '')}".split())  # one line
            rows.append(row)
            continue
        fin = rec["final"]
        search = fin.get("search") or {}
        row.update({k: _num(fin.get(k)) for k in ("test_acc", "test_loss", "params", "inference_flops",
                                                   "train_flops", "growth_flops", "wall_train", "wall_growth")})
        row.update({f"search_{k}": _num(search.get(k)) for k in ("trials", "pruned", "wall", "flops")})
        rows.append(row)
        last = rec["curve"][-1]
        steps_per_epoch = last["step"] / last["epoch"] if last["epoch"] else 1.0
        for p in rec["curve"]:
            curve_rows.append({"dataset": c.dataset, "method": name, "seed": c.seed, "epoch": float(p["epoch"]),
                               "time": float(p["wall_train"]) + float(p["wall_growth"]),
                               "flops": float(p["train_flops"]) + float(p["growth_flops"]),
                               "params": float(p["params"]), "test_acc": _num(p.get("test_acc")),
                               "test_loss": _num(p.get("test_loss"))})
        for e in rec["events"]:
            event_rows.append({"dataset": c.dataset, "method": name, "seed": c.seed,
                               "epoch": float(e["step"]) / steps_per_epoch,
                               "params_after": float(e["params_after"])})
    df = pd.DataFrame(rows)
    for col in ("test_acc", "test_loss", "params", "inference_flops", "train_flops", "growth_flops", "wall_train",
                "wall_growth", "search_trials", "search_pruned", "search_wall", "search_flops"):
        if col not in df:
            df[col] = math.nan
    df["metric"] = [r["test_acc"] if tasks.get(r["dataset"], "classification") == "classification"
                    else r["test_loss"] for _, r in df.iterrows()]
    df["total_wall"] = df["wall_train"] + df["wall_growth"] + df["search_wall"].fillna(0.0)
    df["growth_share"] = df["wall_growth"] / df["total_wall"]
    for (ds, m), g in df.groupby(["dataset", "method"], sort=False):
        missing = g.loc[g["status"] == "missing", "seed"].tolist()
        if missing:
            notes.append(f"{ds}/{m}: missing {', '.join(f'seed{s}' for s in missing)}")
    for _, r in df[df["status"] == "failed"].iterrows():
        notes.append(f"{r['dataset']}/{r['method']}/seed{r['seed']}: failed ({r['failure']})")
    curves = pd.DataFrame(curve_rows, columns=["dataset", "method", "seed", "epoch", "time", "flops", "params",
                                               "test_acc", "test_loss"])
    events = pd.DataFrame(event_rows, columns=["dataset", "method", "seed", "epoch", "params_after"])
    return Board(suite, list(overrides or []), list(suite.dataset.names), tasks, df, curves, events, notes,
                 _env_summary(envs))


def _extra_cells(suite: Suite, records: list[dict], expected: set[str], notes: list[str]) -> list:
    """Cells of methods outside the suite's `methods` that were run on it (`methods=[gradmax]`, a plugin).

    A method counts when its records match the suite as configured now with that method added; its
    expected cells are then the suite's datasets x seeds, so its missing seeds are named like any other's.
    """
    from growbench.config import ConfigError

    extra: list = []
    names = sorted({r["method"] for r in records if r["config_hash"] not in expected} - set(suite.methods))
    for name in names:
        try:
            planned = plan(dataclasses.replace(suite, methods=[name]))
        except ConfigError as e:  # e.g. a plugin that is not installed here
            notes.append(f"records of method {name} not shown: {e}")
            continue
        hashes = {c.hash for c in planned}
        if any(r["config_hash"] in hashes for r in records if r["method"] == name):
            extra += planned
    return extra


def _env_summary(envs: list[dict]) -> dict[str, list[str]]:
    """Distinct hardware and versions of the records used, each with its number of cells, sorted."""
    keys = {
        "hardware": lambda e: (e.get("gpu") or f"{e.get('cpu') or 'unknown CPU'} ({e.get('cpu_count')} cores)")
        + f", device {e.get('device')}",
        "torch": lambda e: str(e.get("torch")),
        "growbench": lambda e: f"{e.get('growbench')} (git {_short(e.get('git_commit'))})",
        "python": lambda e: str(e.get("python")),
    }
    out = {}
    for k, f in keys.items():
        n = Counter(f(e) for e in envs)
        out[k] = [f"{v} [{c} cell{'s' if c != 1 else ''}]" if len(n) > 1 else v for v, c in sorted(n.items())]
    return out


def _short(commit: str | None) -> str:
    if not commit:
        return "unknown"
    dirty = commit.endswith("-dirty")
    return commit[:12] + ("-dirty" if dirty else "")
