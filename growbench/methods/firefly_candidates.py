"""Firefly's temporary candidate network: gated candidates on every growable layer, their short
optimisation, gate-gradient scores, greedy selection and application through the shared primitives.

Candidates of one hidden layer `out(act(bn(inp(x))))` with C units, fan-in shape S (= inp.weight.shape[1:])
and K new-unit candidates:

  split i (C of them):  unit i becomes two copies with in-weights w_i ± g_i·v_i, each with half the
                        out-weights, i.e. `out` sees the average ½(h(w_i + g_i v_i) + h(w_i − g_i v_i));
  new j (K of them):    a unit with in-weights u_j, identity BatchNorm (as `add_units` creates it), the
                        layer's activation, and out-weights g_j·o_j into `out`, |o_j| ≤ ε;
  depth (optional):     a layer inserted after the hidden layer as `insert_identity_layer` builds it,
                        perturbed by its gate: weights I + g·Δ (|Δ| ≤ ε) for MLP/VGG, a residual block
                        whose last BatchNorm weight is g·γ (|γ| ≤ ε) for ResNet.

All gates g = 0 is the current network exactly; g = 1 on a subset is exactly the network that applying
that subset gives. Nothing in the model is edited while candidates are present: forward hooks on the
`inp` and `out` modules add the candidates (the ± copies travel as a doubled batch between `inp` and
`out`, which is exact because BatchNorm runs in eval mode and activation/pooling act per example), and
every hook is removed when the `CandidateForward` context exits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from growbench.models import GrowableNet, Hidden

# Taylor order of each candidate kind in its gate: the split is even in g (loss change ≈ a·g², so the
# gate gradient at g = 1 is 2a and the predicted change is half of it); new units and depth are linear.
ORDER_FACTOR = {"split": 0.5, "add": 1.0, "insert": 1.0}


# --------------------------------------------------------------------------- layer maps
def _apply(layer: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`layer`'s linear map with another weight (same stride/padding): (B, fan_in) or (B, C_in, H, W)."""
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, bias)
    return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)


def _bn_identity(bn: nn.Module | None, z: Tensor) -> Tensor:
    """A new channel's BatchNorm in eval mode: weight 1, bias 0, running mean 0, var 1 (what add_units sets)."""
    return z if bn is None else z / math.sqrt(1.0 + bn.eps)


def _to_consumer(h: "Hidden", a: Tensor) -> Tensor:
    """Activations of new units -> what `out` consumes: 2x2 max-pool if the layer has one, global average
    pooling when a conv layer feeds a Linear (VGG's last conv -> classifier)."""
    if h.pool:
        a = F.max_pool2d(a, 2)
    if isinstance(h.out, nn.Linear) and a.dim() == 4:
        a = a.mean((2, 3))
    return a


# --------------------------------------------------------------------------- depth candidates
class DepthCandidate:
    """A new layer after hidden layer `h`, gated by a scalar g; base class of the two kinds."""

    kind = "insert"

    def __init__(self) -> None:
        self.gate = torch.ones(())
        self.score: Tensor | None = None

    def params(self) -> list[Tensor]:
        raise NotImplementedError

    def bounded(self) -> list[Tensor]:
        """Parameters clamped to ±ε after each optimisation step (the ε-small part of x + ε·h(x))."""
        raise NotImplementedError


class LayerDepth(DepthCandidate):
    """MLP / VGG: the identity Linear (or Dirac 3x3 conv) + activation that `insert_identity_layer` adds,
    with weights I + g·Δ and bias g·c, applied to what `out` consumes (after pooling).

    Exact with splits in the same step: the inserted layer sees both copies of a split unit, so each copy
    keeps its own identity path and the mixing term Δ·x + c is computed from the pair's average (each copy's
    column carries Δ/2, each copy's row repeats its parent's; `_apply_depth` builds those weights)."""

    def __init__(self, h: "Hidden", eps: float, gen: torch.Generator, activation: str) -> None:
        super().__init__()
        W = h.inp.weight
        C = W.shape[0]
        self.conv = isinstance(h.inp, nn.Conv2d)
        shape = (C, C, 3, 3) if self.conv else (C, C)
        self.delta = ((torch.rand(shape, generator=gen) * 2 - 1) * eps).to(W)  # Δ: (C, C[, 3, 3])
        self.bias = torch.zeros(C).to(W)  # c: (C,)
        self.activation = activation  # "relu" | "identity"
        self.gate = self.gate.to(W)

    def params(self) -> list[Tensor]:
        return [self.delta, self.bias]

    def bounded(self) -> list[Tensor]:
        return [self.delta, self.bias]

    def forward(self, plus: Tensor, minus: Tensor) -> Tensor:
        """plus, minus: the two copies' consumed activations (B, C[, H, W]); returns their average after
        the inserted layer, which is what `out` then sees with half out-weights per copy."""
        g = self.gate
        avg = (plus + minus) / 2
        e = F.conv2d(avg, g * self.delta, g * self.bias, padding=1) if self.conv else F.linear(
            avg, g * self.delta, g * self.bias)
        act = F.relu if self.activation == "relu" else (lambda t: t)
        return (act(plus + e) + act(minus + e)) / 2


class BlockDepth(DepthCandidate):
    """ResNet: the basic block `insert_identity_layer` adds after this block (hidden width = this block's),
    with freshly initialised convs and last BatchNorm weight g·γ (bias 0), i.e. relu(y + g·branch(y))."""

    def __init__(self, block: nn.Module, eps: float, gen: torch.Generator) -> None:
        super().__init__()
        self.block = block
        W1 = block.conv1.weight
        hidden, w = W1.shape[0], block.conv2.weight.shape[0]
        self.eps_bn = block.bn1.eps

        def kaiming(shape: tuple[int, ...]) -> Tensor:  # nn.Conv2d's default init
            bound = 1.0 / math.sqrt(shape[1] * shape[2] * shape[3])
            return ((torch.rand(shape, generator=gen) * 2 - 1) * bound).to(W1)

        self.w1 = kaiming((hidden, w, 3, 3))  # (hidden, w, 3, 3)
        self.w2 = kaiming((w, hidden, 3, 3))  # (w, hidden, 3, 3)
        self.gamma = ((torch.rand(w, generator=gen) * 2 - 1) * eps).to(W1)  # γ: (w,)
        self.gate = self.gate.to(W1)

    def params(self) -> list[Tensor]:
        return [self.w1, self.w2, self.gamma]

    def bounded(self) -> list[Tensor]:
        return [self.gamma]

    def forward(self, y: Tensor) -> Tensor:
        """y: the block's output (B, w, H, W), non-negative."""
        s = 1.0 / math.sqrt(1.0 + self.eps_bn)  # identity BatchNorm in eval mode
        a = F.relu(F.conv2d(y, self.w1, padding=1) * s)
        b = F.conv2d(a, self.w2, padding=1) * s * (self.gate * self.gamma).view(1, -1, 1, 1)
        return F.relu(y + b)


def _block_of(model: nn.Module, h: "Hidden") -> nn.Module | None:
    for m in model.modules():
        if getattr(m, "conv1", None) is h.inp and getattr(m, "conv2", None) is h.out:
            return m
    return None


# --------------------------------------------------------------------------- layer candidates
@dataclass
class LayerCandidates:
    """Candidates of one hidden layer; tensors are plain (non-Parameter) tensors on the layer's device."""

    h: "Hidden"
    v: Tensor  # (C, *S)            split directions
    u: Tensor  # (K, *S)            new units' in-weights
    o: Tensor  # (C_next, K[, kh, kw]) new units' out-weights into `out`
    g_split: Tensor  # (C,) gates
    g_new: Tensor  # (K,)
    depth: DepthCandidate | None = None
    s_split: Tensor | None = None  # (C,) scores ∂L/∂g at g = 1 (mean-loss units)
    s_new: Tensor | None = None  # (K,)

    @property
    def name(self) -> str:
        return self.h.name

    def params(self) -> list[Tensor]:
        return [self.v, self.u, self.o] + (self.depth.params() if self.depth is not None else [])

    def gates(self) -> list[Tensor]:
        return [self.g_split, self.g_new] + ([self.depth.gate] if self.depth is not None else [])


def make_candidates(model: "GrowableNet", layers: list["Hidden"], k_new: int, gen: torch.Generator, *,
                    split_init: float = 0.1, new_in_std: float = 0.1, eps: float | None = 0.01,
                    depth: bool = False) -> list[LayerCandidates]:
    """Initial candidates (official init): v ~ U(±split_init), u ~ N(0, new_in_std²), o ~ U(±ε)."""
    bound = 0.01 if eps is None else eps
    out = []
    for h in layers:
        W, O = h.inp.weight, h.out.weight
        C = W.shape[0]
        v = ((torch.rand((C, *W.shape[1:]), generator=gen) * 2 - 1) * split_init).to(W)
        u = (torch.randn((k_new, *W.shape[1:]), generator=gen) * new_in_std).to(W)
        o = ((torch.rand((O.shape[0], k_new, *O.shape[2:]), generator=gen) * 2 - 1) * bound).to(O)
        c = LayerCandidates(h, v, u, o, torch.ones(C).to(W), torch.ones(k_new).to(W))
        if depth:
            c.depth = depth_candidate(model, h, bound, gen)
        out.append(c)
    return out


def depth_candidate(model: "GrowableNet", h: "Hidden", eps: float, gen: torch.Generator) -> DepthCandidate | None:
    """The depth candidate after `h`, or None where this implementation has none: the last VGG conv (the
    global average pool sits between it and the classifier, so the inserted conv's input is not what
    `out` consumes) and MLP layers whose activation is neither ReLU nor identity."""
    if model.family == "resnet":
        block = _block_of(model, h)
        return None if block is None else BlockDepth(block, eps, gen)
    if isinstance(h.inp, nn.Conv2d) and isinstance(h.out, nn.Linear):
        return None
    act = "relu" if isinstance(h.act, nn.ReLU) else ("identity" if isinstance(h.act, nn.Identity) else None)
    return None if act is None else LayerDepth(h, eps, gen, act)


# --------------------------------------------------------------------------- the candidate forward
class CandidateForward:
    """Context manager: while active, `model(x)` is the candidate network f_g (module docstring).

    Hooks per module M (M may be `out` of layer l and `inp` of layer l+1 at once):
      pre-hook   (M is out of l):  average the ± halves of the doubled batch (2B -> B), through l's
                                   depth candidate if any;
      forward    (M is out of l):  add l's new units:  result += M_{o·g}(new activations of l);
      forward    (M is inp of l):  z -> cat(z + δ, z − δ) with δ = M_{v·g}(x) (B -> 2B), and compute
                                   l's new units act(bn_id(M_u(x))) for its `out`.
    """

    def __init__(self, cands: list[LayerCandidates]) -> None:
        self.cands = cands
        self.handles: list = []
        self._new: dict[str, Tensor] = {}  # layer -> new units' consumed activations (B, K[, H, W])
        self._batch: dict[str, int] = {}  # layer -> B, the batch before doubling

    def __enter__(self) -> "CandidateForward":
        roles: dict[int, tuple[nn.Module, list, list]] = {}
        for c in self.cands:
            roles.setdefault(id(c.h.out), (c.h.out, [], []))[1].append(c)
            roles.setdefault(id(c.h.inp), (c.h.inp, [], []))[2].append(c)
        try:
            for mod, out_of, inp_of in roles.values():
                if out_of:
                    self.handles.append(mod.register_forward_pre_hook(self._pre(out_of)))
                self.handles.append(mod.register_forward_hook(self._post(out_of, inp_of)))
            for c in self.cands:
                if isinstance(c.depth, BlockDepth):
                    d = c.depth
                    self.handles.append(d.block.register_forward_hook(lambda m, a, r, d=d: d.forward(r)))
        except Exception:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for hd in self.handles:
            hd.remove()
        self.handles.clear()
        self._new.clear()
        self._batch.clear()

    def _pre(self, out_of: list[LayerCandidates]) -> Callable:
        def hook(mod, args):
            x = args[0]
            for c in out_of:
                B = self._batch.get(c.name)
                plus, minus = (x[:B], x[B:]) if B is not None and x.shape[0] == 2 * B else (x, x)
                if isinstance(c.depth, LayerDepth):
                    x = c.depth.forward(plus, minus)
                else:
                    x = (plus + minus) / 2  # the two copies, each with half the out-weights
            return (x, *args[1:])
        return hook

    def _post(self, out_of: list[LayerCandidates], inp_of: list[LayerCandidates]) -> Callable:
        def hook(mod, args, r):
            for c in out_of:
                a = self._new.pop(c.name, None)
                if a is not None:
                    r = r + _apply(mod, a, c.o * _expand(c.g_new, c.o, 1))
            x = args[0]
            for c in inp_of:
                delta = _apply(mod, x, c.v * _expand(c.g_split, c.v, 0))  # (B, C[, H, W])
                z_new = _apply(mod, x, c.u)  # (B, K[, H, W])
                self._new[c.name] = _to_consumer(c.h, c.h.act(_bn_identity(c.h.bn, z_new)))
                self._batch[c.name] = r.shape[0]
                r = torch.cat([r + delta, r - delta], 0)
            return r
        return hook


def _expand(g: Tensor, like: Tensor, dim: int) -> Tensor:
    shape = [1] * like.dim()
    shape[dim] = -1
    return g.view(shape)


# --------------------------------------------------------------------------- optimise and score
def optimise(model: nn.Module, cands: list[LayerCandidates], batches: Iterable[tuple[Tensor, Tensor]],
             loss_fn: Callable, *, lr: float = 1e-3, penalty: float = 1e-2, eps: float | None = 0.01) -> int:
    """Short RMSprop descent of the candidates' free parameters on the loss of the all-on candidate network
    (official: lr 1e-3, alpha 0.9, momentum 0.1, penalty 1e-2·(‖v‖² + 1e-2·‖u‖²)); returns the steps taken."""
    params = [p for c in cands for p in c.params()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.RMSprop(params, lr=lr, alpha=0.9, momentum=0.1)
    steps = 0
    try:
        with CandidateForward(cands):
            for x, y in batches:
                loss = loss_fn(model(x), y)
                reg = sum(c.v.pow(2).sum() + 1e-2 * c.u.pow(2).sum() for c in cands)
                grads = torch.autograd.grad(loss + penalty * reg, params)
                for p, g in zip(params, grads):
                    p.grad = g
                opt.step()
                if eps is not None:
                    with torch.no_grad():
                        for c in cands:
                            c.o.clamp_(-eps, eps)
                            for t in (c.depth.bounded() if c.depth is not None else []):
                                t.clamp_(-eps, eps)
                steps += 1
    finally:
        for p in params:
            p.grad = None
            p.requires_grad_(False)
    return steps


@dataclass
class ScorePass:
    loss: float  # mean loss of the all-on candidate network over the scoring set
    examples: int
    sub_examples: int = 0  # examples of the leading batches kept to observe the growth
    sub_batches: list = field(default_factory=list)
    sub_scores: dict = field(default_factory=dict)  # layer -> (s_split, s_new, s_depth) on those batches


def score(model: nn.Module, cands: list[LayerCandidates], batches: Iterable[tuple[Tensor, Tensor]],
          loss_fn: Callable, keep_examples: int = 0) -> ScorePass:
    """Gate gradients ∂L/∂g at g = 1 (all candidates on), averaged over the scoring set in mean-loss units
    (official `spffn_update_w` with alpha = 1). The leading batches, up to `keep_examples`, are kept with
    their own average scores so that the growth can be observed on exactly the set it was predicted on."""
    gates = [g for c in cands for g in c.gates()]
    sums = [torch.zeros_like(g, dtype=torch.float64) for g in gates]
    sub = [torch.zeros_like(g, dtype=torch.float64) for g in gates]
    n, n_sub = 0, 0
    loss_sum = torch.zeros((), dtype=torch.float64, device=gates[0].device)  # no host sync per batch
    kept = []
    for g in gates:
        g.requires_grad_(True)
    try:
        with CandidateForward(cands):
            for x, y in batches:
                b = len(y)
                loss = loss_fn(model(x), y)  # mean over the batch
                grads = torch.autograd.grad(loss, gates)
                keep = n_sub + b <= keep_examples
                for i, gr in enumerate(grads):
                    sums[i] += gr.double() * b
                    if keep:
                        sub[i] += gr.double() * b
                if keep:
                    kept.append((x, y))
                    n_sub += b
                loss_sum += loss.detach().double() * b
                n += b
    finally:
        for g in gates:
            g.requires_grad_(False)
    if n == 0:
        raise ValueError("firefly: the scoring set is empty")
    i = 0
    res = ScorePass(float(loss_sum) / n, n, n_sub, kept)
    for c in cands:
        c.s_split, c.s_new = (sums[i] / n).to(c.v.dtype), (sums[i + 1] / n).to(c.v.dtype)
        part = [sub[i] / max(n_sub, 1), sub[i + 1] / max(n_sub, 1)]
        i += 2
        if c.depth is not None:
            c.depth.score = (sums[i] / n).to(c.v.dtype)
            part.append(sub[i] / max(n_sub, 1))
            i += 1
        res.sub_scores[c.name] = part
    return res


# --------------------------------------------------------------------------- select
@dataclass
class Selection:
    split: Tensor  # (m,) unit indices to split, ascending
    new: Tensor  # (k,) new-candidate indices, ascending
    depth: bool = False

    @property
    def units(self) -> int:
        return len(self.split) + len(self.new)


def select(cands: list[LayerCandidates], k: int, room: dict[str, int], *, only_improving: bool = False,
           max_depth: int = 1) -> dict[str, Selection]:
    """Greedy top-k over all candidates of all layers by gate gradient, most negative first (official:
    one global threshold). A layer takes no more units than its room; a depth candidate counts as one
    candidate and at most `max_depth` are taken; `only_improving` stops at the first score ≥ 0."""
    pool = []  # (score, layer index, kind, index)
    for li, c in enumerate(cands):
        pool += [(float(s), li, "split", i) for i, s in enumerate(c.s_split.tolist())]
        pool += [(float(s), li, "add", j) for j, s in enumerate(c.s_new.tolist())]
        if c.depth is not None and c.depth.score is not None:
            pool.append((float(c.depth.score), li, "insert", 0))
    pool.sort(key=lambda t: (t[0], t[1], t[2], t[3]))
    taken: dict[int, dict[str, list[int]]] = {li: {"split": [], "add": [], "insert": []} for li in range(len(cands))}
    used = {li: 0 for li in range(len(cands))}
    n, depth_taken = 0, 0
    for s, li, kind, i in pool:
        if n >= k or (only_improving and s >= 0):
            break
        if kind == "insert":
            if depth_taken >= max_depth:
                continue
            depth_taken += 1
        else:
            if used[li] >= room.get(cands[li].name, 0):
                continue
            used[li] += 1
        taken[li][kind].append(i)
        n += 1
    out = {}
    for li, c in enumerate(cands):
        t = taken[li]
        if t["split"] or t["add"] or t["insert"]:
            dev = c.v.device
            out[c.name] = Selection(torch.tensor(sorted(t["split"]), dtype=torch.long, device=dev),
                                    torch.tensor(sorted(t["add"]), dtype=torch.long, device=dev),
                                    bool(t["insert"]))
    return out


def predicted_change(c: LayerCandidates, sel: Selection, scores: list[Tensor] | None = None) -> dict[str, float]:
    """Per kind, Σ κ·s over the selected candidates (κ = ORDER_FACTOR): the predicted change of the mean loss
    when they are applied at gate 1. `scores` = (s_split, s_new[, s_depth]) to use instead of the layer's."""
    s_split, s_new = (c.s_split, c.s_new) if scores is None else (scores[0], scores[1])
    s_depth = (c.depth.score if c.depth is not None else None) if scores is None else (
        scores[2] if len(scores) > 2 else None)
    out = {"split": ORDER_FACTOR["split"] * float(s_split[sel.split].sum()) if len(sel.split) else 0.0,
           "add": ORDER_FACTOR["add"] * float(s_new[sel.new].sum()) if len(sel.new) else 0.0,
           "insert": ORDER_FACTOR["insert"] * float(s_depth) if sel.depth and s_depth is not None else 0.0}
    return out


# --------------------------------------------------------------------------- apply
@torch.no_grad()
def apply_layer(model: "GrowableNet", c: LayerCandidates, sel: Selection, grown_next: tuple[Tensor, int] | None,
                kind: str) -> str | None:
    """Apply one kind ("split" | "add" | "insert") of layer c's selection with the primitives.

    grown_next: (split indices, number of new units) already applied to the hidden layer whose `inp` is
    this layer's `out` (layers are applied deepest first), so that new units' out-weights get a row for
    each of those: a split copy inherits its parent's row, a new unit of the next layer gets 0 (new units
    of consecutive layers are not connected to each other). Returns the name of an inserted layer."""
    h = model.hidden(c.name)
    if kind == "split" and len(sel.split):
        model.split_unit(h.name, sel.split, c.v[sel.split], 0.5)
    elif kind == "add" and len(sel.new):
        o = c.o[:, sel.new]  # (C_next, k[, kh, kw])
        if grown_next is not None:
            nxt_split, nxt_new = grown_next
            o = torch.cat([o, o[nxt_split], o.new_zeros((nxt_new, *o.shape[1:]))], 0)
        bias = torch.zeros(len(sel.new)).to(c.u) if h.inp.bias is not None else None
        model.add_units(h.name, c.u[sel.new], bias, o)
    elif kind == "insert" and sel.depth and c.depth is not None:
        return _apply_depth(model, h, c.depth, sel.split)
    return None


def _apply_depth(model: "GrowableNet", h: "Hidden", d: DepthCandidate, split: Tensor) -> str:
    """Insert the depth candidate after `h` (already grown by this step's `split` units and new units)."""
    cap = getattr(h.inp, "growbench_max_width", None)
    if isinstance(d, BlockDepth):
        name = model.insert_identity_layer(h.name, hidden=d.w1.shape[0])
        nh = model.hidden(name)
        block = _block_of(model, nh)
        block.train(model.training)  # a fresh block is in training mode; BatchNorm must follow the model
        model.update_weights(block.conv1, d.w1 - block.conv1.weight)
        model.update_weights(block.conv2, d.w2 - block.conv2.weight)
        model.update_weights(block.bn2, d.gamma - block.bn2.weight)  # bias stays 0
    else:
        kw = {} if model.family != "mlp" else {"activation": d.activation}
        name = model.insert_identity_layer(h.name, **kw)
        nh = model.hidden(name)
        W = nh.inp.weight  # (C', C'[, 3, 3]), C' = C + m copies + new units (identity for the new units)
        C, m = d.delta.shape[0], len(split)
        cols = d.delta.clone()  # (C, C[, 3, 3])
        cols[:, split] /= 2  # a split unit's column is shared by its two copies
        rows = torch.cat([cols, cols[:, split]], 1)  # (C, C + m[, 3, 3])
        dw, db = torch.zeros_like(W), torch.zeros_like(nh.inp.bias)
        dw[:C + m, :C + m] = torch.cat([rows, rows[split]], 0)  # a copy's row repeats its parent's
        db[:C + m] = torch.cat([d.bias, d.bias[split]])
        model.update_weights(nh.inp, dw, db)
    if cap is not None:  # an inserted layer is capped like the layer it follows
        nh.inp.growbench_max_width = cap
    return name
