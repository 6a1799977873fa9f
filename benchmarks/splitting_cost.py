"""Cost of one splitting step, exact (`splitting`) against fast (`splitting-fast`), relative to a training
epoch, as the network grows.

For each width w every hidden layer of the suite's model gets w units (clipped to the suite's caps is
*not* applied: the point is the trend). One training epoch is timed by running `--train-steps` ordinary
steps and scaling to the epoch's step count; one growth step of each variant is the method's whole
`grow` call (statistics pass, eigenpairs, splits, loss measurement) with the suite's settings, on a copy
of the same network. Columns: stats = statistics pass, eigen = eigenpairs, step = the whole call.

    python benchmarks/splitting_cost.py [--suite mnist] [--widths 4 16 64 256] [--stats N] [key=value ...]
"""
from __future__ import annotations

import argparse
import copy
import math
import time

import torch

from growbench.config import load_suite
from growbench.methods import resolve_method
from growbench.models import build_model
from growbench.optim import build_optimizer
from growbench.runner import load_data, resolve_device
from growbench.trainer import Context


def epoch_seconds(model, data, suite, device, steps: int) -> float:
    """Seconds of one training epoch, from `steps` timed steps (after 3 warm-up steps)."""
    b = suite.budget
    model = copy.deepcopy(model).train()
    opt = build_optimizer(model, suite.optimizer)
    ctx = Context(dataset=data, device=device, steps_per_epoch=1, total_steps=1, batch_size=b.batch_size,
                  generator=torch.Generator().manual_seed(0))
    batches = list(ctx.batches((steps + 3) * b.batch_size))
    for i, (x, y) in enumerate(batches):
        if i == 3:
            t0 = time.perf_counter()
        loss = ctx.loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    dt = (time.perf_counter() - t0) / (len(batches) - 3)
    return dt * math.ceil(len(data.train) / b.batch_size)


def grow_seconds(model, data, suite, device, method_name: str, stats: int | None) -> dict:
    spec = resolve_method(suite, method_name)
    if stats is not None:
        spec.settings.stats_examples = stats
    method = spec.instantiate()
    model = copy.deepcopy(model)
    ctx = Context(dataset=data, device=device, steps_per_epoch=1, total_steps=1, batch_size=suite.budget.batch_size,
                  generator=torch.Generator().manual_seed(1), model=model)
    t0 = time.perf_counter()
    events = method.grow(model, ctx)
    total = time.perf_counter() - t0
    ex = events[0].extra if events else {}
    return {"step": total, "stats": ex.get("stats_s", float("nan")), "eigen": ex.get("eigen_s", float("nan")),
            "n": ex.get("stats_examples", spec.settings.stats_examples), "split": sum(e.units_added for e in events)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", default="mnist")
    ap.add_argument("--widths", type=int, nargs="+", default=[4, 16, 64, 256])
    ap.add_argument("--stats", type=int, default=None, help="statistics examples (default: the suite's settings)")
    ap.add_argument("--train-steps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("overrides", nargs="*", help="suite key=value overrides")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    suite = load_suite(args.suite, args.overrides)
    device = resolve_device(suite.device)
    name = suite.dataset.name if isinstance(suite.dataset.name, str) else suite.dataset.name[0]
    data = load_data(suite, name).to(device)
    print(f"suite={suite.name} dataset={name} family={suite.model.family} device={device} "
          f"threads={torch.get_num_threads()} batch={suite.budget.batch_size}")
    head = (f"{'width':>6} {'params':>9} {'epoch s':>8} | {'exact: n':>8} {'stats':>7} {'eigen':>8} {'step':>8} "
            f"{'/epoch':>7} | {'fast: stats':>11} {'eigen':>7} {'step':>7} {'/epoch':>7} | {'exact/fast':>10}")
    print(head)
    print("-" * len(head))
    for w in args.widths:
        torch.manual_seed(0)
        model = build_model(suite.model, data.input_shape, data.num_outputs, [w] * len(suite.model.hidden)).to(device)
        ep = epoch_seconds(model, data, suite, device, args.train_steps)
        ex = grow_seconds(model, data, suite, device, "splitting", args.stats)
        fa = grow_seconds(model, data, suite, device, "splitting-fast", args.stats)
        print(f"{w:>6} {model.param_count():>9} {ep:>8.2f} | {ex['n']:>8} {ex['stats']:>7.2f} {ex['eigen']:>8.2f} "
              f"{ex['step']:>8.2f} {ex['step'] / ep:>7.3f} | {fa['stats']:>11.2f} {fa['eigen']:>7.2f} "
              f"{fa['step']:>7.2f} {fa['step'] / ep:>7.3f} | {ex['step'] / fa['step']:>10.1f}", flush=True)


if __name__ == "__main__":
    main()
