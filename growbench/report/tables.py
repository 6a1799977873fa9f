"""Per-method summaries of a suite and their Markdown, LaTeX (booktabs) and CSV renderings.

Numbers are formatted once, and "best in column" is decided on the formatted text, so ties that look
equal are marked equal and nothing depends on float noise below the printed precision.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd

from growbench.report.collect import Board
from growbench.report.stats import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, average_ranks, bootstrap_ci, win_rates

MEANS = ("params", "inference_flops", "train_flops", "growth_flops", "wall_train", "wall_growth", "search_trials",
         "search_pruned", "search_wall", "search_flops", "total_wall", "growth_share")


def summarize(board: Board, dataset: str) -> pd.DataFrame:
    """One row per method of `dataset`, best primary metric first (methods without a finished cell last)."""
    cells = board.cells[board.cells["dataset"] == dataset]
    higher = board.higher(dataset)
    ranks = average_ranks(cells, higher)
    wins = win_rates(cells, higher)
    rows = []
    for method, g in cells.groupby("method", sort=False):
        ok = g[g["status"] == "ok"]
        vals = ok["metric"].to_numpy(dtype=float)
        lo, hi = bootstrap_ci(vals)
        w = wins.get(method)
        row = {
            "suite": board.suite.name, "dataset": dataset, "task": board.tasks.get(dataset, "classification"),
            "metric": board.metric_name(dataset), "higher_is_better": higher, "method": method,
            "target": g["target"].iloc[0], "is_fixed": bool(g["is_fixed"].iloc[0]),
            "cells_expected": len(g), "cells_ok": len(ok), "cells_failed": int((g["status"] == "failed").sum()),
            "missing": ";".join(f"seed{s}" for s in g.loc[g["status"] == "missing", "seed"]),
            "failed": ";".join(f"seed{s}" for s in g.loc[g["status"] == "failed", "seed"]),
            "metric_mean": float(vals.mean()) if vals.size else math.nan,
            "metric_std": float(vals.std(ddof=1)) if vals.size > 1 else math.nan,
            "ci_low": lo, "ci_high": hi, "avg_rank": ranks.get(method, math.nan),
            "wins": w["wins"] if w else math.nan, "win_seeds": w["seeds"] if w else math.nan,
            "win_rate": w["rate"] if w else math.nan, "win_vs": "+".join(w["vs"]) if w else "",
        }
        for k in MEANS:
            col = ok[k].dropna()
            row[k] = float(col.mean()) if len(col) else math.nan
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    key = -df["metric_mean"] if higher else df["metric_mean"]
    df = df.assign(_k=key.fillna(math.inf)).sort_values(["_k", "method"], kind="mergesort").drop(columns="_k")
    return df.reset_index(drop=True)


# --------------------------------------------------------------------------- formatting


def fmt_si(x: float, digits: int = 3) -> str:
    """12345 -> 12.3k, 6.3e7 -> 63.0M: sizes and FLOPs that span decades."""
    if x is None or not np.isfinite(x):
        return "–"
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            v = x / scale
            return f"{v:.{max(0, digits - 1 - int(math.floor(math.log10(abs(v)))))}f}{unit}"
    return f"{x:.0f}"


def fmt_s(x: float) -> str:
    """Seconds with three significant digits (0.00123, 0.397, 12.3, 1234)."""
    if x is None or not np.isfinite(x):
        return "–"
    if x == 0:
        return "0"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return _sig(x, 3) if abs(x) >= 1e-3 else "<0.001"


def _sig(x: float, digits: int) -> str:
    """`digits` significant digits, trailing zeros kept (4.90, not 4.9), never in exponent form."""
    if x == 0 or not np.isfinite(x):
        return f"{x:g}"
    if abs(x) < 1e-3:
        return f"{x:.{digits - 1}e}"
    decimals = max(0, digits - 1 - int(math.floor(math.log10(abs(x)))))
    return f"{x:.{decimals}f}"


def _metric_fmt(higher: bool) -> Callable[..., str]:
    """Accuracy in percent with two decimals; a loss with four significant digits of `ref` (the row's
    mean), so its std and interval print with the same decimals as the mean."""
    def fmt(v: float, ref: float | None = None) -> str:
        if not np.isfinite(v):
            return "–"
        if higher:
            return f"{100 * v:.2f}"
        ref = v if ref is None or not np.isfinite(ref) or ref == 0 else ref
        if abs(ref) < 1e-3:
            return f"{v:.3e}"
        return f"{v:.{max(0, 3 - int(math.floor(math.log10(abs(ref)))))}f}"
    return fmt


@dataclass(frozen=True)
class Column:
    key: str
    md: str
    tex: str
    cell: Callable[[pd.Series], str]
    best: str | None = None  # "max" | "min": which numeric value of `sort` is best
    sort: str | None = None  # the numeric column that decides "best" (default: key)
    shown: Callable[[pd.Series], str] | None = None  # the printed value that ties compare (default: cell)


def columns(df: pd.DataFrame, higher: bool) -> list[Column]:
    m = _metric_fmt(higher)
    metric = ("test acc % ↑", r"test acc (\%) $\uparrow$") if higher else ("test loss ↓", r"test loss $\downarrow$")

    def value(r: pd.Series) -> str:
        if not np.isfinite(r["metric_mean"]):
            return "–"
        mean = r["metric_mean"]
        return m(mean) + (f" ± {m(r['metric_std'], mean)}" if np.isfinite(r["metric_std"]) else "")

    def cells(r: pd.Series) -> str:
        extra = [f"{r['cells_failed']} failed"] if r["cells_failed"] else []
        missing = [m for m in r["missing"].split(";") if m]
        if missing:
            extra.append(f"missing {', '.join(missing)}" if len(missing) <= 2 else f"{len(missing)} missing")
        return f"{r['cells_ok']}/{r['cells_expected']}" + (f" ({'; '.join(extra)})" if extra else "")

    def wins(r: pd.Series) -> str:
        if r["is_fixed"] or not np.isfinite(r["win_seeds"]) or not r["win_seeds"]:
            return "–"
        w = f"{r['wins']:g}"
        return f"{w}/{r['win_seeds']:g} vs {r['win_vs']}"

    cols = [
        Column("method", "method", "method", lambda r: str(r["method"])),
        Column("cells", "cells", "cells", cells),
        Column("metric", metric[0], metric[1], value, "max" if higher else "min", "metric_mean",
               lambda r: m(r["metric_mean"])),
        Column("ci", "95% CI", r"95\% CI", lambda r: f"[{m(r['ci_low'], r['metric_mean'])}, "
                                                     f"{m(r['ci_high'], r['metric_mean'])}]"
               if np.isfinite(r["ci_low"]) else "–"),
        Column("avg_rank", "avg rank", "avg rank", lambda r: f"{r['avg_rank']:.2f}" if np.isfinite(r["avg_rank"])
               else "–", "min"),
        Column("wins", "wins vs fixed", "wins vs fixed", wins, "max", "win_rate", lambda r: f"{r['win_rate']:.4f}"),
        Column("params", "params", "params", lambda r: fmt_si(r["params"]), "min"),
        Column("inference_flops", "inf. FLOPs", "inf.\\ FLOPs", lambda r: fmt_si(r["inference_flops"]), "min"),
        Column("train_flops", "train FLOPs", "train FLOPs", lambda r: fmt_si(r["train_flops"]), "min"),
        Column("growth_flops", "growth FLOPs", "growth FLOPs", lambda r: fmt_si(r["growth_flops"]), "min"),
        Column("wall_train", "train s", "train s", lambda r: fmt_s(r["wall_train"]), "min"),
        Column("wall_growth", "growth s", "growth s", lambda r: fmt_s(r["wall_growth"]), "min"),
    ]
    if df["search_wall"].notna().any() or df["search_trials"].notna().any():
        cols += [
            Column("search_trials", "search trials", "search trials",
                   lambda r: f"{r['search_trials']:g}" + (f" ({r['search_pruned']:g} pruned)"
                                                          if np.isfinite(r["search_pruned"]) else "")
                   if np.isfinite(r["search_trials"]) else "–"),
            Column("search_wall", "search s", "search s", lambda r: fmt_s(r["search_wall"]), "min"),
        ]
    cols.append(Column("total_wall", "total s", "total s", lambda r: fmt_s(r["total_wall"]), "min"))
    return cols


def formatted(df: pd.DataFrame, higher: bool) -> tuple[list[Column], list[list[str]], list[list[bool]]]:
    """Cell texts and which of them are the best of their column. A column marks its best only when at
    least two rows have a value and they do not all print the same."""
    cols = columns(df, higher)
    texts = [[c.cell(r) for c in cols] for _, r in df.iterrows()]
    bold = [[False] * len(cols) for _ in texts]
    for j, c in enumerate(cols):
        if c.best is None:
            continue
        vals = df[c.sort or c.key].to_numpy(dtype=float)
        have = [i for i, v in enumerate(vals) if np.isfinite(v) and texts[i][j] != "–"]
        if len(have) < 2:
            continue
        shown = [(c.shown or c.cell)(r) for _, r in df.iterrows()]
        best_v = max(vals[i] for i in have) if c.best == "max" else min(vals[i] for i in have)
        best_text = {shown[i] for i in have if vals[i] == best_v}
        winners = [i for i in have if shown[i] in best_text]
        if len(winners) == len(have):
            continue
        for i in winners:
            bold[i][j] = True
    return cols, texts, bold


def markdown(df: pd.DataFrame, higher: bool) -> str:
    if df.empty:
        return "(no cells)"
    cols, texts, bold = formatted(df, higher)
    texts = [[t.replace("|", r"\|") for t in row] for row in texts]
    cells = [[f"**{t}**" if b else t for t, b in zip(row, brow)] for row, brow in zip(texts, bold)]
    heads = [c.md for c in cols]
    width = [max(len(h), *(len(r[j]) for r in cells)) for j, h in enumerate(heads)]
    left = [c.key in ("method", "cells") for c in cols]

    def line(vals: list[str]) -> str:
        return "| " + " | ".join(v.ljust(w) if lft else v.rjust(w) for v, w, lft in zip(vals, width, left)) + " |"

    rule = "| " + " | ".join("-" * w if lft else "-" * (w - 1) + ":" for w, lft in zip(width, left)) + " |"
    return "\n".join([line(heads), rule] + [line(r) for r in cells])


TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
               "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "<": r"$<$",
               ">": r"$>$", "±": r"$\pm$", "–": "--", "→": r"$\to$"}


def tex_escape(s: str) -> str:
    return "".join(TEX_ESCAPES.get(ch, ch) for ch in s)





def latex(df: pd.DataFrame, higher: bool, caption: str, label: str) -> str:
    """A booktabs `table` with the best value of each column in bold; \\usepackage{booktabs} needed."""
    cols, texts, bold = formatted(df, higher)
    spec = "".join("l" if c.key in ("method", "cells") else "r" for c in cols)
    out = [r"\begin{table}[t]", r"\centering", r"\small", rf"\caption{{{tex_escape(caption)}}}",
           rf"\label{{{label}}}", rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
           " & ".join(c.tex for c in cols) + r" \\", r"\midrule"]
    for row, brow in zip(texts, bold):
        out.append(" & ".join(rf"\textbf{{{tex_escape(t)}}}" if b else tex_escape(t) for t, b in zip(row, brow))
                   + r" \\")
    out += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(out)


CSV_COLUMNS = ["suite", "dataset", "task", "metric", "higher_is_better", "method", "target", "is_fixed",
               "cells_expected", "cells_ok", "cells_failed", "missing", "failed", "metric_mean", "metric_std",
               "ci_low", "ci_high", "avg_rank", "wins", "win_seeds", "win_rate", "win_vs", *MEANS]


def csv(frames: list[pd.DataFrame]) -> str:
    """Every dataset's summary in one tidy file, numbers at full useful precision (%.6g)."""
    frames = [f for f in frames if not f.empty]
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=CSV_COLUMNS)
    buf = io.StringIO()
    df[CSV_COLUMNS].to_csv(buf, index=False, float_format="%.6g", lineterminator="\n")
    return buf.getvalue()


READING = (
    "How to read: mean ± std over seeds of the final value; 95% CI: percentile bootstrap of the mean over seeds "
    f"({BOOTSTRAP_RESAMPLES:,} resamples, RNG seed {BOOTSTRAP_SEED}). Avg rank: methods ranked within each seed "
    "by the primary metric (1 = best, ties share the average, a failed cell ranks last, a missing one is left "
    "out), averaged over the seeds. Wins vs fixed: per seed, whether the method beats the fixed-size baseline "
    "whose final params are closest to its own (on a log scale; a tie counts 1/2, a failed cell 0), among the "
    "fixed baselines that finished that seed. Params, FLOPs and times are means over finished seeds; "
    "inference FLOPs are per example; total s = train + growth + search wall-clock (evaluation is not charged). "
    "Bold: best of the column (not marked when all rows print the same)."
)
