"""The one training loop every method runs under. It owns the data stream, the optimizer and schedule,
the evaluation points, the budget, the clocks and the FLOP meter; methods only act through hooks.

Fairness: the training data order and augmentation depend on the seed alone (never on the method),
the budget is a number of ordinary training steps, and everything a method does outside those steps
(growth, statistics, per-step bookkeeping) is timed and FLOP-counted separately as growth overhead.
Evaluation happens at the same steps for every method and is not charged.

Checkpoints: with a `checkpoint` callback, the state of the cell is handed to it at every evaluation
point (after the evaluation, before that step's growth and training; see growbench.checkpoint), and
`train(..., resume=state)` continues from such a state to the result a straight run gives. Writing a
checkpoint is charged to no clock.
"""
from __future__ import annotations

import hashlib
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F

from growbench import checkpoint as ckpt
from growbench.config import Suite
from growbench.data import Dataset, Split
from growbench.data.augment import normalize, random_crop, random_flip
from growbench.flops import FlopCount
from growbench.methods.base import GrowthEvent, GrowthMethod
from growbench.models import GrowableNet, count_flops
from growbench.optim import build_optimizer, lr_factor, set_lr, sync_optimizer

PROBE_SIZE = 1024  # examples of the fixed probe batch on which each growth event's loss change is measured
DIVERGENCE_CHECK_EVERY = 25  # steps; checking every step would force a GPU sync per step


class Diverged(Exception):
    """The training loss became NaN or infinite: the cell is recorded as failed with this reason."""


class ResumeError(Exception):
    """A checkpoint could not be restored into a fresh network, optimizer and method."""


class Pruned(Exception):
    """Raised by an `on_eval` callback to stop the cell at an evaluation point (a hyper-parameter search's
    pruner); it leaves `train` and `growbench.runner.run_cell` unrecorded, for the caller to handle."""


def derived_seed(seed: int, purpose: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{purpose}".encode()).digest()[:7], "big")


def loss_fn(task: str, out: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    if task == "classification":
        return F.cross_entropy(out, y, reduction=reduction)
    return F.mse_loss(out, y, reduction=reduction)


class Clock:
    """Wall-clock split into train / growth / eval. Training time is what lies between the other phases,
    so the hot loop is never synchronised; the device is synchronised at every phase boundary."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.totals = {"train": 0.0, "growth": 0.0, "eval": 0.0}
        self._sync()
        self._mark = time.perf_counter()

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def _lap(self) -> float:
        self._sync()
        now = time.perf_counter()
        dt, self._mark = now - self._mark, now
        return dt

    def begin(self) -> None:
        """End of a training stretch: book it as training time."""
        self.totals["train"] += self._lap()

    def end(self, phase: str) -> None:
        self.totals[phase] += self._lap()

    def skip(self) -> None:
        """Time since the last mark belongs to no phase (writing a checkpoint)."""
        self._lap()


@dataclass
class Context:
    """What a method may see and use. Counters are updated by the trainer before each hook call."""

    dataset: Dataset
    device: torch.device
    steps_per_epoch: int
    total_steps: int
    batch_size: int
    generator: torch.Generator  # method-private randomness (CPU); never touches the training stream
    optimizer: torch.optim.Optimizer | None = None
    model: GrowableNet | None = None
    step: int = 0
    samples_seen: int = 0
    augment: bool = False
    crop_padding: int = 4
    flip: bool = True
    _aug_generator: torch.Generator | None = None

    @property
    def epoch(self) -> float:
        return self.step / self.steps_per_epoch

    @property
    def task(self) -> str:
        return self.dataset.task

    def loss_fn(self, out: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return loss_fn(self.task, out, y, reduction)

    def room(self, name: str, model: GrowableNet | None = None) -> int:
        """Units hidden layer `name` may still grow by (the suite's `model.max_hidden`); large if uncapped."""
        model = model or self.model
        h = model.hidden(name)
        cap = getattr(h.inp, "growbench_max_width", None)
        return (1 << 30) if cap is None else max(0, cap - h.width)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Raw stored inputs -> network inputs (normalised float)."""
        if x.dtype == torch.uint8:
            return normalize(x, self.dataset.mean, self.dataset.std)
        return x

    def batches(self, n: int, batch_size: int | None = None, augment: bool = False,
                split: str = "train") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of `n` examples drawn at random (method generator) from a split, for statistics passes."""
        data: Split = getattr(self.dataset, split)
        n = min(n, len(data))
        idx = torch.randperm(len(data), generator=self.generator)[:n].to(self.device)
        bs = batch_size or self.batch_size
        for i in range(0, n, bs):
            j = idx[i:i + bs]
            x = self.prepare(data.x[j])
            if augment and x.dim() == 4:
                x = self._augment(x, self._method_aug_generator())
            yield x, data.y[j]

    def _method_aug_generator(self) -> torch.Generator:
        if self._aug_generator is None:
            self._aug_generator = torch.Generator(device=self.device)
            self._aug_generator.manual_seed(int(torch.randint(1 << 62, (1,), generator=self.generator)))
        return self._aug_generator

    def _augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if self.crop_padding > 0:
            x = random_crop(x, self.crop_padding, gen)
        if self.flip:
            x = random_flip(x, gen)
        return x


@dataclass
class TrainResult:
    curve: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    final: dict = field(default_factory=dict)
    architecture: dict = field(default_factory=dict)


class FlopMeter:
    """Training FLOPs per example are measured once per architecture (FlopCounterMode on a meta copy)
    and multiplied by the examples trained; growth work is counted directly while it runs."""

    def __init__(self, model: GrowableNet, task: str) -> None:
        self.model, self.task = model, task
        self.train_flops = 0
        self.growth_flops = 0
        self.remeasure()

    def remeasure(self) -> None:
        probe = 8
        self.per_example = count_flops(self.model, probe, train=True) / probe

    def add_train(self, n: int) -> None:
        self.train_flops += int(self.per_example * n)


def _evaluate(model: GrowableNet, ctx: Context, split: Split, batch_size: int) -> tuple[float, float | None]:
    was_training = model.training
    model.eval()
    total_loss = torch.zeros((), device=ctx.device, dtype=torch.float64)
    correct = torch.zeros((), device=ctx.device, dtype=torch.long)
    with torch.no_grad():
        for i in range(0, len(split), batch_size):
            x = ctx.prepare(split.x[i:i + batch_size])
            y = split.y[i:i + batch_size]
            out = model(x)
            total_loss += ctx.loss_fn(out, y, reduction="sum").double()
            if ctx.task == "classification":
                correct += (out.argmax(1) == y).sum()
    model.train(was_training)
    n = len(split)
    loss = total_loss.item() / n
    if ctx.task == "regression":
        loss /= split.y.shape[1] if split.y.dim() > 1 else 1
    acc = correct.item() / n if ctx.task == "classification" else None
    return loss, acc


def set_width_caps(model: GrowableNet, suite: Suite) -> None:
    """Attach `model.max_hidden` caps to the layers that produce each hidden layer's units."""
    caps = suite.model.max_hidden
    if caps is None:
        return
    layers = model.hidden_layers()
    if suite.model.family == "resnet":  # one cap per stage, shared by its blocks
        for h in layers:
            h.inp.growbench_max_width = caps[int(h.name.split(".")[0][1:])]
    else:
        for h, cap in zip(layers, caps):
            h.inp.growbench_max_width = cap


def train(model: GrowableNet, method: GrowthMethod, data: Dataset, suite: Suite, seed: int,
          device: torch.device, progress=None, *, checkpoint=None, resume: dict | None = None,
          on_eval=None) -> TrainResult:
    """Train `model` for the suite's budget under `method`'s hooks; returns curve, events and final metrics.

    checkpoint(state): called with the cell's state at every evaluation point but the first and the last;
    if it raises, the cell warns and goes on without checkpoints.
    resume: such a state; `model` must then be `growbench.models.from_spec(state["model"]["spec"])` and
    `method` a fresh instance: the weights, optimizer, method state, RNGs, counters, clocks, curve and
    events are restored from it, and training continues where the state was saved.
    on_eval(row): called with a copy of each evaluation point's curve row (validation metrics included
    when the dataset has a validation split), after it is recorded; it may raise `Pruned` to stop the
    cell there. Its time is charged to no clock.
    """
    b = suite.budget
    n_train = len(data.train)
    steps_per_epoch = math.ceil(n_train / b.batch_size)
    total_steps = max(1, round(b.epochs * steps_per_epoch))
    eval_every = max(1, round(b.eval_every * steps_per_epoch))
    eval_steps = set(range(0, total_steps, eval_every)) | {total_steps}

    model.to(device).train()
    set_width_caps(model, suite)
    opt = method.configure_optimizer(model, suite.optimizer) or build_optimizer(model, suite.optimizer)
    method_gen = torch.Generator().manual_seed(derived_seed(seed, "method"))
    ctx = Context(dataset=data, device=device, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                  batch_size=b.batch_size, generator=method_gen, optimizer=opt, model=model,
                  augment=suite.dataset.augment, crop_padding=suite.dataset.crop_padding, flip=suite.dataset.flip)
    order_gen = torch.Generator().manual_seed(derived_seed(seed, "order"))
    aug_gen = torch.Generator(device=device).manual_seed(derived_seed(seed, "augment"))
    augment = suite.dataset.augment and data.train.x.dim() == 4
    probe = Split(data.train.x[:PROBE_SIZE], data.train.y[:PROBE_SIZE])

    result = TrainResult()
    flops = FlopMeter(model, data.task)
    clock = Clock(device)
    running_loss = torch.zeros((), device=device, dtype=torch.float64)
    running_n = 0
    perm = None
    start = 0
    if resume is None:
        with FlopCount() as fc:
            method.setup(model, ctx)
        flops.growth_flops += fc.total
        sync_optimizer(opt, model, suite.optimizer)
        clock.end("growth")
    else:  # setup's cost was charged before the checkpoint; the RNGs it draws from are rewound below
        try:
            start = resume["step"]
            ctx.step, ctx.samples_seen = start, resume["samples_seen"]
            for h in model.hidden_layers():
                h.inp.growbench_max_width = resume["model"]["caps"].get(h.name)
            method.setup(model, ctx)
            sync_optimizer(opt, model, suite.optimizer)
            model.load_state_dict(resume["model"]["weights"])
            for name, p in model.named_parameters():
                p.requires_grad_(name not in resume["model"]["frozen"])
            ckpt.load_optimizer_state(opt, model, resume["optimizer"])
            method.load_state_dict(resume["method"])
            method.events_done = resume["events_done"]
            rng = resume["rng"]
            order_gen.set_state(rng["order"])
            aug_gen.set_state(rng["augment"])
            method_gen.set_state(rng["method"])
            if rng["method_augment"] is not None:  # (not _method_aug_generator(): it draws from method_gen)
                ctx._aug_generator = torch.Generator(device=device)
                ctx._aug_generator.set_state(rng["method_augment"])
            ckpt.set_rng_state(rng["global"])
            perm = resume["perm"]
            running_loss = resume["running_loss"].to(device)
            running_n = resume["running_n"]
            clock.totals = dict(resume["clock"])
            flops.train_flops, flops.growth_flops = resume["flops"]["train"], resume["flops"]["growth"]
            flops.remeasure()
            result.curve, result.events = list(resume["curve"]), list(resume["events"])
        except Exception as e:
            raise ResumeError(f"{type(e).__name__}: {e}") from e
        clock.skip()
    step_hook = method.has_after_step()

    def evaluate_point(step: int) -> None:
        nonlocal running_loss, running_n
        clock.begin()
        train_loss = running_loss.item() / running_n if running_n else None
        if train_loss is not None and not math.isfinite(train_loss):
            raise Diverged(f"training loss became {train_loss} before step {step} (epoch {step / steps_per_epoch:.2f})")
        test_loss, test_acc = _evaluate(model, ctx, data.test, b.eval_batch_size)
        row = {"step": step, "epoch": step / steps_per_epoch, "samples": ctx.samples_seen,
               "params": model.param_count(), "train_loss": train_loss, "test_loss": test_loss, "test_acc": test_acc,
               "lr": opt.param_groups[0]["lr"]}
        if data.val is not None:
            row["val_loss"], row["val_acc"] = _evaluate(model, ctx, data.val, b.eval_batch_size)
        if not math.isfinite(test_loss):
            raise Diverged(f"test loss is {test_loss} at step {step} (epoch {step / steps_per_epoch:.2f})")
        clock.end("eval")
        row.update(wall_train=clock.totals["train"], wall_growth=clock.totals["growth"],
                   wall_eval=clock.totals["eval"], train_flops=flops.train_flops, growth_flops=flops.growth_flops)
        result.curve.append(row)
        running_loss = torch.zeros((), device=device, dtype=torch.float64)
        running_n = 0
        if on_eval is not None:
            on_eval(dict(row))  # may raise Pruned
            clock.skip()

    def grow(step: int) -> None:
        clock.begin()
        probe_before, _ = _evaluate(model, ctx, probe, b.eval_batch_size)
        params_before = model.param_count()
        clock.end("eval")
        g0 = clock.totals["growth"]
        with FlopCount() as fc:
            events = method.grow(model, ctx) or []
        sync_optimizer(opt, model, suite.optimizer)
        clock.end("growth")
        gflops = fc.total
        flops.growth_flops += gflops
        flops.remeasure()
        probe_after, _ = _evaluate(model, ctx, probe, b.eval_batch_size)
        clock.end("eval")
        if isinstance(events, GrowthEvent):
            events = [events]
        for i, ev in enumerate(events):
            result.events.append({
                "step": step, "epoch": step / steps_per_epoch, "where": ev.where, "kind": ev.kind,
                "units_added": ev.units_added,
                "params_before": params_before, "params_after": model.param_count(),
                "predicted_loss_change": ev.predicted_loss_change, "observed_loss_change": ev.observed_loss_change,
                "probe_loss_before": probe_before, "probe_loss_after": probe_after,
                # wall-clock and FLOPs belong to the whole grow() call; listed on its first event
                "wall": clock.totals["growth"] - g0 if i == 0 else 0.0, "flops": gflops if i == 0 else 0,
                "extra": ev.extra,
            })
        method.events_done += 1

    def save(step: int) -> None:
        nonlocal checkpoint
        try:
            state = {
                "step": step, "samples_seen": ctx.samples_seen,
                "model": {"spec": model.spec(), "weights": model.state_dict(),
                          "frozen": [n for n, p in model.named_parameters() if not p.requires_grad],
                          "caps": {h.name: getattr(h.inp, "growbench_max_width", None)
                                   for h in model.hidden_layers()}},
                "optimizer": ckpt.optimizer_state(opt, model),
                "method": method.state_dict(), "events_done": method.events_done,
                "rng": {"global": ckpt.rng_state(device), "order": order_gen.get_state(),
                        "augment": aug_gen.get_state(), "method": method_gen.get_state(),
                        "method_augment": None if ctx._aug_generator is None else ctx._aug_generator.get_state()},
                "perm": perm, "running_loss": running_loss, "running_n": running_n,
                "clock": dict(clock.totals), "flops": {"train": flops.train_flops, "growth": flops.growth_flops},
                "curve": result.curve, "events": result.events,
            }
            checkpoint(state)
        except Exception as e:  # a full disk or an unpicklable method state must not stop the cell
            warnings.warn(f"checkpoint at step {step} not written ({type(e).__name__}: {e}); "
                          "the cell goes on without checkpoints", stacklevel=2)
            checkpoint = None
        clock.skip()

    for step in range(start, total_steps):
        ctx.step = step
        if step in eval_steps and not (resume is not None and step == start):  # done before the checkpoint
            evaluate_point(step)
            if checkpoint is not None and step > 0:
                save(step)
        if method.should_grow(model, ctx):
            grow(step)
        pos = step % steps_per_epoch
        if pos == 0:
            perm = torch.randperm(n_train, generator=order_gen).to(device)
        idx = perm[pos * b.batch_size:(pos + 1) * b.batch_size]
        x = ctx.prepare(data.train.x[idx])
        if augment:
            x = ctx._augment(x, aug_gen)
        y = data.train.y[idx]
        set_lr(opt, suite.optimizer.lr, lr_factor(suite.schedule, step, total_steps, steps_per_epoch))
        loss = ctx.loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n = len(idx)
        running_loss += loss.detach().double() * n
        running_n += n
        ctx.samples_seen += n
        flops.add_train(n)
        if step_hook:
            clock.begin()
            with FlopCount() as fc:
                method.after_step(model, ctx)
            flops.growth_flops += fc.total
            clock.end("growth")
        if (step + 1) % DIVERGENCE_CHECK_EVERY == 0 and not torch.isfinite(running_loss):
            raise Diverged(f"training loss became {running_loss.item()} at step {step} (epoch {ctx.epoch:.2f})")
        if progress is not None:
            progress(step + 1, total_steps)
    ctx.step = total_steps
    evaluate_point(total_steps)

    last = result.curve[-1]
    result.architecture = model.spec()
    result.final = {
        "test_acc": last["test_acc"], "test_loss": last["test_loss"],
        "val_acc": last.get("val_acc"), "val_loss": last.get("val_loss"),
        "params": model.param_count(), "inference_flops": count_flops(model, 1, train=False),
        "train_flops": flops.train_flops, "growth_flops": flops.growth_flops,
        "wall_train": clock.totals["train"], "wall_growth": clock.totals["growth"], "wall_eval": clock.totals["eval"],
        "wall_total": clock.totals["train"] + clock.totals["growth"],
        "steps": total_steps, "epochs": total_steps / steps_per_epoch, "growth_events": len(result.events),
        "widths": model.widths(),
    }
    return result
