"""The linear algebra of TINY (and of GradMax, which is TINY with some switches off), in plain tensors.

Notation (docs/methods/tiny.md): new units are inserted between layer l-1 (`inp`) and layer l (`out`).
`B2` = input of layer l-1 (B_{l-2}), `B1` = input of layer l (B_{l-1}), `G` = d(summed loss)/dA_l with
A_l the pre-activation (output) of layer l. A ones column/row is appended to B when that layer has a
bias, so biases are the last entry of every weight row. All statistics are averages over samples:

    S  = E[B1 B1^T]   (D2, D2)        S2 = E[B2 B2^T]   (D1, D1)         C = E[B2 B1^T]  (D1, D2)
    M  = E[B1 G^T]    (D2, C2)        M2 = E[B2 G^T]    (D1, C2)         (M2 = gromo's M_{-2})

Convolutions are unfolded (im2col): B1 becomes U2 (D2 = C1*kh*kw [+1], L2 output positions of
layer l) and sums run over positions too. For a conv -> conv pair the coupling is the exact one
(gromo's FullConv2dGrowingModule): a new channel's pre-activation z = alpha . U1 lives on the
L1 = H1*W1 positions layer l reads, and layer l reads it through its own kernel, so its out-weights
omega have C2*kh*kw rows and

    S2 = E[sum_q c(q) U1[:, q] U1[:, q]^T]        c(q) = number of (output position, kernel offset)
                                                   pairs of layer l that read input position q
    M2[a, (c, e)] = E[sum_p U1[a, pos(p, e)] G[c, p]]      (D1, C2*E), E = kh*kw, column c*E + e

The weighted form of S2 is the same matrix as gromo's masked-unfold S_growth without building the
(D1, E, L2) masked tensor, and M2 is a conv weight-gradient of layer l's geometry applied to the
image of U1 (no im2col of U1 needed).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# sigma'(0+) of the activations growbench and gromo know (gromo's table; LeakyReLU/ELU: right derivative)
ACTIVATION_GRADIENT_AT_ZERO: dict[type, float] = {
    nn.ReLU: 1.0, nn.GELU: 0.5, nn.SELU: 1.0507, nn.SiLU: 0.5, nn.Tanh: 1.0, nn.Sigmoid: 0.25,
    nn.Identity: 1.0, nn.LeakyReLU: 1.0, nn.ELU: 1.0,
}


def activation_gradient(act: nn.Module) -> float:
    """sigma'(0+): the slope with which a new unit's (small) pre-activation reaches layer l."""
    for cls, value in ACTIVATION_GRADIENT_AT_ZERO.items():
        if type(act) is cls:
            return value
    eps = 1e-4  # unknown activation: one-sided finite difference at 0+
    with torch.no_grad():
        t = torch.tensor([0.0, eps], dtype=torch.float64)
        y = act(t)
    return float((y[1] - y[0]) / eps)


# --------------------------------------------------------------------------- inputs


def with_ones(b: Tensor, dim: int) -> Tensor:
    """Append a ones slice along `dim` (the bias input)."""
    shape = list(b.shape)
    shape[dim] = 1
    return torch.cat([b, b.new_ones(shape)], dim)


def unfold_input(x: Tensor, layer: nn.Conv2d | nn.Linear) -> Tensor:
    """The input of `layer` as the matrix it multiplies, ones appended when it has a bias.

    Linear: x (n, d) -> (n, d [+1]);  Conv2d: x (n, C, H, W) -> (n, C*kh*kw [+1], L) (im2col).
    """
    if isinstance(layer, nn.Linear):
        x = x.flatten(1)
        return with_ones(x, 1) if layer.bias is not None else x
    u = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
    return with_ones(u, 1) if layer.bias is not None else u


def read_counts(height: int, width: int, conv: nn.Conv2d, device=None, dtype=torch.float32) -> Tensor:
    """c(q): how many (output position, kernel offset) pairs of `conv` read input position q.  (H*W,)"""
    geom = dict(kernel_size=conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    ones = torch.ones(1, 1, height, width, device=device, dtype=dtype)
    return F.fold(F.unfold(ones, **geom), (height, width), **geom).flatten()


def conv_weight_grad(image: Tensor, grad_out: Tensor, conv: nn.Conv2d) -> Tensor:
    """sum_{n,p} grad_out[n, c, p] image[n, a, pos(p, e)] as (a, c*E + e): the weight-gradient of a
    conv with `conv`'s geometry whose input is `image` (n, A, H, W) and output gradient grad_out.  (A, C2*E)"""
    c2, a = grad_out.shape[1], image.shape[1]
    kh, kw = conv.kernel_size
    w = torch.nn.grad.conv2d_weight(image, (c2, a, kh, kw), grad_out, stride=conv.stride, padding=conv.padding,
                                    dilation=conv.dilation)  # (C2, A, kh, kw)
    return w.transpose(0, 1).reshape(a, c2 * kh * kw)


def position_gram(a: Tensor, b: Tensor) -> Tensor:
    """sum over examples n and positions l of a[n, :, l] b[n, :, l]^T.  a (n, D, L), b (n, E, L) -> (D, E).
    One GEMM on (D, n*L) matrices: about 3x faster than einsum's batched path on CPU."""
    return a.transpose(0, 1).reshape(a.shape[1], -1) @ b.transpose(0, 1).reshape(b.shape[1], -1).T


# --------------------------------------------------------------------------- statistics


class LayerStatistics:
    """Running sums of S, M, S2, M2 (and C or N) for one hidden layer over a statistics set.

    kind: "linear" (Linear -> Linear), "gap" (Conv -> global average pool -> Linear; the pooled
    unfolded input of layer l-1 plays B2), "conv" (Conv -> Conv, exact coupling).
    For "conv" the cross-covariance C would cost O(D1*E*L2*D2) per sample (about ten times the rest),
    so by default N is accumulated directly in a second pass (`update_n_conv`) once dW* is known;
    `cross_covariance=True` accumulates C instead (used by the tests to check both agree).
    """

    def __init__(self, kind: str, cross_covariance: bool | None = None) -> None:
        self.kind = kind
        self.keep_c = (kind != "conv") if cross_covariance is None else cross_covariance
        self.n = 0
        self.sums: dict[str, Tensor] = {}
        self.n_direct: Tensor | None = None  # sum of -B2^T V_proj, conv second pass
        self.n_direct_count = 0
        self.kernel: tuple[int, int] | None = None  # kh, kw of layer l (conv)

    def _add(self, key: str, value: Tensor) -> None:
        value = value.detach().double()
        if key in self.sums:
            self.sums[key] += value
        else:
            self.sums[key] = value.clone()

    # -- pass 1
    def update_linear(self, b2: Tensor, b1: Tensor, g: Tensor) -> None:
        """b2 (n, D1), b1 (n, D2), g (n, C2), ones columns already appended."""
        self._add("s", b1.T @ b1)  # (D2, D2)
        self._add("m", b1.T @ g)  # (D2, C2)
        self._add("s2", b2.T @ b2)  # (D1, D1)
        self._add("m2", b2.T @ g)  # (D1, C2)
        if self.keep_c:
            self._add("c", b2.T @ b1)  # (D1, D2)
        self.n += b2.shape[0]

    def update_gap(self, x: Tensor, inp: nn.Conv2d, b1: Tensor, out: nn.Linear, g: Tensor) -> None:
        """x (n, C0, H0, W0) input of inp; b1 (n, C1) the pooled input of out; g (n, C2)."""
        b2 = unfold_input(x, inp).mean(2)  # (n, D1): position-average of the new channel's input
        self.update_linear(b2, unfold_input(b1, out), g)

    def update_conv(self, x: Tensor, inp: nn.Conv2d, b1: Tensor, out: nn.Conv2d, g: Tensor) -> None:
        """x (n, C0, H0, W0) input of inp; b1 (n, C1, H1, W1) input of out; g (n, C2, H2, W2)."""
        n, _, h1, w1 = b1.shape
        self.kernel = tuple(out.kernel_size)
        u1 = unfold_input(x, inp)  # (n, D1, L1), L1 = H1*W1
        u2 = unfold_input(b1, out)  # (n, D2, L2)
        g2 = g.flatten(2)  # (n, C2, L2)
        counts = read_counts(h1, w1, out, x.device, x.dtype)  # (L1,)
        self._add("s", position_gram(u2, u2))  # (D2, D2)
        self._add("m", position_gram(u2, g2))  # (D2, C2)
        self._add("s2", position_gram(u1 * counts, u1))  # (D1, D1)
        image = u1.reshape(n, -1, h1, w1)  # (n, D1, H1, W1): U1 seen as a D1-channel image
        self._add("m2", conv_weight_grad(image, g, out))  # (D1, C2*E)
        if self.keep_c:
            patches = F.unfold(image, out.kernel_size, dilation=out.dilation, padding=out.padding, stride=out.stride)
            self._add("c", position_gram(patches, u2))  # (D1*E, D2), row a*E + e
        self.n += n

    # -- pass 2 (conv only)
    def update_n_conv(self, x: Tensor, inp: nn.Conv2d, b1: Tensor, out: nn.Conv2d, g: Tensor,
                      delta: Tensor) -> None:
        """N += -B2^T V_proj with V_proj = G - dW* B1 (spec step 3), dW* (C2, D2) from pass 1."""
        n, _, h1, w1 = b1.shape
        dw = delta[:, : out.weight[0].numel()].reshape(out.weight.shape).to(g)
        db = delta[:, -1].to(g) if out.bias is not None else None
        v_proj = g - F.conv2d(b1, dw, db, out.stride, out.padding, out.dilation)  # (n, C2, H2, W2)
        image = unfold_input(x, inp).reshape(n, -1, h1, w1)
        value = -conv_weight_grad(image, v_proj, out).double()  # (D1, C2*E)
        self.n_direct = value if self.n_direct is None else self.n_direct + value
        self.n_direct_count += n

    # -- averages
    def mean(self, key: str) -> Tensor:
        return self.sums[key] / self.n

    @property
    def tensor_s(self) -> Tensor:
        return self.mean("s")

    @property
    def tensor_m(self) -> Tensor:
        return self.mean("m")

    @property
    def tensor_s_growth(self) -> Tensor:
        return self.mean("s2")

    @property
    def tensor_m_prev(self) -> Tensor:
        return self.mean("m2")

    def tensor_n(self, delta: Tensor | None) -> Tensor:
        """N = -E[B2 V_proj^T] = -M2 + C dW*^T (projected); -M2 when delta is None (no projection)."""
        if delta is None:
            return -self.tensor_m_prev
        if not self.keep_c:
            if self.n_direct is None:
                raise RuntimeError("conv statistics: run the second pass (update_n_conv) before tensor_n")
            return self.n_direct / self.n_direct_count
        c = self.mean("c")
        d = delta.to(c)  # (C2, D2)
        if self.kind != "conv":
            return -self.tensor_m_prev + c @ d.T  # (D1, C2)
        e = math.prod(self.kernel)
        cd = (c.reshape(-1, e, c.shape[1]) @ d.T).permute(0, 2, 1)  # (D1, C2, E)
        return -self.tensor_m_prev + cd.reshape(cd.shape[0], -1)


# --------------------------------------------------------------------------- closed forms


def optimal_delta(s: Tensor, m: Tensor, dtype: torch.dtype = torch.float64,
                  force_pinv: bool = False) -> tuple[Tensor, float]:
    """Best update of the existing weights of layer l: dW* = (S^-1 M)^T and its first-order loss decrease
    tr(M^T S^-1 M) >= 0. Falls back to the pseudo-inverse when S is singular, to float64 + pinv when the
    decrease comes out negative, then to zero (gromo's recipe).  s (D2, D2), m (D2, C2) -> (C2, D2), float."""
    s_, m_ = s.to(dtype), m.to(dtype)
    x = None
    if not force_pinv:
        try:
            x = torch.linalg.solve(s_, m_)
        except RuntimeError:  # torch.linalg.LinAlgError: singular S
            force_pinv = True
    if force_pinv:
        x = torch.linalg.pinv(s_) @ m_
    decrease = float(torch.trace(m_.T @ x))
    if not (math.isfinite(decrease) and decrease >= 0 and bool(torch.isfinite(x).all())):
        if not force_pinv or dtype != torch.float64:
            return optimal_delta(s, m, torch.float64, force_pinv=True)
        return torch.zeros_like(x.T), 0.0
    return x.T.contiguous(), decrease


def sqrt_inverse_psd(s: Tensor, threshold: float) -> Tensor:
    """S^{-1/2} on the eigen-directions with eigenvalue > threshold (zero elsewhere).  (D, D)"""
    s = (s + s.T) / 2
    e, q = torch.linalg.eigh(s)
    keep = e > threshold
    q = q[:, keep]
    return (q * e[keep].rsqrt()) @ q.T


def optimal_added_neurons(s2: Tensor | None, n: Tensor, numerical_threshold: float = 1e-6,
                          statistical_threshold: float = 1e-3, max_neurons: int | None = None,
                          dtype: torch.dtype = torch.float64, alpha_zero: bool = False,
                          ignore_singular_values: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """New units fitting the projected residual: SVD of P = S2^{-1/2} N = U diag(sigma) V^T.

    s2 (D1, D1) or None (identity: GradMax), n (D1, cols).  Returns
    alpha (K, D1) = sqrt(sigma) (S2^{-1/2} u)^T in-weights (bias last), omega (cols, K) = sqrt(sigma) v
    out-weights, sigma (K,) sorted decreasingly. Kept: sigma >= min(statistical_threshold, sigma_max) and
    sigma > 0, at most max_neurons. alpha S2 alpha^T = diag(sigma) on the kept directions.
    """
    n = n.to(dtype)
    isqrt = sqrt_inverse_psd(s2.to(dtype), numerical_threshold) if s2 is not None else None
    p = isqrt @ n if isqrt is not None else n  # (D1, cols)
    u, sigma, vh = torch.linalg.svd(p, full_matrices=False)  # (D1, r), (r,), (r, cols)
    if sigma.numel() == 0:
        k = 0
    else:
        keep = (sigma >= min(statistical_threshold, float(sigma[0]))) & (sigma > 0)
        k = int(keep.sum())
    if max_neurons is not None:
        k = min(k, max_neurons)
    u, sigma, vh = u[:, :k], sigma[:k], vh[:k]
    scale = torch.ones_like(sigma) if ignore_singular_values else sigma.sqrt()
    alpha = ((isqrt @ u) if isqrt is not None else u) * scale  # (D1, K)
    omega = vh.T * scale  # (cols, K)
    if alpha_zero:
        alpha = torch.zeros_like(alpha)
    return alpha.T.contiguous(), omega.contiguous(), sigma


def neurons_first_order(alpha: Tensor, m2: Tensor, omega: Tensor) -> float:
    """First-order loss change per unit gamma^2 of adding units (alpha, omega) through a linear(ised)
    activation of slope 1: sum_j alpha_j^T M2 omega_j (negative = decrease). Exact for the applied move,
    unlike sum sigma^2, which ignores the part of the new units' activity that layer l could already
    express (the projection term alpha^T C dW*^T omega)."""
    return float(torch.einsum("ka,ac,ck->", alpha.to(m2), m2, omega.to(m2)))
