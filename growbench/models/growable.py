"""Growth primitives shared by every model family and every growth method.

A *hidden layer* is a place where units can be added: the units are produced by `inp` (layer l-1,
Linear or Conv2d), optionally normalised by `bn`, passed through `act`, and consumed by `out`
(layer l). Every primitive edits the parameters of existing modules in place, so hooks a method
registered on those modules keep working after growth. Parameters that change shape are replaced by
new `nn.Parameter`s; each replacement is logged in `model.remaps` as (old, new) with the old tensor
in the leading corner of the new one, which is what `growbench.optim.sync_optimizer` needs to keep
the optimizer state of existing entries and start new entries at zero.

Every primitive is function-preserving at zero amplitude (zero out-weights for `add_units`, zero
delta for `split_unit`, identity init for `insert_identity_layer`); tests prove it per family.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

Layer = nn.Linear | nn.Conv2d


@dataclass
class Hidden:
    """One growable hidden layer: `out(act(bn(inp(x))))` (with whatever pooling sits in between)."""

    name: str
    inp: Layer
    bn: nn.BatchNorm1d | nn.BatchNorm2d | None
    act: nn.Module
    out: Layer
    pool: bool = False  # a max-pool sits between act and out (the path is not linear in the units)

    @property
    def width(self) -> int:
        return self.inp.weight.shape[0]

    @property
    def kind(self) -> str:
        return "conv" if isinstance(self.inp, nn.Conv2d) else "linear"


def _set_param(model: "GrowableNet", module: nn.Module, attr: str, value: Tensor) -> None:
    old = getattr(module, attr)
    new = nn.Parameter(value.detach().clone(), requires_grad=old.requires_grad)
    setattr(module, attr, new)
    model.remaps.append((old, new))


def _set_features(layer: Layer, *, out: int | None = None, inp: int | None = None) -> None:
    if isinstance(layer, nn.Linear):
        if out is not None:
            layer.out_features = out
        if inp is not None:
            layer.in_features = inp
    else:
        if out is not None:
            layer.out_channels = out
        if inp is not None:
            layer.in_channels = inp


class GrowableNet(nn.Module):
    """Base class of the model families. Subclasses define `hidden_layers`, `spec`, `insert_identity_layer`."""

    family: str = ""

    def __init__(self) -> None:
        super().__init__()
        self.remaps: list[tuple[nn.Parameter, nn.Parameter]] = []

    # ---------------------------------------------------------------- family interface
    def hidden_layers(self) -> list[Hidden]:
        raise NotImplementedError

    def spec(self) -> dict:
        """A plain dict from which `growbench.models.from_spec` builds a fresh net of the same shape."""
        raise NotImplementedError

    def insert_identity_layer(self, after: str, **kwargs) -> str:
        """Insert a layer computing the identity right after hidden layer `after`; returns its name."""
        raise NotImplementedError

    # ---------------------------------------------------------------- lookup
    def hidden(self, name: str) -> Hidden:
        for h in self.hidden_layers():
            if h.name == name:
                return h
        valid = ", ".join(h.name for h in self.hidden_layers())
        raise KeyError(f"no hidden layer {name!r}; this {self.family} has: {valid}")

    def widths(self) -> dict[str, int]:
        return {h.name: h.width for h in self.hidden_layers()}

    # ---------------------------------------------------------------- primitives
    @torch.no_grad()
    def add_units(self, name: str, w_in: Tensor, b_in: Tensor | None, w_out: Tensor,
                  act_init: Tensor | None = None,
                  bn_init: tuple[Tensor, Tensor, Tensor, Tensor] | None = None) -> None:
        """Append k units to hidden layer `name`.

        w_in:  (k, fan_in) or (k, C_in, kh, kw)   new rows of `inp` (layer l-1)
        b_in:  (k,) or None (zero bias; ignored when `inp` has no bias)
        w_out: (fan_out, k) or (C_out, k, kh, kw) new columns of `out` (layer l); zeros preserve the function
        act_init: per-unit activation parameters of the new units, for activations that have them
                  (SENN's `Rational`: (k, 3) = (v, c, l); None = the activation's own default draw)
        bn_init:  (weight, bias, running_mean, running_var), each (k,), of the new BatchNorm channels;
                  None = the identity: weight 1, bias 0, running mean 0, running var 1. With zero w_out
                  the function is unchanged either way.
        """
        h = self.hidden(name)
        k = w_in.shape[0]
        W = h.inp.weight
        if tuple(w_in.shape[1:]) != tuple(W.shape[1:]):
            raise ValueError(f"w_in of {name} must have shape (k, {tuple(W.shape[1:])}), got {tuple(w_in.shape)}")
        O = h.out.weight
        want_out = (O.shape[0], k, *O.shape[2:])
        if tuple(w_out.shape) != want_out:
            raise ValueError(f"w_out of {name} must have shape {want_out}, got {tuple(w_out.shape)}")
        if b_in is not None and h.inp.bias is not None and tuple(b_in.shape) != (k,):
            raise ValueError(f"b_in of {name} must have shape ({k},), got {tuple(b_in.shape)}")
        n = W.shape[0]
        _set_param(self, h.inp, "weight", torch.cat([W, w_in.to(W)], 0))
        if h.inp.bias is not None:
            b = torch.zeros(k, device=W.device, dtype=W.dtype) if b_in is None else b_in.to(W)
            _set_param(self, h.inp, "bias", torch.cat([h.inp.bias, b], 0))
        _set_features(h.inp, out=n + k)
        if h.bn is not None:
            init = bn_init if bn_init is not None else (torch.ones(k), torch.zeros(k), torch.zeros(k), torch.ones(k))
            if any(tuple(t.shape) != (k,) for t in init):
                raise ValueError(f"bn_init of {name} must be four tensors of shape ({k},)")
            self._grow_bn(h.bn, *init)
        self._grow_act(h, k, act_init)
        _set_param(self, h.out, "weight", torch.cat([O, w_out.to(O)], 1))
        _set_features(h.out, inp=n + k)

    @torch.no_grad()
    def split_unit(self, name: str, idx: Tensor, delta: Tensor, out_fraction: float = 0.5) -> None:
        """Split units `idx` of hidden layer `name` in two: in-weights w ± delta.

        idx:   (m,) unit indices;  delta: (m, fan_in) or (m, C_in, kh, kw)
        The unit keeps `out_fraction` of its out-weights and the copy (appended at the end) the rest,
        so at delta = 0 the function is unchanged. BatchNorm parameters and statistics are copied.
        """
        h = self.hidden(name)
        idx = torch.as_tensor(idx, dtype=torch.long, device=h.inp.weight.device)
        if len(torch.unique(idx)) != len(idx):
            raise ValueError(f"split_unit({name!r}): idx has repeated units {idx.tolist()}; split each unit once")
        W = h.inp.weight
        if tuple(delta.shape) != (len(idx), *W.shape[1:]):
            raise ValueError(f"delta of {name} must have shape {(len(idx), *W.shape[1:])}, got {tuple(delta.shape)}")
        delta = delta.to(W)
        new_w = W.clone()
        new_w[idx] += delta
        _set_param(self, h.inp, "weight", torch.cat([new_w, W[idx] - delta], 0))
        if h.inp.bias is not None:
            _set_param(self, h.inp, "bias", torch.cat([h.inp.bias, h.inp.bias[idx]], 0))
        n = W.shape[0]
        _set_features(h.inp, out=n + len(idx))
        if h.bn is not None:
            bn = h.bn
            self._grow_bn(bn, bn.weight[idx], bn.bias[idx], bn.running_mean[idx], bn.running_var[idx])
        if hasattr(h.act, "grown"):  # the copies keep their parent's activation parameters
            self._grow_act(h, len(idx), h.act.coefficients()[idx.to(h.act.v.device)])
        O = h.out.weight
        new_o = O.clone()
        new_o[:, idx] *= out_fraction
        _set_param(self, h.out, "weight", torch.cat([new_o, O[:, idx] * (1.0 - out_fraction)], 1))
        _set_features(h.out, inp=n + len(idx))

    @torch.no_grad()
    def update_weights(self, layer: Layer | str, delta_w: Tensor, delta_b: Tensor | None = None) -> None:
        """W += delta_w (and b += delta_b) for an existing layer; `layer` is a module or a hidden layer's name
        (then its `out` layer, the one TINY's best update δW* changes)."""
        mod = self.hidden(layer).out if isinstance(layer, str) else layer
        mod.weight.add_(delta_w.to(mod.weight))
        if delta_b is not None and mod.bias is not None:
            mod.bias.add_(delta_b.to(mod.bias))

    def _grow_act(self, h: Hidden, k: int, init: Tensor | None) -> None:
        """Per-unit activation parameters (e.g. SENN's Rational) grow with the layer; no-op for ReLU & co."""
        if hasattr(h.act, "grown"):
            for attr, value in h.act.grown(k, init).items():
                _set_param(self, h.act, attr, value)
        elif init is not None:
            raise ValueError(f"act_init given, but the activation of {h.name} ({type(h.act).__name__}) "
                             "has no per-unit parameters")

    def _grow_bn(self, bn: nn.Module, w: Tensor, b: Tensor, mean: Tensor, var: Tensor) -> None:
        dev, dt = bn.weight.device, bn.weight.dtype
        _set_param(self, bn, "weight", torch.cat([bn.weight, w.to(dev, dt)]))
        _set_param(self, bn, "bias", torch.cat([bn.bias, b.to(dev, dt)]))
        bn.running_mean = torch.cat([bn.running_mean, mean.to(dev, bn.running_mean.dtype)])
        bn.running_var = torch.cat([bn.running_var, var.to(dev, bn.running_var.dtype)])
        bn.num_features = bn.weight.shape[0]

    # ---------------------------------------------------------------- counts
    def param_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.spec()["input_shape"])


def _meta_copy(model: nn.Module) -> nn.Module:
    """A hook-free copy on the meta device: FLOPs can be counted without compute or side effects."""
    remaps, model.__dict__["remaps"] = model.__dict__.get("remaps"), []
    try:
        twin = copy.deepcopy(model)
    finally:
        if remaps is not None:
            model.__dict__["remaps"] = remaps
    for m in twin.modules():
        for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            getattr(m, hooks).clear()
    return twin.to("meta")


def count_flops(model: GrowableNet, batch: int = 1, train: bool = False, loss: str = "classification") -> int:
    """FLOPs of a forward (inference, eval mode) or forward+backward (training) pass on `batch` examples,
    counted by torch's FlopCounterMode on a meta-device copy of the model."""
    twin = _meta_copy(model)
    twin.train(train)
    x = torch.zeros(batch, *model.input_shape(), device="meta")
    with FlopCounterMode(display=False) as counter:
        if train:
            out = twin(x)
            out.float().pow(2).mean().backward()
        else:
            with torch.no_grad():
                twin(x)
    return int(counter.get_total_flops())
