"""The growth-method plugin interface: one base class, one file per method (like Optuna's samplers).

The trainer owns the loop, the optimizer, the clocks and the FLOP meter; a method only acts through
these hooks, called in this order:

    configure_optimizer(model, cfg)         once: an optimizer to use instead of the suite's (None: the suite's)
    setup(model, ctx)                       once, before the first step
    should_grow(model, ctx) -> bool         before every training step (keep it cheap)
    grow(model, ctx) -> list[GrowthEvent]   when should_grow said yes; timed and FLOP-counted as growth
    after_step(model, ctx)                  after every step, only if the method overrides it;
                                            timed and FLOP-counted as growth overhead

`ctx` is a `growbench.trainer.Context`: step/epoch counters, the loss function, a method-private
random generator, and `ctx.batches(n)` to draw statistics batches from the training set without
disturbing the training data stream (which is identical for every method of a suite).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from growbench.config import GrowthConfig

if TYPE_CHECKING:
    from growbench.models import GrowableNet
    from growbench.trainer import Context


@dataclass
class GrowthEvent:
    """What one growth action did. The trainer fills step, params, wall-clock and FLOPs."""

    where: str  # hidden layer name (or a comma-separated list)
    kind: str  # add | split | insert | update
    units_added: int
    predicted_loss_change: float | None = None  # the method's own first/second-order prediction
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
    preserves_function: ClassVar[bool] = True  # the conformance kit checks this promise

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

    @classmethod
    def has_after_step(cls) -> bool:
        return cls.after_step is not GrowthMethod.after_step


def settings_from_dict(cls: type, data: dict, method: str) -> Any:
    """Build a method's Settings dataclass; unknown keys and wrong types are ConfigErrors."""
    from growbench.config import _build

    return _build(cls, data, f"method_settings.{method}")


def settings_dict(settings: Any) -> dict:
    return dataclasses.asdict(settings) if dataclasses.is_dataclass(settings) else dict(settings or {})
