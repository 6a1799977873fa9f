"""Kronecker-factored Fisher of a growable MLP for SENN: running factors, natural gradients, the
natural-gradient optimizer, and the statistics pass of an expansion check. Spec: docs/methods/senn.md.

Conventions (per sample n; `e_n` = ∂ℓ_n/∂f_n, the output gradient of the per-sample loss):
  * linear layer j, y = W x + b: a = [x, 1] (d_in+1), g = ∂ℓ_n/∂y (d_out);
  * the Fisher is the *normalised* empirical Fisher F = E[∇ℓ ∇ℓᵀ / ‖e‖²] of the official code
    (`kfac_observe` backpropagates e/‖e‖): its K-FAC blocks are A = E[a aᵀ] and G = E[ĝ ĝᵀ], ĝ = g/‖e‖.
    Since ĝ is g rescaled per sample, the training backward pass already holds everything: no extra pass.
    With this Fisher η = ḡᵀF⁻¹ḡ ≤ E‖e‖² (a projection of the per-sample gradient norms), which is what
    the absolute threshold Δη/‖dL‖² of the spec normalises by;
  * damping: Â = A + γ·mean(diag A)·I, Ĝ = G + γ·mean(diag G)·I (the spec's Tikhonov 0.1·mean diag);
  * Rational activation coefficients (v, c, l per unit) get a diagonal block of the same Fisher.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from growbench.models.activations import Rational, rational_dx, rational_param_grads

if TYPE_CHECKING:
    from growbench.config import OptimizerConfig
    from growbench.models.mlp import MLP

FLOOR = 1e-12  # absolute damping floor: a factor of all zeros (dead layer) stays invertible


# --------------------------------------------------------------------------- small linear algebra
def damped(M: Tensor, rel: float, absolute: float | None = None) -> Tensor:
    """M + δI with δ = rel·mean(diag M) (or `absolute` when given), never below FLOOR."""
    d = M.shape[-1]
    delta = absolute if absolute is not None else rel * float(torch.diagonal(M, dim1=-2, dim2=-1).mean())
    return M + max(delta, FLOOR) * torch.eye(d, dtype=M.dtype, device=M.device)


def spd_inverse(M: Tensor) -> Tensor:
    """Inverse of a symmetric positive-definite matrix, in float64 (factors can be badly conditioned)."""
    M64 = M.double()
    M64 = 0.5 * (M64 + M64.T)
    L, info = torch.linalg.cholesky_ex(M64)
    if int(info) == 0:
        return torch.cholesky_inverse(L).to(M.dtype)
    return torch.linalg.pinv(M64, hermitian=True).to(M.dtype)


def with_ones(x: Tensor) -> Tensor:
    """a = [x, 1]: (N, d) -> (N, d+1), the bias as the last input."""
    return torch.cat([x, x.new_ones(x.shape[0], 1)], 1)


# --------------------------------------------------------------------------- layers: Linear and Conv2d alike
Layer = nn.Linear | nn.Conv2d


def net_layers(model: nn.Module) -> list[Layer]:
    """The Kronecker-factored layers in forward order: an MLP's linears, a VGG's convs and its classifier."""
    if hasattr(model, "linears"):
        return list(model.linears)
    return [*model.convs, model.classifier]


def fan_in(mod: Layer) -> int:
    """d_in of the weight matrix: in_features, or C_in·kh·kw of a conv (its unfolded patch)."""
    return mod.in_features if isinstance(mod, nn.Linear) else mod.weight[0].numel()


def fan_out(mod: Layer) -> int:
    return mod.weight.shape[0]


def input_rows(x: Tensor, mod: Layer) -> Tensor:
    """The layer's input as one row per (example, output position), n-major: Linear x (N, d) -> (N, d);
    Conv2d x (N, C, H, W) -> unfolded patches (N·L, C·kh·kw), L = output positions (KFC's im2col)."""
    if isinstance(mod, nn.Linear):
        return x.flatten(1)
    u = F.unfold(x, mod.kernel_size, dilation=mod.dilation, padding=mod.padding, stride=mod.stride)  # (N, D, L)
    return u.transpose(1, 2).reshape(-1, u.shape[1])


def output_rows(g: Tensor) -> Tensor:
    """Output (gradient) rows in the order of `input_rows`: (N, C) -> (N, C); (N, C, H', W') -> (N·L, C)."""
    if g.dim() == 2:
        return g
    return g.flatten(2).transpose(1, 2).reshape(-1, g.shape[1])


def positions(g: Tensor) -> int:
    """L: output positions per example of a layer output (N, C) or (N, C, H', W')."""
    return 1 if g.dim() == 2 else g.shape[2] * g.shape[3]


# --------------------------------------------------------------------------- running factors
@dataclass
class LayerFactors:
    A: Tensor  # (d_in+1, d_in+1)  E[a aᵀ]
    G: Tensor  # (d_out, d_out)    E[ĝ ĝᵀ]
    A_inv: Tensor | None = None
    G_inv: Tensor | None = None
    A_fresh: bool = True  # A changed since A_inv was computed

    def fits(self, mod: Layer) -> bool:
        return self.A.shape[0] == fan_in(mod) + 1 and self.G.shape[0] == fan_out(mod)


@dataclass
class ActFactors:
    F: Tensor  # (width, 3)  diagonal Fisher of (v, c, l) per unit

    def fits(self, act: Rational) -> bool:
        return self.F.shape[0] == act.width


class KFACStats:
    """Running (EMA) Kronecker factors of every Linear of an MLP and diagonal factors of its Rational
    activations. Hooks only keep references to the training step's tensors; `update()` (SENN's
    `after_step`, charged as growth overhead) folds them into the averages and refreshes the inverses
    every `inverse_every` updates."""

    def __init__(self, decay: float = 0.95, damping: float = 0.1, inverse_every: int = 10, every: int = 1) -> None:
        """inverse_every: updates between re-inversions; 0 = only when asked (`fresh_inverses`, at checks)."""
        self.decay, self.damping, self.inverse_every, self.every = decay, damping, inverse_every, every
        self.steps = 0  # training steps seen (factors are folded in every `every` of them)
        self.inverted_at = 0  # `updates` at the last inversion
        self.model: MLP | None = None
        self.layers: dict[nn.Linear, LayerFactors] = {}
        self.acts: dict[Rational, ActFactors] = {}
        self.recording = True
        self.updates = 0
        self._x: dict[nn.Module, Tensor] = {}
        self._g: dict[nn.Module, Tensor] = {}
        self._hooked: dict[nn.Module, object] = {}

    # ---------------------------------------------------------------- hooks
    def attach(self, model: "MLP") -> None:
        """Hook every Linear and Rational of `model` not hooked yet (call again after a layer is inserted)."""
        self.model = model
        for mod in [*net_layers(model), *self.rationals()]:
            if mod not in self._hooked:
                self._hooked[mod] = mod.register_forward_hook(self._on_forward)

    def detach(self) -> None:
        for h in self._hooked.values():
            h.remove()
        self._hooked.clear()

    def _on_forward(self, mod: nn.Module, args: tuple, out: Tensor) -> None:
        if not (self.recording and torch.is_grad_enabled() and out.requires_grad):
            return
        self._x[mod] = args[0].detach()

        def keep(g: Tensor) -> None:
            self._g[mod] = g.detach()
        out.register_hook(keep)

    def linears(self) -> list[Layer]:
        """Every Kronecker-factored layer (Linear, or Conv2d of a VGG)."""
        return net_layers(self.model)

    def rationals(self) -> list[Rational]:
        return [a for a in getattr(self.model, "acts", []) if isinstance(a, Rational)]

    # ---------------------------------------------------------------- EMA update from the training step
    @torch.no_grad()
    def update(self) -> None:
        """Fold the last training step's inputs and output gradients into the running factors.
        Cost per layer O(B·(d_in² + d_out²)) plus, every `inverse_every` calls, O(d_in³ + d_out³)."""
        mods = self.linears()
        last = mods[-1]
        self.steps += 1
        if (self.steps - 1) % self.every or last not in self._g or any(m not in self._x or m not in self._g
                                                                       for m in mods):
            self._x.clear()
            self._g.clear()
            return  # not this step, or no complete training step seen
        w = sample_weights(self._g[last])  # (B,) 1/‖e_n‖²: any common scale of the gradients cancels
        for j, mod in enumerate(mods):
            # the first layer's A = E[x xᵀ] is a statistic of the data alone: the statistics pass's
            # estimate is kept (its (d_in+1)² update per step and d_in³ inversion were most of the cost)
            A, G = layer_factors(mod, self._x[mod], self._g[mod], w, with_A=j > 0 or mod not in self.layers)
            self._fold_linear(mod, A, G)
        for act in self.rationals():
            if act in self._x and act in self._g:
                self._fold_act(act, act_factor(act, self._x[act], self._g[act], w))
        self._x.clear()
        self._g.clear()
        self.updates += 1
        if self.inverse_every and self.updates - self.inverted_at >= self.inverse_every:
            self.invert()

    def _fold_linear(self, mod: nn.Linear, A: Tensor, G: Tensor) -> None:
        f = self.layers.get(mod)
        if f is None or not f.fits(mod):
            self.layers[mod] = LayerFactors(A, G)
            self._invert_layer(self.layers[mod])
            return
        if A is not None:
            f.A.mul_(self.decay).add_(A, alpha=1 - self.decay)
            f.A_fresh = True
        f.G.mul_(self.decay).add_(G, alpha=1 - self.decay)

    def _fold_act(self, act: Rational, F: Tensor) -> None:
        f = self.acts.get(act)
        if f is None or not f.fits(act):
            self.acts[act] = ActFactors(F)
            return
        f.F.mul_(self.decay).add_(F, alpha=1 - self.decay)

    def reset(self, factors: dict[nn.Module, tuple]) -> None:
        """Replace the factors of the given modules (fresh estimates after growth) and invert them."""
        for mod, val in factors.items():
            if isinstance(mod, Rational):
                self.acts[mod] = ActFactors(val[0].clone())
            else:
                self.layers[mod] = LayerFactors(val[0].clone(), val[1].clone())
                self._invert_layer(self.layers[mod])

    def stale(self) -> list[nn.Module]:
        """Modules whose running factors are missing or do not fit their current shape (after growth)."""
        out = [m for m in self.linears() if m not in self.layers or not self.layers[m].fits(m)]
        return out + [a for a in self.rationals() if a not in self.acts or not self.acts[a].fits(a)]

    def refresh(self, fresh: dict[nn.Module, tuple]) -> None:
        """After a statistics pass: replace the stale modules' factors by `fresh` estimates, drop the factors
        of modules that left the network, and invert what changed (a check's natural direction)."""
        if fresh:
            self.reset(fresh)
        self.prune()
        self.fresh_inverses()

    def prune(self) -> None:
        live = set(self.linears()) | set(self.rationals())
        self.layers = {m: f for m, f in self.layers.items() if m in live}
        self.acts = {a: f for a, f in self.acts.items() if a in live}

    # ---------------------------------------------------------------- inverses and natural gradients
    def invert(self) -> None:
        for f in self.layers.values():
            self._invert_layer(f)
        self.inverted_at = self.updates

    def fresh_inverses(self) -> None:
        """Invert the running factors if they changed since the last inversion (a check's natural direction)."""
        if self.updates != self.inverted_at:
            self.invert()

    def _invert_layer(self, f: LayerFactors) -> None:
        if f.A_fresh or f.A_inv is None:
            f.A_inv = spd_inverse(damped(f.A, self.damping))
            f.A_fresh = False
        f.G_inv = spd_inverse(damped(f.G, self.damping))

    def natural_linear(self, mod: Layer, gW: Tensor, gb: Tensor | None) -> tuple[Tensor, Tensor | None] | None:
        """Ĝ⁻¹ [∇W, ∇b] Â⁻¹ split back into (weight, bias) directions, the weight one in gW's shape (a conv
        kernel (C_out, C_in, kh, kw) is its (C_out, C_in·kh·kw) matrix); None without fitting factors."""
        f = self.layers.get(mod)
        if f is None or not f.fits(mod) or f.A_inv is None:
            return None
        gW2 = gW.reshape(gW.shape[0], -1)
        gb_ = gb if gb is not None else gW.new_zeros(gW.shape[0])
        nat = f.G_inv @ torch.cat([gW2, gb_[:, None]], 1) @ f.A_inv  # (d_out, d_in+1)
        return nat[:, :-1].reshape(gW.shape), (nat[:, -1] if gb is not None else None)

    def natural_act(self, act: Rational, grads: Tensor) -> Tensor | None:
        """grads (width, 3) of (v, c, l) -> diagonal natural gradient; None without fitting factors."""
        f = self.acts.get(act)
        if f is None or not f.fits(act):
            return None
        return grads / (f.F + max(self.damping * float(f.F.mean()), FLOOR))

    @torch.no_grad()
    def step_length(self, directions: dict[Tensor, Tensor]) -> float | None:
        """An MLP's c = Σ(Jt·e)/Σ(Jt·Jt) on the last training step's batch (None when its tensors are missing):
        Jt by forward mode through the stashed layer inputs, e = the per-sample output gradients. CNNs use
        `layer_step_lengths`."""
        mods = self.linears()
        last = mods[-1]
        if last not in self._g or any(m not in self._x for m in mods):
            return None
        e = self._g[last]  # (B, d_out): gradient of the batch-mean loss = e_n / B, the scale cancels in c
        acts = list(self.model.acts)
        dx = torch.zeros_like(self._x[mods[0]].flatten(1))
        for j, lin in enumerate(mods):
            x = self._x[lin].flatten(1)
            dy = dx @ lin.weight.T
            if lin.weight in directions:
                dy = dy + x @ directions[lin.weight].T
            if lin.bias is not None and lin.bias in directions:
                dy = dy + directions[lin.bias]
            if j == len(acts):
                break
            act = acts[j]
            y = self._x[act] if act in self._x else torch.nn.functional.linear(x, lin.weight, lin.bias)
            dcoef = None
            if isinstance(act, Rational) and act.v in directions:
                dcoef = torch.stack([directions[act.v], directions[act.c], directions[act.l]], 1)
            dx = _act_jvp(act, y, dy, dcoef)
        den = float((dy * dy).sum())
        if not den > 0:
            return None
        return float((dy * e).sum()) * e.shape[0] / den  # e·B: the per-sample gradients of the official code

    @torch.no_grad()
    def layer_step_lengths(self, directions: dict[Tensor, Tensor]) -> dict[Tensor, float] | None:
        """A CNN's step lengths, one per layer: c = argmin Σ‖e·B − Σ_l c_l Jt_l‖² (K×K least squares, K =
        layers with a direction; Jt_l by forward mode through the whole net, train-mode BN).

        Why not the single c of `step_length`: KFC's factors assume output derivatives uncorrelated across
        positions, so a conv block's direction is mis-scaled by up to its number of positions (measured on
        cifar-small: conv directions ~1e6 x the classifier's, and the one least-squares c fell to ~1e-8,
        which froze training). One c per layer is the same least-squares rescaling of the official code
        with a coefficient per Kronecker block; with one layer it is the official one."""
        from growbench.methods.senn_conv import net_jvp

        mods = self.linears()
        last = mods[-1]
        if last not in self._g or mods[0] not in self._x:
            return None
        e = self._g[last] * self._g[last].shape[0]  # (B, d_out) per-sample output gradients
        groups = []
        for mod in mods:
            ps = [p for p in (mod.weight, mod.bias) if p is not None and p in directions]
            if ps:
                groups.append(ps)
        if not groups:
            return None
        X = self._x[mods[0]]
        J = torch.stack([net_jvp(self.model, X, {p: directions[p] for p in ps}, train=True).flatten()
                         for ps in groups]).double()  # (K, B·d_out)
        M = J @ J.T  # (K, K)
        v = J @ e.flatten().double()  # (K,)
        ridge = 1e-10 * float(torch.diagonal(M).max()) + 1e-30
        c = torch.linalg.solve(M + ridge * torch.eye(len(groups), dtype=M.dtype), v)
        return {p: float(ci) for ci, ps in zip(c, groups) for p in ps}

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        lin = [self.layers.get(m) for m in self.linears()]
        act = [self.acts.get(a) for a in self.rationals()]
        def cpu(t):
            return None if t is None else t.cpu()
        # the inverses too: they are refreshed every `inverse_every` updates, so a resumed run must not
        # recompute them from newer factors (it would drift from a straight run)
        return {"A": [cpu(f and f.A) for f in lin], "G": [cpu(f and f.G) for f in lin],
                "A_inv": [cpu(f and f.A_inv) for f in lin], "G_inv": [cpu(f and f.G_inv) for f in lin],
                "A_fresh": [f is not None and f.A_fresh for f in lin],
                "F": [cpu(f and f.F) for f in act], "updates": self.updates, "steps": self.steps,
                "inverted_at": self.inverted_at}

    def load_state_dict(self, state: dict) -> None:
        mods, acts = self.linears(), self.rationals()
        if len(state["A"]) != len(mods) or len(state["F"]) != len(acts):
            return  # another architecture: keep the fresh estimates from setup
        for m, A, G, Ai, Gi, fresh in zip(mods, state["A"], state["G"], state["A_inv"], state["G_inv"],
                                          state["A_fresh"]):
            if A is not None:
                f = LayerFactors(A.to(m.weight), G.to(m.weight))
                if f.fits(m):
                    self.layers[m] = f
                    if Ai is None:
                        self._invert_layer(f)
                    else:
                        f.A_inv, f.G_inv = Ai.to(m.weight), Gi.to(m.weight)
                        f.A_fresh = fresh
        for a, Fa in zip(acts, state["F"]):
            if Fa is not None and Fa.shape[0] == a.width:
                self.acts[a] = ActFactors(Fa.to(a.v))
        self.updates, self.steps, self.inverted_at = state["updates"], state["steps"], state["inverted_at"]


def sample_weights(e: Tensor) -> Tensor:
    """(N, d_out) output gradients -> (N,) 1/‖e_n‖² (0 where the gradient vanishes)."""
    n2 = e.pow(2).sum(1)
    return torch.where(n2 > 0, 1.0 / n2.clamp_min(1e-30), torch.zeros_like(n2))


def layer_factors(mod: Layer, x: Tensor, g: Tensor, w: Tensor, with_A: bool = True) -> tuple[Tensor | None, Tensor]:
    """Fresh factors of one layer from its input x and output gradient g, w (N,) the per-example weights.

    Linear: `linear_factors`. Conv2d (KFC, Grosse & Martens 2016): rows = (example n, output position p),
    a_np = [patch, 1] (C_in·kh·kw + 1), g_np (C_out); with L positions per example
        A = (1/(N·L)) Σ_{n,p} a aᵀ          mean over examples and positions
        G = (1/N)     Σ_{n,p} w_n g gᵀ      mean over examples, *sum* over positions
    KFC's Fisher block is L·Ā⊗Ḡ (both position means: spatially uncorrelated derivatives); the L is
    folded into G, so F ≈ A⊗G and every formula of the dense case (η, natural gradients of the real
    weight gradient Γ = Σ_p E_n[g aᵀ]) holds unchanged."""
    if isinstance(mod, nn.Linear):
        return linear_factors(x.flatten(1), g, w, with_A)
    n, L = x.shape[0], positions(g)
    gh = output_rows(g) * w.repeat_interleave(L).sqrt()[:, None]  # (N·L, C_out)
    G = gh.T @ gh / n
    if not with_A:
        return None, G
    a = with_ones(input_rows(x, mod))  # (N·L, D+1)
    return a.T @ a / (n * L), G


def linear_factors(x: Tensor, g: Tensor, w: Tensor, with_A: bool = True) -> tuple[Tensor | None, Tensor]:
    """x (N, d_in), g (N, d_out), w (N,) -> A = E[a aᵀ] (d_in+1)² (None unless with_A), G = E[w g gᵀ] (d_out)²."""
    n = x.shape[0]
    gh = g * w.sqrt()[:, None]
    if not with_A:
        return None, gh.T @ gh / n
    a = with_ones(x)
    return a.T @ a / n, gh.T @ gh / n


def act_param_sample_grads(act: Rational, x: Tensor, gy: Tensor) -> Tensor:
    """Per-sample gradients of (v, c, l): x, gy (N, width) input and output gradient -> (N, width, 3)."""
    return rational_param_grads(x, act.v, act.c, act.l).detach() * gy[..., None]


def act_factor(act: Rational, x: Tensor, gy: Tensor, w: Tensor) -> Tensor:
    """Diagonal normalised Fisher of (v, c, l): (width, 3)."""
    per = act_param_sample_grads(act, x, gy) * w.sqrt()[:, None, None]
    return per.pow(2).mean(0)


# --------------------------------------------------------------------------- the natural-gradient optimizer
class KFACNaturalGradient(torch.optim.Optimizer):
    """`senn`'s training steps: θ ← θ − lr·(c·t + wd·θ), t = F̂⁻¹∇ with the running K-FAC factors (Linear
    layers) and diagonal factors (Rational coefficients), plain gradient for anything else.

    c = Σ(Jt·e)/Σ(Jt·Jt) over the batch (e = per-sample output gradients, Jt = the outputs' change along
    t, forward mode over the step's own activations): the least-squares step length along t, the same
    rescaling the official code applies to its natural-gradient direction (`Jt_rescale`). Block-diagonal
    K-FAC directions overshoot when every layer fits the whole residual at once; c makes the step exact
    along t (one extra forward-mode pass per step), so lr is a fraction of that step, as the official
    lr 0.1 is of its CG natural-gradient step. CNNs get one c per layer (`KFACStats.layer_step_lengths`).

    It keeps no state per parameter (the curvature lives in `KFACStats`), so growth needs nothing from
    it; the two parameter groups mirror `growbench.optim.build_optimizer` (0: weights with decay,
    1: the rest) so the suite's schedule and `sync_optimizer` treat it like the shared optimizers."""

    def __init__(self, model: nn.Module, cfg: "OptimizerConfig", stats: KFACStats, lr_mul: float = 1.0) -> None:
        """lr_mul: the step is lr_mul × the group's (scheduled) lr, i.e. SENN's own peak lr / the suite's."""
        from growbench.optim import _group_index

        groups: list[list[nn.Parameter]] = [[], []]
        for p in model.parameters():
            groups[_group_index(p, cfg)].append(p)
        params = [{"params": groups[0], "weight_decay": cfg.weight_decay},
                  {"params": groups[1], "weight_decay": cfg.weight_decay if cfg.decay_norm_and_bias else 0.0}]
        super().__init__(params, {"lr": cfg.lr, "weight_decay": 0.0})
        self.stats = stats
        self.lr_mul = lr_mul

    @torch.no_grad()
    def step(self, closure: Callable | None = None):  # noqa: D102 (torch API)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}

        def apply(p: Tensor, d: Tensor) -> None:
            if id(p) not in group_of:  # not (yet) an optimized parameter
                return
            g = group_of[id(p)]
            if g["weight_decay"]:
                d = d + g["weight_decay"] * p
            p.add_(d, alpha=-g["lr"] * self.lr_mul)

        directions: dict[Tensor, Tensor] = {}  # parameter -> t (natural direction, else its gradient)
        if self.stats.model is not None:
            for mod in self.stats.linears():
                if mod.weight.grad is None:
                    continue
                nat = self.stats.natural_linear(mod, mod.weight.grad, None if mod.bias is None else mod.bias.grad)
                if nat is not None:
                    directions[mod.weight] = nat[0]
                    if mod.bias is not None and nat[1] is not None:
                        directions[mod.bias] = nat[1]
            for act in self.stats.rationals():
                ps = [act.v, act.c, act.l]
                if any(p.grad is None for p in ps):
                    continue
                nat = self.stats.natural_act(act, torch.stack([p.grad for p in ps], 1))
                if nat is not None:
                    for i, p in enumerate(ps):
                        directions[p] = nat[:, i]
        cnn = self.stats.model is not None and not hasattr(self.stats.model, "acts")
        plain = {}
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None and p not in directions:
                    # a CNN's BatchNorm γ, β (no Kronecker factors): a plain SGD step at the suite's lr, kept
                    # out of c (the least-squares length of the natural direction would rescale them wildly)
                    (plain if cnn else directions)[p] = p.grad
        for p, d in plain.items():
            g = group_of.get(id(p))
            if g is not None:
                p.add_(d + g["weight_decay"] * p if g["weight_decay"] else d, alpha=-g["lr"])
        if cnn:
            per = self.stats.layer_step_lengths(directions) or {}
            self.last_scale = per
            for p, d in directions.items():  # no length (tensors missing): no step, never an unscaled one
                apply(p, d * per.get(p, 0.0))
            return loss
        c = self.stats.step_length(directions) if self.stats.model is not None else None
        self.last_scale = 1.0 if c is None else c
        for p, d in directions.items():
            apply(p, d * self.last_scale)
        return loss


def natural_linears(stats: KFACStats | None, layers: list[nn.Module], Gamma: list[Tensor]
                    ) -> tuple[list[tuple[Tensor, Tensor | None] | None], float]:
    """Each layer's natural direction of its gradient Γ_j (d_out, d_in+1) (None without fitting factors) and
    η = Σ ⟨direction, Γ⟩, the natural expansion score of the network as it is."""
    out, eta = [], 0.0
    for j, mod in enumerate(layers):
        nat = None if stats is None else stats.natural_linear(mod, Gamma[j][:, :-1], Gamma[j][:, -1])
        out.append(nat)
        if nat is not None:
            eta += float((nat[0] * Gamma[j][:, :-1]).sum() + (nat[1] * Gamma[j][:, -1]).sum())
    return out, eta


# --------------------------------------------------------------------------- the statistics pass of a check
@dataclass
class Observation:
    """One statistics pass of an MLP on N examples (all per layer j of `model.linears`, float32):
    inputs x_j (N, d_in), per-sample output gradients g_j = ∂ℓ_n/∂y_j (N, d_out), residual gradients
    r_j (N, d_out: backprop of e − c·Jt), fresh factors A_j, G_j, the gradient Γ_j = E[g aᵀ] (d_out, d_in+1),
    per-sample weights w = 1/‖e‖², ‖dL‖² = E‖e‖², and η = Σ⟨Γ, natural direction⟩ with the running factors.

    A CNN's pass (`senn_conv.observe_net`) stores conv layers as rows (example, position), n-major:
    inputs x_j (N·L_j, C_in·kh·kw) unfolded patches, grads/residuals (N·L_j, C_out), `positions` L_j, and
    the raw input images of every layer in `images` (what candidate channels are computed from)."""

    n: int
    inputs: list[Tensor]
    grads: list[Tensor]
    residuals: list[Tensor]
    A: list[Tensor]
    G: list[Tensor]
    Gamma: list[Tensor]
    act_F: dict[int, Tensor]  # hidden index -> (width, 3) fresh diagonal factor of its Rational
    w: Tensor
    loss_sqnorm: float
    eta: float
    tangent: dict = field(default_factory=dict)  # "lin": [(TW, Tb)], "act": {i: (width, 3)}
    jt_coef: float = 0.0  # c of the residual e − c·Jt
    positions: list[int] = field(default_factory=list)  # L_j per layer (empty: all 1, an MLP)
    images: list[Tensor] = field(default_factory=list)  # CNN: input of every layer as the layer sees it


def mlp_forward(model: "MLP", X: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """The MLP's forward, keeping each linear's input x_j and output y_j (pre-activation)."""
    x = X.flatten(1)
    xs, ys = [], []
    for lin, act in zip(model.linears, model.acts):
        xs.append(x)
        y = lin(x)
        ys.append(y)
        x = act(y)
    xs.append(x)
    out = model.linears[-1](x)
    ys.append(out)
    return out, xs, ys


def _act_jvp(act: nn.Module, y: Tensor, dy: Tensor, dcoef: Tensor | None) -> Tensor:
    """Tangent of act(y) (N, width) for input tangent dy and (Rational) coefficient tangent dcoef (width, 3).
    Closed forms for Rational and ReLU (cheap: this runs in every `senn` step), torch.func otherwise."""
    if isinstance(act, Rational):
        v, c, l = act.v.detach(), act.c.detach(), act.l.detach()
        out = rational_dx(y, v, c, l) * dy
        if dcoef is not None:
            out = out + (rational_param_grads(y, v, c, l) * dcoef).sum(-1)
        return out
    if isinstance(act, nn.ReLU):
        return dy * (y > 0)
    return torch.func.jvp(act, (y,), (dy,))[1]


def observe(model: "MLP", loss_fn: Callable, X: Tensor, Y: Tensor, stats: KFACStats | None,
            tangent: dict | None = None, pure_kfac: bool = False, residual: bool = True) -> Observation:
    """The statistics pass of an expansion check (the spec's `kfac_observe`).

    1. forward; e_n = ∂ℓ_n/∂f_n; backward of e gives g_j, the fresh factors and the gradient Γ_j;
    2. stale running factors (a grown layer) are replaced by these fresh ones;
    3. tangent t = the natural-gradient direction of Γ under the running factors (unless given, or zero
       with `pure_kfac`); η = ⟨Γ, t⟩;
    4. Jt = forward-mode derivative of the outputs along t; c = Σ(Jt·e)/Σ(Jt·Jt); r_j = backprop of e − c·Jt.
    A CNN goes to `senn_conv.observe_net` (the same steps with KFC factors, BatchNorm in eval mode).
    """
    if not hasattr(model, "linears"):
        from growbench.methods.senn_conv import observe_net

        return observe_net(model, loss_fn, X, Y, stats, tangent, pure_kfac, residual)
    was = None if stats is None else stats.recording
    if stats is not None:
        stats.recording = False
    try:
        with torch.enable_grad():
            out, xs, ys = mlp_forward(model, X)
            total = loss_fn(out, Y) * X.shape[0]  # Σ_n ℓ_n with ℓ_n the suite's per-sample loss
            (e,) = torch.autograd.grad(total, out, retain_graph=True)
            hidden_outs = xs[1:len(model.acts) + 1]  # act outputs (inputs of the next linear)
            grads = torch.autograd.grad(out, ys + hidden_outs, grad_outputs=e, retain_graph=residual)
        n = X.shape[0]
        e = e.detach()
        g_lin = [g.detach() for g in grads[:len(ys)]]
        g_act = [g.detach() for g in grads[len(ys):]]
        xs = [x.detach() for x in xs]
        w = sample_weights(e)
        A, G, Gamma = [], [], []
        for j, lin in enumerate(model.linears):
            Aj, Gj = linear_factors(xs[j], g_lin[j], w)
            A.append(Aj)
            G.append(Gj)
            Gamma.append(g_lin[j].T @ with_ones(xs[j]) / n)  # (d_out, d_in+1): gradient of the mean loss
        act_F, act_grad = {}, {}
        for i, act in enumerate(model.acts):
            if isinstance(act, Rational):
                y = ys[i].detach()
                act_F[i] = act_factor(act, y, g_act[i], w)
                act_grad[i] = act_param_sample_grads(act, y, g_act[i]).mean(0)  # (width, 3)
        if stats is not None:
            fresh = {}
            stale = set(stats.stale())
            for j, lin in enumerate(model.linears):
                if lin in stale:
                    fresh[lin] = (A[j], G[j])
            for i, act in act_grad_items(model):
                if act in stale:
                    fresh[act] = (act_F[i],)
            stats.refresh(fresh)
        # 3. tangent and η
        lin_nat, eta = natural_linears(stats, model.linears, Gamma)
        natural = {"lin": lin_nat, "act": {}}
        for i, act in act_grad_items(model):
            nat = None if stats is None else stats.natural_act(act, act_grad[i])
            if nat is not None:
                natural["act"][i] = nat
                eta += float((nat * act_grad[i]).sum())
        if tangent is None:
            tangent = {"lin": [None] * len(model.linears), "act": {}} if pure_kfac else natural
        residuals: list[Tensor] = []
        c = 0.0
        if residual:
            jt = _jvp_outputs(model, xs, ys, tangent)  # (N, d_out)
            if jt is None:
                lres = e
            else:
                c = float((jt * e).sum() / ((jt * jt).sum() + 1e-10))
                lres = e - c * jt
            with torch.enable_grad():
                rs = torch.autograd.grad(out, ys, grad_outputs=lres)
            residuals = [r.detach() for r in rs]
        return Observation(n=n, inputs=xs, grads=g_lin, residuals=residuals, A=A, G=G, Gamma=Gamma, act_F=act_F, w=w,
                           loss_sqnorm=float(e.pow(2).sum(1).mean()), eta=eta, tangent=tangent, jt_coef=c)
    finally:
        if stats is not None:
            stats.recording = was


def act_grad_items(model: "MLP") -> list[tuple[int, Rational]]:
    return [(i, a) for i, a in enumerate(model.acts) if isinstance(a, Rational)]


@torch.no_grad()
def _jvp_outputs(model: "MLP", xs: list[Tensor], ys: list[Tensor], tangent: dict) -> Tensor | None:
    """J·t of the outputs (N, d_out), forward mode layer by layer; None when t is zero."""
    lin_t, act_t = tangent["lin"], tangent["act"]
    if all(t is None for t in lin_t) and not act_t:
        return None
    dx = torch.zeros_like(xs[0])
    n_hidden = len(model.acts)
    for j, lin in enumerate(model.linears):
        dy = dx @ lin.weight.T
        if lin_t[j] is not None:
            TW, Tb = lin_t[j]
            dy = dy + xs[j] @ TW.T + (0 if Tb is None else Tb)
        if j < n_hidden:
            dx = _act_jvp(model.acts[j], ys[j].detach(), dy, act_t.get(j))
        else:
            return dy
    return None
