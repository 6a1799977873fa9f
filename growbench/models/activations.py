"""Learnable per-unit activations that growth methods need.

`Rational` is SENN's identity-capable activation (Mitchell et al., "Self-Expanding Neural Networks",
`nets.Rational1D` in the official code), one (v, c, l) triple per unit:

    φ(x) = [ (2·v·x + c) / (1 + x²) + l·x ] / sqrt(v² + c² + l² + 1e-8)

The odd bump 2x/(1+x²), the even bump 1/(1+x²) and the linear term span a family that contains the
identity, (v, c, l) = (0, 0, 1), so a layer inserted with this activation at identity leaves the network
function unchanged (in float32 1 + 1e-8 rounds to 1, so it is exactly x). The normalisation makes φ
invariant to rescaling (v, c, l), so weight decay on them is harmless. New units are drawn from N(0, 1)
per coefficient, as in the official code.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

EPS = 1e-8
PARAMS = ("v", "c", "l")  # per-unit coefficients: odd bump, even bump, linear term


class Rational(nn.Module):
    """φ applied per unit (feature dimension 1 of an (N, width, ...) input); three (width,) parameters."""

    def __init__(self, width: int, identity: bool = False, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if identity:
            coef = self.identity_coefficients(width)
        else:
            coef = torch.randn(width, 3, generator=generator)
        self.v = nn.Parameter(coef[:, 0].clone())
        self.c = nn.Parameter(coef[:, 1].clone())
        self.l = nn.Parameter(coef[:, 2].clone())

    @property
    def width(self) -> int:
        return self.v.shape[0]

    @staticmethod
    def identity_coefficients(k: int) -> Tensor:
        """(k, 3) coefficients (v, c, l) = (0, 0, 1): φ(x) = x."""
        coef = torch.zeros(k, 3)
        coef[:, 2] = 1.0
        return coef

    def coefficients(self) -> Tensor:
        """(width, 3) current (v, c, l) per unit (detached)."""
        return torch.stack([self.v, self.c, self.l], 1).detach()

    def _shape(self, t: Tensor, x: Tensor) -> Tensor:
        return t.view(1, -1, *([1] * (x.dim() - 2)))

    def forward(self, x: Tensor) -> Tensor:
        v, c, l = (self._shape(t, x) for t in (self.v, self.c, self.l))
        return rational(x, v, c, l)

    def extra_repr(self) -> str:
        return f"width={self.width}"

    # ---------------------------------------------------------------- growth (called by GrowableNet primitives)
    @torch.no_grad()
    def grown(self, k: int, init: Tensor | None = None) -> dict[str, Tensor]:
        """New values of v, c, l with k units appended. init: (k, 3) coefficients, None = N(0, 1) draws.
        The caller swaps them in through `_set_param`, so the optimizer sees the replacement."""
        if init is None:
            init = torch.randn(k, 3)
        if tuple(init.shape) != (k, 3):
            raise ValueError(f"Rational.grown: init must have shape ({k}, 3) (v, c, l per unit), "
                             f"got {tuple(init.shape)}")
        init = init.to(self.v)
        return {name: torch.cat([getattr(self, name), init[:, i]]) for i, name in enumerate(PARAMS)}


def rational(x: Tensor, v: Tensor, c: Tensor, l: Tensor) -> Tensor:
    """φ(x) with coefficients broadcast against x (used batched over candidate units by SENN)."""
    den = 1.0 / (1.0 + x * x)
    norm = torch.sqrt(v * v + c * c + l * l + EPS)
    return ((2.0 * v * x + c) * den + l * x) / norm


def rational_with_grads(x: Tensor, v: Tensor, c: Tensor,
                        l: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor]]:
    """(φ(x), φ'(x), (∂φ/∂v, ∂φ/∂c, ∂φ/∂l)) sharing the intermediates: SENN's candidate ascent runs this
    on (N, P) blocks for every step, where the number of tensor ops is what costs."""
    den = 1.0 / (1.0 + x * x)
    s2 = v * v + c * c + l * l + EPS
    inv_s = s2.rsqrt()
    odd = 2.0 * x * den
    num = v * odd + c * den + l * x  # φ·s
    phi = num * inv_s
    dphi = (2.0 * v * den - (2.0 * v * x + c) * odd * den + l) * inv_s
    k = phi / s2  # ∂(num/s)/∂θ = (∂num/∂θ)/s − num·θ/s³ = (∂num/∂θ)/s − φ·θ/s²
    return phi, dphi, (odd * inv_s - k * v, den * inv_s - k * c, x * inv_s - k * l)


def rational_dx(x: Tensor, v: Tensor, c: Tensor, l: Tensor) -> Tensor:
    """φ'(x), broadcast like `rational` (forward-mode tangents without autograd)."""
    den = 1.0 / (1.0 + x * x)
    norm = torch.sqrt(v * v + c * c + l * l + EPS)
    return (2.0 * v * den - (2.0 * v * x + c) * 2.0 * x * den * den + l) / norm


def rational_param_grads(x: Tensor, v: Tensor, c: Tensor, l: Tensor) -> Tensor:
    """∂φ/∂(v, c, l) at x: (..., 3) for x of shape (...) broadcast with the coefficients.
    Used for per-sample gradients of the coefficients (SENN's diagonal Fisher) without autograd."""
    return torch.stack(rational_param_grad_parts(x, v, c, l), -1)


def rational_param_grad_parts(x: Tensor, v: Tensor, c: Tensor, l: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(∂φ/∂v, ∂φ/∂c, ∂φ/∂l), each shaped like x broadcast with the coefficients."""
    den = 1.0 / (1.0 + x * x)
    s2 = v * v + c * c + l * l + EPS
    s = torch.sqrt(s2)
    num = (2.0 * v * x + c) * den + l * x  # φ·s
    # d(num/s)/dθ = (dnum/dθ)/s - num·θ/s³
    dv = (2.0 * x * den) / s - num * v / (s2 * s)
    dc = den / s - num * c / (s2 * s)
    dl = x / s - num * l / (s2 * s)
    return dv, dc, dl
