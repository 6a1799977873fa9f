"""Leaderboard figures, sized for a paper column (3.4 in wide, fonts >= 7 pt), PNG (200 dpi) and PDF.

Drawn with seaborn (its "paper" context and "ticks" style, `lineplot` for mean curves with the seed range
as band, `scatterplot`, `barplot` and `stripplot`) on matplotlib figures we size and save ourselves.
Only seaborn's deterministic estimators are used (means, the 100 % percentile interval = seed range, no
bootstrapped bands and no jitter), so the same records give the same pixels.

One colour per method everywhere: a fixed mapping for the methods we know, a hash of the name for the
rest, so a method keeps its colour across figures and suites. Fixed-size baselines are drawn dashed with
square markers so the figures also read in grey. Nothing random is drawn (no jitter); PDFs carry no
creation date, so rerunning on the same records and library versions gives the same files.
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib import rc_context
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogFormatter

from growbench.report.collect import Board
from growbench.report.stats import pareto_front

WIDTH_IN = 3.4
DPI = 200
LOG_SPAN = 20.0  # use a log axis when the positive values span more than this factor

METHOD_COLORS = {  # Okabe-Ito and Tol colours; fixed-size baselines in neutral tones
    "fixed": "#000000", "fixed-large": "#8C8C8C", "fixed-matched": "#8C6D31", "optuna-fixed": "#6A3D9A",
    "random": "#E69F00", "tiny": "#0072B2", "senn": "#009E73", "senn-sgd": "#66C2A5", "firefly": "#D55E00",
    "splitting": "#CC79A7", "splitting-fast": "#882255", "gradmax": "#56B4E9",
}
FALLBACK_COLORS = ("#332288", "#117733", "#44AA99", "#88CCEE", "#999933", "#DDCC77", "#CC6677", "#AA4499",
                   "#661100", "#6699CC")

RC = {
    **sns.axes_style("ticks"), **sns.plotting_context("paper"),  # seaborn's paper look, then our sizes
    "font.family": "DejaVu Sans", "font.size": 7.5, "axes.labelsize": 8, "axes.titlesize": 8,
    "xtick.labelsize": 7, "ytick.labelsize": 7, "legend.fontsize": 7, "legend.title_fontsize": 7,
    "axes.linewidth": 0.6, "xtick.major.width": 0.6, "ytick.major.width": 0.6, "xtick.minor.width": 0.4,
    "ytick.minor.width": 0.4, "lines.linewidth": 1.2, "lines.markersize": 4, "axes.spines.top": False,
    "axes.spines.right": False, "axes.grid": True, "grid.linewidth": 0.4, "grid.alpha": 0.35,
    "pdf.fonttype": 42, "svg.hashsalt": "growbench", "savefig.dpi": DPI,
}


def method_color(name: str) -> str:
    """The colour of a method in every figure of every suite."""
    if name in METHOD_COLORS:
        return METHOD_COLORS[name]
    h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big")
    return FALLBACK_COLORS[h % len(FALLBACK_COLORS)]


def _style(name: str, fixed: bool) -> dict:
    return {"color": method_color(name), "linestyle": "--" if fixed else "-", "marker": "s" if fixed else "o"}


def _wide(values: np.ndarray | list[float]) -> bool:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    return v.size > 1 and v.max() / v.min() > LOG_SPAN


def _si(x: float, _pos: object = None) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:g}{unit}"
    return f"{x:g}"


def _plain(x: float, _pos: object = None) -> str:
    """0.1, 1, 10, 1,000 rather than 10^-1 on log axes."""
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:g}"


class _LogLabels(LogFormatter):
    """Matplotlib's choice of which log ticks to label (minor ones too on short ranges), in plain
    numbers (0.3, 1k) rather than 3 x 10^-1."""

    def __init__(self, fmt) -> None:
        super().__init__(labelOnlyBase=False)
        self.fmt = fmt

    def __call__(self, x: float, pos: object = None) -> str:
        return self.fmt(x) if super().__call__(x, pos) else ""


def _log(ax, which: str, fmt=None) -> None:
    """Put the x or y axis of `ax` on a log scale with plain labels."""
    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    axis = ax.xaxis if which == "x" else ax.yaxis
    axis.set_major_formatter(_LogLabels(fmt or _plain))
    axis.set_minor_formatter(_LogLabels(fmt or _plain))


def _new_figure(height: float = 2.4) -> tuple[Figure, object]:
    fig = Figure(figsize=(WIDTH_IN, height), layout="constrained")
    return fig, fig.add_subplot()


def _legend(fig: Figure, handles: list, ncols: int = 3) -> None:
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=min(ncols, len(handles)), frameon=False,
                   handlelength=2.0, columnspacing=1.0, borderaxespad=0.2)


def _handle(name: str, fixed: bool, marker: bool) -> Line2D:
    """A legend entry: marker only for scatter plots, line only for curves."""
    st = _style(name, fixed)
    if marker:
        return Line2D([], [], color=st["color"], marker=st["marker"], markersize=4, linestyle="none", label=name)
    return Line2D([], [], color=st["color"], linestyle=st["linestyle"], label=name)


def save(fig: Figure, stem: Path) -> list[Path]:
    """PNG at 200 dpi and PDF, with no timestamps or version strings that would change between runs."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    png, pdf = stem.with_suffix(".png"), stem.with_suffix(".pdf")
    fig.savefig(png, dpi=DPI, metadata={"Software": None})
    fig.savefig(pdf, metadata={"CreationDate": None, "ModDate": None, "Creator": "growbench", "Producer": None})
    return [png, pdf]


class Plotter:
    """The figures of one dataset of a board."""

    def __init__(self, board: Board, dataset: str, order: list[str]) -> None:
        self.board, self.dataset, self.order = board, dataset, order
        self.higher = board.higher(dataset)
        self.cells = board.cells[(board.cells["dataset"] == dataset) & (board.cells["status"] == "ok")]
        self.curves = board.curves[board.curves["dataset"] == dataset]
        self.events = board.events[board.events["dataset"] == dataset]
        self.fixed = {m: bool(g["is_fixed"].iloc[0]) for m, g in board.cells.groupby("method", sort=False)}
        self.methods = [m for m in order if m in set(self.cells["method"])]
        self.title = f"{board.suite.name} · {dataset}"

    # metric in display units: accuracy in percent
    def _y(self, v: np.ndarray | pd.Series) -> np.ndarray:
        return np.asarray(v, dtype=float) * (100.0 if self.higher else 1.0)

    @property
    def ylabel(self) -> str:
        return "test accuracy (%)" if self.higher else "test loss (MSE)"

    def _ylog(self, ax, values: np.ndarray) -> None:
        if not self.higher and _wide(values):
            _log(ax, "y")

    def metric_vs_params(self) -> Figure:
        fig, ax = _new_figure(2.5)
        handles = []
        log_y = not self.higher and _wide(self._y(self.cells["metric"]))
        for m in self.methods:
            g = self.cells[self.cells["method"] == m]
            st = _style(m, self.fixed[m])
            y = self._y(g["metric"])
            sns.scatterplot(x=g["params"].to_numpy(dtype=float), y=y, ax=ax, s=9, color=st["color"],
                            marker=st["marker"], alpha=0.35, linewidth=0, zorder=3, legend=False)
            if len(y) < 2:
                yerr = None
            elif log_y:  # mean ± std can cross zero on a log axis: the bar is the seed range there
                yerr = [[y.mean() - y.min()], [y.max() - y.mean()]]
            else:
                yerr = y.std(ddof=1)
            ax.errorbar(g["params"].mean(), y.mean(), yerr=yerr,
                        color=st["color"], marker=st["marker"], markersize=5, markeredgecolor="white",
                        markeredgewidth=0.5, capsize=2, elinewidth=0.8, linestyle="none", zorder=4)
            handles.append(_handle(m, self.fixed[m], marker=True))
        if _wide(self.cells["params"]):
            _log(ax, "x", _si)
        else:
            ax.xaxis.set_major_formatter(FuncFormatter(_si))
        self._ylog(ax, self._y(self.cells["metric"]))
        fixed_means = [(g["params"].mean(), float(self._y(g["metric"]).mean()))
                       for m, g in self.cells.groupby("method", sort=False) if self.fixed[m]]
        front = pareto_front(fixed_means, self.higher)
        if front:
            lo, hi = ax.get_xlim()
            xs = [p[0] for p in front] + [hi]
            ys = [p[1] for p in front] + [front[-1][1]]
            ax.step(xs, ys, where="post", color="#555555", linewidth=0.9, linestyle=":", zorder=2)
            ax.set_xlim(lo, hi)
            handles.append(Line2D([], [], color="#555555", linewidth=0.9, linestyle=":", label="fixed-size front"))
        ax.set_xlabel("final parameters")
        ax.set_ylabel(self.ylabel)
        ax.set_title(self.title)
        _legend(fig, handles)
        return fig

    def anytime(self, axis: str) -> Figure:
        """Metric vs cumulative training cost (`time` in s or `flops`), mean over seeds and their range."""
        fig, ax = _new_figure(2.5)
        metric = self.board.metric_name(self.dataset)
        ends = self.curves.groupby(["method", "seed"])[axis].max()
        starts = self.curves[self.curves["epoch"] > 0].groupby(["method", "seed"])[axis].min()
        log_x = _wide(ends.to_numpy()) and bool((starts > 0).all())
        handles, all_y = [], []
        for m in self.methods:
            g = self.curves[self.curves["method"] == m]
            if log_x:  # start where every seed has a point, so the mean never mixes subsets of seeds
                g = g[g["epoch"] > 0]
                grid = np.geomspace(g.groupby("seed")[axis].min().max(), g[axis].max(), 200)
            else:
                grid = np.linspace(0.0, g[axis].max(), 200)
            ys = []
            for _, s in g.groupby("seed"):
                x, y = s[axis].to_numpy(), self._y(s[metric])
                ys.append(np.interp(grid, x, y, left=np.nan, right=y[-1]))  # a finished run keeps its value
            ys = np.vstack(ys)  # (seeds, grid); NaN before a seed's first point
            st = _style(m, self.fixed[m])
            long = pd.DataFrame({"x": np.tile(grid, ys.shape[0]), "y": ys.ravel()}).dropna()
            # mean over seeds at each grid point, band = the 100 % percentile interval (the seed range)
            sns.lineplot(data=long, x="x", y="y", ax=ax, estimator="mean", errorbar=("pi", 100),
                         color=st["color"], linestyle=st["linestyle"], err_kws={"alpha": 0.18, "linewidth": 0},
                         legend=False)
            all_y.append(long.groupby("x")["y"].mean().to_numpy())
            handles.append(_handle(m, self.fixed[m], marker=False))
        fmt = _si if axis == "flops" else _plain
        if log_x:
            _log(ax, "x", fmt)
        else:
            ax.xaxis.set_major_formatter(FuncFormatter(fmt))
        if all_y:
            self._ylog(ax, np.concatenate(all_y))
        if axis == "flops":
            ax.set_xlabel("training FLOPs (train + growth)")
        else:
            ax.set_xlabel("training wall-clock (s, train + growth)")
        ax.set_ylabel(self.ylabel)
        ax.set_title(self.title + " (band: seed range)")
        _legend(fig, handles)
        return fig

    def growth(self) -> Figure:
        """Parameters vs epoch, exact at every growth event, mean over seeds."""
        fig, ax = _new_figure(2.4)
        handles, all_p = [], []
        for m in self.methods:
            c = self.curves[self.curves["method"] == m]
            e = self.events[self.events["method"] == m]
            grid = np.unique(np.concatenate([c["epoch"].to_numpy(), e["epoch"].to_numpy()]))
            per_seed = []
            for seed, s in c.groupby("seed"):
                ev = e[e["seed"] == seed].sort_values("epoch", kind="mergesort")
                xs = np.concatenate([[0.0], ev["epoch"].to_numpy()])
                ps = np.concatenate([[s.sort_values("epoch")["params"].iloc[0]], ev["params_after"].to_numpy()])
                per_seed.append(ps[np.searchsorted(xs, grid, side="right") - 1])
            mean = np.mean(per_seed, axis=0)
            st = _style(m, self.fixed[m])
            sns.lineplot(x=grid, y=mean, ax=ax, drawstyle="steps-post", color=st["color"],
                         linestyle=st["linestyle"], estimator=None, legend=False)
            all_p.append(mean)
            handles.append(_handle(m, self.fixed[m], marker=False))
        if all_p and _wide(np.concatenate(all_p)):
            _log(ax, "y", _si)
        else:
            ax.yaxis.set_major_formatter(FuncFormatter(_si))
        ax.set_xlabel("epoch")
        ax.set_ylabel("parameters")
        ax.set_title(self.title + " (mean over seeds)")
        _legend(fig, handles)
        return fig

    def overhead(self) -> Figure:
        """Growth wall-clock as a share of the total (train + growth + search): bar = mean, dots = seeds."""
        n = len(self.methods)
        fig, ax = _new_figure(0.9 + 0.22 * max(n, 2))
        data = self.cells[["method", "growth_share"]].copy()
        data["share"] = 100.0 * data["growth_share"].astype(float)
        palette = {m: method_color(m) for m in self.methods}
        sns.barplot(data=data, y="method", x="share", order=self.methods, hue="method", palette=palette,
                    estimator="mean", errorbar=None, width=0.65, alpha=0.75, linewidth=0, ax=ax, legend=False)
        sns.stripplot(data=data, y="method", x="share", order=self.methods, color="black", size=2.8,
                      jitter=False, linewidth=0, zorder=3, ax=ax)
        for i, m in enumerate(self.methods):
            share = data.loc[data["method"] == m, "share"].to_numpy(dtype=float)
            mean = float(np.nanmean(share)) if share.size else math.nan
            if np.isfinite(mean):
                ax.annotate(f"{mean:.1f}%" if mean >= 0.1 else f"{mean:.2g}%", (max(share.max(), mean), i),
                            xytext=(4, 0), textcoords="offset points", va="center", fontsize=7)
        ax.set_ylabel("")
        ax.set_ylim(n - 0.5, -0.5)
        ax.set_xlim(0, None)
        ax.margins(x=0.18)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: f"{x:g}"))
        ax.grid(axis="y", visible=False)
        ax.set_xlabel("growth share of total wall-clock (%)")
        ax.set_title(self.title)
        return fig


FIGURES = ("metric-vs-params", "anytime-wallclock", "anytime-flops", "growth", "overhead")


def figures(board: Board, dataset: str, order: list[str], out_dir: Path) -> list[Path]:
    """Write every figure of one dataset as <out_dir>/<dataset>-<figure>.{png,pdf}; skip if nothing finished."""
    p = Plotter(board, dataset, order)
    if not p.methods:
        return []
    makers = {"metric-vs-params": p.metric_vs_params, "anytime-wallclock": lambda: p.anytime("time"),
              "anytime-flops": lambda: p.anytime("flops"), "growth": p.growth, "overhead": p.overhead}
    written = []
    with rc_context(RC):
        for name in FIGURES:
            written += save(makers[name](), out_dir / f"{dataset}-{name}")
    return written


__all__ = ["method_color", "figures", "FIGURES", "METHOD_COLORS"]
