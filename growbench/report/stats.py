"""Seed-level statistics of a leaderboard: bootstrap intervals, average ranks, matched-size win rates.

All functions take `cells`, one row per (method, seed) of one dataset with columns `method`, `seed`,
`status` (ok | failed | missing), `metric`, `params` and `is_fixed`; `higher` says whether a larger
metric is better (accuracy) or a smaller one (loss).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0


def bootstrap_ci(values: list[float] | np.ndarray, level: float = 0.95,
                 resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over seeds. The RNG seed is fixed, so the same values
    always give the same interval (tables stay byte-identical); one value gives a zero-width interval."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return (math.nan, math.nan)
    if x.size == 1:
        return (float(x[0]), float(x[0]))
    rng = np.random.Generator(np.random.PCG64(seed))
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.percentile(means, [100 * alpha, 100 * (1 - alpha)])
    return (float(lo), float(hi))


def _badness(cells: pd.DataFrame, higher: bool) -> pd.Series:
    """Smaller is better; a failed cell is worse than any finished one."""
    bad = -cells["metric"] if higher else cells["metric"]
    return bad.where(cells["status"] == "ok", math.inf).astype(float)


def average_ranks(cells: pd.DataFrame, higher: bool) -> dict[str, float]:
    """Rank the methods within each seed (1 = best, ties share the average rank, a failed cell ranks
    below every finished one, a missing cell takes no part), then average each method's ranks over
    the seeds where it has a record."""
    have = cells[cells["status"].isin(["ok", "failed"])].copy()
    if have.empty:
        return {}
    have["bad"] = _badness(have, higher)
    have["rank"] = have.groupby("seed")["bad"].rank(method="average")
    return {m: float(g["rank"].mean()) for m, g in have.groupby("method", sort=False)}


def matched_fixed(params: float, candidates: dict[str, float]) -> str | None:
    """The fixed baseline whose final params are closest to `params` on a log scale (size ratio);
    on a tie the larger baseline (the stronger opponent), then the name, decides."""
    if not candidates:
        return None
    lp = math.log(max(params, 1.0))
    return min(candidates, key=lambda m: (abs(math.log(max(candidates[m], 1.0)) - lp), -candidates[m], m))


def win_rates(cells: pd.DataFrame, higher: bool) -> dict[str, dict]:
    """For each non-fixed method: per seed, does it beat the fixed baseline closest to its own final
    size (`matched_fixed`) among the fixed methods that finished that seed? A win counts 1, a tie 1/2,
    a loss 0; a failed cell of the method is a loss (against the fixed baseline closest to its mean
    size over its finished seeds, or the smallest one). Seeds where no fixed baseline finished are left
    out. Returns {method: {"wins": float, "seeds": int, "rate": float, "vs": [fixed names]}}."""
    out: dict[str, dict] = {}
    fixed = cells[cells["is_fixed"] & (cells["status"] == "ok")]
    for method, g in cells[~cells["is_fixed"]].groupby("method", sort=False):
        ok_params = g.loc[g["status"] == "ok", "params"]
        fallback_size = float(ok_params.mean()) if len(ok_params) else 0.0
        wins, seeds, vs = 0.0, 0, []
        for _, row in g.iterrows():
            if row["status"] == "missing":
                continue
            opp = fixed[fixed["seed"] == row["seed"]]
            if opp.empty:
                continue
            size = float(row["params"]) if row["status"] == "ok" else fallback_size
            name = matched_fixed(size, dict(zip(opp["method"], opp["params"].astype(float))))
            if name not in vs:
                vs.append(name)
            seeds += 1
            if row["status"] != "ok":
                continue
            theirs = float(opp.loc[opp["method"] == name, "metric"].iloc[0])
            mine = float(row["metric"])
            if mine == theirs:
                wins += 0.5
            elif (mine > theirs) == higher:
                wins += 1.0
        out[method] = {"wins": wins, "seeds": seeds, "rate": wins / seeds if seeds else math.nan, "vs": vs}
    return out


def pareto_front(points: list[tuple[float, float]], higher: bool) -> list[tuple[float, float]]:
    """The non-dominated (params, metric) points, by increasing params: fewer params and a better
    metric dominate."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1] if higher else p[1])):
        if not front or (y > front[-1][1] if higher else y < front[-1][1]):
            front.append((x, y))
    return front
