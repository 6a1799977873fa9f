"""`gradmax`: GradMax (Evci et al., ICLR 2022): zero in-weights, out-weights that maximise the new gradient.

U. Evci, B. van Merriënboer, T. Unterthiner, M. Vladymyrov, F. Pedregosa, "GradMax: Growing Neural
Networks using Gradient Information", ICLR 2022; official code google-research/growneuron (TensorFlow).

New units between layer l-1 (`inp`) and layer l (`out`) get zero in-weights (and bias), so the network
function is unchanged whatever their out-weights. With in-weights alpha_j = 0 the loss gradient on them is

    dL/dalpha_j = sigma'(0) * M2 omega_j,     M2 = E[B_{l-2} G_l^T]   (D1 x C2; M_grow = M2^T)

(B_{l-2}: input of layer l-1 with a ones entry for its bias, G_l: dL/d pre-activation of layer l). Under the
paper's constraint on the out-weights (orthogonal, each of norm c), sum_j |dL/dalpha_j|^2 is largest for
omega_j = c * the top right singular vectors of M2 (the top left singular vectors of M_grow), and is then
sigma'(0)^2 c^2 sum_j s_j^2. c = `scale` x the mean norm of the existing units' out-weights (official
`mean_norm`, 0.5). The SVD is `growbench.methods.tiny_math.optimal_added_neurons` with TINY's switches off
(no whitening, no projection, alpha = 0, singular values ignored): GradMax is TINY's special case.

Convolutions: conv -> conv uses the exact two-conv coupling (M2 has C2*kh*kw columns, a new channel's
out-kernel), conv -> global average pool -> linear uses the position-averaged input (the official code grows
such pairs randomly). Layers with a max-pool after the activation or per-unit activation parameters are skipped.

Two choices the harness forces (see the README):
* PyTorch's ReLU has derivative 0 at 0, so units with zero in-weights would never get a gradient. The
  official code uses `relu1` = max(x, 0), whose TensorFlow derivative at 0 is 1; `setup` swaps every
  `nn.ReLU` for `ReLU1` (same forward, derivative 1 at exactly 0; `relu_grad_at_zero: false` keeps them).
* Statistics run with BatchNorm in eval mode, where a new channel is the identity (1/sqrt(1 + eps)); in
  training mode BatchNorm normalises the zero channel (0/sqrt(eps)) and its first gradients differ.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from growbench.config import ConfigError
from growbench.methods.base import GrowthEvent, GrowthMethod
from growbench.methods.tiny import coupling as tiny_coupling
from growbench.methods.tiny_math import conv_weight_grad, optimal_added_neurons, unfold_input
from growbench.models import GrowableNet, Hidden

LAYERS = ("all", "round-robin")
SCALE_METHODS = ("mean_norm", "fixed")


@dataclass
class GradMaxSettings:
    units_per_step: int = 1  # units added to each grown layer per event (at most its room and rank of M2)
    layers: str = "all"  # all: every growable layer at each event (all-at-once) | round-robin: one per event
    scale: float = 0.5  # out-weight norm: scale x mean norm of existing out-weights (mean_norm) or scale (fixed)
    scale_method: str = "mean_norm"
    stats_examples: int = 128  # training examples of the statistics pass (official grow_batch_size)
    stats_batch_size: int | None = None  # None: the suite's batch size
    relu_grad_at_zero: bool = True  # swap nn.ReLU for ReLU1 (derivative 1 at 0), as the official relu1
    rank_tol: float = 1e-6  # singular values below rank_tol x the largest count as zero: no unit for them

    def __post_init__(self) -> None:
        key = "method_settings.gradmax"
        if self.units_per_step < 1:
            raise ConfigError(f"{key}.units_per_step must be >= 1, got {self.units_per_step}")
        if self.layers not in LAYERS:
            raise ConfigError(f"{key}.layers: unknown value {self.layers!r}; valid choices: {', '.join(LAYERS)}")
        if self.scale_method not in SCALE_METHODS:
            raise ConfigError(f"{key}.scale_method: unknown value {self.scale_method!r}; "
                              f"valid choices: {', '.join(SCALE_METHODS)}")
        if not self.scale > 0:
            raise ConfigError(f"{key}.scale must be > 0, got {self.scale}")
        if self.stats_examples < 1 or (self.stats_batch_size is not None and self.stats_batch_size < 1):
            raise ConfigError(f"{key}: stats_examples and stats_batch_size must be >= 1")
        if not 0 <= self.rank_tol < 1:
            raise ConfigError(f"{key}.rank_tol must be in [0, 1), got {self.rank_tol}")


class ReLU1(nn.ReLU):
    """max(x, 0) with derivative 1 at x = 0 (clamp's gradient), like the official code's `relu1`."""

    def forward(self, x: Tensor) -> Tensor:
        return x.clamp_min(0)


def swap_relus(model: nn.Module) -> int:
    """Replace every `nn.ReLU` module of `model` by `ReLU1`; returns how many were replaced."""
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.ReLU:
                setattr(parent, name, ReLU1())
                n += 1
    return n


def derivative_at_zero(act: nn.Module) -> float:
    """The derivative autograd will use for a new unit's pre-activation, which is exactly 0."""
    with torch.enable_grad():
        z = torch.zeros(1, requires_grad=True) * 1.0  # not a leaf: FlopCounterMode's module hooks refuse leaves
        (grad,) = torch.autograd.grad(act(z).sum(), z)
    return float(grad)


def coupling(h: Hidden) -> tuple[str | None, str]:
    """(kind, reason): TINY's couplings (linear | conv | gap, the same statistics), plus GradMax's own
    condition: zero in-weights must leave the function unchanged, so the activation must map 0 to 0."""
    kind, reason = tiny_coupling(h)
    if kind is None:
        return kind, reason
    with torch.no_grad():
        if float(h.act(torch.zeros(1)).abs()) != 0.0:
            return None, f"{type(h.act).__name__}(0) != 0: zero in-weights would change the function"
    return kind, ""


def growth_matrices(model: GrowableNet, hiddens: list[Hidden], batches: list[tuple[Tensor, Tensor]],
                    loss_fn) -> dict[str, Tensor]:
    """M2 = dL/d(new in-weights) per unit out-weight, for every hidden layer, on the batches (float64):
    L is `loss_fn` (the trainer's mean loss) over all the batches' examples. Linear and gap: (D1, C2);
    conv -> conv: (D1, C2*kh*kw) with column c*kh*kw + e. Parameter .grad is never touched."""
    n_total = sum(len(y) for _, y in batches)
    sums: dict[str, Tensor] = {}
    mods = list(dict.fromkeys(m for h in hiddens for m in (h.inp, h.out)))
    for x, y in batches:
        seen: dict[nn.Module, tuple[Tensor, Tensor]] = {}

        def hook(mod, args, out):
            seen[mod] = (args[0].detach(), out)

        handles = [m.register_forward_hook(hook) for m in mods]
        try:
            with torch.enable_grad():
                loss = loss_fn(model(x), y) * (len(y) / n_total)
                grads = torch.autograd.grad(loss, [seen[h.out][1] for h in hiddens])
        finally:
            for hd in handles:
                hd.remove()
        for h, g in zip(hiddens, grads):
            x2, b1, g = seen[h.inp][0], seen[h.out][0], g.detach()
            kind = coupling(h)[0]
            if kind == "linear":
                m = unfold_input(x2, h.inp).T @ g
            elif kind == "gap":
                m = unfold_input(x2, h.inp).mean(2).T @ g
            else:
                u1 = unfold_input(x2, h.inp)  # (n, D1, H1*W1)
                m = conv_weight_grad(u1.reshape(u1.shape[0], u1.shape[1], *b1.shape[2:]), g, h.out)
            m = m.double()
            sums[h.name] = sums[h.name] + m if h.name in sums else m
    return sums


def out_norm(h: Hidden, scale: float, method: str) -> float:
    """Norm of each new unit's out-weights: scale x the mean norm of the existing units' out-weights."""
    if method == "fixed":
        return scale
    w = h.out.weight.detach()
    norms = w.transpose(0, 1).flatten(1).norm(dim=1)  # one per existing unit
    mean = float(norms.mean()) if norms.numel() else 0.0
    return scale * mean if mean > 0 else scale  # all-zero out-weights: fall back to `fixed`


class GradMax(GrowthMethod):
    """GradMax: zero in-weights; out-weights along the top singular vectors of the growth gradient M2."""

    name: ClassVar[str] = "gradmax"
    Settings: ClassVar[type] = GradMaxSettings
    preserves_function: ClassVar[bool] = True  # zero in-weights: new units output sigma(0) = 0

    def __init__(self, settings=None, growth=None) -> None:
        super().__init__(settings, growth)
        self.cursor = 0  # round-robin: index of the next hidden layer to try (checkpointed)

    @classmethod
    def search_space(cls) -> dict[str, dict]:
        return {"units_per_step": {"type": "int", "low": 1, "high": 32, "log": True},
                "scale": {"type": "float", "low": 0.05, "high": 2.0, "log": True},
                "layers": {"type": "categorical", "choices": list(LAYERS)},
                "stats_examples": {"type": "int", "low": 64, "high": 2048, "log": True}}

    def setup(self, model: GrowableNet, ctx) -> None:
        if self.settings.relu_grad_at_zero:
            swap_relus(model)  # also on resume: the rebuilt network has plain nn.ReLU again

    def candidates(self, model: GrowableNet, ctx) -> tuple[list[Hidden], dict[str, str]]:
        layers, skipped = [], {}
        for h in model.hidden_layers():
            kind, reason = coupling(h)
            if kind is None:
                skipped[h.name] = reason
            elif ctx.room(h.name, model) <= 0:
                skipped[h.name] = "at its width cap"
            else:
                layers.append(h)
        if self.settings.layers == "round-robin" and layers:
            names = [h.name for h in model.hidden_layers()]
            pick = min(layers, key=lambda h: (names.index(h.name) - self.cursor) % len(names))
            self.cursor = (names.index(pick.name) + 1) % len(names)
            layers = [pick]
        return layers, skipped

    def grow(self, model: GrowableNet, ctx) -> list[GrowthEvent]:
        s = self.settings
        hiddens, skipped = self.candidates(model, ctx)
        if not hiddens:
            return []
        batches = list(ctx.batches(s.stats_examples, s.stats_batch_size))
        count = sum(len(y) for _, y in batches)
        was_training = model.training
        model.eval()  # BatchNorm on running statistics: a new channel is the identity
        try:
            m2 = growth_matrices(model, hiddens, batches, ctx.loss_fn)
        finally:
            model.train(was_training)
        events = []
        for h in hiddens:  # shallow first: a deeper layer's zero in-weights then cover the new units too
            want = min(s.units_per_step, ctx.room(h.name, model))
            _, omega, sigma = optimal_added_neurons(None, -m2[h.name], statistical_threshold=0.0, max_neurons=want,
                                                    alpha_zero=True, ignore_singular_values=True)
            if sigma.numel():
                keep = int((sigma > s.rank_tol * float(sigma[0])).sum())
                omega, sigma = omega[:, :keep], sigma[:keep]
            k = int(sigma.numel())
            if k == 0:
                skipped[h.name] = "M2 is zero: no direction increases the gradient"
                continue
            c = out_norm(h, s.scale, s.scale_method)
            w_out = self._out_weights(h, omega * c)
            w_in = h.inp.weight.new_zeros(k, *h.inp.weight.shape[1:])
            slope = derivative_at_zero(h.act) / (math.sqrt(1.0 + h.bn.eps) if h.bn is not None else 1.0)
            model.add_units(h.name, w_in, None, w_out)
            extra = {"singular_values": sigma.tolist(), "out_norm": c, "stats_examples": count,
                     "grad_norm_sq": slope ** 2 * c ** 2 * float((sigma ** 2).sum()), "act_slope_at_zero": slope}
            events.append(GrowthEvent(where=h.name, kind="add", units_added=k, predicted_loss_change=0.0,
                                      extra=extra))
        if skipped and events:
            events[0].extra["skipped"] = skipped
        return events

    @staticmethod
    def _out_weights(h: Hidden, omega: Tensor) -> Tensor:
        """(cols, K) singular vectors -> new columns of layer l: (C2, K) or (C2, K, kh, kw), zero-padded for
        rows layer l gained since the statistics."""
        w = h.out.weight
        k = omega.shape[1]
        if w.dim() == 4:
            kh, kw = w.shape[2:]
            omega = omega.reshape(-1, kh, kw, k).permute(0, 3, 1, 2)
        out = w.new_zeros(w.shape[0], k, *w.shape[2:])
        out[: omega.shape[0]] = omega.to(w)
        return out
