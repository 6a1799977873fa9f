"""Tensor math of splitting steepest descent (Liu, Wu & Wang 2019; Wang et al. 2019), kept free of hooks
and of the trainer so each formula can be read and tested on its own.

Notation (one hidden layer, C units, fan-in d = d_in for a Linear, C_in·kh·kw for a Conv2d):

    z_i = θ_iᵀ x (+ b_i)           pre-activation of unit i (x: input row or one unfolded patch)
    a_i = c_i (z_i − μ_i) + β_i     after eval-mode BatchNorm (c_i = γ_i / sqrt(var_i + eps)); a_i = z_i without BN
    h_i = σ(a_i)                    the unit's output; g_i = ∂L/∂h_i (L = mean loss of the statistics set)

Splitting unit i into θ_i ± εv, each copy keeping half the out-weights, changes the loss by
ε²/2 · vᵀ S_i v + O(ε⁴) with the *splitting matrix*

    S_i = Σ_rows  g_i σ''(a_i) c_i² x xᵀ                                              (d × d)

where the rows are the examples (Linear) or every (example, output position) pair (Conv2d: the
positions of one example are summed, because the loss sees all of them). The per-row factor
w_i = g_i σ''(a_i) c_i² is all a layer needs besides its input, so both variants work from (x, w).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Layer = nn.Linear | nn.Conv2d


# --------------------------------------------------------------------------- σ''
def softplus_d2(a: Tensor, beta: float) -> Tensor:
    """Second derivative of softplus_β(a) = log(1 + exp(βa)) / β: β s (1 − s), s = sigmoid(βa).
    The official S2D code's stand-in for ReLU, whose σ'' is 0 almost everywhere."""
    s = torch.sigmoid(beta * a)
    return beta * s * (1 - s)


def activation_d2(act: nn.Module, a: Tensor, relu_surrogate: str = "softplus", beta: float = 3.0) -> Tensor:
    """σ''(a) for the activation module `act`; ReLU uses the surrogate (`none`: the exact 0)."""
    if isinstance(act, nn.ReLU):
        if relu_surrogate == "none":
            return torch.zeros_like(a)
        return softplus_d2(a, beta)
    if isinstance(act, nn.Tanh):
        t = torch.tanh(a)
        return -2 * t * (1 - t * t)
    if isinstance(act, nn.Sigmoid):
        s = torch.sigmoid(a)
        return s * (1 - s) * (1 - 2 * s)
    if isinstance(act, nn.Softplus):
        return softplus_d2(a, act.beta)
    if isinstance(act, nn.SiLU):  # d²/da² a·s(a) = s(1−s)(2 + a(1 − 2s))
        s = torch.sigmoid(a)
        return s * (1 - s) * (2 + a * (1 - 2 * s))
    if isinstance(act, nn.GELU):
        if act.approximate != "none":
            raise ValueError("splitting: σ'' of tanh-approximated GELU is not implemented")
        pdf = torch.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)  # d²/da² aΦ(a) = φ(a)(2 − a²)
        return pdf * (2 - a * a)
    if isinstance(act, nn.SELU):  # exact a.e.: scale·alpha·e^a below 0, 0 above (the kink at 0 is ignored)
        return torch.where(a < 0, 1.0507009873554805 * 1.6732632423543772 * torch.exp(a), torch.zeros_like(a))
    if isinstance(act, nn.Identity):
        return torch.zeros_like(a)
    return _autograd_d2(act, a)


def _autograd_d2(act: nn.Module, a: Tensor) -> Tensor:
    """σ''(a) by double backward, for any other element-wise activation (e.g. per-unit parametrised ones)."""
    with torch.enable_grad():
        a = a.detach().requires_grad_(True)
        (d1,) = torch.autograd.grad(act(a).sum(), a, create_graph=True)
        if not d1.requires_grad:  # piecewise linear: σ'' = 0 a.e.
            return torch.zeros_like(a)
        (d2,) = torch.autograd.grad(d1.sum(), a)
    return d2.detach()


def bn_scale(bn: nn.Module | None) -> Tensor | None:
    """c = γ / sqrt(running_var + eps) of an eval-mode BatchNorm, shape (C,); None without BN."""
    if bn is None:
        return None
    c = torch.rsqrt(bn.running_var + bn.eps)
    return c if bn.weight is None else bn.weight.detach() * c


def row_weights(g: Tensor, d2: Tensor, scale: Tensor | None) -> Tensor:
    """w = g σ''(a) c², same shape as g: (B, C) or (B, C, H', W')."""
    w = g * d2
    if scale is not None:
        w = w * (scale * scale).view(1, -1, *([1] * (g.dim() - 2)))
    return w


# --------------------------------------------------------------------------- rows
def patches(layer: Layer, x: Tensor) -> Tensor:
    """The layer's input as rows: (B, d) for a Linear; unfolded patches (B·H'·W', C_in·kh·kw) for a Conv2d,
    ordered like `weight.view(C, -1)` and like `w.view(B, C, -1)` positions."""
    if isinstance(layer, nn.Linear):
        return x
    if layer.groups != 1:
        raise ValueError("splitting: grouped convolutions are not supported")
    cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])  # (B, d, L) -> (B·L, d)


def rows(w: Tensor) -> Tensor:
    """Per-row weights (B, C) or (B, C, H', W') -> (R, C), rows matching `patches`."""
    if w.dim() == 2:
        return w
    return w.flatten(2).transpose(1, 2).reshape(-1, w.shape[1])


# --------------------------------------------------------------------------- exact S
def splitting_matrices(X: Tensor, W: Tensor, max_floats: int = 1 << 22) -> Tensor:
    """S_k = Σ_r W[r, k] X[r] X[r]ᵀ for every column k of W.

    X: (R, d) rows;  W: (R, k) per-row weights  ->  (k, d, d)
    Rows are processed in chunks so the (rows, k, d) temporary stays under `max_floats` elements.
    """
    R, d = X.shape
    k = W.shape[1]
    S = X.new_zeros(k, d, d)
    step = max(1, max_floats // max(1, k * d))
    for r0 in range(0, R, step):
        x, w = X[r0:r0 + step], W[r0:r0 + step]  # (r, d), (r, k)
        wx = (w.unsqueeze(2) * x.unsqueeze(1)).reshape(x.shape[0], k * d)  # (r, k·d)
        S += (wx.T @ x).view(k, d, d)  # (k·d, r) @ (r, d)
    return S


def min_eigenpairs(S: Tensor) -> tuple[Tensor, Tensor]:
    """Minimum eigenvalue and unit eigenvector of each symmetric matrix: S (k, d, d) -> (k,), (k, d).
    The sign of each vector is fixed (largest-magnitude entry positive) so runs are reproducible."""
    vals, vecs = torch.linalg.eigh(0.5 * (S + S.transpose(1, 2)))
    lam, v = vals[:, 0], vecs[:, :, 0]
    return lam, _fix_sign(v)


def _fix_sign(v: Tensor) -> Tensor:
    pick = v.gather(1, v.abs().argmax(1, keepdim=True))  # (k, 1)
    return v * torch.where(pick < 0, -1.0, 1.0).to(v)


# --------------------------------------------------------------------------- fast: S·v without S
def splitting_products(layer: Layer, x: Tensor, w: Tensor, V: Tensor) -> Tensor:
    """S_i v_i for every unit i at once, never forming S_i.

    x: the layer's input (B, d) or (B, C_in, H, W);  w: (B, C) or (B, C, H', W');  V: (C, d)  ->  (C, d)
    u = v_iᵀ x per row is the layer itself run with weights V (no bias); S_i v_i = Σ_r w_ri u_ri x_r
    is that layer's weight gradient for the output gradient w ⊙ u.
    """
    if isinstance(layer, nn.Linear):
        u = x @ V.T  # (B, C)
        return (w * u).T @ x  # (C, d)
    shape = (V.shape[0], *layer.weight.shape[1:])  # (C, C_in, kh, kw)
    kw = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation)
    u = F.conv2d(x, V.view(shape), **kw)  # (B, C, H', W')
    return torch.nn.grad.conv2d_weight(x, shape, w * u, **kw).reshape(V.shape[0], -1)


def rayleigh(V: Tensor, SV: Tensor) -> tuple[Tensor, Tensor]:
    """Rayleigh quotients q_i = v_iᵀ S v_i / v_iᵀ v_i and their gradients 2(S v − q v)/‖v‖²: (C,), (C, d)."""
    nn2 = (V * V).sum(1)  # (C,)
    q = (V * SV).sum(1) / nn2
    return q, 2 * (SV - q.unsqueeze(1) * V) / nn2.unsqueeze(1)


class RMSprop:
    """The fast-splitting paper's v-optimiser, written out so every neuron's row is updated in place:
    torch.optim.RMSprop's (non-centred) rule, then each row renormalised to unit length. eps is tiny
    (not torch's 1e-8) so the step does not depend on the scale of S, which spans many decades."""

    def __init__(self, V: Tensor, lr: float, alpha: float = 0.9, momentum: float = 0.1, eps: float = 1e-20) -> None:
        self.lr, self.alpha, self.momentum, self.eps = lr, alpha, momentum, eps
        self.sq = torch.zeros_like(V)
        self.buf = torch.zeros_like(V)

    def step(self, V: Tensor, grad: Tensor) -> Tensor:
        """One descent step on the Rayleigh quotient; returns the new unit-norm V (C, d)."""
        self.sq.mul_(self.alpha).addcmul_(grad, grad, value=1 - self.alpha)
        self.buf.mul_(self.momentum).add_(grad / (self.sq.sqrt() + self.eps))
        V = V - self.lr * self.buf
        return V / V.norm(dim=1, keepdim=True).clamp_min(1e-30)


def lobpcg_min_eig(product: Callable[[Tensor], Tensor], V: Tensor, iterations: int) -> tuple[Tensor, Tensor]:
    """Minimum eigenpair of every S_i from products only: gradient steps on the Rayleigh quotient whose step
    (and momentum) are chosen optimally, i.e. Rayleigh–Ritz over span{v, ∇R(v), previous step} per unit
    (single-vector LOBPCG, Knyazev 2001). Deterministic, no learning rate, R(v) never increases.

    product: V (C, d) -> (S_i v_i)_i (C, d), one pass over the statistics set;  V: (C, d) start
    -> (λ (C,), v (C, d) unit rows). One `product` call per iteration plus one for the final λ; the other
    S-products follow by linearity.
    """
    V = V / V.norm(dim=1, keepdim=True).clamp_min(1e-30)
    SV = product(V)
    P = SP = None  # previous step direction and its product
    for _ in range(iterations):
        R = SV - (V * SV).sum(1, keepdim=True) * V  # ∝ ∇R(v), orthogonal to v
        R, SR = _orthonormal(R, None, [V], [SV])
        SR = product(R)
        basis, sbasis = [V, R], [SV, SR]
        if P is not None:
            P, SP = _orthonormal(P, SP, [V, R], [SV, SR], tol=1e-3)  # SP by linearity: drop near-dependent P
            basis.append(P)
            sbasis.append(SP)
        Q, SQ = torch.stack(basis, 2), torch.stack(sbasis, 2)  # (C, d, m), m = 2 or 3
        A = Q.transpose(1, 2) @ SQ  # (C, m, m) = Qᵀ S Q
        A = 0.5 * (A + A.transpose(1, 2))
        empty = Q.norm(dim=1) < 0.5  # (C, m) columns that were zeroed (converged / no new direction)
        big = 4 * A.abs().amax((1, 2), keepdim=True) + 1e-30
        A = A + torch.diag_embed(empty.to(A)) * big  # an empty column decouples (zero row) -> push it up
        y = torch.linalg.eigh(A)[1][:, :, :1]  # (C, m, 1) lowest Ritz vector
        V, SV = (Q @ y)[:, :, 0], (SQ @ y)[:, :, 0]
        P, SP = (Q[:, :, 1:] @ y[:, 1:])[:, :, 0], (SQ[:, :, 1:] @ y[:, 1:])[:, :, 0]
        n = V.norm(dim=1, keepdim=True).clamp_min(1e-30)
        V, SV, P, SP = V / n, SV / n, P / n, SP / n
    SV = product(V)  # fresh product: no drift from the linear recurrences in λ
    return (V * SV).sum(1), V


def _orthonormal(X: Tensor, SX: Tensor | None, against: list[Tensor], s_against: list[Tensor],
                 tol: float = 1e-6) -> tuple[Tensor, Tensor | None]:
    """Rows of X made orthogonal to the (unit, mutually orthogonal) rows in `against`, then unit length;
    rows that lose all but `tol` of their norm become 0. SX (if given) is transformed alike (stays S·X)."""
    scale = X.norm(dim=1, keepdim=True)
    for B, SB in zip(against, s_against):
        c = (B * X).sum(1, keepdim=True)
        X = X - c * B
        if SX is not None:
            SX = SX - c * SB
    n = X.norm(dim=1, keepdim=True)
    keep = n > tol * scale.clamp_min(1e-30)
    inv = torch.where(keep, 1 / n.clamp_min(1e-30), torch.zeros_like(n))
    return X * inv, None if SX is None else SX * inv
