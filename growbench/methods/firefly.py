"""`firefly`: Firefly neural architecture descent (Wu, Liu, Stone & Liu, NeurIPS 2020; official code
klightz/Firefly, `--method fireflyn`). Spec: docs/methods/firefly.md.

One growth step (BatchNorm in eval mode throughout, its mode restored after):
  1. candidates on every hidden layer with room (`firefly_candidates`): a ± split of every existing unit
     (direction v), K brand-new units (in-weights u, out-weights o with |o| ≤ ε), and with `depth: true`
     an identity-initialised layer after the hidden layer (perturbed by ε-bounded weights); each
     candidate has a gate g, and all gates at 0 is the current network exactly;
  2. a short RMSprop descent of (v, u, o[, depth]) on the loss of the all-on candidate network (official:
     one epoch; here `opt_epochs` of the training set, with the suite's augmentation);
  3. scores s_c = ∂L/∂g_c at g = 1, averaged over `score_epochs` of the training set (mean-loss units);
  4. greedy selection of the k = max(1, int(grow_ratio · Σ widths)) most negative scores over all layers
     (official: one global threshold), each layer taking at most ctx.room(name) units;
  5. application, deepest layer first: `split_unit(name, idx, v[idx])` (copies w ± v, half out-weights),
     `add_units(name, u, 0, o)`, and `insert_identity_layer` + `update_weights` for a depth candidate.

Decisions where the spec is unverified or silent (details in docs/methods/firefly.md):
  * the predicted loss change of an event is Σ κ·s over its candidates with κ = ½ for splits (the split is
    even in its gate, so the loss is a·g² to leading order and the gate gradient at g = 1 is 2a) and κ = 1
    for new units and depth (linear in the gate); the ranking uses the raw gate gradients as the code does;
  * new units' out-weights are clamped to ±ε after each optimisation step (`spffn_clip`'s 1e-2; the
    official loop defines but does not call it) so that they enter ε-small; `epsilon: null` disables it;
  * new units of consecutive layers are not connected to each other (the code learns that O(ε²) link);
  * depth growth (paper only): one gated candidate layer per hidden layer, ranked with the width
    candidates as one candidate each, at most `max_depth_per_step` insertions per step; none after the
    last VGG conv (global average pooling sits between it and the classifier).
Known limits of the predictions (measured in the doc): a ReLU split changes the loss piecewise-linearly on a
finite set, so κ = ½ holds on average only; the official absolute split init U(±0.1) is not small at large
fan-in, where split predictions lose accuracy (new-unit predictions stay within a few %).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from growbench.methods.base import GrowthEvent, GrowthMethod
from growbench.methods.firefly_candidates import (ORDER_FACTOR, LayerCandidates, apply_layer, make_candidates,
                                                  optimise, predicted_change, score, select)

if TYPE_CHECKING:
    from growbench.models import GrowableNet
    from growbench.trainer import Context


@dataclass
class FireflySettings:
    grow_ratio: float = 0.35  # units added per step as a share of all hidden units (code 0.35, paper 0.3)
    new_candidates: int = 70  # K brand-new unit candidates per layer (code: 70)
    epsilon: float | None = 0.01  # |out-weights| of new units (and depth perturbations) ≤ ε; null: no bound
    opt_epochs: float = 1.0  # candidate optimisation: share of the training set, in epochs (code: 1)
    score_epochs: float = 1.0  # scoring pass: share of the training set, in epochs (code: 1)
    batch_size: int | None = None  # batches of both passes (None: the suite's; code: 128)
    lr: float = 1e-3  # RMSprop learning rate (code; alpha 0.9 and momentum 0.1 are fixed)
    penalty: float = 1e-2  # L2 penalty penalty·(‖v‖² + 1e-2·‖u‖²) during optimisation (code: 1e-2)
    split_init: float = 0.1  # v ~ U(±split_init) (code: 0.1)
    new_in_std: float = 0.1  # u ~ N(0, new_in_std²) (code: 0.1)
    only_improving: bool = False  # select only candidates with a negative score (code: no)
    depth: bool = False  # paper's depth growth: identity-initialised layers as candidates too
    max_depth_per_step: int = 1  # layer insertions per step when depth is on
    observe_examples: int = 1024  # leading scoring examples on which each event's loss change is measured

    def __post_init__(self) -> None:
        from growbench.config import ConfigError

        where = "method_settings.firefly"
        if not 0 < self.grow_ratio <= 10:
            raise ConfigError(f"{where}.grow_ratio must be in (0, 10], got {self.grow_ratio}")
        if self.new_candidates < 0:
            raise ConfigError(f"{where}.new_candidates must be >= 0, got {self.new_candidates}")
        if self.epsilon is not None and self.epsilon <= 0:
            raise ConfigError(f"{where}.epsilon must be > 0 or null, got {self.epsilon}")
        if self.opt_epochs < 0 or self.score_epochs <= 0:
            raise ConfigError(f"{where}: opt_epochs must be >= 0 and score_epochs > 0")
        if self.lr <= 0 or self.penalty < 0 or self.split_init < 0 or self.new_in_std < 0:
            raise ConfigError(f"{where}: lr must be > 0; penalty, split_init and new_in_std >= 0")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"{where}.batch_size must be >= 1 or null, got {self.batch_size}")
        if self.max_depth_per_step < 0 or self.observe_examples < 0:
            raise ConfigError(f"{where}: max_depth_per_step and observe_examples must be >= 0")


class Firefly(GrowthMethod):
    """Firefly width growth (splits + new units, as the official code) and optional depth growth (paper)."""

    name: ClassVar[str] = "firefly"
    Settings: ClassVar[type] = FireflySettings
    preserves_function: ClassVar[bool] = False  # the chosen candidates change the function by O(ε)

    def grow(self, model: "GrowableNet", ctx: "Context") -> list[GrowthEvent]:
        s = self.settings
        hidden = model.hidden_layers()
        room = {h.name: ctx.room(h.name, model) for h in hidden}
        layers = hidden if s.depth else [h for h in hidden if room[h.name] > 0]
        k = min(max(1, int(s.grow_ratio * sum(h.width for h in hidden))), sum(room.values()) + (
            s.max_depth_per_step if s.depth else 0))
        if not layers or k <= 0:
            return []
        was_training = model.training
        model.eval()  # BatchNorm statistics fixed while candidates are scored
        try:
            cands = make_candidates(model, layers, s.new_candidates, ctx.generator, split_init=s.split_init,
                                    new_in_std=s.new_in_std, eps=s.epsilon, depth=s.depth)
            n_train = len(ctx.dataset.train)
            bs = s.batch_size or ctx.batch_size
            steps = 0
            if s.opt_epochs > 0:
                steps = optimise(model, cands, ctx.batches(_examples(s.opt_epochs, n_train, bs), bs, ctx.augment),
                                 ctx.loss_fn, lr=s.lr, penalty=s.penalty, eps=s.epsilon)
            sp = score(model, cands, ctx.batches(_examples(s.score_epochs, n_train, bs), bs, ctx.augment),
                       ctx.loss_fn, keep_examples=s.observe_examples)
            chosen = select(cands, k, room, only_improving=s.only_improving,
                            max_depth=s.max_depth_per_step if s.depth else 0)
            return self._apply(model, ctx, cands, chosen, sp, k, steps)
        finally:
            model.train(was_training)

    @torch.no_grad()
    def _apply(self, model, ctx, cands: list[LayerCandidates], chosen, sp, k: int, steps: int) -> list[GrowthEvent]:
        """Apply the selection deepest layer first; one event per (layer, kind), with its loss change
        predicted on the scoring set and observed on its leading `observe_examples`."""
        by_inp = {id(c.h.inp): c for c in cands}
        nxt = {c.name: by_inp.get(id(c.h.out)) for c in cands}
        applied: dict[str, tuple[torch.Tensor, int]] = {}
        observe = sp.sub_batches
        loss = _mean_loss(model, ctx, observe) if observe else None
        events = []
        for c in reversed(cands):
            sel = chosen.get(c.name)
            if sel is None:
                continue
            pred = predicted_change(c, sel)
            pred_sub = predicted_change(c, sel, sp.sub_scores[c.name]) if observe else None
            n_next = nxt[c.name]
            grown_next = applied.get(n_next.name) if n_next is not None else None
            for kind in ("split", "add", "insert"):
                n_units = {"split": len(sel.split), "add": len(sel.new), "insert": int(sel.depth)}[kind]
                if n_units == 0:
                    continue
                width = c.h.inp.weight.shape[0]  # (after earlier kinds of this layer)
                inserted = apply_layer(model, c, sel, grown_next, kind)
                after = _mean_loss(model, ctx, observe) if observe else None
                scores = {"split": c.s_split[sel.split], "add": c.s_new[sel.new],
                          "insert": c.depth.score.view(1) if c.depth is not None and sel.depth else None}[kind]
                extra = {"gate_gradient_sum": float(scores.sum()), "order_factor": ORDER_FACTOR[kind],
                         "candidates": {"split": len(c.s_split), "add": len(c.s_new), "insert": 1}[kind],
                         "examples_scored": sp.examples, "optimisation_steps": steps, "budget_k": k,
                         "candidate_net_loss": sp.loss}
                if observe:
                    extra.update(predicted_on_observed=pred_sub[kind], examples_observed=sp.sub_examples)
                if inserted is not None:
                    extra["inserted"] = inserted
                    n_units = width  # the new layer's width
                events.append(GrowthEvent(
                    where=c.name, kind=kind, units_added=n_units, predicted_loss_change=pred[kind],
                    observed_loss_change=(after - loss) if observe else None, extra=extra))
                loss = after
            applied[c.name] = (sel.split, len(sel.new))
        return events


def _examples(epochs: float, n_train: int, batch_size: int) -> int:
    """Examples of a pass of `epochs` over the training set: at least one batch."""
    return min(n_train, max(batch_size, int(math.ceil(epochs * n_train))))


def _mean_loss(model, ctx, batches) -> float:
    n = sum(len(y) for _, y in batches)
    return float(sum(ctx.loss_fn(model(x), y).double() * len(y) for x, y in batches)) / n
