"""Method registry. Every method, built-in or plugin, is found through the entry-point group
`growbench.methods` (built-ins are declared in growbench's own pyproject), like timm's model registry."""
from __future__ import annotations

import dataclasses
import traceback
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from growbench.config import ConfigError, GrowthConfig, Suite, _build, _coerce
from growbench.methods.base import GrowthEvent, GrowthMethod, settings_dict, settings_from_dict

__all__ = ["GrowthMethod", "GrowthEvent", "method_names", "load_method_class", "resolve_method", "MethodSpec",
           "PluginLoadError"]

GROUP = "growbench.methods"
# Used only when growbench runs from a source tree without installed metadata (no entry points).
_BUILTIN_FALLBACK = {
    "fixed": "growbench.methods.fixed:Fixed",
    "fixed-matched": "growbench.methods.fixed_matched:FixedMatched",
    "optuna-fixed": "growbench.methods.optuna_fixed:OptunaFixed",
    "firefly": "growbench.methods.firefly:Firefly",
    "random": "growbench.methods.random_growth:RandomGrowth",
    "senn": "growbench.methods.senn:Senn",
    "senn-sgd": "growbench.methods.senn:SennSgd",
    "splitting": "growbench.methods.splitting:Splitting",
    "splitting-fast": "growbench.methods.splitting:SplittingFast",
    "tiny": "growbench.methods.tiny:Tiny",
}


class PluginLoadError(Exception):
    """A registered method failed to import; the message names it and summarises the traceback."""


def _entry_points() -> dict[str, Any]:
    eps = {ep.name: ep for ep in entry_points(group=GROUP)}
    if not eps:
        from importlib.metadata import EntryPoint

        eps = {n: EntryPoint(n, v, GROUP) for n, v in _BUILTIN_FALLBACK.items()}
    return eps


def method_names() -> list[str]:
    return sorted(_entry_points())


def load_method_class(name: str) -> type[GrowthMethod]:
    eps = _entry_points()
    if name not in eps:
        raise ConfigError(f"unknown method {name!r}; valid methods: {', '.join(sorted(eps))}")
    try:
        cls = eps[name].load()
    except Exception as e:  # a broken plugin must not take the suite down with it
        tb = traceback.format_exception_only(type(e), e)[-1].strip()
        raise PluginLoadError(f"method {name!r} ({eps[name].value}) failed to import: {tb}") from e
    if not (isinstance(cls, type) and issubclass(cls, GrowthMethod)):
        raise PluginLoadError(f"method {name!r} ({eps[name].value}) is not a growbench GrowthMethod subclass")
    return cls


@dataclass
class MethodSpec:
    """A method as a suite runs it: entry name (maybe an alias), class, settings, growth schedule."""

    name: str
    target: str
    cls: type[GrowthMethod]
    settings: Any
    growth: GrowthConfig
    hidden: list[int] | None = None  # starting widths, if not the suite's
    error: str | None = None  # set when the plugin failed to import: its cells are recorded as failed

    def config(self) -> dict:
        return {"method": self.target, "settings": settings_dict(self.settings),
                "growth": dataclasses.asdict(self.growth), "hidden": self.hidden}

    def instantiate(self) -> GrowthMethod:
        if self.error is not None:
            raise PluginLoadError(self.error)
        return self.cls(self.settings, self.growth)


def resolve_method(suite: Suite, name: str) -> MethodSpec:
    """`method_settings.<name>` holds the method's own settings and three keys every method accepts:
    `method: <registered name>` (run a method under another name, e.g. a second fixed size),
    `hidden: [..]` (starting widths instead of the suite's `model.hidden`) and
    `growth: {...}` (overrides of the suite's growth schedule)."""
    raw = dict(suite.method_settings.get(name) or {})
    target = raw.pop("method", name)
    if not isinstance(target, str):
        raise ConfigError(f"method_settings.{name}.method: expected a method name, got {target!r}")
    try:
        cls = load_method_class(target)
    except PluginLoadError as e:
        cls, error = None, str(e)
    else:
        error = None
    growth_over = raw.pop("growth", None) or {}
    hidden = raw.pop("hidden", None)
    if hidden is not None:
        hidden = _coerce(hidden, list[int], f"method_settings.{name}.hidden")
        if len(hidden) != len(suite.model.hidden) or min(hidden) < 1:
            raise ConfigError(f"method_settings.{name}.hidden: give {len(suite.model.hidden)} positive widths "
                              f"(one per entry of model.hidden), got {hidden}")
    if not isinstance(growth_over, dict):
        raise ConfigError(f"method_settings.{name}.growth: expected a mapping, got {growth_over!r}")
    growth = _build(GrowthConfig, {**dataclasses.asdict(suite.growth), **growth_over}, f"method_settings.{name}.growth")
    settings = raw if cls is None else settings_from_dict(cls.Settings, raw, name)
    return MethodSpec(name, target, cls, settings, growth, hidden, error)
