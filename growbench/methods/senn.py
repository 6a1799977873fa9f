"""`senn` and `senn-sgd`: Self-Expanding Neural Networks (Mitchell, Menzenbach, Kersting & Mundt,
arXiv 2307.04526) with the natural expansion score. Spec and decisions: docs/methods/senn.md.

The score: η = ḡᵀF⁻¹ḡ, how much a natural-gradient step could still reduce the loss, with a
Kronecker-factored Fisher per layer (A = E[aaᵀ], G = E[ĝĝᵀ], damped; see `senn_kfac`). The running
factors are kept by `after_step` (charged as growth overhead); `senn` also trains with them
(natural-gradient steps, `KFACNaturalGradient`), `senn-sgd` trains with the suite's optimizer.

One expansion check (on the shared growth schedule; the spec's `evo.cooldown` epochs map to
`growth.every_epochs`):
  1. statistics pass on `stats_examples` training examples and a validation pass on another draw:
     per-layer inputs, fresh factors, the residual output gradients r (e − c·Jt backpropagated, t = the
     current natural-gradient direction, then the layer's existing inputs regressed out);
  2. for every hidden layer with room: P candidate units h = φ(w·x + b) (rational φ with their own
     (v, c, l)) scored by the lower bound Δη = tr(Cᵀ A_h⁻¹ C G⁻¹), C = E[h rᵀ], and improved by gradient
     ascent; the best is re-scored on the validation pass and accepted when
     Δη_val/η_layer_val > τ and Δη/‖dL‖² > abs_thresh;
  3. for every hidden layer (if depth is allowed): P_L candidate layers h = φ(B·a + s), the same score,
     divided by `layer_cost_mul`; accepted layers are inserted at identity (rational φ at (0, 0, 1),
     kernel B, the next layer multiplied by B⁻¹), then `layer_cooldown` checks without depth;
  4. the eligible proposal with the largest ratio is applied (one unit, or one layer); with `recursive`
     everything is recomputed and the next one applied, at most `max_additions_per_check` times.
New units have zero outgoing weights and a new layer is an exact identity, so the function is unchanged.

Decisions where the spec is open (details and reasons in docs/methods/senn.md): the Fisher is the official
normalised one (G from e/‖e‖), with the bias inside A; `senn` steps along K-FAC directions rescaled by the
official least-squares coefficient c (so its lr is a fraction of that step); the ascent runs on log Δη and
undoes failed steps (Δη never decreases); the best candidate is re-scored on an independent draw
(`validation_examples`, not the whole training set); depth only after the last hidden layer by default; the
recursion is bounded; Theorem 3.1 is read with α = abs_thresh and λ = 1 (normalised Fisher).

Conv (the vgg family; `senn_conv`): KFC factors (Grosse & Martens 2016) for every conv — A from unfolded
input patches with a bias 1 (mean over examples and positions), G from the per-position output gradients
(summed over positions, so F ≈ A⊗G) — for the score, the running factors and `senn`'s natural-gradient
steps (the classifier stays a Linear). Width only: a candidate channel is a filter (+ bias) on the layer's
input patches through the family's ReLU (no rational activation: VGG has one shared ReLU), scored by what
it adds to the next conv's unfolded patches (kh·kw features per row) or, after the last conv, to the
classifier's pooled input; its BatchNorm channel is set so that it computes the scored relu(w·u + b)
at unit scale in eval mode (statistics passes run BatchNorm in eval mode). Our decisions: depth proposals
and the `activation` setting are ignored for vgg (not implemented), BatchNorm parameters are trained with
their plain gradient in `senn`, and the resnet family is refused (config check and setup).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar

import torch
from torch import Tensor, nn

from growbench.methods.base import GrowthEvent, GrowthMethod
from growbench.methods.senn_conv import ConvCandidates, channel_moments
from growbench.methods.senn_kfac import (KFACNaturalGradient, KFACStats, Observation, damped, observe, with_ones)
from growbench.models.activations import Rational, rational, rational_with_grads

if TYPE_CHECKING:
    from growbench.models.mlp import MLP
    from growbench.trainer import Context


# --------------------------------------------------------------------------- settings
@dataclass
class SennSettings:
    """Defaults: the official MNIST configuration (experiment 3) where it has one; see docs/methods/senn.md."""

    tau: float = 0.007  # evo.thresh: accept when Δη_val / η_layer_val > tau
    abs_thresh: float = 0.25  # evo.abs_thresh: ... and Δη / ‖dL‖² > abs_thresh (width)
    layer_abs_thresh: float | None = None  # also require it of depth proposals (official code: not applied)
    layer_cost_mul: float = 60.0  # evo.layer_cost_mul: depth scores are divided by this
    layer_cooldown: int = 1  # evo.layer_cooldown: checks (this one included) without depth after an insertion
    recursive: bool = True  # evo.recursive: keep adding while proposals pass
    max_additions_per_check: int = 16  # bound on the recursion (the official loop has none)
    proposals: int = 100  # evo.proposals_per_layer (exp. 1/4: 100, exp. 3: 10000)
    layer_proposals: int = 100  # evo.layer_proposals_per_layer
    ascent_steps: int = 300  # gradient-ascent steps on each candidate (official code: 300)
    ascent_lr: float = 0.3  # initial step ε, divided by 3 whenever a step does not increase Δη
    logdet_reg: float = 1e-2  # pulls log det(WWᵀ) of the candidate's in-weights towards 0 (non-degenerate)
    depth: bool = True  # consider inserting layers
    depth_positions: str = "last"  # last: only after the last hidden layer (the official slots) | all
    max_hidden_layers: int = 3  # depth stops here (exp. 3: three hidden-layer slots)
    depth_basis: str = "optimised"  # optimised: the new layer's kernel is the best candidate's B | identity
    basis_floor: float = 1e-3  # singular values of B clipped below at basis_floor·mean (make_invertible)
    pure_kfac: bool = False  # evo.pure_kfac: residual = raw gradient (no natural-gradient step removed)
    activation: str = "rational"  # rational: hidden activations become SENN's rational ones | keep
    stats_examples: int = 1024  # statistics pass (official: one training batch of 1024)
    validation_examples: int = 4096  # re-scoring pass (official: the whole training set); 0 = reuse stats pass
    damping: float = 0.1  # Tikhonov relative to mean diag, on G (score) and on A and G (running factors)
    a_damping: float = 1e-4  # relative Tikhonov on A in the score (official: pinv)
    factor_decay: float = 0.95  # EMA of the running factors
    factor_every: int = 1  # training steps between updates of the running factors
    inverse_every: int = 10  # factor updates between re-inversions (senn; senn-sgd inverts at checks only)

    _method: ClassVar[str] = "senn"

    def __post_init__(self) -> None:
        from growbench.config import ConfigError

        where = f"method_settings.{self._method}"
        if self.depth_basis not in ("optimised", "identity"):
            raise ConfigError(f"{where}.depth_basis: unknown value {self.depth_basis!r}; valid: optimised, identity")
        if self.activation not in ("rational", "keep"):
            raise ConfigError(f"{where}.activation: unknown value {self.activation!r}; valid: rational, keep")
        if self.depth_positions not in ("last", "all"):
            raise ConfigError(f"{where}.depth_positions: unknown value {self.depth_positions!r}; valid: last, all")
        for key in ("proposals", "layer_proposals", "stats_examples", "max_additions_per_check", "inverse_every",
                    "max_hidden_layers", "factor_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{where}.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("tau", "abs_thresh", "layer_cooldown", "ascent_steps", "logdet_reg", "validation_examples",
                    "damping", "a_damping", "basis_floor"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{where}.{key} must be >= 0, got {getattr(self, key)}")
        if self.layer_cost_mul <= 0 or self.ascent_lr <= 0 or not 0 <= self.factor_decay < 1:
            raise ConfigError(f"{where}: layer_cost_mul and ascent_lr must be > 0 and factor_decay in [0, 1)")


@dataclass
class SennNaturalSettings(SennSettings):
    # peak natural-gradient step, as a fraction of the least-squares step along the natural direction
    # (see KFACNaturalGradient), under the suite's schedule; None: the suite's optimizer.lr
    lr: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lr is not None and self.lr <= 0:
            from growbench.config import ConfigError

            raise ConfigError(f"method_settings.{self._method}.lr must be > 0, got {self.lr}")


@dataclass
class SennSgdSettings(SennSettings):
    _method: ClassVar[str] = "senn-sgd"


def theorem_bound(tau: float, alpha: float, lam: float = 1.0) -> float:
    """Theorem 3.1: additions between two convergence points N < 1 + (ln λ − ln α)/ln(1+τ). With the
    normalised Fisher η/‖dL‖² ≤ λ = 1 for an exact layer block, and α = abs_thresh (the first addition
    needs Δη/‖dL‖² > α, every later one multiplies the layer's η by more than 1+τ)."""
    return 1.0 + (math.log(lam) - math.log(alpha)) / math.log1p(tau)


# --------------------------------------------------------------------------- scoring
CONV_CHUNK = 8  # conv candidates per autograd pass: their unfolded features are P·N·L·kh·kw floats
@dataclass
class Target:
    """What candidates at hidden position i are scored against: the layer j = i+1 that receives them.
    Rows are examples, or (example, position) pairs of a conv layer (then n = N·L)."""

    R: Tensor  # (n, d_out) residual gradients, existing inputs regressed out, whitened: L·r·U⁻ᵀ with Ĝ = UUᵀ
    delta: float  # damping of the candidates' second moment (that of Â_j, so the bound stays a bound)
    eta_layer: float  # tr(Γ Â⁻¹ Γᵀ Ĝ⁻¹) of layer j
    loss_sqnorm: float  # ‖dL‖² = E‖e‖²
    n: int


def make_target(obs: Observation, j: int, s: SennSettings) -> Target:
    """Regress [x_j, 1] out of the residual r_j (the spec's `layer_residual`) and whiten it by Ĝ_j.

    Conv layer j (rows = (example, position), L positions): A is a mean over rows, G a sum over positions
    (`layer_factors`) and a new input's gradient Σ_p E_n[g hᵀ] = L·E_rows[g hᵀ], so with R scaled by L the
    row-wise score tr(Cᵀ A_h⁻¹ C) (C = E_rows[h Rᵀ]) is the same Schur-complement bound as for a Linear."""
    a = with_ones(obs.inputs[j]).double()  # (n, d_in+1), n = N·L
    n = a.shape[0]
    L = obs.positions[j] if obs.positions else 1
    A = obs.A[j].double()
    delta = max(s.a_damping * float(torch.diagonal(A).mean()), 1e-12)
    A_hat = A + delta * torch.eye(A.shape[0], dtype=A.dtype)
    r = obs.residuals[j].double()  # (n, d_out)
    r = r - a @ torch.linalg.solve(A_hat, a.T @ r / n)
    G_hat = damped(obs.G[j].double(), s.damping)
    U = torch.linalg.cholesky(G_hat)
    R = torch.linalg.solve_triangular(U, r.T, upper=False).T * L  # (n, d_out)
    Gam = obs.Gamma[j].double()  # (d_out, d_in+1)
    eta_layer = float((torch.linalg.solve(A_hat, Gam.T).T * torch.cholesky_solve(Gam, U)).sum())
    return Target(R.to(obs.inputs[j].dtype), delta, eta_layer, obs.loss_sqnorm, n)


def candidate_features(x: Tensor, W: Tensor, b: Tensor, coef: Tensor | None, act: nn.Module | None) -> Tensor:
    """x (N, d_in); W (P, k, d_in); b (P, k); coef (P, k, 3) -> H (P, N, k) = φ(x Wᵀ + b)."""
    Z = torch.einsum("nd,pkd->pnk", x, W) + b[:, None, :]
    if coef is None:
        return act(Z)
    return rational(Z, coef[:, None, :, 0], coef[:, None, :, 1], coef[:, None, :, 2])


def score(H: Tensor, t: Target) -> Tensor:
    """Δη = tr(Cᵀ (A_h + δI)⁻¹ C Ĝ⁻¹) per candidate: H (P, N, k) -> (P,). Ĝ⁻¹ is inside t.R."""
    C = torch.einsum("pnk,no->pko", H, t.R) / t.n  # (P, k, d_out)
    k = H.shape[2]
    if k == 1:
        Ah = H.pow(2).mean(1)[:, 0] + t.delta  # (P,)
        return C.pow(2).sum((1, 2)) / Ah
    Ah = torch.einsum("pnk,pnl->pkl", H, H) / t.n + t.delta * torch.eye(k, dtype=H.dtype)
    L, _ = torch.linalg.cholesky_ex(Ah)
    return (C * torch.cholesky_solve(C, L)).sum((1, 2))


def logdet_gram(W: Tensor) -> tuple[Tensor, Tensor]:
    """ld = log det(W Wᵀ) per candidate (P,), the official regulariser's log det(LᵀL) of the kernel, and its
    gradient 2 (W Wᵀ)⁻¹ W (P, k, d_in), in closed form."""
    gram = W @ W.transpose(1, 2)  # (P, k, k)
    if W.shape[1] == 1:
        return torch.log(gram[:, 0, 0]), 2.0 * W / gram
    return torch.linalg.slogdet(gram)[1], 2.0 * torch.linalg.solve(gram, W)


def _unit_score_grads(x: Tensor, t: Target, W: Tensor, b: Tensor, coef: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Δη and ∇log Δη of single rational units in closed form (the hot path: P candidates × steps).
    x (N, d); W (P, 1, d); b (P, 1); coef (P, 1, 3) -> Δη (P,), [∇W, ∇b, ∇coef]."""
    n = x.shape[0]
    v, c, l = coef[:, 0, 0], coef[:, 0, 1], coef[:, 0, 2]  # (P,)
    z = torch.addmm(b[:, 0], x, W[:, 0, :].T)  # (N, P)
    h, dh, parts = rational_with_grads(z, v, c, l)
    C = h.T @ t.R  # (P, d_out), times N
    c2 = C.pow(2).sum(1)  # (P,)
    Ah = h.pow(2).mean(0) + t.delta
    val = c2 / (Ah * (n * n))
    # ∂ log Δη / ∂h_np = (2/N) [R_n·C̄_p / ‖C̄_p‖² − h_np / Ah_p] with C̄ = C/N
    gh = t.R @ (C * (2.0 / c2.clamp_min(1e-30))[:, None]).T - h * (2.0 / (n * Ah))  # (N, P)
    gz = gh * dh
    gW = (gz.T @ x)[:, None, :]
    gb = gz.sum(0)[:, None]
    gcoef = torch.stack([(gh * part).sum(0) for part in parts], 1)[:, None, :]
    return val, [gW, gb, gcoef]


def ascend(x: Tensor, t: Target, W: Tensor, b: Tensor, coef: Tensor | None, act: nn.Module | None,
           steps: int, lr: float, reg: float, features: Callable | None = None,
           chunk: int = 0) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """Gradient ascent on each candidate's Δη (batched over P). A step is ε·∇log Δη (scale-free: Δη is in
    units of ‖dL‖²) minus reg·ld·∇ld (ld = log det WWᵀ); a step that does not increase Δη is undone and
    its ε divided by 3, so Δη never decreases. Returns the improved (W, b, coef) and their Δη (P,).
    features(W, b, coef) -> H (P, rows, k): the candidates' features (default: φ(x Wᵀ + b), dense);
    chunk: candidates per autograd pass (0: all; bounds the memory of conv features)."""
    P = W.shape[0]
    feats = features or (lambda W_, b_, c_: candidate_features(x, W_, b_, c_, act))

    def evaluate(W, b, coef):
        if coef is not None and W.shape[1] == 1 and features is None:
            val, grads = _unit_score_grads(x, t, W, b, coef)
            return (val, grads, *logdet_gram(W))
        vals, grads = [], []
        step = chunk or P
        for lo in range(0, P, step):
            sl = slice(lo, lo + step)
            ps = [p[sl].detach().requires_grad_(True) for p in (W, b) + ((coef,) if coef is not None else ())]
            with torch.enable_grad():
                val = score(feats(ps[0], ps[1], ps[2] if coef is not None else None), t)
                obj = torch.log(val.clamp_min(1e-30)).sum()
                grads.append(torch.autograd.grad(obj, ps))
            vals.append(val.detach())
        ld, gld = logdet_gram(W)
        return torch.cat(vals), [torch.cat(g) for g in zip(*grads)], ld, gld

    params = [W, b] + ([coef] if coef is not None else [])
    best, grads, ld, gld = evaluate(*params, *([] if coef is not None else [None]))
    eps = torch.full((P,), lr)
    for _ in range(steps):
        shape = (P,) + (1,) * 2
        trial = [p + eps.view(P, *([1] * (p.dim() - 1))) * g for p, g in zip(params, grads)]
        trial[0] = trial[0] - reg * ld.view(shape) * gld
        val, tgrads, tld, tgld = evaluate(*trial, *([] if coef is not None else [None]))
        up = val > best
        for i, p in enumerate(params):
            m = up.view(P, *([1] * (p.dim() - 1)))
            params[i] = torch.where(m, trial[i], p)
            grads[i] = torch.where(m, tgrads[i], grads[i])
        ld = torch.where(up, tld, ld)
        gld = torch.where(up.view(shape), tgld, gld)
        best = torch.where(up, val, best)
        eps = torch.where(up, eps, eps / 3)
        if bool((eps < lr * 1e-6).all()):
            break
    W, b = params[0], params[1]
    return W, b, (params[2] if coef is not None else None), best


def make_invertible(W: Tensor, floor: float) -> Tensor:
    """Clip the singular values of a square kernel below at floor·mean (the official `make_invertible`)."""
    U, S, Vh = torch.linalg.svd(W.double())
    S = S.clamp_min(floor * float(S.mean()))
    return (U @ torch.diag(S) @ Vh).to(W.dtype)


@dataclass
class Proposal:
    kind: str  # width | depth
    position: int  # hidden index i: width adds to fc_i, depth inserts right after fc_i
    W: Tensor  # (k, d_in) in-weights in nn.Linear orientation
    b: Tensor  # (k,)
    coef: Tensor | None  # (k, 3) rational (v, c, l); None: the layer's own (non-rational) activation
    delta_eta: float  # Δη on the statistics pass (best candidate)
    delta_eta_val: float  # Δη on the validation pass
    eta_layer: float
    eta_layer_val: float
    loss_sqnorm: float
    eligible: bool = False
    key: float = 0.0  # the ranking numerator: Δη (width) or Δη_val/layer_cost_mul (depth)
    moments: tuple[float, float] | None = None  # conv: mean, variance of the new channel's w·u (its BN init)

    def info(self, eta: float) -> dict:
        cost = self.key
        return {"kind": self.kind, "position": self.position, "delta_eta": self.delta_eta,
                "delta_eta_val": self.delta_eta_val, "eta_layer": self.eta_layer, "eta_layer_val": self.eta_layer_val,
                "loss_sqnorm": self.loss_sqnorm, "eta": eta, "ratio": 1.0 + cost / eta if eta > 0 else None,
                "eligible": self.eligible}


# --------------------------------------------------------------------------- the method
class Senn(GrowthMethod):
    """SENN trained as the paper does: natural-gradient steps through the running Kronecker factors
    (`configure_optimizer`), growth by the natural expansion score. MLP and VGG (width only) families."""

    name: ClassVar[str] = "senn"
    families: ClassVar[tuple[str, ...]] = ("mlp", "vgg")  # vgg: KFC factors, width only (docs); no resnet
    Settings: ClassVar[type] = SennNaturalSettings
    natural_gradient: ClassVar[bool] = True

    def __init__(self, settings=None, growth=None) -> None:
        super().__init__(settings, growth)
        self._stats: KFACStats | None = None
        self.layer_cooldown = 0
        self.checks = 0
        self.check_log: list[dict] = []  # per check: the best proposal of each kind and position, per round

    # ---------------------------------------------------------------- hooks
    def _new_stats(self) -> KFACStats:
        """Running factors; only the natural-gradient optimizer needs inverses between checks."""
        s = self.settings
        return KFACStats(decay=s.factor_decay, damping=s.damping, every=s.factor_every,
                         inverse_every=s.inverse_every if self.natural_gradient else 0)

    def configure_optimizer(self, model, cfg):
        if not self.natural_gradient:
            return None
        self._stats = self._new_stats()
        lr = getattr(self.settings, "lr", None)
        return KFACNaturalGradient(model, cfg, self._stats, 1.0 if lr is None else lr / cfg.lr)

    def setup(self, model: "MLP", ctx: "Context") -> None:
        from growbench.config import ConfigError
        from growbench.models.mlp import MLP
        from growbench.models.vgg import VGG

        if not isinstance(model, (MLP, VGG)):
            raise ConfigError(f"method {self.name}: only the mlp and vgg families are supported (got {model.family}); "
                              "see docs/methods/senn.md")
        # vgg: its shared ReLU stays (no per-unit activation to grow); `activation` and `depth` apply to MLPs
        if self.settings.activation == "rational" and isinstance(model, MLP):
            for i, act in enumerate(model.acts):
                if not isinstance(act, Rational):
                    w = model.linears[i].out_features
                    model.acts[i] = Rational(w, generator=ctx.generator).to(model.linears[i].weight.device)
                    model.act_names[i] = "rational"
        if self._stats is None:
            self._stats = self._new_stats()
        self._stats.attach(model)
        X, Y = self._draw(ctx, self.settings.stats_examples)
        observe(model, ctx.loss_fn, X, Y, self._stats, residual=False)  # initial running factors

    def after_step(self, model, ctx) -> None:
        self._stats.update()

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["kfac"] = None if self._stats is None else self._stats.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        kfac = state.pop("kfac", None)
        super().load_state_dict(state)
        if kfac is not None and self._stats is not None:
            self._stats.load_state_dict(kfac)

    # ---------------------------------------------------------------- growth
    @staticmethod
    def _draw(ctx: "Context", n: int) -> tuple[Tensor, Tensor]:
        xs, ys = zip(*ctx.batches(n))
        return torch.cat(xs), torch.cat(ys)

    def grow(self, model: "MLP", ctx: "Context") -> list[GrowthEvent]:
        s = self.settings
        X, Y = self._draw(ctx, s.stats_examples)
        XV, YV = (X, Y) if s.validation_examples == 0 else self._draw(ctx, s.validation_examples)
        self.checks += 1
        events: list[GrowthEvent] = []
        log = {"step": ctx.step, "rounds": []}
        depth_rejected: set[int] = set()  # positions whose depth proposal failed this check (see docs)
        changed = False
        for rnd in range(s.max_additions_per_check):
            obs = observe(model, ctx.loss_fn, X, Y, self._stats, pure_kfac=s.pure_kfac)
            obs_val = obs if XV is X else observe(model, ctx.loss_fn, XV, YV, self._stats, tangent=obs.tangent)
            changed = False
            props = self._proposals(model, ctx, obs, obs_val, depth_rejected)
            log["rounds"].append([p.info(obs.eta) for p in props])
            ok = [p for p in props if p.eligible]
            if not ok:
                break
            best = max(ok, key=lambda p: p.key)
            events.append(self._apply(model, ctx, best, X, obs.eta, rnd))
            changed = True
            if not s.recursive:
                break
        if changed:  # running factors of the grown layers from the statistics set
            observe(model, ctx.loss_fn, X, Y, self._stats, residual=False)
        if self.layer_cooldown > 0:
            self.layer_cooldown -= 1
        self.check_log.append(log)
        return events

    def _proposals(self, model: "MLP", ctx: "Context", obs: Observation, obs_val: Observation,
                   depth_rejected: set[int]) -> list[Proposal]:
        s = self.settings
        props = []
        hidden = model.hidden_layers()
        conv = model.family != "mlp"  # conv families: width only (depth proposals are not implemented)
        depth_ok = s.depth and not conv and self.layer_cooldown <= 0 and len(hidden) < s.max_hidden_layers
        depth_at = range(len(hidden)) if s.depth_positions == "all" else [len(hidden) - 1]
        for i, h in enumerate(hidden):
            t, tv = make_target(obs, i + 1, s), make_target(obs_val, i + 1, s)
            if ctx.room(h.name) > 0:
                width = self._width_conv if conv else self._width
                props.append(width(h, i, obs, obs_val, t, tv, ctx.generator))
            if depth_ok and i in depth_at and i not in depth_rejected:
                p = self._depth(i, obs, obs_val, t, tv, ctx.generator)
                if not p.eligible:
                    depth_rejected.add(i)
                props.append(p)
        return props

    def _width(self, h, i: int, obs: Observation, obs_val: Observation, t: Target, tv: Target,
               gen: torch.Generator) -> Proposal:
        """The best of `proposals` candidate units for hidden layer i (the spec's consider_adding_width)."""
        s = self.settings
        x = obs.inputs[i]
        P, d = s.proposals, x.shape[1]
        W = torch.randn(P, 1, d, generator=gen) / math.sqrt(d)  # lecun normal, as the official DDense
        b = torch.randn(P, 1, generator=gen)
        rat = isinstance(h.act, Rational)
        coef = torch.randn(P, 1, 3, generator=gen) if rat else None
        W, b, coef, val = ascend(x, t, W.to(x), b.to(x), None if coef is None else coef.to(x), h.act,
                                 s.ascent_steps, s.ascent_lr, s.logdet_reg)
        k = int(val.argmax())
        Wk, bk, ck = W[k:k + 1], b[k:k + 1], (None if coef is None else coef[k:k + 1])
        v = float(score(candidate_features(obs_val.inputs[i], Wk, bk, ck, h.act), tv)[0])
        p = Proposal("width", i, Wk[0], bk[0], None if ck is None else ck[0], float(val[k]), v,
                     t.eta_layer, tv.eta_layer, t.loss_sqnorm)
        p.eligible = (v > s.tau * tv.eta_layer) and (p.delta_eta > s.abs_thresh * t.loss_sqnorm)
        p.key = p.delta_eta
        return p

    def _width_conv(self, h, i: int, obs: Observation, obs_val: Observation, t: Target, tv: Target,
                    gen: torch.Generator) -> Proposal:
        """The best of `proposals` candidate channels for conv hidden layer i: a filter w (+ bias b) on the
        layer's input patches through its activation, h = relu(w·u + b), scored by what it adds to the
        consumer's input patches (`senn_conv.ConvCandidates`); the same ascent and acceptance rule."""
        s = self.settings
        x = obs.images[i]  # (N, C_in, H, W)
        P, d = s.proposals, h.inp.weight[0].numel()
        W = torch.randn(P, 1, d, generator=gen) / math.sqrt(d)  # lecun normal on the patch
        b = torch.randn(P, 1, generator=gen)
        feats = ConvCandidates(h, x)
        W, b, _, val = ascend(x, t, W.to(x), b.to(x), None, h.act, s.ascent_steps, s.ascent_lr, s.logdet_reg,
                              features=feats, chunk=CONV_CHUNK)
        k = int(val.argmax())
        Wk, bk = W[k:k + 1], b[k:k + 1]
        v = float(score(ConvCandidates(h, obs_val.images[i])(Wk, bk), tv)[0])
        p = Proposal("width", i, Wk[0].reshape(1, *h.inp.weight.shape[1:]), bk[0], None, float(val[k]), v,
                     t.eta_layer, tv.eta_layer, t.loss_sqnorm)
        p.eligible = (v > s.tau * tv.eta_layer) and (p.delta_eta > s.abs_thresh * t.loss_sqnorm)
        p.key = p.delta_eta
        p.moments = channel_moments(x, h.inp, Wk)
        return p

    def _depth(self, i: int, obs: Observation, obs_val: Observation, t: Target, tv: Target,
               gen: torch.Generator) -> Proposal:
        """The best of `layer_proposals` candidate layers right after hidden layer i (consider_inserting_layer)."""
        s = self.settings
        x = obs.inputs[i + 1]  # the input of the layer the new one would feed: (N, d)
        P, d = s.layer_proposals, x.shape[1]
        W = torch.randn(P, d, d, generator=gen) / math.sqrt(d)
        b = torch.randn(P, d, generator=gen)
        coef = torch.randn(P, d, 3, generator=gen)
        W, b, coef, val = ascend(x, t, W.to(x), b.to(x), coef.to(x), None, s.ascent_steps, s.ascent_lr,
                                 s.logdet_reg)
        k = int(val.argmax())
        Wk = make_invertible(W[k], s.basis_floor)[None]
        bk, ck = b[k:k + 1], coef[k:k + 1]
        v = float(score(candidate_features(obs_val.inputs[i + 1], Wk, bk, ck, None), tv)[0])
        p = Proposal("depth", i, Wk[0], bk[0], ck[0], float(val[k]), v, t.eta_layer, tv.eta_layer, t.loss_sqnorm)
        adjusted = v / s.layer_cost_mul
        p.eligible = adjusted > s.tau * tv.eta_layer
        if s.layer_abs_thresh is not None:
            p.eligible = p.eligible and p.delta_eta / s.layer_cost_mul > s.layer_abs_thresh * t.loss_sqnorm
        p.key = adjusted
        return p

    @torch.no_grad()
    def _apply(self, model: "MLP", ctx: "Context", p: Proposal, X: Tensor, eta: float, rnd: int) -> GrowthEvent:
        s = self.settings
        h = model.hidden_layers()[p.position]
        extra = {k: v for k, v in p.info(eta).items() if k not in ("kind", "position", "eligible")}
        extra.update(check=self.checks, round=rnd)
        if p.kind == "width":
            O = h.out.weight  # (d_out, d_in) or (C_out, C, kh, kw): the new unit's column stays zero
            w_out = torch.zeros(O.shape[0], 1, *O.shape[2:], device=O.device, dtype=O.dtype)
            bn = self.bn_channel(h.bn, p) if h.bn is not None and p.moments is not None else None
            # W (1, d_in) | (1, C_in, kh, kw), b (1,)
            model.add_units(h.name, p.W, p.b, w_out, act_init=p.coef, bn_init=bn)
            return GrowthEvent(where=h.name, kind="add", units_added=1, predicted_loss_change=0.0, extra=extra)
        probe = X[:256]
        before = model(probe)
        cap = getattr(h.inp, "growbench_max_width", None)
        new = model.insert_identity_layer(h.name, activation="rational")
        lin, nxt = model.linears[p.position + 1], model.linears[p.position + 2]
        if cap is not None:
            lin.growbench_max_width = cap  # an inserted layer may grow as far as the layer it copies
        basis = "identity"
        if s.depth_basis == "optimised":
            O, ob = nxt.weight.detach().clone(), nxt.bias.detach().clone()
            B, sh = p.W.double(), p.b.double()
            B_inv = torch.linalg.pinv(B)
            lin.weight.copy_(B)
            lin.bias.copy_(sh)
            O2 = O.double() @ B_inv  # y = O x + ob with x = B z + s  ->  O B⁻¹ (B z + s) + ob − O B⁻¹ s
            nxt.weight.copy_(O2)
            nxt.bias.copy_(ob.double() - O2 @ sh)
            err = float((model(probe) - before).abs().max() / (before.abs().max() + 1e-12))
            if err > 1e-4:  # an ill-conditioned basis would change the function: fall back to the identity
                lin.weight.copy_(torch.eye(lin.in_features))
                lin.bias.zero_()
                nxt.weight.copy_(O)
                nxt.bias.copy_(ob)
            else:
                basis = "optimised"
        self._stats.attach(model)
        self.layer_cooldown = s.layer_cooldown
        extra.update(after=h.name, basis=basis)
        return GrowthEvent(where=new, kind="insert", units_added=lin.out_features, predicted_loss_change=0.0,
                           extra=extra)


    @staticmethod
    def bn_channel(bn: nn.BatchNorm2d, p: Proposal) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """`add_units`' bn_init (weight, bias, running mean, running var) of the new channel, so that it
        computes the scored relu(w·u + b) at unit scale, relu((w·u + b)/σ), in eval mode (≈ in train mode):
        μ and σ² − eps (floored) are the mean and variance of w·u on the statistics pass, weight 1, shift
        (b + μ)/σ. The score is invariant to the feature's scale (but for its damping); the unscaled
        feature (weight σ, which the ascent can make large) made the new out-weights' SGD gradients blow up
        a cifar-small run (train loss 2.3 -> 357 after a check). The out-weights are zero, so the function
        is unchanged either way."""
        mu, var = p.moments
        rv = max(var - bn.eps, bn.eps)
        sigma = math.sqrt(rv + bn.eps)
        t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
        return t(1.0), t((float(p.b.reshape(-1)[0]) + mu) / sigma), t(mu), t(rv)


class SennSgd(Senn):
    """The same growth rule, trained with the suite's shared optimizer (the running factors are kept
    only for the natural-gradient direction the score's residual removes)."""

    name: ClassVar[str] = "senn-sgd"
    Settings: ClassVar[type] = SennSgdSettings
    natural_gradient: ClassVar[bool] = False
