"""A first leaderboard: one row per (dataset, method) from the records of a suite's current plan.

Only records whose config hash matches the suite as configured now are used, so editing a suite never
mixes old and new protocols; cells without a record are counted as missing and named.
"""
from __future__ import annotations

import statistics

from growbench.config import Suite
from growbench.records import scan
from growbench.runner import plan


def _mean_std(xs: list[float]) -> str:
    if not xs:
        return "-"
    m = statistics.fmean(xs)
    s = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{m:.4f} ± {s:.4f}"


def table(suite: Suite) -> tuple[list[dict], list[str]]:
    """Rows of the leaderboard and notes (missing cells, stale or unreadable files)."""
    cells = plan(suite)
    records, problems = scan(suite.results_dir, suite.name)
    by_hash = {r["config_hash"]: r for r in records}
    expected = {c.hash for c in cells}
    stale = [r for r in records if r["config_hash"] not in expected]
    notes = list(problems)
    if stale:
        notes.append(f"{len(stale)} record(s) of suite {suite.name} belong to another configuration and are not shown")
    rows = []
    for dataset in suite.dataset.names:
        for method in suite.methods:
            group = [c for c in cells if c.dataset == dataset and c.method.name == method]
            recs = [by_hash[c.hash] for c in group if c.hash in by_hash]
            ok = [r for r in recs if r["status"] == "ok"]
            missing = [f"seed{c.seed}" for c in group if c.hash not in by_hash]
            if missing:
                notes.append(f"{dataset}/{method}: missing {', '.join(missing)}")
            failed = [r for r in recs if r["status"] == "failed"]
            for r in failed:
                notes.append(f"{dataset}/{method}/seed{r['seed']}: failed ({r['failure']['message']})")
            fin = [r["final"] for r in ok]
            classification = bool(ok) and fin[0]["test_acc"] is not None
            rows.append({
                "dataset": dataset, "method": method,
                "cells": f"{len(ok)}/{len(group)}" + (f" ({len(failed)} failed)" if failed else ""),
                "metric": "test acc" if classification or not ok else "test loss",
                "value": _mean_std([f["test_acc"] if classification else f["test_loss"] for f in fin]),
                "params": f"{statistics.fmean([f['params'] for f in fin]):,.0f}" if fin else "-",
                "train s": f"{statistics.fmean([f['wall_train'] for f in fin]):.1f}" if fin else "-",
                "growth s": f"{statistics.fmean([f['wall_growth'] for f in fin]):.2f}" if fin else "-",
            })
    return rows, notes


def render(rows: list[dict]) -> str:
    if not rows:
        return "(no cells)"
    cols = list(rows[0])
    width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    line = lambda vals: "  ".join(str(v).ljust(width[c]) for c, v in zip(cols, vals))  # noqa: E731
    out = [line(cols), line("-" * width[c] for c in cols)]
    out += [line(r[c] for c in cols) for r in rows]
    return "\n".join(out)


def print_leaderboard(suite: Suite, out) -> None:
    rows, notes = table(suite)
    print(f"leaderboard of suite {suite.name} (mean ± std over seeds; times in seconds)", file=out)
    print(render(rows), file=out)
    for n in notes:
        print(f"note: {n}", file=out)


__all__ = ["table", "render", "print_leaderboard"]
