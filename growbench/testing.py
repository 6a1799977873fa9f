"""The conformance kit: pytest test cases a growth-method plugin subclasses (as `optuna.testing` does for
samplers). Needs pytest (`pip install growbench[test]`).

    # tests/test_mymethod.py of your plugin
    from growbench.testing import MethodConformance

    class TestMyMethod(MethodConformance):
        method_name = "mymethod"            # its entry-point name in `growbench.methods`
        settings = {"units_per_step": 2}    # method_settings for the kit's runs (optional)

Each (method, family) is trained once, through the real runner and trainer (`growbench.runner.run_cell`),
on a tiny problem (`kit_suite`): an MLP 2 -> [2, 2] -> 3 (caps 4, 4) on 300 toy-spirals points with Adam,
and a VGG-style CNN [2, 4] with stride-2 downsampling and BatchNorm (caps 4, 6) on 256 synthetic 3x8x8
images with SGD + momentum; 40 and 32 training steps, growth at the 1st and 2nd epoch. The method runs as
a subclass whose hooks observe the cell (outputs around each `grow`, the optimizer after it, the
architecture at every step); the checks are the test methods below. A family outside the method's
`families` is skipped with that reason.

`run_conformance(name, family, settings)` gives the same observed run outside pytest, and
`synthetic_images` / `make_context` build data and a trainer `Context` for a method's own unit tests.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import tempfile
import traceback
from contextlib import redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from growbench.config import (MODEL_FAMILIES, BudgetConfig, ConfigError, DatasetConfig, GrowthConfig, ModelConfig,
                              OptimizerConfig, ScheduleConfig, Suite)
from growbench.data import Dataset, Split, load_dataset
from growbench.methods import PluginLoadError, load_method_class, method_names
from growbench.methods.base import GrowthEvent, GrowthMethod, settings_from_dict
from growbench.models import GrowableNet, from_spec

__all__ = ["MethodConformance", "ConformanceRun", "run_conformance", "kit_suite", "kit_data", "synthetic_images",
           "make_context", "KIT_FAMILIES"]

KIT_FAMILIES = ("mlp", "vgg")
EVENT_KINDS = ("add", "split", "insert", "update")
PROBE = 512  # training examples on which outputs and losses are compared around growth
# Cells that fail with an exception of this name need an artefact another command makes first (a search
# result, another method's records): the kit cannot make it, so their run-based checks are skipped.
PREREQUISITE = "MissingPrerequisite"


# --------------------------------------------------------------------------- data and suites


def synthetic_images(n_train: int = 256, n_test: int = 128, classes: int = 4, shape: tuple[int, int, int] = (3, 8, 8),
                     seed: int = 0) -> Dataset:
    """A learnable image classification set made in code: one random template per class plus noise,
    stored as uint8 like the real image sets (normalised by the trainer with the stored mean/std)."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.rand(classes, *shape, generator=g)

    def split(n: int) -> Split:
        y = torch.arange(n) % classes
        x = 0.6 * templates[y] + 0.4 * torch.rand(n, *shape, generator=g)
        return Split((x * 255).round().to(torch.uint8), y)

    train, test = split(n_train), split(n_test)
    pixels = train.x.float() / 255
    mean = tuple(pixels.mean((0, 2, 3)).tolist())
    std = tuple(pixels.std((0, 2, 3)).tolist())
    return Dataset(name="synthetic-images", task="classification", input_shape=tuple(shape), num_outputs=classes,
                   train=train, val=None, test=test, mean=mean, std=std,
                   fingerprint={"kind": "synthetic", "generator": "growbench.testing.synthetic_images", "seed": seed})


def kit_suite(family: str, method: str, settings: dict | None = None, results_dir: str | None = None) -> Suite:
    """The suite of one conformance run (see the module doc); `settings` go to method_settings.<method>."""
    common = dict(methods=[method], seeds=[0], method_settings={method: dict(settings or {})}, device="cpu",
                  results_dir=results_dir or str(Path(tempfile.gettempdir()) / "growbench-conformance"),
                  checkpoint=False, growth=GrowthConfig(start_epoch=1, every_epochs=1, stop_epoch=2.5))
    if family == "mlp":
        return Suite(name="conformance-mlp", description="conformance kit: MLP on toy spirals",
                     dataset=DatasetConfig(name="toy-spirals", train_subset=300, test_subset=150),
                     model=ModelConfig(family="mlp", hidden=[2, 2], max_hidden=[4, 4], activation="relu"),
                     budget=BudgetConfig(epochs=4, batch_size=30, eval_every=1, eval_batch_size=500),
                     optimizer=OptimizerConfig(name="adam", lr=0.01, weight_decay=0.0),
                     schedule=ScheduleConfig(name="cosine"), **common)
    if family == "vgg":
        return Suite(name="conformance-vgg", description="conformance kit: VGG-style CNN on synthetic images",
                     dataset=DatasetConfig(name="synthetic-images"),
                     model=ModelConfig(family="vgg", hidden=[2, 4], max_hidden=[4, 6], pool_after=[0],
                                       downsample="stride", batchnorm=True),
                     budget=BudgetConfig(epochs=4, batch_size=32, eval_every=1, eval_batch_size=500),
                     optimizer=OptimizerConfig(name="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4),
                     schedule=ScheduleConfig(name="cosine"), **common)
    raise ValueError(f"the conformance kit has no {family!r} run; families: {', '.join(KIT_FAMILIES)}")


def kit_data(family: str) -> Dataset:
    if family == "mlp":
        return load_dataset("toy-spirals", train_subset=300, test_subset=150)
    return synthetic_images()


def make_context(model: GrowableNet, data: Dataset, *, batch_size: int = 32, steps_per_epoch: int | None = None,
                 total_steps: int = 100, caps: list[int] | None = None, seed: int = 0, step: int = 0):
    """A trainer `Context` for calling a method's hooks directly in unit tests (CPU). `caps` are width caps
    per hidden layer, as a suite's `model.max_hidden`."""
    from growbench.trainer import Context

    if caps is not None:
        for h, cap in zip(model.hidden_layers(), caps):
            h.inp.growbench_max_width = cap
    spe = steps_per_epoch or math.ceil(len(data.train) / batch_size)
    return Context(dataset=data, device=torch.device("cpu"), steps_per_epoch=spe, total_steps=total_steps,
                   batch_size=batch_size, generator=torch.Generator().manual_seed(seed), model=model, step=step)


# --------------------------------------------------------------------------- observation


def _shape_signature(model: GrowableNet) -> str:
    return json.dumps(model.spec(), sort_keys=True)


def _fresh(spec: dict) -> GrowableNet:
    """A net built from `spec` without touching the global RNG (the method's draws stay as in a real run)."""
    with torch.random.fork_rng(devices=[]):
        try:
            with torch.device("meta"):
                return from_spec(spec)
        except Exception:
            return from_spec(spec)


@dataclass
class Growth:
    """What one `grow` call did, as observed from outside the method."""

    step: int
    events: list
    units: int  # sum of units_added over its events
    width_before: int  # sum of hidden widths
    width_after: int
    params_before: int
    params_after: int
    output_change: float  # max |f_after - f_before| on the probe inputs (eval mode)
    output_scale: float  # max |f_before|
    loss_before: float
    loss_after: float


@dataclass
class Observer:
    probe: tuple[torch.Tensor, torch.Tensor] | None = None
    model: GrowableNet | None = None
    ctx: Any = None
    optimizer: Any = None
    phase: str = "configure"
    train_steps: int = 0
    hook_steps: dict = field(default_factory=dict)  # hook -> trainer-optimizer steps taken inside it
    should_grow_calls: int = 0
    said_yes: list = field(default_factory=list)
    growths: list = field(default_factory=list)
    signature: str | None = None
    violations: dict = field(default_factory=lambda: {k: [] for k in (
        "budget", "schedule", "caps", "counts", "optimizer", "events")})
    loss_start: float | None = None
    loss_end: float | None = None
    pending_optimizer_check: str | None = None
    kit_error: str | None = None

    # -- helpers
    def _outputs(self, model: GrowableNet) -> tuple[torch.Tensor, float]:
        x, y = self.probe
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model(x)
                loss = float(self.ctx.loss_fn(out, y))
        finally:
            model.train(was)
        return out.detach().double(), loss

    def _check_caps(self, model: GrowableNet, when: str) -> None:
        for h in model.hidden_layers():
            cap = getattr(h.inp, "growbench_max_width", None)
            if cap is not None and h.width > cap:
                self.violations["caps"].append(f"{when}: {h.name} has width {h.width} > its cap {cap}")

    def _check_counts(self, model: GrowableNet, when: str) -> None:
        spec = model.spec()
        fresh = _fresh(spec)
        if fresh.param_count() != model.param_count():
            self.violations["counts"].append(f"{when}: param_count() {model.param_count()} but a fresh "
                                             f"from_spec(spec()) net has {fresh.param_count()}")
        mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        theirs = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
        if mine != theirs:
            diff = sorted(set(mine.items()) ^ set(theirs.items()))[:4]
            self.violations["counts"].append(f"{when}: the state_dict does not match a fresh from_spec(spec()) "
                                             f"net's (the checkpoint could not be restored): {diff}")

    def _check_optimizer(self, model: GrowableNet, when: str) -> None:
        opt = self.optimizer
        held = [p for g in opt.param_groups for p in g["params"]]
        ids = [id(p) for p in held]
        named = dict(model.named_parameters())
        mine = {id(p) for p in named.values()}
        problems = []
        if len(ids) != len(set(ids)):
            problems.append("a parameter is listed twice")
        held_ids = set(ids)
        missing = [n for n, p in named.items() if id(p) not in held_ids]
        if missing:
            problems.append(f"model parameters not in the optimizer: {missing[:5]}")
        stale = [tuple(p.shape) for p in held if id(p) not in mine]
        if stale:
            problems.append(f"{len(stale)} optimizer parameter(s) no longer in the model, shapes {stale[:5]}")
        for name, p in named.items():
            for k, v in opt.state.get(p, {}).items():
                if torch.is_tensor(v) and v.dim() > 0 and tuple(v.shape) != tuple(p.shape):
                    problems.append(f"state {k!r} of {name} has shape {tuple(v.shape)}, the parameter {tuple(p.shape)}")
        if problems:
            self.violations["optimizer"].append(f"{when}: " + "; ".join(problems))

    def _check_events(self, events: Any, before: set[str], after: set[str], step: int) -> list:
        evs = [events] if isinstance(events, GrowthEvent) else list(events or [])
        for ev in evs:
            if not isinstance(ev, GrowthEvent):
                self.violations["events"].append(f"step {step}: grow() returned {type(ev).__name__}, "
                                                 "not a GrowthEvent")
                continue
            where = f"step {step}, event at {ev.where!r}"
            if ev.kind not in EVENT_KINDS:
                self.violations["events"].append(f"{where}: kind {ev.kind!r} is not one of {', '.join(EVENT_KINDS)}")
            if not isinstance(ev.units_added, int) or ev.units_added < 0:
                self.violations["events"].append(f"{where}: units_added {ev.units_added!r} is not an int >= 0")
            for key in ("predicted_loss_change", "observed_loss_change"):
                v = getattr(ev, key)
                if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v)):
                    self.violations["events"].append(f"{where}: {key} {v!r} is not a finite number or None")
            names = [n.strip() for n in str(ev.where).split(",")]
            unknown = [n for n in names if n not in before | after]
            if unknown:
                self.violations["events"].append(f"{where}: names no hidden layer ({unknown}); layers: "
                                                 f"{sorted(before | after)}")
            if not isinstance(ev.extra, dict):
                self.violations["events"].append(f"{where}: extra must be a dict")
        return [ev for ev in evs if isinstance(ev, GrowthEvent)]

    # -- hook wrappers
    def on_setup(self, model: GrowableNet, ctx) -> None:
        self.model, self.ctx, self.optimizer = model, ctx, ctx.optimizer
        data = ctx.dataset.train
        self.probe = (ctx.prepare(data.x[:PROBE]), data.y[:PROBE])
        if hasattr(self.optimizer, "register_step_post_hook"):  # any torch.optim.Optimizer
            self.optimizer.register_step_post_hook(self._count_step)
        else:
            self.violations["budget"].append(f"{type(self.optimizer).__name__} is not a torch.optim.Optimizer: "
                                             "its steps cannot be counted")

    def after_setup(self, model: GrowableNet) -> None:
        self.signature = _shape_signature(model)
        self._check_caps(model, "after setup")
        self._check_counts(model, "after setup")
        _, self.loss_start = self._outputs(model)
        self.phase = "train"

    def _count_step(self, opt, args, kwargs) -> None:
        if self.phase == "train":
            self.train_steps += 1
        else:
            self.hook_steps[self.phase] = self.hook_steps.get(self.phase, 0) + 1

    def before_step(self, model: GrowableNet, step: int) -> None:
        self.should_grow_calls += 1
        sig = _shape_signature(model)
        if sig != self.signature:
            self.violations["schedule"].append(
                f"the architecture changed outside grow() before step {step} (in after_step or a training step)")
            self.signature = sig
        if self.pending_optimizer_check:
            self._check_optimizer(model, self.pending_optimizer_check)
            self.pending_optimizer_check = None

    def around_grow(self, method: GrowthMethod, model: GrowableNet, ctx, grow) -> Any:
        step = ctx.step
        if not self.said_yes or self.said_yes[-1] != step:
            self.violations["schedule"].append(f"grow() was called at step {step} but should_grow said no")
        before_names = {h.name for h in model.hidden_layers()}
        width0, params0 = sum(model.widths().values()), model.param_count()
        f0, loss0 = self._outputs(model)
        self.phase = "grow"
        try:
            events = grow(model, ctx)
        finally:
            self.phase = "train"
        try:
            f1, loss1 = self._outputs(model)
            after_names = {h.name for h in model.hidden_layers()}
            evs = self._check_events(events, before_names, after_names, step)
            change = float((f1 - f0).abs().max()) if f1.shape == f0.shape else math.inf
            self.growths.append(Growth(step, evs, sum(ev.units_added for ev in evs if isinstance(ev.units_added, int)),
                                       width0, sum(model.widths().values()), params0, model.param_count(), change,
                                       float(f0.abs().max()), loss0, loss1))
            self.signature = _shape_signature(model)
            self._check_caps(model, f"after grow() at step {step}")
            self._check_counts(model, f"after grow() at step {step}")
            self.pending_optimizer_check = f"after grow() at step {step}"
        except Exception as e:  # a kit failure must not look like the method's
            self.kit_error = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
        return events

    def finish(self) -> None:
        model = self.model
        if model is None:
            return
        if _shape_signature(model) != self.signature:
            self.violations["schedule"].append("the architecture changed outside grow() after the last step")
        self._check_caps(model, "at the end")
        self._check_counts(model, "at the end")
        self._check_optimizer(model, "at the end")
        _, self.loss_end = self._outputs(model)


def instrumented(cls: type[GrowthMethod], obs: Observer) -> type[GrowthMethod]:
    """`cls` with its hooks observed by `obs`; everything else (class attributes, after_step, state) is cls's."""

    def setup(self, model, ctx):
        obs.on_setup(model, ctx)
        obs.phase = "setup"
        try:
            cls.setup(self, model, ctx)
        finally:
            obs.phase = "train"
        obs.after_setup(model)

    def should_grow(self, model, ctx):
        obs.before_step(model, ctx.step)
        yes = bool(cls.should_grow(self, model, ctx))
        if yes:
            obs.said_yes.append(ctx.step)
        return yes

    def grow(self, model, ctx):
        return obs.around_grow(self, model, ctx, lambda m, c: cls.grow(self, m, c))

    body = {"setup": setup, "should_grow": should_grow, "grow": grow, "__module__": cls.__module__,
            "__qualname__": cls.__qualname__, "__doc__": cls.__doc__}
    if cls.has_after_step():
        def after_step(self, model, ctx):
            obs.phase = "after_step"
            try:
                cls.after_step(self, model, ctx)
            finally:
                obs.phase = "train"
        body["after_step"] = after_step
    return type(cls.__name__, (cls,), body)


# --------------------------------------------------------------------------- one observed run


@dataclass
class ConformanceRun:
    """One cell of the kit's suite, trained through `growbench.runner.run_cell` with the method observed."""

    method: str
    family: str
    cls: type[GrowthMethod]
    suite: Suite
    record: dict
    obs: Observer
    total_steps: int

    @property
    def ok(self) -> bool:
        return self.record["status"] == "ok"

    def require_ok(self) -> None:
        if self.obs.kit_error:
            pytest.fail(f"growbench.testing itself failed while observing {self.method}: {self.obs.kit_error}")
        if not self.ok:
            f = self.record["failure"]
            if f["message"].startswith(f"{PREREQUISITE}:"):  # e.g. optuna-fixed without a search result
                pytest.skip(f"{self.method} needs what another command makes first: {f['message']}")
            hint = (f"\n(if {self.method} does not support the {self.family} family, declare it on the class, e.g. "
                    f"`families = (\"mlp\",)`: the kit then skips that family)\n" if f["reason"] == "error" else "\n")
            pytest.fail(f"the {self.family} cell of {self.method} failed ({f['reason']}): {f['message']}{hint}"
                        + f.get("traceback", ""), pytrace=False)

    def violations(self, kind: str) -> list[str]:
        return self.obs.violations[kind]

    @property
    def growths(self) -> list[Growth]:
        return [g for g in self.obs.growths if g.units > 0 or g.params_after != g.params_before
                or g.width_after != g.width_before]


_RUNS: dict[tuple, ConformanceRun] = {}


def run_conformance(method: str, family: str, settings: dict | None = None) -> ConformanceRun:
    """Train the kit's `family` cell of `method` (cached per process: every check reads the same run)."""
    from growbench.runner import plan, run_cell

    key = (method, family, json.dumps(settings or {}, sort_keys=True, default=str))
    if key in _RUNS:
        return _RUNS[key]
    suite = kit_suite(family, method, settings)
    (cell,) = plan(suite)  # ConfigError here: settings the method rejects
    if cell.method.error is not None:
        raise PluginLoadError(cell.method.error)
    obs = Observer()
    cell.method = dataclasses.replace(cell.method, cls=instrumented(cell.method.cls, obs))
    data = kit_data(family)
    b = suite.budget
    total = max(1, round(b.epochs * math.ceil(len(data.train) / b.batch_size)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: one thread is fastest, and CI machines are shared
    try:
        rec = run_cell(cell, data, torch.device("cpu"), checkpoint=False)
        if rec["status"] == "ok":
            try:
                obs.finish()
            except Exception as e:
                obs.kit_error = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    finally:
        torch.set_num_threads(threads)
    run = ConformanceRun(method, family, cell.method.cls.__mro__[1], suite, rec, obs, total)
    _RUNS[key] = run
    return run


# --------------------------------------------------------------------------- the test cases


def _format(problems: list[str], limit: int = 8) -> str:
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return "\n  " + "\n  ".join(problems[:limit]) + more


class MethodConformance:
    """Subclass with `method_name` (and optionally `settings`) set; pytest collects the checks below.

    Class attributes:
      method_name          the entry-point name of the method under test
      settings             method_settings for the kit's runs (may hold `growth:` overrides, see docs/plugins.md)
      function_tolerance   max |f_after - f_before| / (1 + max |f_before|) on the probe inputs, for methods
                           whose `preserves_function` is True
    Fixtures a subclass may override: `conformance_method` (e.g. parametrized over several methods) and
    `conformance_settings` (settings per method).
    """

    method_name: ClassVar[str] = ""
    settings: ClassVar[dict] = {}
    function_tolerance: ClassVar[float] = 1e-4

    # ---------------------------------------------------------------- fixtures
    @pytest.fixture(scope="class")
    def conformance_method(self) -> str:
        if not self.method_name:
            pytest.fail(f"{type(self).__name__}: set method_name to the method's entry-point name")
        return self.method_name

    @pytest.fixture(scope="class")
    def conformance_settings(self, conformance_method: str) -> dict:
        return dict(self.settings)

    @pytest.fixture(scope="class", params=KIT_FAMILIES)
    def conformance_family(self, request) -> str:
        return request.param

    @pytest.fixture(scope="class")
    def conformance_run(self, conformance_method: str, conformance_settings: dict,
                        conformance_family: str) -> ConformanceRun:
        cls = load_method_class(conformance_method)
        if conformance_family not in cls.families:
            pytest.skip(f"{conformance_method} declares families = {tuple(cls.families)}")
        return run_conformance(conformance_method, conformance_family, conformance_settings)

    # ---------------------------------------------------------------- registration and settings
    def test_registered(self, conformance_method: str) -> None:
        """Found in the entry-point group `growbench.methods`, imports, is a GrowthMethod, and
        `growbench list` shows it."""
        from growbench.cli import main

        assert conformance_method in method_names(), (
            f"{conformance_method!r} is not registered; add to your pyproject.toml\n"
            f'  [project.entry-points."growbench.methods"]\n  {conformance_method} = "your_package:YourMethod"\n'
            "and reinstall (pip install -e .)")
        try:
            cls = load_method_class(conformance_method)
        except PluginLoadError as e:
            pytest.fail(str(e), pytrace=False)
        assert issubclass(cls, GrowthMethod)
        out = io.StringIO()
        with redirect_stdout(out):
            assert main(["list"]) == 0
        line = next((ln for ln in out.getvalue().splitlines() if ln.split()[:1] == [conformance_method]), None)
        assert line is not None and "BROKEN" not in line, f"growbench list shows: {line}"

    def test_settings_and_search_space(self, conformance_method: str, conformance_settings: dict) -> None:
        """`Settings` is a dataclass with a default for every field; the kit's settings and every bound and
        choice of `search_space()` are valid settings; `families` names known model families."""
        cls = load_method_class(conformance_method)
        S = cls.Settings
        assert dataclasses.is_dataclass(S), f"{cls.__name__}.Settings must be a dataclass"
        missing = [f.name for f in dataclasses.fields(S)
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        assert not missing, f"{cls.__name__}.Settings fields without defaults: {missing}"
        S()
        own = {k: v for k, v in conformance_settings.items() if k not in ("method", "hidden", "growth")}
        settings_from_dict(S, own, conformance_method)
        with pytest.raises(ConfigError):
            settings_from_dict(S, {"no_such_setting_xyz": 1}, conformance_method)
        assert set(cls.families) <= set(MODEL_FAMILIES) and cls.families, (
            f"families {cls.families} must be a non-empty subset of {MODEL_FAMILIES}")
        fields = {f.name for f in dataclasses.fields(S)}
        space = cls.search_space()
        assert isinstance(space, dict)
        for key, dist in space.items():
            assert key in fields, f"search_space key {key!r} is not a field of {S.__name__}: {sorted(fields)}"
            kind = dist.get("type")
            assert kind in ("float", "int", "categorical"), f"search_space[{key!r}]: type {kind!r}"
            if kind == "categorical":
                values = list(dist["choices"])
                assert values, f"search_space[{key!r}]: no choices"
            else:
                lo, hi = dist["low"], dist["high"]
                assert lo <= hi, f"search_space[{key!r}]: low {lo} > high {hi}"
                if dist.get("log"):
                    assert lo > 0, f"search_space[{key!r}]: a log range needs low > 0"
                if kind == "int":
                    assert isinstance(lo, int) and isinstance(hi, int), f"search_space[{key!r}]: int bounds"
                values = [lo, hi]
            for v in values:
                try:
                    settings_from_dict(S, {**own, key: v}, conformance_method)
                except ConfigError as e:
                    pytest.fail(f"search_space[{key!r}] allows {v!r}, which the settings reject: {e}", pytrace=False)

    # ---------------------------------------------------------------- runs
    def test_record_validates(self, conformance_run: ConformanceRun, tmp_path: Path) -> None:
        """The cell trains to an `ok` record that `growbench.records.validate` accepts and that survives
        an atomic write and a read (JSON-serialisable events and extras)."""
        from growbench.records import read_record, validate, write_record

        conformance_run.require_ok()
        rec = conformance_run.record
        assert validate(rec) == []
        path = tmp_path / "record.json"
        write_record(path, rec)
        back = read_record(path)
        assert len(back["events"]) == len(rec["events"]) and len(back["curve"]) == len(rec["curve"])
        assert rec["final"]["params"] == _fresh(rec["architecture"]).param_count()

    def test_respects_budget(self, conformance_run: ConformanceRun) -> None:
        """Exactly the budget's training steps: the trainer's optimizer steps once per step and never
        inside the method's hooks (a method trains candidates with its own optimizer)."""
        run = conformance_run
        run.require_ok()
        obs = run.obs
        assert run.record["final"]["steps"] == run.total_steps
        assert obs.should_grow_calls == run.total_steps
        assert not run.violations("budget"), _format(run.violations("budget"))
        assert not obs.hook_steps, f"the trainer's optimizer stepped inside hooks: {obs.hook_steps}"
        assert obs.train_steps == run.total_steps, (
            f"{obs.train_steps} optimizer steps in training, the budget is {run.total_steps}")

    def test_grows_only_when_told(self, conformance_run: ConformanceRun) -> None:
        """The architecture changes only inside grow(), which runs only when should_grow said yes; a
        method with grows = False never changes it; record events sit at growth steps."""
        run = conformance_run
        run.require_ok()
        assert not run.violations("schedule"), _format(run.violations("schedule"))
        event_steps = {ev["step"] for ev in run.record["events"]}
        assert event_steps <= set(run.obs.said_yes), f"events at steps {sorted(event_steps - set(run.obs.said_yes))}"
        if not run.cls.grows:
            assert not run.growths and not run.record["events"], f"{run.method} has grows = False but grew"

    def test_grows(self, conformance_run: ConformanceRun) -> None:
        """A growth method adds units in the kit's run (otherwise the growth checks would test nothing:
        give the kit settings under which it grows)."""
        run = conformance_run
        run.require_ok()
        if not run.cls.grows:
            pytest.skip(f"{run.method} has grows = False")
        assert any(g.width_after > g.width_before for g in run.growths), (
            f"{run.method} never grew in the kit's {run.family} run ({len(run.obs.said_yes)} growth steps); "
            "set `settings` so that it grows")

    def test_width_caps(self, conformance_run: ConformanceRun) -> None:
        """Widths never exceed `model.max_hidden` (the caps `ctx.room` reports)."""
        run = conformance_run
        run.require_ok()
        assert not run.violations("caps"), _format(run.violations("caps"))

    def test_counts_exact(self, conformance_run: ConformanceRun) -> None:
        """After every growth and at the end, param_count() and the state_dict's shapes equal those of a
        fresh `from_spec(model.spec())` net (so records count right and checkpoints restore); records agree."""
        run = conformance_run
        run.require_ok()
        assert not run.violations("counts"), _format(run.violations("counts"))
        calls = {g.step: g for g in run.obs.growths}
        for ev in run.record["events"]:
            g = calls[ev["step"]]
            assert (ev["params_before"], ev["params_after"]) == (g.params_before, g.params_after), (
                f"record event at step {ev['step']}: params {ev['params_before']} -> {ev['params_after']}, "
                f"the network: {g.params_before} -> {g.params_after}")

    def test_events_report_growth(self, conformance_run: ConformanceRun) -> None:
        """grow() returns GrowthEvents (valid kind, units_added >= 0, finite predictions, known layer names)
        whose units_added add up to the hidden units the call really added."""
        run = conformance_run
        run.require_ok()
        assert not run.violations("events"), _format(run.violations("events"))
        wrong = [f"step {g.step}: events report {g.units} units, widths grew by {g.width_after - g.width_before}"
                 for g in run.obs.growths if g.units != g.width_after - g.width_before]
        assert not wrong, _format(wrong)

    def test_function_preserved(self, conformance_run: ConformanceRun) -> None:
        """For a method with preserves_function = True: every growth leaves the outputs on the probe inputs
        unchanged (eval mode), and the record's probe losses before/after agree."""
        run = conformance_run
        run.require_ok()
        if not run.cls.preserves_function:
            pytest.skip(f"{run.method} declares preserves_function = False")
        if not run.growths:
            pytest.skip(f"{run.method} did not grow in this run")
        tol = self.function_tolerance
        bad = [f"step {g.step}: outputs changed by {g.output_change:.3g} (scale {g.output_scale:.3g}), "
               f"loss {g.loss_before:.6g} -> {g.loss_after:.6g}"
               for g in run.growths if g.output_change > tol * (1.0 + g.output_scale)]
        assert not bad, (f"{run.method} declares preserves_function = True but growth changed the function:"
                         + _format(bad) + "\n(set preserves_function = False if the change is by design)")
        for ev in run.record["events"]:
            b, a = ev["probe_loss_before"], ev["probe_loss_after"]
            assert abs(a - b) <= tol * (1.0 + abs(b)), f"record: probe loss {b} -> {a} at step {ev['step']}"

    def test_optimizer_follows_growth(self, conformance_run: ConformanceRun) -> None:
        """After each growth the optimizer holds exactly the model's parameters (each once, none stale) with
        state of matching shapes."""
        run = conformance_run
        run.require_ok()
        assert not run.violations("optimizer"), _format(run.violations("optimizer"))

    def test_keeps_training_after_growth(self, conformance_run: ConformanceRun) -> None:
        """The training loss (probe set, eval mode) at the end is below the loss right after the last
        growth: the grown network trains on."""
        run = conformance_run
        run.require_ok()
        obs = run.obs
        after = run.growths[-1].loss_after if run.growths else obs.loss_start
        when = f"after the growth at step {run.growths[-1].step}" if run.growths else "at the start"
        assert math.isfinite(obs.loss_end) and obs.loss_end < after, (
            f"loss {when}: {after:.6g}, at the end: {obs.loss_end:.6g}")

