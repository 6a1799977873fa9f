"""`tiny`: TINY (Verbockhaven et al., "Growing Tiny Networks: Spotting Expressivity Bottlenecks and
Fixing Them Optimally", TMLR 2024), following the authors' library gromo 0.1.0 (spec:
docs/methods/tiny.md of the team's shared docs; our choices: docs/methods/tiny.md of this repo).

One growth step: a statistics pass over a random subset of the training set (model in eval mode,
summed loss) gives, for every candidate hidden layer, S, M, S2, M2 and C (`tiny_math`); the best update
dW* of layer l, the projected residual N, and new units (alpha, omega) from the SVD of S2^{-1/2} N follow
in closed form, with their first-order loss gain. The layer(s) to grow are selected (default: the best
first-order improvement, gromo's `select_best_update`), an amplitude gamma is line-searched on the same
examples (units scaled by gamma, dW* by gamma^2), and the change is applied through the shared primitives.

Decisions the spec leaves open (see docs/methods/tiny.md):
* conv -> conv uses the exact two-conv coupling (gromo's FullConv2dGrowingModule), because layer l is a
  real 3x3 (possibly strided) conv here; conv -> GAP -> Linear treats the pooled unfolded input as B2;
  layers with a max-pool between activation and layer l (`Hidden.pool`) are skipped (not linear).
* `compute_delta=False` by default (gromo's documented TINY recipe: dW* only projects the residual);
  the paper applies it (set `compute_delta: true`).
* `predicted_loss_change` = -gamma^2 * gromo's `first_order_improvement` (Delta_delta [if applied] +
  sigma'(0) sum_j sigma_j^2), TINY's own prediction, also used to select layers. It is not the exact
  first-order change of the applied move: it omits the part of the new units' activity that layer l
  can already express (sigma'(0) sum_j alpha_j^T C dW*^T omega_j). The exact one for a linearised
  activation, -gamma^2 (Delta_delta [if applied] - sigma'(0) sum_j alpha_j^T M2 omega_j), is reported
  as `extra["predicted_linearised"]`; the tests check it against measured loss changes.
* ReLU is not differentiable at 0; sigma'(0+) = 1 as in gromo, so with ReLU neither prediction is a
  derivative (the observed change on the statistics set is recorded next to them).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, ClassVar, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from growbench.methods.base import GrowthEvent, GrowthMethod
from growbench.methods.tiny_math import (LayerStatistics, activation_gradient, neurons_first_order,
                                         optimal_added_neurons, optimal_delta)
from growbench.models.growable import GrowableNet, Hidden

if TYPE_CHECKING:
    from growbench.trainer import Context

SELECTIONS = ("best", "all", "sequential")
LINE_SEARCHES = ("grid", "log")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class TinySettings:
    max_added_neurons: int | None = None  # cap on units added to one layer per growth event (None: all significant)
    selection: str = "best"  # best: layer with the largest first-order gain | all: every layer | sequential
    compute_delta: bool = False  # also apply -gamma^2 dW* to layer l (paper); False = gromo's TINY recipe
    use_projection: bool = True  # fit the residual left after dW* (TINY); False: raw -M2 (GradMax-like)
    use_covariance: bool = True  # whiten with S2 (TINY); False: identity (GradMax-like)
    numerical_threshold: float = 1e-6  # eigenvalues of S2 below this are dropped in S2^{-1/2}
    statistical_threshold: float = 1e-3  # singular values of S2^{-1/2} N below this are dropped
    stats_examples: int = 1024  # training examples of the statistics (and line-search) set
    stats_batch_size: int = 256
    line_search: str = "grid"  # grid: `gammas` (gromo tutorial) | log: gromo's log-grid line search
    gammas: list[float] = field(default_factory=lambda: [0.1, 0.5, 1.0])  # gamma = 0 is always the baseline
    log_points: int = 20  # points per decade range of the log line search (gromo: 100, from 1e-6 to 1)
    when_no_decrease: str = "smallest"  # line search keeps gamma = 0: add at the smallest gamma tried | skip
    dtype: str = "float64"  # dtype of the linear algebra (statistics are summed in float64)

    def __post_init__(self) -> None:
        from growbench.config import ConfigError

        key = "method_settings.tiny"
        if self.selection not in SELECTIONS:
            raise ConfigError(f"{key}.selection: unknown value {self.selection!r}; valid: {', '.join(SELECTIONS)}")
        if self.line_search not in LINE_SEARCHES:
            raise ConfigError(f"{key}.line_search: unknown value {self.line_search!r}; "
                              f"valid: {', '.join(LINE_SEARCHES)}")
        if self.when_no_decrease not in ("smallest", "skip"):
            raise ConfigError(f"{key}.when_no_decrease: unknown value {self.when_no_decrease!r}; valid: smallest, skip")
        if self.dtype not in DTYPES:
            raise ConfigError(f"{key}.dtype: unknown value {self.dtype!r}; valid: {', '.join(DTYPES)}")
        if self.max_added_neurons is not None and self.max_added_neurons < 1:
            raise ConfigError(f"{key}.max_added_neurons must be >= 1 or null, got {self.max_added_neurons}")
        if self.stats_examples < 1 or self.stats_batch_size < 1 or self.log_points < 2:
            raise ConfigError(f"{key}: stats_examples, stats_batch_size must be >= 1 and log_points >= 2")
        if not self.gammas or any(g <= 0 for g in self.gammas):
            raise ConfigError(f"{key}.gammas: give positive amplitudes (0 is always tried), got {self.gammas}")


@dataclass
class Proposal:
    """New units for one hidden layer, at amplitude 1 (the line search scales them)."""

    name: str
    alpha_w: Tensor  # (K, *inp.weight.shape[1:])  in-weights of the new units (rows of layer l-1)
    alpha_b: Tensor | None  # (K,)  their biases (None when layer l-1 has none)
    omega: Tensor  # (out.weight.shape[0], K, *out.weight.shape[2:])  new columns of layer l
    delta_w: Tensor | None  # out.weight.shape  dW* (applied as -gamma^2 dW* when compute_delta)
    delta_b: Tensor | None  # (C2,)
    sigma: Tensor  # (K,) singular values, decreasing
    first_order: float  # gromo's first_order_improvement, statistics units (summed loss per example)
    realised_first_order: float  # first-order decrease of the applied move per gamma^2, same units
    delta_decrease: float  # tr(M^T S^-1 M)

    @property
    def units(self) -> int:
        return int(self.sigma.numel())


# --------------------------------------------------------------------------- which layers


def coupling(h: Hidden) -> tuple[str | None, str]:
    """(kind, reason): kind in linear | conv | gap, or None with the reason the layer is skipped."""
    if h.pool:
        return None, "max-pool between activation and next layer: not linear in the new units"
    if hasattr(h.act, "grown"):  # e.g. SENN's Rational: the new units' activation is not the layer's module
        return None, f"per-unit activation parameters ({type(h.act).__name__})"
    inp, out = h.inp, h.out
    if isinstance(inp, nn.Linear) and isinstance(out, nn.Linear):
        return "linear", ""
    if isinstance(inp, nn.Conv2d) and inp.groups == 1:
        if isinstance(out, nn.Conv2d) and out.groups == 1:
            return "conv", ""
        if isinstance(out, nn.Linear) and out.in_features == inp.out_channels:
            return "gap", ""  # one classifier column per channel: global average pooling in between
    return None, f"unsupported coupling {type(inp).__name__} -> {type(out).__name__}"


def new_unit_scale(h: Hidden) -> float:
    """d(input of layer l)/d(new pre-activation) at 0: sigma'(0+) times an identity-initialised BatchNorm
    channel in eval mode (1/sqrt(1 + eps)); BatchNorm is otherwise ignored, as in gromo."""
    scale = activation_gradient(h.act)
    if h.bn is not None:
        scale /= math.sqrt(1.0 + h.bn.eps)
    return scale


# --------------------------------------------------------------------------- statistics passes

LossFn = Callable[..., Tensor]


def _forward_backward(model: GrowableNet, hiddens: list[Hidden], x: Tensor, y: Tensor,
                      loss_fn: LossFn) -> tuple[float, list[tuple[Tensor, Tensor, Tensor]]]:
    """Summed loss of the batch and, per hidden layer, (input of inp, input of out, dLoss/d output of out).
    Gradients are taken w.r.t. the pre-activations only: parameter .grad is never touched."""
    seen: dict[nn.Module, tuple[Tensor, Tensor]] = {}

    def hook(mod, args, out):
        seen[mod] = (args[0].detach(), out)

    mods = list(dict.fromkeys(m for h in hiddens for m in (h.inp, h.out)))
    handles = [m.register_forward_hook(hook) for m in mods]
    try:
        with torch.enable_grad():
            loss = loss_fn(model(x), y, reduction="sum")
            grads = torch.autograd.grad(loss, [seen[h.out][1] for h in hiddens])
    finally:
        for hd in handles:
            hd.remove()
    return float(loss.detach()), [(seen[h.inp][0], seen[h.out][0], g.detach()) for h, g in zip(hiddens, grads)]


def collect_statistics(model: GrowableNet, hiddens: list[Hidden], batches: list[tuple[Tensor, Tensor]],
                       loss_fn: LossFn, cross_covariance: bool | None = None
                       ) -> tuple[dict[str, LayerStatistics], float, int]:
    """Pass 1: S, M, S2, M2 (and C for linear/gap layers) of every hidden layer; summed loss; examples."""
    stats = {h.name: LayerStatistics(coupling(h)[0], cross_covariance) for h in hiddens}
    total, count = 0.0, 0
    for x, y in batches:
        loss, per_layer = _forward_backward(model, hiddens, x, y, loss_fn)
        total += loss
        count += x.shape[0]
        for h, (b2, b1, g) in zip(hiddens, per_layer):
            st = stats[h.name]
            if st.kind == "linear":
                st.update_linear(_ones(b2, h.inp), _ones(b1, h.out), g)
            elif st.kind == "gap":
                st.update_gap(b2, h.inp, b1, h.out, g)
            else:
                st.update_conv(b2, h.inp, b1, h.out, g)
    return stats, total, count


def collect_projection(model: GrowableNet, hiddens: list[Hidden], stats: dict[str, LayerStatistics],
                       deltas: dict[str, Tensor], batches: list[tuple[Tensor, Tensor]], loss_fn: LossFn) -> None:
    """Pass 2 (conv -> conv layers without C): N = -E[B2 V_proj^T] on the same examples, dW* known."""
    for x, y in batches:
        _, per_layer = _forward_backward(model, hiddens, x, y, loss_fn)
        for h, (b2, b1, g) in zip(hiddens, per_layer):
            stats[h.name].update_n_conv(b2, h.inp, b1, h.out, g, deltas[h.name])


def _ones(b: Tensor, layer: nn.Linear) -> Tensor:
    b = b.flatten(1)
    return torch.cat([b, b.new_ones(b.shape[0], 1)], 1) if layer.bias is not None else b


# --------------------------------------------------------------------------- proposals


def _solve_delta(st: LayerStatistics, s: TinySettings) -> tuple[Tensor | None, float]:
    if not (s.compute_delta or s.use_projection):
        return None, 0.0
    return optimal_delta(st.tensor_s, st.tensor_m, DTYPES[s.dtype])


def make_proposal(h: Hidden, st: LayerStatistics, delta: Tensor | None, delta_decrease: float,
                  s: TinySettings, max_units: int | None) -> Proposal:
    """Closed-form new units for hidden layer h from its statistics (spec steps 3-7)."""
    dtype = DTYPES[s.dtype]
    n = st.tensor_n(delta if s.use_projection else None)  # (D1, C2[*E])
    alpha, omega, sigma = optimal_added_neurons(
        st.tensor_s_growth if s.use_covariance else None, n, s.numerical_threshold, s.statistical_threshold,
        max_units, dtype)
    slope = new_unit_scale(h)
    applied = delta_decrease if s.compute_delta else 0.0
    first_order = applied + slope * float((sigma ** 2).sum())
    realised = applied - slope * neurons_first_order(alpha, st.tensor_m_prev.to(dtype), omega)

    ref = h.inp.weight
    k = alpha.shape[0]
    alpha = alpha.to(ref)
    if h.inp.bias is not None:
        alpha_w, alpha_b = alpha[:, :-1], alpha[:, -1].contiguous()
    else:
        alpha_w, alpha_b = alpha, None
    alpha_w = alpha_w.reshape(k, *ref.shape[1:])
    out_w = h.out.weight
    if out_w.dim() == 4:  # (C2*kh*kw, K) -> (C2, K, kh, kw)
        kh, kw = out_w.shape[2:]
        omega = omega.reshape(out_w.shape[0], kh, kw, k).permute(0, 3, 1, 2)
    omega = omega.to(out_w).contiguous()
    delta_w = delta_b = None
    if delta is not None:
        delta = delta.to(out_w)
        if h.out.bias is not None:
            delta_w, delta_b = delta[:, :-1], delta[:, -1].contiguous()
        else:
            delta_w = delta
        delta_w = delta_w.reshape(out_w.shape).contiguous()
    return Proposal(h.name, alpha_w.contiguous(), alpha_b, omega, delta_w, delta_b, sigma.detach().cpu(),
                    first_order, realised, delta_decrease)


def compute_proposals(model: GrowableNet, hiddens: list[Hidden], batches: list[tuple[Tensor, Tensor]],
                      loss_fn: LossFn, settings: TinySettings, max_units: dict[str, int | None] | None = None
                      ) -> tuple[dict[str, Proposal], dict[str, LayerStatistics], float, int]:
    """Statistics (one pass, plus one for conv -> conv layers when projecting) and proposals of every
    hidden layer. The model should be in eval mode. Returns proposals, statistics, summed loss, examples."""
    max_units = max_units or {}
    stats, total, count = collect_statistics(model, hiddens, batches, loss_fn)
    solved = {h.name: _solve_delta(stats[h.name], settings) for h in hiddens}
    second = [h for h in hiddens if settings.use_projection and not stats[h.name].keep_c]
    if second:
        collect_projection(model, second, stats, {h.name: solved[h.name][0] for h in second}, batches, loss_fn)
    caps: dict[str, int | None] = {}
    for h in hiddens:
        limits = [c for c in (max_units.get(h.name), settings.max_added_neurons) if c is not None]
        caps[h.name] = min(limits) if limits else None
    proposals = {h.name: make_proposal(h, stats[h.name], *solved[h.name], settings, caps[h.name]) for h in hiddens}
    return proposals, stats, total, count


# --------------------------------------------------------------------------- extended forward and apply


@contextmanager
def extended(model: GrowableNet, proposals: list[Proposal], gamma: float, compute_delta: bool) -> Iterator[None]:
    """Forward hooks making `model` compute the grown network at amplitude gamma without changing it:
    new units gamma*alpha (through the layer's BatchNorm as an identity-initialised eval-mode channel and
    its activation), gamma*omega into layer l, and -gamma^2 dW* on layer l when compute_delta."""
    acts: dict[str, Tensor] = {}
    handles = []
    for p in proposals:
        h = model.hidden(p.name)
        gap = isinstance(h.inp, nn.Conv2d) and isinstance(h.out, nn.Linear)

        def inp_hook(mod, args, out, p=p, h=h, gap=gap):
            x = args[0]
            b = None if p.alpha_b is None else gamma * p.alpha_b
            if isinstance(mod, nn.Linear):
                z = F.linear(x, gamma * p.alpha_w, b)
            else:
                z = F.conv2d(x, gamma * p.alpha_w, b, mod.stride, mod.padding, mod.dilation)
            if h.bn is not None:  # new BatchNorm channel: weight 1, bias 0, running mean 0, running var 1
                z = z / math.sqrt(1.0 + h.bn.eps)
            a = h.act(z)
            acts[p.name] = a.mean((2, 3)) if gap else a

        def out_hook(mod, args, out, p=p):
            a = acts.pop(p.name)
            if isinstance(mod, nn.Linear):
                extra = F.linear(a, gamma * p.omega)
                if compute_delta and p.delta_w is not None:
                    extra = extra - F.linear(args[0], gamma ** 2 * p.delta_w,
                                             None if p.delta_b is None else gamma ** 2 * p.delta_b)
            else:
                extra = F.conv2d(a, gamma * p.omega, None, mod.stride, mod.padding, mod.dilation)
                if compute_delta and p.delta_w is not None:
                    extra = extra - F.conv2d(args[0], gamma ** 2 * p.delta_w,
                                             None if p.delta_b is None else gamma ** 2 * p.delta_b,
                                             mod.stride, mod.padding, mod.dilation)
            return out + extra

        handles.append(h.inp.register_forward_hook(inp_hook))
        handles.append(h.out.register_forward_hook(out_hook))
    try:
        yield
    finally:
        for hd in handles:
            hd.remove()


@torch.no_grad()
def summed_loss(model: GrowableNet, batches: list[tuple[Tensor, Tensor]], loss_fn: LossFn) -> float:
    return sum(float(loss_fn(model(x), y, reduction="sum")) for x, y in batches)


def _pad(t: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Zero-pad `t` at the end of each dim to `shape` (units added earlier in the same event)."""
    if tuple(t.shape) == tuple(shape):
        return t
    out = t.new_zeros(shape)
    out[tuple(slice(0, s) for s in t.shape)] = t
    return out


def apply_proposals(model: GrowableNet, proposals: list[Proposal], gamma: float, compute_delta: bool) -> None:
    """Commit the grown network at amplitude gamma through the shared primitives (in layer order, padding
    each proposal with zeros for the units the previous ones added to a shared layer)."""
    order = {h.name: i for i, h in enumerate(model.hidden_layers())}
    for p in sorted(proposals, key=lambda p: order[p.name]):
        h = model.hidden(p.name)
        if compute_delta and p.delta_w is not None:
            db = None if p.delta_b is None else -gamma ** 2 * p.delta_b
            model.update_weights(p.name, _pad(-gamma ** 2 * p.delta_w, tuple(h.out.weight.shape)), db)
        k = p.units
        w_in = _pad(gamma * p.alpha_w, (k, *h.inp.weight.shape[1:]))
        b_in = None if p.alpha_b is None else gamma * p.alpha_b
        w_out = _pad(gamma * p.omega, (h.out.weight.shape[0], k, *h.out.weight.shape[2:]))
        model.add_units(p.name, w_in, b_in, w_out)


def line_search(loss_at: Callable[[float], float], loss0: float, s: TinySettings) -> tuple[float, float, dict]:
    """Amplitude minimising the loss. grid: gamma in {0} + gammas (gromo tutorial: {0, .1, .5, 1}).
    log: gromo's `line_search` with `log_points` per range: {0} + logspace(1e-6, 1), then the next decade
    (1..10, 10..100, ...) while the minimum keeps decreasing."""
    history = {0.0: loss0}
    if s.line_search == "grid":
        for g in s.gammas:
            history[float(g)] = loss_at(float(g))
    else:
        lo, hi, best = 1e-6, 1.0, loss0
        for _ in range(8):  # at most 1e7: the minimum is found long before
            for g in torch.logspace(math.log10(lo), math.log10(hi), s.log_points, dtype=torch.float64).tolist():
                history[g] = loss_at(g)
            new_best = min(history.values())
            if not new_best < best:
                break
            best, lo, hi = new_best, hi, hi * 10
    gamma = min(history, key=lambda g: (history[g], g))
    return gamma, history[gamma], history


# --------------------------------------------------------------------------- the method


class Tiny(GrowthMethod):
    """TINY: add the units that best fix each layer's expressivity bottleneck (closed form, first order)."""

    name: ClassVar[str] = "tiny"
    Settings: ClassVar[type] = TinySettings
    # The move is function-preserving at amplitude 0, but the line search applies it at gamma > 0.
    preserves_function: ClassVar[bool] = False

    def __init__(self, settings=None, growth=None) -> None:
        super().__init__(settings, growth)
        self._cursor = 0  # sequential selection: index of the next hidden layer to try

    def candidates(self, model: GrowableNet, ctx: "Context") -> tuple[list[Hidden], dict[str, str]]:
        """Hidden layers to compute proposals for, and the skipped ones with their reason."""
        s = self.settings
        layers, skipped = [], {}
        for h in model.hidden_layers():
            kind, reason = coupling(h)
            if kind is None:
                skipped[h.name] = reason
            elif ctx.room(h.name, model) <= 0:
                skipped[h.name] = "at its width cap"
            else:
                layers.append(h)
        if s.selection == "sequential" and layers:
            names = [h.name for h in model.hidden_layers()]
            pick = min(layers, key=lambda h: (names.index(h.name) - self._cursor) % len(names))
            self._cursor = (names.index(pick.name) + 1) % len(names)
            layers = [pick]
        return layers, skipped

    def grow(self, model: GrowableNet, ctx: "Context") -> list[GrowthEvent]:
        s = self.settings
        hiddens, skipped = self.candidates(model, ctx)
        if not hiddens:
            return []
        batches = list(ctx.batches(s.stats_examples, s.stats_batch_size))
        y0 = batches[0][1]
        # trainer loss units: mean over examples (and over outputs for regression); statistics use the sum
        unit = float(y0[0].numel()) if ctx.task == "regression" else 1.0
        max_units = {h.name: min(ctx.room(h.name, model), s.max_added_neurons or (1 << 30)) for h in hiddens}
        was_training = model.training
        model.eval()  # BatchNorm on running statistics during statistics and line search
        try:
            proposals, _, total, count = compute_proposals(model, hiddens, batches, ctx.loss_fn, s, max_units)
            # statistics are per-example averages of the summed loss; the trainer's loss also averages
            # over the outputs for regression. Line-search losses are sums over the examples.
            scale = 1.0 / unit
            loss_scale = 1.0 / (count * unit)
            gains = {n: p.first_order * scale for n, p in proposals.items()}
            useful = [p for p in proposals.values() if p.units > 0 and p.first_order > 0]
            if not useful:
                return []
            chosen = [max(useful, key=lambda p: p.first_order)] if s.selection == "best" else useful

            def loss_at(g: float) -> float:
                with extended(model, chosen, g, s.compute_delta):
                    return summed_loss(model, batches, ctx.loss_fn) * loss_scale

            loss0 = total * loss_scale
            gamma, loss_g, history = line_search(loss_at, loss0, s)
            where = ",".join(p.name for p in chosen)
            extra = {"gamma": gamma, "line_search": {f"{g:.6g}": v for g, v in sorted(history.items())},
                     "candidates_first_order": gains, "stats_examples": count}
            if skipped:
                extra["skipped"] = skipped
            extra["layers"] = {p.name: {"units": p.units, "singular_values": p.sigma.tolist(),
                                        "first_order_improvement": p.first_order * scale,
                                        "realised_first_order": p.realised_first_order * scale,
                                        "delta_decrease": p.delta_decrease * scale} for p in chosen}
            if gamma == 0.0:  # no amplitude decreases the loss on the statistics set
                if s.when_no_decrease == "skip":
                    extra["reason"] = "line search kept gamma = 0; nothing added"
                    return [GrowthEvent(where=where, kind="add", units_added=0, predicted_loss_change=0.0,
                                        observed_loss_change=0.0, extra=extra)]
                # units at amplitude 0 would stay dead (zero in- and out-weights get zero gradients):
                # add them at the smallest amplitude tried instead, the loss change is recorded
                gamma = min(g for g in history if g > 0)
                loss_g = history[gamma]
                extra["gamma"] = gamma
                extra["reason"] = "line search kept gamma = 0; added at the smallest amplitude tried"
            apply_proposals(model, chosen, gamma, s.compute_delta)
        finally:
            model.train(was_training)
        predicted = -gamma ** 2 * sum(p.first_order for p in chosen) * scale
        extra["predicted_linearised"] = -gamma ** 2 * sum(p.realised_first_order for p in chosen) * scale
        return [GrowthEvent(where=where, kind="add", units_added=sum(p.units for p in chosen),
                            predicted_loss_change=predicted, observed_loss_change=loss_g - loss0, extra=extra)]
