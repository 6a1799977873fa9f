"""The growth-method plugin interface: one base class, one file per method (like Optuna's samplers).

The trainer owns the loop, the optimizer, the clocks and the FLOP meter; a method only acts through
these hooks, called in this order:

    configure_optimizer(model, cfg)         once: an optimizer to use instead of the suite's (None: the suite's)
    setup(model, ctx)                       once, before the first step
    should_grow(model, ctx) -> bool         before every training step (keep it cheap)
    grow(model, ctx) -> list[GrowthEvent]   when should_grow said yes; timed and FLOP-counted as growth
    after_step(model, ctx)                  after every step, only if the method overrides it;
                                            timed and FLOP-counted as growth overhead
    state_dict() / load_state_dict(state)   the method's own state in a cell's checkpoint (see below)

Checkpoints: at every evaluation point the trainer saves the network, optimizer, RNGs and the method's
`state_dict()`. When a killed or preempted cell resumes, the trainer rebuilds the (grown) network,
calls `setup(model, ctx)` again (ctx.step is the resume step; setup's cost is not charged twice and
any randomness it draws is rewound afterwards), then loads the saved weights and calls
`load_state_dict(state)`. So `setup` should (re)create hooks and references to modules, and
`state_dict` must hold everything else that changes while training. The default saves the plain-data
instance attributes (numbers, strings, tensors, and lists/tuples/sets/dicts of them) other than
`settings` and `growth`, and skips the rest (modules, hook handles, generators): override both
methods if your method keeps state in other objects.

`ctx` is a `growbench.trainer.Context`: step/epoch counters, the loss function, a method-private
random generator, `ctx.room(layer)` (units left under the suite's width cap), and `ctx.batches(n)` to
draw statistics batches from the training set without disturbing the training data stream (which is
identical for every method of a suite).

A method edits the network only through the primitives of `growbench.models.GrowableNet`
(`add_units`, `split_unit`, `update_weights`, `insert_identity_layer`) and reports each change as a
`GrowthEvent` (where, kind, units added, its own predicted loss change); the trainer adds the step,
params, probe losses before/after, wall-clock and FLOPs. Class attributes declare the rest: `name`,
`Settings` (a dataclass with a default for every field, filled from `method_settings.<name>`),
`grows`, `preserves_function`, `families` and `search_space()`. Methods are registered in the
entry-point group `growbench.methods`; `growbench.testing.MethodConformance` checks all of this
(docs/plugins.md walks through writing one).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from growbench.config import MODEL_FAMILIES, GrowthConfig

if TYPE_CHECKING:
    from growbench.models import GrowableNet
    from growbench.trainer import Context


@dataclass
class GrowthEvent:
    """What one growth action did. The trainer fills step, params, wall-clock and FLOPs."""

    where: str  # hidden layer name (or a comma-separated list)
    kind: str  # add | split | insert | update
    units_added: int
    predicted_loss_change: float | None = None  # the method's own prediction (< 0: decrease; 0.0: function kept)
    observed_loss_change: float | None = None  # measured by the method on its statistics set, if it does
    extra: dict = field(default_factory=dict)


@dataclass
class NoSettings:
    pass


class GrowthMethod:
    """Base class of every method (built-in or plugin). Subclasses set `name` and `Settings`."""

    name: ClassVar[str] = ""
    Settings: ClassVar[type] = NoSettings
    grows: ClassVar[bool] = True  # False for fixed-size baselines
    preserves_function: ClassVar[bool] = True  # growth leaves the network function unchanged (the kit checks it)
    families: ClassVar[tuple[str, ...]] = MODEL_FAMILIES  # model families it supports; the kit skips the others

    def __init__(self, settings: Any = None, growth: GrowthConfig | None = None) -> None:
        self.settings = settings if settings is not None else self.Settings()
        self.growth = growth or GrowthConfig()
        self._growth_steps: set[int] | None = None
        self.events_done = 0

    # ---------------------------------------------------------------- hooks
    def configure_optimizer(self, model: "GrowableNet", cfg: Any) -> Any:
        """A torch optimizer to train with instead of the suite's (e.g. SENN's natural-gradient steps), or
        None. It gets the suite's learning-rate schedule, and after growth its state is kept for existing
        entries and zero for new ones (`growbench.optim.sync_optimizer`) like any other optimizer."""
        return None

    def setup(self, model: "GrowableNet", ctx: "Context") -> None:
        pass

    def growth_steps(self, ctx: "Context") -> set[int]:
        """Steps at which the shared schedule (suite `growth:` + the method's overrides) grows."""
        if self._growth_steps is None:
            g, spe = self.growth, ctx.steps_per_epoch
            stop = ctx.total_steps if g.stop_epoch is None else min(ctx.total_steps, round(g.stop_epoch * spe))
            steps, e = [], g.start_epoch
            while round(e * spe) < stop and (g.max_events is None or len(steps) < g.max_events):
                steps.append(round(e * spe))
                e += g.every_epochs
            self._growth_steps = set(steps)
        return self._growth_steps

    def should_grow(self, model: "GrowableNet", ctx: "Context") -> bool:
        return self.grows and ctx.step in self.growth_steps(ctx)

    def grow(self, model: "GrowableNet", ctx: "Context") -> list[GrowthEvent]:
        return []

    def after_step(self, model: "GrowableNet", ctx: "Context") -> None:
        pass

    def state_dict(self) -> dict:
        """What a checkpoint saves of this method (default: plain-data attributes, see the module doc)."""
        return {k: v for k, v in vars(self).items() if k not in ("settings", "growth") and _plain(v)}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`'s output; called on resume after `setup(model, ctx)`."""
        self.__dict__.update(state)

    @classmethod
    def search_space(cls) -> dict[str, dict]:
        """Tunable settings as Optuna-style distributions, for hyper-parameter searches (default: none).

        {setting: {"type": "float", "low": 1e-3, "high": 1.0, "log": True}     # trial.suggest_float
                   {"type": "int", "low": 1, "high": 16, "log": False, "step": 1} # trial.suggest_int
                   {"type": "categorical", "choices": ["all", "one"]}}          # trial.suggest_categorical
        Keys are fields of `Settings`; every value in a range must be a valid setting (the kit checks
        the bounds and every choice)."""
        return {}

    @classmethod
    def has_after_step(cls) -> bool:
        return cls.after_step is not GrowthMethod.after_step


def _plain(v: Any) -> bool:
    """Data that survives a checkpoint unchanged in meaning: no references to modules or live objects."""
    import torch

    if v is None or isinstance(v, (bool, int, float, complex, str, bytes)):
        return True
    if isinstance(v, torch.Tensor):
        return not isinstance(v, torch.nn.Parameter)  # a parameter belongs to the network
    if isinstance(v, (list, tuple, set, frozenset)):
        return all(_plain(x) for x in v)
    if isinstance(v, dict):
        return all(_plain(k) and _plain(x) for k, x in v.items())
    return False


def settings_from_dict(cls: type, data: dict, method: str) -> Any:
    """Build a method's Settings dataclass; unknown keys and wrong types are ConfigErrors."""
    from growbench.config import _build

    return _build(cls, data, f"method_settings.{method}")


def settings_dict(settings: Any) -> dict:
    return dataclasses.asdict(settings) if dataclasses.is_dataclass(settings) else dict(settings or {})
