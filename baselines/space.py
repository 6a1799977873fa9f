"""Search spaces of the fixed-size baselines: YAML files under baselines/spaces/, one per model family
(`mlp.yaml`, `vgg.yaml`, `resnet.yaml`), and optionally one per suite (`<suite>.yaml` wins over the family's).

A space maps keys to Optuna distributions or fixed values (see baselines/spaces/mlp.yaml):
depth and width (MLP: number of hidden layers, per-layer widths) or width_multiplier (any family: x the
suite's caps), plus lr and weight_decay. `SearchSpace.suggest(trial, suite)` turns a trial into a
configuration {"hidden": [...], "lr": ..., "weight_decay": ...} that `optuna-fixed` can train.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from growbench.config import ConfigError, Suite

KEYS = ("depth", "width", "width_multiplier", "lr", "weight_decay")
TYPES = ("int", "float", "categorical")
DIST_KEYS = {"type", "low", "high", "log", "step", "choices"}


def space_dirs() -> list[Path]:
    """./baselines/spaces (a project's own), then the spaces installed with growbench."""
    dirs = [Path.cwd() / "baselines" / "spaces", Path(__file__).resolve().parent / "spaces"]
    out = []
    for d in dirs:
        if d.is_dir() and d.resolve() not in [o.resolve() for o in out]:
            out.append(d)
    return out


def find_space(suite: Suite, name: str | None = None) -> Path:
    if name:
        if name.endswith((".yaml", ".yml")) or "/" in name:
            p = Path(name)
            if not p.is_file():
                raise ConfigError(f"space={name}: no such file")
            return p
        candidates = [name]
    else:
        candidates = [suite.name, suite.model.family]
    for n in candidates:
        for d in space_dirs():
            if (d / f"{n}.yaml").is_file():
                return d / f"{n}.yaml"
    known = sorted({p.stem for d in space_dirs() for p in d.glob("*.yaml")})
    raise ConfigError(f"no search space {' or '.join(c + '.yaml' for c in candidates)} under "
                      f"{', '.join(map(str, space_dirs()))}; known spaces: {', '.join(known)}")


def _check_dist(key: str, d: Any, where: str) -> Any:
    if not isinstance(d, dict):
        if isinstance(d, bool) or not isinstance(d, (int, float, str)):
            raise ConfigError(f"{where}: {key} must be a distribution mapping or a fixed number, got {d!r}")
        return d
    unknown = sorted(set(d) - DIST_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key {key}.{unknown[0]}; valid keys: {', '.join(sorted(DIST_KEYS))}")
    kind = d.get("type")
    if kind not in TYPES:
        raise ConfigError(f"{where}: {key}.type: unknown value {kind!r}; valid choices: {', '.join(TYPES)}")
    if kind == "categorical":
        if not isinstance(d.get("choices"), list) or not d["choices"]:
            raise ConfigError(f"{where}: {key}: a categorical distribution needs a non-empty list of choices")
        return d
    for b in ("low", "high"):
        v = d.get(b)
        if isinstance(v, str):
            try:
                v = float(v)  # YAML 1.1 reads 1e-3 (no dot) as a string
            except ValueError:
                pass
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{where}: {key}.{b}: expected a number, got {d.get(b)!r}")
        d[b] = v
    if kind == "int" and not all(float(d[b]).is_integer() for b in ("low", "high")):
        raise ConfigError(f"{where}: {key}: an int distribution needs integer bounds, got {d['low']}, {d['high']}")
    if d["low"] > d["high"]:
        raise ConfigError(f"{where}: {key}: low {d['low']} > high {d['high']}")
    if d.get("log") and d["low"] <= 0:
        raise ConfigError(f"{where}: {key}: a log distribution needs low > 0, got {d['low']}")
    return d


@dataclass
class SearchSpace:
    path: Path
    spec: dict  # key -> distribution dict or fixed value

    @classmethod
    def load(cls, suite: Suite, name: str | None = None) -> "SearchSpace":
        path = find_space(suite, name)
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: malformed YAML: {getattr(e, 'problem', e)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a search space is a YAML mapping of keys to distributions")
        unknown = sorted(set(data) - set(KEYS))
        if unknown:
            raise ConfigError(f"{path}: unknown key {unknown[0]}; valid keys: {', '.join(KEYS)}")
        spec = {k: _check_dist(k, data[k], str(path)) for k in KEYS if k in data}
        family = suite.model.family
        for k in ("lr", "weight_decay"):
            if k not in spec:
                raise ConfigError(f"{path}: {k} is missing (give a distribution or a fixed value)")
        if family != "mlp" and ({"depth", "width"} & set(spec)):
            raise ConfigError(f"{path}: depth and width are for MLPs; suite {suite.name} has model.family={family}: "
                              "use width_multiplier")
        if ("width" in spec) == ("width_multiplier" in spec):
            raise ConfigError(f"{path}: give either width (MLP, per layer) or width_multiplier")
        if "depth" in spec and "width" not in spec:
            raise ConfigError(f"{path}: depth needs width (the per-layer widths)")
        return cls(path, spec)

    # ------------------------------------------------------------------ trials -> configurations
    @staticmethod
    def _draw(trial: Any, name: str, d: Any) -> Any:
        if not isinstance(d, dict):
            return d
        if d["type"] == "categorical":
            return trial.suggest_categorical(name, d["choices"])
        if d["type"] == "int":
            return trial.suggest_int(name, int(d["low"]), int(d["high"]), step=int(d.get("step") or 1),
                                     log=bool(d.get("log")))
        step = d.get("step")
        return trial.suggest_float(name, float(d["low"]), float(d["high"]), step=step, log=bool(d.get("log")))

    def suggest(self, trial: Any, suite: Suite) -> dict:
        """The configuration of one trial: {"hidden": [...], "lr": ..., "weight_decay": ...}."""
        s = self.spec
        if "width" in s:
            depth = int(self._draw(trial, "depth", s["depth"])) if "depth" in s else len(suite.model.hidden)
            hidden = [int(self._draw(trial, f"width_{i}", s["width"])) for i in range(depth)]
        else:
            m = float(self._draw(trial, "width_multiplier", s["width_multiplier"]))
            hidden = [max(1, round(m * r)) for r in reference_widths(suite)]
        return {"hidden": hidden, "lr": float(self._draw(trial, "lr", s["lr"])),
                "weight_decay": float(self._draw(trial, "weight_decay", s["weight_decay"]))}

    def default_params(self, suite: Suite) -> dict:
        """Parameters giving the suite's own widest network (its caps) with its lr and weight decay, those
        inside the space: the first trial of a new study (`enqueue_trial`), so the search starts from
        what the suite already uses."""
        s, out = self.spec, {}
        ref = reference_widths(suite)

        def put(name: str, d: Any, v: float) -> None:
            if isinstance(d, dict) and _inside(d, v):
                out[name] = int(v) if d["type"] == "int" else v

        if "width" in s:
            put("depth", s.get("depth"), len(ref))
            for i, w in enumerate(ref):
                put(f"width_{i}", s["width"], w)
        else:
            put("width_multiplier", s["width_multiplier"], 1.0)
        put("lr", s["lr"], suite.optimizer.lr)
        put("weight_decay", s["weight_decay"], suite.optimizer.weight_decay)
        return out

    def describe(self) -> str:
        parts = []
        for k, d in self.spec.items():
            if not isinstance(d, dict):
                parts.append(f"{k}={d}")
            elif d["type"] == "categorical":
                parts.append(f"{k} in {d['choices']}")
            else:
                parts.append(f"{k} {d['low']:g}..{d['high']:g}{' (log)' if d.get('log') else ''}")
        return ", ".join(parts)


def reference_widths(suite: Suite) -> list[int]:
    """What width_multiplier scales: the suite's growth caps, else its starting widths."""
    return list(suite.model.max_hidden or suite.model.hidden)


def _inside(d: dict, v: float) -> bool:
    if d["type"] == "categorical":
        return v in d["choices"]
    if d["type"] == "int" and not float(v).is_integer():
        return False
    return d["low"] <= v <= d["high"] and (not d.get("log") or v > 0) and math.isfinite(v)
