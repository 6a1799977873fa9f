"""Counting FLOPs of code that runs (growth steps, per-step bookkeeping) with little overhead.

`torch.utils.flop_counter.FlopCounterMode` attributes FLOPs to modules through global module hooks;
that bookkeeping made the growth steps of small networks 2-4x slower, which would charge growth methods
for the meter rather than for their work. `FlopCount` uses the same per-operator formulas (torch's
`flop_registry`: matrix products, convolutions, attention) in a bare dispatch mode, and adds formulas for
the dense decompositions growth methods rely on (eigh, SVD, solves), which torch does not count.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

aten = torch.ops.aten


def _n(x: torch.Tensor) -> tuple[int, int, int]:
    """(batch, rows, cols) of a (..., m, n) matrix argument."""
    *b, m, n = x.shape
    batch = 1
    for d in b:
        batch *= d
    return batch, m, n


# Conventional dense-algebra operation counts (Golub & Van Loan; 1 multiply-add = 2 FLOPs).
def _eigh(x, *a, **k):
    b, n, _ = _n(x)
    return int(b * 9 * n ** 3)  # tridiagonalisation (4/3 n^3) + QR iterations with vectors (~ 8 n^3)


def _svd(x, *a, **k):
    b, m, n = _n(x)
    m, n = max(m, n), min(m, n)
    return int(b * (4 * m * n * n + 8 * n ** 3))  # thin SVD (Golub-Kahan-Reinsch, with vectors)


def _solve(a, rhs, *args, **k):
    b, n, _ = _n(a)
    r = rhs.shape[-1] if rhs.dim() == a.dim() else 1
    return int(b * (2 * n ** 3 / 3 + 2 * n * n * r))  # LU + two triangular solves per right-hand side


def _cholesky(x, *a, **k):
    b, n, _ = _n(x)
    return int(b * n ** 3 / 3)


def _inverse(x, *a, **k):
    b, n, _ = _n(x)
    return int(b * 2 * n ** 3)


def _lstsq(a, b, *args, **k):
    bt, m, n = _n(a)
    r = b.shape[-1] if b.dim() == a.dim() else 1
    return int(bt * (2 * m * n * n - 2 * n ** 3 / 3 + 4 * m * n * r))  # Householder QR + apply + solve


EXTRA = {
    aten._linalg_eigh: _eigh, aten._linalg_svd: _svd, aten._linalg_solve_ex: _solve, aten.linalg_solve_ex: _solve,
    aten.linalg_cholesky_ex: _cholesky, aten.linalg_inv_ex: _inverse,
    aten.linalg_pinv: _svd,  # one operator on the CPU, an SVD inside
    aten.linalg_lstsq: _lstsq,
}


def _formula(func):
    packet = func._overloadpacket
    if packet in flop_registry:
        f = flop_registry[packet]
        return lambda args, kwargs, out: f(*args, **kwargs, out_val=out)
    if packet in EXTRA:
        f = EXTRA[packet]
        return lambda args, kwargs, out: f(*args)
    return None


class FlopCount(TorchDispatchMode):
    """`with FlopCount() as fc: ...; fc.total` counts the FLOPs of every counted operator run inside."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self._cache: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        f = self._cache.get(func, False)
        if f is False:
            f = self._cache[func] = _formula(func)
        if f is not None:
            self.total += int(f(args, kwargs, out))
        return out
