"""`fixed-matched`: a fixed network with the final architecture a growth method reached, trained from scratch.

    method_settings:
      fixed-matched-tiny: {method: fixed-matched, match: tiny}

For each (dataset, seed), the cell reads the record of the `match` method for the same suite, dataset
and seed (the record whose config hash matches the suite as configured now), rebuilds its final
architecture (`record["architecture"]`: widths, and inserted layers if it grew any) with fresh weights
(the seed's initialisation), and trains it with the suite's budget, optimizer and schedule: equal
parameters, no growth. The matched record (its hash and architecture) is part of the cell's identity,
so a rerun of the growth method makes new fixed-matched cells. When the growth method has no ok record
yet, the cell fails and says which method to run first; rerunning after it gives the matched cell.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from growbench.config import ConfigError, Suite, cell_config, config_hash
from growbench.methods.base import GrowthMethod
from growbench.methods.optuna_fixed import MissingPrerequisite


@dataclass
class FixedMatchedSettings:
    match: str = ""  # the growth method (a name in the suite's methods or method_settings) whose final size to train


class FixedMatched(GrowthMethod):
    name: ClassVar[str] = "fixed-matched"
    Settings: ClassVar[type] = FixedMatchedSettings
    grows: ClassVar[bool] = False

    def __init__(self, settings: Any = None, growth: Any = None) -> None:
        super().__init__(settings, growth)
        self.final_extra: dict = {}

    @classmethod
    def resolve_cell(cls, suite: Suite, dataset: str, seed: int, spec: Any) -> dict:
        """Plan time: the matched method's record for this dataset and seed (its hash and final architecture)."""
        from growbench.methods import resolve_method
        from growbench.records import RecordError, read_record, record_path

        name, match = spec.name, spec.settings.match
        if spec.hidden is not None:
            raise ConfigError(f"method_settings.{name}.hidden: {name} trains the final widths of the method "
                              "it matches; remove hidden")
        if not match:
            return {"error": f"method_settings.{name}.match is not set: name the growth method whose final size "
                             f"{name} trains, e.g. method_settings.{name}.match=tiny"}
        if match == name:
            raise ConfigError(f"method_settings.{name}.match: {name} cannot match itself; name a growth method")
        grown = resolve_method(suite, match)  # ConfigError: unknown method
        if grown.cls is not None and not grown.cls.grows:
            raise ConfigError(f"method_settings.{name}.match: {match} ({grown.target}) does not grow; "
                              "name a growth method")
        h = config_hash(cell_config(suite, dataset, match, seed, grown.config()))
        path = record_path(suite.results_dir, suite.name, dataset, match, seed, h)
        rel = str(path.relative_to(suite.results_dir))
        out: dict = {"match": match, "record": rel}
        if not path.is_file():
            return {**out, "missing": True}
        try:
            rec = read_record(path)
        except RecordError as e:
            return {**out, "unreadable": str(e)}
        if rec["status"] != "ok":
            return {**out, "failed": (rec.get("failure") or {}).get("message", "")}
        return {**out, "config_hash": h, "architecture": rec["architecture"], "params": rec["final"]["params"],
                "widths": rec["final"]["widths"]}

    def prepare_cell(self, suite: Suite, resolved: dict | None) -> tuple[Suite, dict]:
        """Run time: the matched architecture, no width caps."""
        r = resolved or {}
        if "architecture" not in r:
            if "error" in r:
                raise MissingPrerequisite(r["error"])
            match, rec = r.get("match", "?"), Path(suite.results_dir) / r.get("record", "?")
            first = f"run `growbench run suite={suite.name} methods=[{match}]` (with this run's overrides) first"
            if r.get("failed") is not None:
                raise MissingPrerequisite(f"the record of {match} it matches failed ({r['failed']}); fix it and "
                                          f"{first.replace('run `', 'rerun `', 1)} with retry_failed=true")
            if r.get("unreadable"):
                raise MissingPrerequisite(f"the record of {match} it matches cannot be read ({r['unreadable']})")
            raise MissingPrerequisite(f"{match} has no record yet for this dataset and seed ({rec}): {first}, then "
                                      "rerun this command (if it ran in this same command, just rerun it)")
        self.final_extra = {"matched": {"method": r["match"], "config_hash": r["config_hash"],
                                        "params": r["params"], "widths": r["widths"]}}
        return dataclasses.replace(suite, model=dataclasses.replace(suite.model, max_hidden=None)), r["architecture"]
