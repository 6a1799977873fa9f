"""SENN on the VGG-style conv family: the statistics pass with KFC factors, forward-mode Jt through the
whole net, and candidate channels. Spec: docs/methods/senn.md ("Conv layers").

KFC (Grosse & Martens 2016): a conv layer is a Linear applied to every unfolded input patch, so its
rows are (example n, output position p): a_np = [patch, 1] (C_in·kh·kw + 1), g_np = ∂ℓ_n/∂y[n, :, p].
A is the mean over examples and positions, G the mean over examples of the *sum* over positions
(`senn_kfac.layer_factors`), so F ≈ A⊗G and the dense-layer formulas apply to the real gradient
Γ = Σ_p E_n[g aᵀ]. A bias-free conv followed by BatchNorm keeps the ones entry: in eval mode BN is a
per-channel affine map, so its shift β is the conv's bias up to a per-channel scale (K-FAC is invariant
to it); the tangent of that "bias" is applied to β (`net_jvp`).

A candidate channel of hidden layer i is a filter (+ bias) on layer i's input patches through the
family's activation (ReLU: VGG has no per-unit activation), h = relu(w·u + b), max-pooled if the layer
pools; what it adds to the consumer j = i+1 are k·k new entries of j's input patches (one per kernel
offset: E = kh·kw features per row), or one classifier input (its global average) after the last conv.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from growbench.methods.senn_kfac import (KFACStats, Observation, input_rows, layer_factors, natural_linears,
                                         net_layers, output_rows, positions, sample_weights, with_ones)

if TYPE_CHECKING:
    from growbench.models.growable import GrowableNet, Hidden


def _bn_after(model: "GrowableNet") -> dict[nn.Module, nn.BatchNorm2d]:
    """conv -> the BatchNorm right after it (where a bias-free conv's bias direction goes)."""
    return {h.inp: h.bn for h in model.hidden_layers() if isinstance(h.bn, nn.BatchNorm2d)}


def net_jvp(model: "GrowableNet", X: Tensor, directions: dict[Tensor, Tensor], train: bool = False) -> Tensor:
    """Jt: the outputs' change (N, d_out) along parameter directions {parameter: tangent} (missing: 0),
    forward mode through the whole net (dual tensors). train: BatchNorm with batch statistics, as in the
    training step (on cloned buffers, so running statistics are untouched); else the model's mode."""
    import torch.autograd.forward_ad as fwAD

    params = dict(model.named_parameters())
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    was = model.training
    if train:
        model.train()
    try:
        with torch.no_grad(), fwAD.dual_level():
            duals = {k: fwAD.make_dual(p.detach(), directions[p].reshape(p.shape).to(p)) if p in directions
                     else p.detach() for k, p in params.items()}
            out = torch.func.functional_call(model, (duals, buffers), (X,))
            jt = fwAD.unpack_dual(out).tangent
    finally:
        model.train(was)
    return torch.zeros_like(out) if jt is None else jt


def _tangent_directions(model: "GrowableNet", layers: list, tangent: dict) -> dict[Tensor, Tensor]:
    """observe's tangent {"lin": [(TW, Tb) | None]} as parameter directions; a bias-free conv's Tb goes to
    the following BatchNorm's shift: δβ = γ/√(running var + eps)·Tb (the same output change, eval mode)."""
    bns = _bn_after(model)
    out: dict[Tensor, Tensor] = {}
    for mod, t in zip(layers, tangent["lin"]):
        if t is None:
            continue
        TW, Tb = t
        out[mod.weight] = TW
        if Tb is None:
            continue
        if mod.bias is not None:
            out[mod.bias] = Tb
        elif mod in bns:
            bn = bns[mod]
            out[bn.bias] = Tb * bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    return out


def observe_net(model: "GrowableNet", loss_fn: Callable, X: Tensor, Y: Tensor, stats: KFACStats | None,
                tangent: dict | None = None, pure_kfac: bool = False, residual: bool = True) -> Observation:
    """`senn_kfac.observe` for a CNN (every conv and the classifier), BatchNorm in eval mode (running
    statistics: the candidates are scored against the function the network computes at evaluation).

    Per layer j with L_j output positions (1 for the classifier): rows (N·L_j, ·) as `input_rows`;
    A_j ((D+1)²), G_j (C_out²) as `layer_factors`; Γ_j = (1/N) Σ_{n,p} g aᵀ (C_out, D+1), the gradient of
    the mean loss w.r.t. [W, b]; residual rows r_j (N·L_j, C_out)."""
    layers = net_layers(model)
    was_rec = None if stats is None else stats.recording
    was_training = model.training
    if stats is not None:
        stats.recording = False
    model.eval()
    seen: dict[nn.Module, tuple[Tensor, Tensor]] = {}

    def hook(mod, args, out):
        seen[mod] = (args[0].detach(), out)

    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        with torch.enable_grad():
            out = model(X)
            total = loss_fn(out, Y) * X.shape[0]  # Σ_n ℓ_n
            (e,) = torch.autograd.grad(total, out, retain_graph=True)
            ys = [seen[m][1] for m in layers]
            grads = torch.autograd.grad(out, ys, grad_outputs=e, retain_graph=residual)
        for hd in handles:
            hd.remove()
        handles = []
        n = X.shape[0]
        e = e.detach()
        w = sample_weights(e)  # (N,) 1/‖e_n‖²
        images = [seen[m][0] for m in layers]
        Ls = [positions(g) for g in grads]
        inputs = [input_rows(x, m) for x, m in zip(images, layers)]  # (N·L_j, D_j)
        g_rows = [output_rows(g.detach()) for g in grads]  # (N·L_j, C_j)
        A, G, Gamma = [], [], []
        for j, mod in enumerate(layers):
            Aj, Gj = layer_factors(mod, images[j], grads[j].detach(), w)
            A.append(Aj)
            G.append(Gj)
            Gamma.append(g_rows[j].T @ with_ones(inputs[j]) / n)  # (C_out, D+1): Σ over positions, mean over n
        if stats is not None:
            stale = set(stats.stale())
            stats.refresh({m: (A[j], G[j]) for j, m in enumerate(layers) if m in stale})
        lin_nat, eta = natural_linears(stats, layers, Gamma)
        natural = {"lin": lin_nat, "act": {}}
        if tangent is None:
            tangent = {"lin": [None] * len(layers), "act": {}} if pure_kfac else natural
        residuals: list[Tensor] = []
        c = 0.0
        if residual:
            dirs = _tangent_directions(model, layers, tangent)
            lres = e
            if dirs:
                jt = net_jvp(model, X, dirs)  # eval mode: the model is in eval here
                den = float((jt * jt).sum())
                if den > 0:
                    c = float((jt * e).sum()) / (den + 1e-10)
                    lres = e - c * jt
            with torch.enable_grad():
                rs = torch.autograd.grad(out, ys, grad_outputs=lres)
            residuals = [output_rows(r.detach()) for r in rs]
        return Observation(n=n, inputs=inputs, grads=g_rows, residuals=residuals, A=A, G=G, Gamma=Gamma, act_F={},
                           w=w, loss_sqnorm=float(e.pow(2).sum(1).mean()), eta=eta, tangent=tangent, jt_coef=c,
                           positions=Ls, images=images)
    finally:
        for hd in handles:
            hd.remove()
        model.train(was_training)
        if stats is not None:
            stats.recording = was_rec


class ConvCandidates:
    """Features of P candidate channels of hidden layer `h` as its consumer sees them, from x (N, C_in, H, W),
    the input of h.inp: W (P, 1, C_in·kh·kw), b (P, 1) -> H (P, N·L_j, E), rows as the consumer's
    `input_rows`; E = kh·kw of a consumer conv (the channel's slice of each patch), 1 for the classifier
    (global average). `chunk` candidates at a time bound the memory of the unfolded tensor."""

    def __init__(self, h: "Hidden", x: Tensor) -> None:
        self.h, self.x = h, x

    def __call__(self, W: Tensor, b: Tensor, coef: Tensor | None = None) -> Tensor:
        inp, out = self.h.inp, self.h.out
        P = W.shape[0]
        z = F.conv2d(self.x, W.reshape(P, *inp.weight.shape[1:]), b[:, 0], stride=inp.stride, padding=inp.padding,
                     dilation=inp.dilation)  # (N, P, H', W'): BN∘conv of the candidate = w·u + b (see _apply)
        a = self.h.act(z)
        if self.h.pool:
            a = F.max_pool2d(a, 2)
        if isinstance(out, nn.Linear):  # global average pool into the classifier
            return a.mean((2, 3)).T[:, :, None]  # (P, N, 1)
        u = F.unfold(a, out.kernel_size, dilation=out.dilation, padding=out.padding, stride=out.stride)
        n, _, L = u.shape
        E = u.shape[1] // P
        return u.view(n, P, E, L).permute(1, 0, 3, 2).reshape(P, n * L, E)  # (P, N·L_j, E)


def channel_moments(x: Tensor, inp: nn.Conv2d, W: Tensor) -> tuple[float, float]:
    """Mean and variance over examples and positions of the new channel's pre-BN output w·u (bias-free)."""
    z = F.conv2d(x, W.reshape(1, *inp.weight.shape[1:]), None, stride=inp.stride, padding=inp.padding,
                 dilation=inp.dilation)
    return float(z.mean()), float(z.var(unbiased=False))
