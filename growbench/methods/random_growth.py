"""`random`: adds randomly initialised units on the shared growth schedule.

The sanity baseline a growth method must beat: same schedule, same number of units, no signal.
New units get Kaiming-uniform in-weights (as a fresh layer would) and zero out-weights, so the
network function is unchanged at the moment of growth (GradMax's `random-in/zero-out` baseline).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from growbench.methods.base import GrowthEvent, GrowthMethod


@dataclass
class RandomSettings:
    units_per_step: int = 1  # units added to each grown layer per growth event
    layers: str = "all"  # all: every growable layer per event; one: one layer drawn at random

    def __post_init__(self) -> None:
        from growbench.config import ConfigError

        if self.layers not in ("all", "one"):
            raise ConfigError(f"method_settings.random.layers: unknown value {self.layers!r}; valid choices: all, one")
        if self.units_per_step < 1:
            raise ConfigError(f"method_settings.random.units_per_step must be >= 1, got {self.units_per_step}")


class RandomGrowth(GrowthMethod):
    name: ClassVar[str] = "random"
    Settings: ClassVar[type] = RandomSettings

    def grow(self, model, ctx) -> list[GrowthEvent]:
        s = self.settings
        layers = [h for h in model.hidden_layers() if ctx.room(h.name) > 0]
        if s.layers == "one" and layers:
            layers = [layers[int(torch.randint(len(layers), (1,), generator=ctx.generator))]]
        events = []
        for h in layers:
            k = min(s.units_per_step, ctx.room(h.name))
            W = h.inp.weight
            fan_in = W[0].numel()
            bound = 1.0 / math.sqrt(fan_in)  # nn.Linear / nn.Conv2d default init (kaiming_uniform a=sqrt(5))
            w_in = (torch.rand((k, *W.shape[1:]), generator=ctx.generator) * 2 - 1) * bound
            b_in = (torch.rand(k, generator=ctx.generator) * 2 - 1) * bound
            O = h.out.weight
            w_out = torch.zeros(O.shape[0], k, *O.shape[2:])
            model.add_units(h.name, w_in, b_in, w_out)
            events.append(GrowthEvent(where=h.name, kind="add", units_added=k, predicted_loss_change=0.0))
        return events
