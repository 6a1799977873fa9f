"""Suite configuration: YAML + Hydra-style overrides -> a validated, frozen `Suite`.

Typos and wrong types must fail before any compute is spent, so every section is a dataclass
and unknown keys are errors that list the valid ones.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(Exception):
    """Bad suite, key or value. The CLI prints it and exits with code 2."""


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class DatasetConfig:
    name: str | list[str] = "toy-spirals"  # one dataset, or several: cells = dataset x method x seed
    root: str | None = None  # else $GROWBENCH_DATA, else the user cache dir
    download: bool = False  # needs torchvision (pip install growbench[download])
    train_subset: int | None = None  # stratified, identical for every method and seed
    test_subset: int | None = None
    val_size: int = 0  # held out from train; evaluated at every point when > 0
    augment: bool = False  # random crop (with padding) + horizontal flip, on the device
    crop_padding: int = 4
    flip: bool = True

    @property
    def names(self) -> list[str]:
        return [self.name] if isinstance(self.name, str) else list(self.name)


@dataclass(frozen=True)
class ModelConfig:
    family: str = "mlp"  # mlp | vgg | resnet
    hidden: list[int] = field(default_factory=lambda: [4])  # starting width of each growable layer
    max_hidden: list[int] | None = None  # growth caps per growable layer (None: no cap)
    activation: str = "relu"  # mlp: relu | selu | tanh | gelu
    pool_after: list[int] = field(default_factory=list)  # vgg: halve the resolution after these conv indices
    downsample: str = "max"  # vgg: max (2x2 max-pool) | stride (the next conv has stride 2)
    batchnorm: bool = True  # vgg / resnet
    stem: int = 64  # resnet: stem channels
    widths: list[int] = field(default_factory=lambda: [64, 128, 256, 512])  # resnet stage widths
    blocks: list[int] = field(default_factory=lambda: [2, 2, 2, 2])  # resnet blocks per stage


@dataclass(frozen=True)
class BudgetConfig:
    epochs: float = 10  # ordinary training passes over the training set, the same for every method
    batch_size: int = 128
    eval_every: float = 1.0  # epochs between evaluation points (plus one at step 0 and one at the end)
    eval_batch_size: int = 1000


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    decay_norm_and_bias: bool = False  # weight decay on 1-D parameters (BN, biases)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass(frozen=True)
class ScheduleConfig:
    name: str = "cosine"  # constant | cosine | step
    warmup_epochs: float = 0.0
    milestones: list[float] = field(default_factory=list)  # step: epochs at which lr *= gamma
    gamma: float = 0.1


@dataclass(frozen=True)
class GrowthConfig:
    """The growth schedule every growth method shares unless its settings override it."""

    start_epoch: float = 0.0
    every_epochs: float = 1.0
    stop_epoch: float | None = None  # None: until the budget's last epoch (exclusive)
    max_events: int | None = None


@dataclass(frozen=True)
class SubmititConfig:
    """`executor: submitit`: where and how cells are sent to SLURM (one array task per cell)."""

    cluster: str | None = None  # None: SLURM if sbatch is on PATH, else local processes; local | debug for tests
    partition: str | None = None
    time: int = 240  # minutes per cell (SLURM --time); a preempted or timed-out cell is requeued and resumes
    gpus_per_node: int = 0
    cpus_per_task: int = 4  # also the torch threads of each cell
    mem_gb: float | None = None
    array_parallelism: int = 64  # cells running at once
    folder: str | None = None  # submitit's logs and pickles; default <results_dir>/submitit
    parameters: dict[str, Any] = field(default_factory=dict)  # passed to AutoExecutor.update_parameters


@dataclass(frozen=True)
class Suite:
    name: str
    description: str = ""
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    growth: GrowthConfig = field(default_factory=GrowthConfig)
    methods: list[str] = field(default_factory=lambda: ["fixed", "random"])
    seeds: list[int] = field(default_factory=lambda: [0])
    method_settings: dict[str, dict] = field(default_factory=dict)
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    results_dir: str = "results"
    retry_failed: bool = False  # rerun cells whose record says failed (the old record is kept aside)
    executor: str = "local"  # local (workers processes on this machine) | submitit (SLURM)
    workers: int = 1  # executor=local: cells run at once, each in its own process when > 1
    checkpoint: bool = True  # save each cell's state at every evaluation point; a killed cell resumes there
    submitit: SubmititConfig = field(default_factory=SubmititConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


MODEL_FAMILIES = ("mlp", "vgg", "resnet")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "step")
ACTIVATIONS = ("relu", "selu", "tanh", "gelu", "rational")
EXECUTORS = ("local", "submitit")
SUBMITIT_CLUSTERS = ("slurm", "local", "debug")

# --------------------------------------------------------------------------- typed parsing


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (arg,) = typing.get_args(tp)
        return f"list of {_type_name(arg)}"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; int is accepted where float is expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
    elif origin is list:
        (arg,) = typing.get_args(tp)
        if isinstance(value, (list, tuple)):
            return [_coerce(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            return {str(k): v for k, v in value.items()}
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return _build(tp, value, key)
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _build(cls: type, data: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown key {where}{unknown[0]}; valid keys{' under ' + prefix if prefix else ''}: "
            + ", ".join(names)
        )
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{prefix or 'suite'}: {e}") from None


# --------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> (["a","b"], value); values use YAML syntax (`[0,1]`, `true`, `1e-3`, `null`)."""
    if "=" not in text:
        raise ConfigError(f"bad override {text!r}: expected key=value (for example budget.epochs=3)")
    key, _, raw = text.partition("=")
    key = key.strip().lstrip("+")
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"bad override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"bad override {text!r}: value is not valid YAML ({e.__class__.__name__})") from None
    if isinstance(value, str) and "," in value and not raw.strip().startswith(("'", '"')):
        raise ConfigError(f"bad override {text!r}: write lists in brackets, e.g. {key}=[{raw}]")
    return key, value


def apply_override(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        if part not in node or node[part] is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            raise ConfigError(f"bad override {key}: {part} is not a section")
        node = node[part]
    node[parts[-1]] = value


# --------------------------------------------------------------------------- suites on disk


def suite_dirs() -> list[Path]:
    """Where suites are looked up: $GROWBENCH_SUITES, ./suites, then the suites shipped with growbench."""
    dirs = []
    if os.environ.get("GROWBENCH_SUITES"):
        dirs += [Path(p) for p in os.environ["GROWBENCH_SUITES"].split(os.pathsep) if p]
    dirs.append(Path.cwd() / "suites")
    dirs.append(Path(__file__).resolve().parent.parent / "suites")
    try:
        from importlib.resources import files

        dirs.append(Path(str(files("growbench.suites"))))
    except (ModuleNotFoundError, TypeError):
        pass
    seen, out = set(), []
    for d in dirs:
        r = d.resolve()
        if r not in seen and r.is_dir():
            seen.add(r)
            out.append(r)
    return out


def available_suites() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in suite_dirs():
        for p in sorted(d.glob("*.yaml")):
            found.setdefault(p.stem, p)
    return found


def suite_path(name: str) -> Path:
    if name.endswith((".yaml", ".yml")) or os.sep in name:
        p = Path(name)
        if not p.is_file():
            raise ConfigError(f"suite file {name} does not exist")
        return p
    suites = available_suites()
    if name not in suites:
        raise ConfigError(f"unknown suite {name!r}; valid suites: {', '.join(sorted(suites))}")
    return suites[name]


def read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: malformed YAML{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a suite file must be a YAML mapping of keys to values")
    return data


def load_suite(name: str = "toy", overrides: list[str] | tuple[str, ...] = ()) -> Suite:
    """Load a suite by name (or path), apply `key=value` overrides, validate everything."""
    path = suite_path(name)
    data = read_yaml(path)
    data.setdefault("name", path.stem)
    for text in overrides:
        key, value = parse_override(text)
        if key == "suite":
            continue
        apply_override(data, key, value)
    suite = _build(Suite, data, "")
    validate(suite)
    return suite


def _choice(value: str, valid: tuple[str, ...] | list[str], key: str) -> None:
    if value not in valid:
        raise ConfigError(f"{key}: unknown value {value!r}; valid choices: {', '.join(valid)}")


def _positive(value: float | int | None, key: str, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def validate(suite: Suite) -> None:
    """Checks that need more than types: choices, ranges, method names and their settings."""
    from growbench.data import DATASETS
    from growbench.methods import resolve_method  # here: growbench.methods imports this module

    for n in suite.dataset.names:
        _choice(n, DATASETS, "dataset.name")
    if not suite.dataset.names:
        raise ConfigError("dataset.name: give at least one dataset")
    for key in ("train_subset", "test_subset"):
        _positive(getattr(suite.dataset, key), f"dataset.{key}")
    _positive(suite.dataset.val_size, "dataset.val_size", allow_zero=True)
    _positive(suite.dataset.crop_padding, "dataset.crop_padding", allow_zero=True)
    m = suite.model
    _choice(m.family, MODEL_FAMILIES, "model.family")
    _choice(m.activation, ACTIVATIONS, "model.activation")
    _choice(m.downsample, ("max", "stride"), "model.downsample")
    if not m.hidden:
        raise ConfigError("model.hidden: give the starting width of at least one growable layer")
    for i, h in enumerate(m.hidden):
        _positive(h, f"model.hidden[{i}]")
    if m.max_hidden is not None:
        if len(m.max_hidden) != len(m.hidden):
            raise ConfigError(
                f"model.max_hidden has {len(m.max_hidden)} entries but model.hidden has {len(m.hidden)}"
            )
        for i, (h, c) in enumerate(zip(m.hidden, m.max_hidden)):
            if c < h:
                raise ConfigError(f"model.max_hidden[{i}]={c} is below model.hidden[{i}]={h}")
    if m.family == "resnet":
        if len(m.widths) != len(m.blocks) or len(m.hidden) != len(m.widths):
            raise ConfigError(
                "model: resnet needs one entry per stage in widths, blocks and hidden "
                f"(got {len(m.widths)}, {len(m.blocks)}, {len(m.hidden)})"
            )
    b = suite.budget
    _positive(b.epochs, "budget.epochs")
    _positive(b.batch_size, "budget.batch_size")
    _positive(b.eval_every, "budget.eval_every")
    _positive(b.eval_batch_size, "budget.eval_batch_size")
    _choice(suite.optimizer.name, OPTIMIZERS, "optimizer.name")
    _positive(suite.optimizer.lr, "optimizer.lr")
    _positive(suite.optimizer.weight_decay, "optimizer.weight_decay", allow_zero=True)
    _choice(suite.schedule.name, SCHEDULES, "schedule.name")
    _positive(suite.schedule.warmup_epochs, "schedule.warmup_epochs", allow_zero=True)
    g = suite.growth
    _positive(g.every_epochs, "growth.every_epochs")
    _positive(g.start_epoch, "growth.start_epoch", allow_zero=True)
    if not suite.seeds:
        raise ConfigError("seeds: give at least one seed, e.g. seeds=[0,1,2]")
    if len(set(suite.seeds)) != len(suite.seeds):
        raise ConfigError(f"seeds: duplicates in {suite.seeds}")
    if not suite.methods:
        raise ConfigError("methods: give at least one method, e.g. methods=[fixed,random]")
    if len(set(suite.methods)) != len(suite.methods):
        raise ConfigError(f"methods: duplicates in {suite.methods}")
    for name in suite.methods:
        spec = resolve_method(suite, name)  # raises ConfigError for unknown methods and settings
        if spec.cls is not None and suite.model.family not in spec.cls.families:
            raise ConfigError(f"method {name!r} supports model.family {', '.join(spec.cls.families)}, "
                              f"not {suite.model.family}; remove it from methods or pick another suite")
    _choice(suite.executor, EXECUTORS, "executor")
    _positive(suite.workers, "workers")
    sub = suite.submitit
    if sub.cluster is not None:
        _choice(sub.cluster, SUBMITIT_CLUSTERS, "submitit.cluster")
    for key in ("time", "cpus_per_task", "array_parallelism", "mem_gb"):
        _positive(getattr(sub, key), f"submitit.{key}")
    _positive(sub.gpus_per_node, "submitit.gpus_per_node", allow_zero=True)
    if suite.executor == "submitit":
        import importlib.util

        if importlib.util.find_spec("submitit") is None:
            raise ConfigError("executor=submitit needs the submitit package, which is not installed here: "
                              "pip install 'growbench[slurm]' (or use executor=local workers=N)")


# --------------------------------------------------------------------------- identity of a cell


def cell_config(suite: Suite, dataset: str, method: str, seed: int, method_cfg: dict) -> dict:
    """Everything that determines a cell's result, and nothing that doesn't (paths, device)."""
    ds = dataclasses.asdict(suite.dataset)
    for k in ("root", "download"):
        ds.pop(k)
    ds["name"] = dataset
    return {
        "dataset": ds,
        "model": dataclasses.asdict(suite.model),
        "budget": dataclasses.asdict(suite.budget),
        "optimizer": dataclasses.asdict(suite.optimizer),
        "schedule": dataclasses.asdict(suite.schedule),
        "growth": dataclasses.asdict(suite.growth),
        "method": method,
        "method_config": method_cfg,
        "seed": seed,
    }


def config_hash(cfg: dict) -> str:
    blob = json.dumps(cfg, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()
