"""Cost of SENN's score bookkeeping (per training step) and of one expansion check, relative to a training
epoch, for the suite's network (default: mnist's MLP; `--suite cifar-small` for the VGG) at a few widths.

MLP: every hidden layer gets w units with SENN's rational activation. VGG: the suite's caps scaled so the
first conv has w channels (cifar-small, w = 16: 16/16/32/32), the family's ReLU. Columns:
  step ms       one ordinary training step with the suite's optimizer (mean over --steps steps);
  keep ms       `after_step` of senn-sgd on those steps: running K-FAC factors and amortised inversions
                (the per-step bookkeeping, charged as growth overhead in a record), with its settings;
  keep/step     keep ms / step ms;
  senn ms       one step of senn's natural-gradient optimizer (directions + the least-squares step length);
  senn keep     senn's `after_step` (its own `factor_every`: its optimizer's curvature);
  check s       one expansion check with the suite's senn-sgd settings and nothing accepted (thresholds out
                of reach): statistics and validation passes, the best width proposal of every hidden layer
                and the depth proposal. A recursive check repeats this once per accepted addition;
  +flops s      the same check under torch's FlopCounterMode, as the trainer runs it (Python dispatch per op);
  check/epoch   check s / (step ms × steps per epoch).

    python benchmarks/senn_cost.py [--suite mnist] [--widths 16 64 256] [--steps 40] [--threads 1] [key=value ...]

Threads default to 1: on shared CPU machines multi-threaded timings of small ops are dominated by noise.
"""
from __future__ import annotations

import argparse
import copy
import math
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from growbench.config import load_suite
from growbench.methods import resolve_method
from growbench.models import MLP, build_model
from growbench.optim import build_optimizer, sync_optimizer
from growbench.runner import load_data, resolve_device
from growbench.trainer import Context


def make_context(data, suite, device, model, seed: int = 0) -> Context:
    return Context(dataset=data, device=device, steps_per_epoch=1, total_steps=1, batch_size=suite.budget.batch_size,
                   generator=torch.Generator().manual_seed(seed), model=model)


def time_steps(model, data, suite, device, steps: int, method=None, natural: bool = False) -> tuple[float, float]:
    """(seconds per training step, seconds per after_step) over `steps` steps after 3 warm-up steps."""
    model = copy.deepcopy(model).train()
    ctx = make_context(data, suite, device, model)
    opt = None
    if method is not None:
        opt = method.configure_optimizer(model, suite.optimizer) if natural else None
        method.setup(model, ctx)
    opt = opt or build_optimizer(model, suite.optimizer)
    sync_optimizer(opt, model, suite.optimizer)
    batches = list(ctx.batches((steps + 3) * suite.budget.batch_size))
    train_s = keep_s = 0.0
    for i, (x, y) in enumerate(batches):
        t0 = time.perf_counter()
        loss = ctx.loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        t1 = time.perf_counter()
        if method is not None:
            method.after_step(model, ctx)
        t2 = time.perf_counter()
        if i >= 3:
            train_s += t1 - t0
            keep_s += t2 - t1
    n = len(batches) - 3
    return train_s / n, keep_s / n


def check_seconds(model, data, suite, device, flop_counter: bool) -> float:
    """One expansion check that accepts nothing (every proposal is still built and scored)."""
    spec = resolve_method(suite, "senn-sgd")
    spec.settings.tau = 1e30
    spec.settings.recursive = False
    method = spec.instantiate()
    model = copy.deepcopy(model)
    ctx = make_context(data, suite, device, model, seed=1)
    method.setup(model, ctx)
    t0 = time.perf_counter()
    if flop_counter:
        with FlopCounterMode(display=False):
            method.grow(model, ctx)
    else:
        method.grow(model, ctx)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--suite", default="mnist")
    ap.add_argument("--widths", type=int, nargs="+", default=None, help="default: 16 64 256 (MLP), 4 8 16 (VGG)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("overrides", nargs="*",
                    help="suite overrides, e.g. dataset.root=... method_settings.senn-sgd.proposals=32")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    suite = load_suite(args.suite, args.overrides)
    device = resolve_device(suite.device)
    data = load_data(suite, suite.dataset.names[0])
    spe = math.ceil(len(data.train) / suite.budget.batch_size)
    with FlopCounterMode(display=False):  # its first use imports half of torch: keep that out of the timings
        torch.ones(2) * 2
    s = resolve_method(suite, "senn-sgd").settings
    print(f"suite {suite.name}: {data.name}, {len(data.train)} training examples, batch {suite.budget.batch_size} "
          f"({spe} steps/epoch), {len(suite.model.hidden)} hidden layers, {args.threads} thread(s), device {device}")
    sn = resolve_method(suite, "senn").settings
    print(f"senn-sgd: {s.proposals} unit proposals, {s.layer_proposals} layer proposals, {s.ascent_steps} ascent "
          f"steps, {s.stats_examples}+{s.validation_examples} statistics examples, factors every {s.factor_every} "
          f"step(s) (senn: {sn.factor_every}), inverses every {s.inverse_every} updates")
    head = (f"{'width':>6} {'step ms':>8} {'keep ms':>8} {'keep/step':>9} {'senn ms':>8} {'senn keep':>9} "
            f"{'check s':>8} {'+flops s':>9} {'check/epoch':>11}")
    print(head)
    print("-" * len(head))
    mlp = suite.model.family == "mlp"
    caps = suite.model.max_hidden or suite.model.hidden
    for w in args.widths or ([16, 64, 256] if mlp else [4, 8, 16]):
        torch.manual_seed(0)
        if mlp:
            model = MLP(data.input_shape, data.num_outputs, [w] * len(suite.model.hidden), "rational").to(device)
        else:
            hidden = [max(1, round(c * w / caps[0])) for c in caps]
            model = build_model(suite.model, data.input_shape, data.num_outputs, hidden).to(device)
        step, _ = time_steps(model, data, suite, device, args.steps)
        _, keep = time_steps(model, data, suite, device, args.steps, resolve_method(suite, "senn-sgd").instantiate())
        senn, senn_keep = time_steps(model, data, suite, device, args.steps,
                                     resolve_method(suite, "senn").instantiate(), natural=True)
        check = check_seconds(model, data, suite, device, False)
        check_fc = check_seconds(model, data, suite, device, True)
        epoch = step * spe
        print(f"{w:>6} {step * 1e3:>8.2f} {keep * 1e3:>8.2f} {keep / step:>8.1f}x {senn * 1e3:>8.2f} "
              f"{senn_keep * 1e3:>9.2f} {check:>8.2f} {check_fc:>9.2f} {check / epoch:>10.1%}")


if __name__ == "__main__":
    main()
