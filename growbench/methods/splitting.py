"""`splitting` and `splitting-fast`: splitting steepest descent (S2D, Liu, Wu & Wang, NeurIPS 2019) and its
fast variant (Wang et al. 2019, "energy-aware" splitting). Team spec: shared/docs/methods/splitting.md;
what we implement and where we deviate: docs/methods/splitting.md.

One growth step:
  1. statistics pass (BatchNorm in eval mode) over a few thousand training examples: for every hidden
     layer with room, its input x and the per-row factor w = g σ''(a) c² (see `splitting_math`);
  2. per unit, the minimum eigenpair (λ_i, v_i) of its splitting matrix S_i:
       `splitting`      forms every S_i (d × d) and takes a dense eigendecomposition;
       `splitting-fast` never forms S_i: gradient steps on each Rayleigh quotient using S_i·v products
                        only (optimal step + momentum by default, the spec's RMSprop as an option);
  3. the units with the most negative λ (a fraction of all splittable units, never λ ≥ 0) are each
     replaced by two copies at θ_i ± ε v_i with half the out-weights (`split_unit`), deepest layer
     first so a layer's direction always matches its current fan-in;
  4. one event per grown layer: predicted loss change ε²/2 Σλ (mean loss of the statistics set)
     and the change observed on that same set.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from growbench.methods.base import GrowthEvent, GrowthMethod
from growbench.methods.splitting_math import (RMSprop, _fix_sign, activation_d2, bn_scale, lobpcg_min_eig,
                                              min_eigenpairs, patches, rayleigh, row_weights, rows,
                                              splitting_matrices, splitting_products)

if TYPE_CHECKING:
    from growbench.models import GrowableNet, Hidden
    from growbench.trainer import Context


# --------------------------------------------------------------------------- settings
@dataclass
class SplittingSettings:
    fraction: float = 0.3  # share of splittable units split per step (spec: grow_rate 0.3); at least 1
    scope: str = "global"  # global: rank λ over all layers (spec) | layer: `fraction` of each layer's units
    max_per_layer: int | None = None  # optional cap on units split in one layer per step (room always applies)
    epsilon: float = 0.01  # offspring at θ ± ε·v with ‖v‖ = 1 (spec: 1e-2)
    relu_surrogate: str = "softplus"  # σ'' used for ReLU: softplus (β below, spec) | none (exact 0: never splits)
    surrogate_beta: float = 3.0  # β of the softplus surrogate (spec: 3)
    stats_examples: int = 1024  # training examples of one statistics pass (drawn with the method's generator)
    stats_batch_size: int | None = None  # None: the suite's batch size

    _method: ClassVar[str] = "splitting"  # for error messages

    def __post_init__(self) -> None:
        from growbench.config import ConfigError

        where = f"method_settings.{self._method}"
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"{where}.fraction must be in (0, 1], got {self.fraction}")
        if self.scope not in ("global", "layer"):
            raise ConfigError(f"{where}.scope: unknown value {self.scope!r}; valid choices: global, layer")
        if self.relu_surrogate not in ("softplus", "none"):
            raise ConfigError(f"{where}.relu_surrogate: unknown value {self.relu_surrogate!r}; "
                              "valid choices: softplus, none")
        if self.max_per_layer is not None and self.max_per_layer < 1:
            raise ConfigError(f"{where}.max_per_layer must be >= 1, got {self.max_per_layer}")
        if self.epsilon < 0 or self.surrogate_beta <= 0 or self.stats_examples < 1:
            raise ConfigError(f"{where}: epsilon must be >= 0, surrogate_beta > 0 and stats_examples >= 1")


@dataclass
class SplittingExactSettings(SplittingSettings):
    max_matrix_floats: int = 1 << 24  # splitting-matrix entries held at once (64 MB in fp32); more units -> chunks


@dataclass
class SplittingFastSettings(SplittingSettings):
    _method: ClassVar[str] = "splitting-fast"
    solver: str = "lobpcg"  # lobpcg: Rayleigh-quotient steps with optimal step + momentum | rmsprop (spec's optimiser)
    passes: int = 20  # passes over the statistics set; lobpcg: one iteration each; rmsprop: one step per batch
    lr: float = 1e-3  # rmsprop only (spec: 1e-3; alpha 0.9 and momentum 0.1 are fixed)
    warm_start: bool = True  # start each unit's v from its previous estimate (copies inherit the parent's)

    def __post_init__(self) -> None:
        super().__post_init__()
        from growbench.config import ConfigError

        if self.solver not in ("lobpcg", "rmsprop"):
            raise ConfigError(f"method_settings.{self._method}.solver: unknown value {self.solver!r}; "
                              "valid choices: lobpcg, rmsprop")
        if self.passes < 0 or self.lr <= 0:
            raise ConfigError(f"method_settings.{self._method}: passes must be >= 0 and lr > 0")


# --------------------------------------------------------------------------- statistics
@dataclass
class Statistics:
    """One statistics pass: the batches (kept to measure the observed loss change) and, per layer and batch,
    the layer input x and the per-row factor w, scaled so that summing over batches gives the set's mean."""

    batches: list[tuple[Tensor, Tensor]]
    inputs: dict[str, list[Tensor]]  # x: (B, d) or (B, C_in, H, W)
    weights: dict[str, list[Tensor]]  # w: (B, C) or (B, C, H', W'), times n_batch / n
    loss: float  # mean loss of the statistics set (eval mode)
    examples: int


class _Recorder:
    """Forward hooks that record each watched layer's input and its activation's input a and output h.

    The activation module may be shared by several layers (VGG uses one nn.ReLU), so an activation call is
    attributed to the layer whose pre-activation (BatchNorm output, else `inp` output) is its very input."""

    def __init__(self, layers: list["Hidden"]) -> None:
        self.x: dict[str, Tensor] = {}
        self.pre: dict[str, Tensor] = {}
        self.h: dict[str, tuple[Tensor, Tensor]] = {}
        self.handles = []
        acts = {}
        for h in layers:
            self.handles.append(h.inp.register_forward_hook(self._on_inp(h.name, h.bn is None)))
            if h.bn is not None:
                self.handles.append(h.bn.register_forward_hook(self._on_pre(h.name)))
            acts[id(h.act)] = h.act
        self.handles += [a.register_forward_hook(self._on_act) for a in acts.values()]

    def _on_inp(self, name: str, is_pre: bool):
        def hook(mod, args, out):
            self.x[name] = args[0].detach()
            if is_pre:
                self.pre[name] = out
        return hook

    def _on_pre(self, name: str):
        def hook(mod, args, out):
            self.pre[name] = out
        return hook

    def _on_act(self, mod, args, out) -> None:
        for name, t in self.pre.items():
            if args[0] is t:
                self.h[name] = (args[0], out)

    def clear(self) -> None:
        for d in (self.x, self.pre, self.h):
            d.clear()

    def remove(self) -> None:
        for hd in self.handles:
            hd.remove()


def collect_statistics(model: "GrowableNet", ctx: "Context", layers: list["Hidden"],
                       s: SplittingSettings) -> Statistics:
    """The statistics pass: one forward and one backward (to the layer outputs h only) per batch, eval mode."""
    batches = list(ctx.batches(s.stats_examples, s.stats_batch_size))
    n = sum(len(y) for _, y in batches)
    inputs = {h.name: [] for h in layers}
    weights = {h.name: [] for h in layers}
    loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
    rec = _Recorder(layers)
    was_training = model.training
    model.eval()
    try:
        for x, y in batches:
            rec.clear()
            with torch.enable_grad():
                loss = ctx.loss_fn(model(x), y)  # mean over the batch
                missing = [h.name for h in layers if h.name not in rec.h]
                if missing:
                    raise RuntimeError(f"splitting: could not find the activation output of {missing}")
                grads = torch.autograd.grad(loss, [rec.h[h.name][1] for h in layers])  # g = ∂loss/∂h
            share = len(y) / n
            loss_sum += loss.detach().double() * share
            with torch.no_grad():
                for h, g in zip(layers, grads):
                    a = rec.h[h.name][0].detach()
                    d2 = activation_d2(h.act, a, s.relu_surrogate, s.surrogate_beta)
                    inputs[h.name].append(rec.x[h.name])
                    weights[h.name].append(row_weights(g, d2, bn_scale(h.bn)) * share)
    finally:
        rec.remove()
        model.train(was_training)
    return Statistics(batches, inputs, weights, float(loss_sum), n)


@torch.no_grad()
def statistics_loss(model: "GrowableNet", ctx: "Context", batches: list[tuple[Tensor, Tensor]]) -> float:
    """Mean loss over the statistics batches in eval mode."""
    was_training = model.training
    model.eval()
    try:
        n = sum(len(y) for _, y in batches)
        total = sum(ctx.loss_fn(model(x), y).double() * len(y) for x, y in batches)
        return float(total) / n
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------- eigenpairs
@torch.no_grad()
def exact_min_eigen(h: "Hidden", xs: list[Tensor], ws: list[Tensor], max_floats: int) -> tuple[Tensor, Tensor]:
    """(λ_min (C,), v (C, d)) from the explicit splitting matrices, `max_floats` matrix entries at a time."""
    C, d = h.width, h.inp.weight[0].numel()
    k = max(1, min(C, max_floats // (d * d)))
    lams, vecs = [], []
    for j0 in range(0, C, k):
        S = None  # (k, d, d)
        for x, w in zip(xs, ws):
            part = splitting_matrices(patches(h.inp, x), rows(w)[:, j0:j0 + k])
            S = part if S is None else S.add_(part)
        lam, v = min_eigenpairs(S)
        lams.append(lam)
        vecs.append(v)
    return torch.cat(lams), torch.cat(vecs)


@torch.no_grad()
def fast_min_eigen(h: "Hidden", xs: list[Tensor], ws: list[Tensor], V: Tensor, passes: int,
                   solver: str = "lobpcg", lr: float = 1e-3) -> tuple[Tensor, Tensor]:
    """(λ (C,), v (C, d)) from S·v products only; V: (C, d) start directions.

    lobpcg: `passes` iterations, each one product over the whole statistics set (`lobpcg_min_eig`);
    rmsprop (spec): one RMSprop step per batch on that batch's Rayleigh quotient, `passes` epochs.
    Either way λ = vᵀSv over the whole set at the end."""
    def product(V: Tensor) -> Tensor:  # (C, d) -> (S_i v_i)_i over the statistics set
        out = torch.zeros_like(V)
        for x, w in zip(xs, ws):
            out += splitting_products(h.inp, x, w, V)
        return out

    if solver == "lobpcg":
        return lobpcg_min_eig(product, V, passes)
    V = V / V.norm(dim=1, keepdim=True).clamp_min(1e-30)
    opt = RMSprop(V, lr)
    for _ in range(passes):
        for x, w in zip(xs, ws):
            _, grad = rayleigh(V, splitting_products(h.inp, x, w, V))
            V = opt.step(V, grad)
    lam, _ = rayleigh(V, product(V))
    return lam, V


# --------------------------------------------------------------------------- selection
def select_units(lams: dict[str, Tensor], room: dict[str, int], fraction: float, scope: str = "global",
                 max_per_layer: int | None = None) -> dict[str, list[int]]:
    """Units to split per layer, most negative λ first, never one with λ ≥ 0.

    global (spec): k = max(1, floor(fraction · N)) over all N splittable units, ranked together;
    layer: max(1, floor(fraction · width)) per layer. Each layer takes at most min(room, max_per_layer);
    a unit passed over for a full layer leaves its place to the next candidate."""
    lams = {name: lam.detach().cpu() for name, lam in lams.items()}
    cap = {name: min(room[name], max_per_layer or room[name]) for name in lams}
    if scope == "layer":
        out = {}
        for name, lam in lams.items():
            k = min(cap[name], max(1, int(fraction * len(lam) + 1e-9)))
            order = torch.argsort(lam, stable=True)
            out[name] = [int(i) for i in order[:k] if lam[i] < 0]
        return {n: v for n, v in out.items() if v}
    N = sum(len(lam) for lam in lams.values())
    k = max(1, int(fraction * N + 1e-9))
    flat = sorted((float(v), name, i) for name, lam in lams.items() for i, v in enumerate(lam.tolist()))
    out: dict[str, list[int]] = {}
    taken = 0
    for v, name, i in flat:
        if v >= 0 or taken == k:
            break
        if len(out.setdefault(name, [])) < cap[name]:
            out[name].append(i)
            taken += 1
    return {n: v for n, v in out.items() if v}


# --------------------------------------------------------------------------- the methods
class _SplittingBase(GrowthMethod):
    """Shared growth step; subclasses give the eigen-solver (`_min_eigen`)."""

    variant: ClassVar[str] = ""
    # Offspring sit at theta +- epsilon*v: the function changes by O(epsilon^2) (O(epsilon) near ReLU kinks).
    preserves_function: ClassVar[bool] = False

    def _min_eigen(self, h: "Hidden", xs: list[Tensor], ws: list[Tensor], ctx: "Context") -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _after_split(self, name: str, idx: list[int]) -> None:
        pass

    def grow(self, model: "GrowableNet", ctx: "Context") -> list[GrowthEvent]:
        s = self.settings
        layers = [h for h in model.hidden_layers() if ctx.room(h.name, model) > 0]
        if not layers:
            return []
        t0 = time.perf_counter()
        stats = collect_statistics(model, ctx, layers, s)
        t1 = time.perf_counter()
        eig = {h.name: self._min_eigen(h, stats.inputs[h.name], stats.weights[h.name], ctx) for h in layers}
        del stats.inputs, stats.weights
        t2 = time.perf_counter()
        lams = {name: lam for name, (lam, _) in eig.items()}
        chosen = select_units(lams, {h.name: ctx.room(h.name, model) for h in layers}, s.fraction, s.scope,
                              s.max_per_layer)
        timing = {"stats_s": round(t1 - t0, 4), "eigen_s": round(t2 - t1, 4), "stats_examples": stats.examples}
        events, before = [], stats.loss
        for h in reversed(layers):  # deepest first: a split appends fan-in to the next layer, not to this one
            idx = chosen.get(h.name)
            if not idx:
                continue
            lam, V = eig[h.name]
            W = h.inp.weight
            delta = s.epsilon * V[idx].view(len(idx), *W.shape[1:])  # (m, fan_in) or (m, C_in, kh, kw)
            model.split_unit(h.name, torch.tensor(idx), delta)
            self._after_split(h.name, idx)
            after = statistics_loss(model, ctx, stats.batches)
            split_lams = lam[idx]
            events.append(GrowthEvent(
                where=h.name, kind="split", units_added=len(idx),
                predicted_loss_change=0.5 * s.epsilon ** 2 * float(split_lams.sum()),
                observed_loss_change=after - before,
                extra={"variant": self.variant, "epsilon": s.epsilon,
                       "lambda_split": [float(f"{v:.4g}") for v in split_lams.tolist()],
                       "lambda_min": float(lam.min()), "units_negative": int((lam < 0).sum()),
                       "units": len(lam), **timing}))
            before = after
        return events


class Splitting(_SplittingBase):
    """Exact S2D: every unit's splitting matrix S_i (d × d) and its dense eigendecomposition."""

    name: ClassVar[str] = "splitting"
    variant: ClassVar[str] = "exact"
    Settings: ClassVar[type] = SplittingExactSettings

    def _min_eigen(self, h, xs, ws, ctx):
        return exact_min_eigen(h, xs, ws, self.settings.max_matrix_floats)


class SplittingFast(_SplittingBase):
    """Fast splitting: minimum eigenpairs from S_i·v products only (no d × d matrix): gradient steps on each
    unit's Rayleigh quotient. Memory O(C·d) per layer; each pass costs about one forward and one backward
    of that layer alone over the statistics set."""

    name: ClassVar[str] = "splitting-fast"
    variant: ClassVar[str] = "fast"
    Settings: ClassVar[type] = SplittingFastSettings

    def __init__(self, settings=None, growth=None) -> None:
        super().__init__(settings, growth)
        self._v: dict[str, Tensor] = {}  # last directions per layer, (C, d), for warm starts

    def _start(self, h: "Hidden", ctx: "Context") -> Tensor:
        """Warm start when available (zero-padded if the fan-in grew since), else a random direction."""
        W = h.inp.weight
        C, d = W.shape[0], W[0].numel()
        V = torch.randn(C, d, generator=ctx.generator).to(W)
        old = self._v.get(h.name) if self.settings.warm_start else None
        if old is not None and old.shape[0] == C and old.shape[1] <= d:
            old = old.to(W)  # a checkpoint may have brought it back on another device
            if isinstance(h.inp, torch.nn.Conv2d):  # channel-major: pad whole input channels
                k = W[0, 0].numel()
                V = torch.zeros(C, W.shape[1], k).to(W)
                V[:, :old.shape[1] // k] = old.view(C, -1, k)
                V = V.view(C, d)
            else:
                V = torch.nn.functional.pad(old, (0, d - old.shape[1]))
        return V

    def _min_eigen(self, h, xs, ws, ctx):
        s = self.settings
        lam, V = fast_min_eigen(h, xs, ws, self._start(h, ctx), s.passes, s.solver, s.lr)
        self._v[h.name] = V
        return lam, _fix_sign(V)

    def _after_split(self, name: str, idx: list[int]) -> None:
        if name in self._v:
            V = self._v[name]
            self._v[name] = torch.cat([V, V[idx]])
