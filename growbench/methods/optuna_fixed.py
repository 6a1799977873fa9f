"""`optuna-fixed`: a fixed-size network with the widths, learning rate and weight decay an Optuna search chose.

`growbench search suite=NAME` (baselines/search.py) searches, per dataset, the suite's model family
(MLP: depth and per-layer widths; VGG / ResNet: a width multiplier) with lr and weight decay on a
validation split, and writes the best configuration with the whole search's cost to
`baselines/best/<suite>-<dataset>.yaml` (relative to the working directory, like `results/`). This
method retrains that configuration for every seed of the suite on the suite's own data split (the
search's validation examples go back into training when the suite has `val_size: 0`) and budget; its
records carry the search's cost in `final["search"] = {"trials", "pruned", "wall", "flops", ...}`,
which the leaderboard adds to the total cost.

The searched configuration is part of each cell's identity (`config["resolved"]`, hence its hash): a
new search result makes new cells, so records never mix searches. A missing best file, or one searched
under another protocol of the suite (budget, optimizer, schedule, data, model family...), makes the
cell fail with a message saying what to run.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar

import yaml

from growbench.config import ConfigError, Suite, cell_config
from growbench.methods.base import GrowthMethod

BEST_DIR = Path("baselines") / "best"
SEARCH_KEYS = ("trials", "pruned", "wall", "flops")  # what the leaderboard reads from final["search"]


class MissingPrerequisite(Exception):
    """A cell needs something another command makes first (a search result, another method's records)."""


def best_path(suite: str, dataset: str) -> Path:
    return BEST_DIR / f"{suite}-{dataset}.yaml"


def protocol(suite: Suite, dataset: str) -> dict:
    """What a searched configuration's quality depends on besides the searched values (widths, lr, weight
    decay) and the validation split: data selection and augmentation, model family and its fixed settings,
    budget, optimizer (but lr and weight decay) and schedule. The retraining checks it is unchanged."""
    cfg = cell_config(suite, dataset, "optuna-fixed", 0, {})
    ds = {k: v for k, v in cfg["dataset"].items() if k != "val_size"}
    model = {k: v for k, v in cfg["model"].items() if k not in ("hidden", "max_hidden")}
    opt = {k: v for k, v in cfg["optimizer"].items() if k not in ("lr", "weight_decay")}
    return json.loads(json.dumps({"dataset": ds, "model": model, "budget": cfg["budget"], "optimizer": opt,
                                  "schedule": cfg["schedule"]}))


def protocol_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """`key: searched value -> now` for every leaf that differs."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += protocol_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} when searched, {b!r} now")
    return out


def read_best(path: Path) -> dict:
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict) or not {"config", "search", "protocol", "study"} <= set(data):
        raise ValueError("not a growbench search result (needs config, search, protocol, study)")
    return data


class OptunaFixed(GrowthMethod):
    name: ClassVar[str] = "optuna-fixed"
    grows: ClassVar[bool] = False

    def __init__(self, settings: Any = None, growth: Any = None) -> None:
        super().__init__(settings, growth)
        self.final_extra: dict = {}

    @classmethod
    def resolve_cell(cls, suite: Suite, dataset: str, seed: int, spec: Any) -> dict:
        """Plan time: the search result this cell trains (it goes into the cell's config and hash)."""
        if spec.hidden is not None:
            raise ConfigError(f"method_settings.{spec.name}.hidden: {spec.name} trains the searched widths; "
                              "remove hidden")
        path = best_path(suite.name, dataset)
        out: dict = {"best": str(path)}
        if not path.is_file():
            return {**out, "missing": True}
        try:
            best = read_best(path)
        except (OSError, ValueError, yaml.YAMLError) as e:
            return {**out, "unreadable": f"{type(e).__name__}: {e}"}
        diff = protocol_diff(best["protocol"], protocol(suite, dataset))
        if diff:
            return {**out, "mismatch": diff}
        top = best.get("best") or {}
        return {**out, "study": best["study"], "config": best["config"], "search": best["search"],
                "best_trial": top.get("trial"), "best_value": top.get("value"),
                "metric": (best.get("objective") or {}).get("metric")}

    def prepare_cell(self, suite: Suite, resolved: dict | None) -> tuple[Suite, None]:
        """Run time: the suite this cell trains under (searched widths, lr and weight decay; no width caps)."""
        resolved = resolved or {}
        if "config" not in resolved:
            path = resolved.get("best", f"{BEST_DIR}/<suite>-<dataset>.yaml")
            run = f"run `growbench search suite={suite.name}` (with this run's overrides) first"
            if resolved.get("mismatch"):
                raise MissingPrerequisite(f"{path} was searched under another protocol of the suite "
                                          f"({'; '.join(resolved['mismatch'][:4])}): {run}")
            if resolved.get("unreadable"):
                raise MissingPrerequisite(f"{path} cannot be read ({resolved['unreadable']}): {run}")
            raise MissingPrerequisite(f"no search result: {path} does not exist under {Path.cwd()}: {run}")
        cfg = resolved["config"]
        search = dict(resolved["search"])
        self.final_extra = {
            "search": {**{k: search.get(k) for k in SEARCH_KEYS},
                       **{k: v for k, v in search.items() if k not in SEARCH_KEYS},
                       "study": resolved["study"], "best_trial": resolved.get("best_trial"),
                       "best_value": resolved.get("best_value"), "metric": resolved.get("metric")},
            "searched": dict(cfg),
        }
        model = dataclasses.replace(suite.model, hidden=[int(h) for h in cfg["hidden"]], max_hidden=None)
        opt = dataclasses.replace(suite.optimizer, lr=float(cfg["lr"]), weight_decay=float(cfg["weight_decay"]))
        return dataclasses.replace(suite, model=model, optimizer=opt), None
