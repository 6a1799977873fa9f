"""Cost of one Firefly growth round relative to one training epoch, in FLOPs and wall-clock.

Cases: the mnist suite's MLP and a cifar-small-like VGG (stride-2 downsampling, GAP -> Linear), each at a
small and a large width, with the suite's firefly settings. The data are random tensors of the real shapes
and sizes (60000 or 50000 training examples): the cost does not depend on their content.

Columns:
  flops ratio   growth FLOPs (counted by FlopCounterMode, as the trainer does) / FLOPs of one training epoch
  wall ratio    growth seconds / seconds of one training epoch (the epoch timed on `--steps` SGD steps and
                scaled to the suite's steps per epoch; growth timed with no FLOP counter)
  wall (FCM)    the same growth under FlopCounterMode, which is how the trainer charges it: the counter's
                per-operation overhead dominates on nets this small

    python benchmarks/firefly_cost.py [--steps 30] [--threads 1]
"""
from __future__ import annotations

import argparse
import copy
import math
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from growbench.config import load_suite
from growbench.data import Dataset, Split
from growbench.methods import resolve_method
from growbench.models import build_model, count_flops
from growbench.optim import build_optimizer
from growbench.trainer import Context


def fake_data(shape: tuple[int, ...], n: int, classes: int = 10) -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
    y = torch.randint(0, classes, (n,), generator=g)
    c = shape[0]
    split = Split(x, y)
    return Dataset("fake", "classification", shape, classes, split, None, Split(x[:100], y[:100]),
                   (0.5,) * c, (0.25,) * c, {})


def context(data: Dataset, batch_size: int, model, augment: bool) -> Context:
    spe = math.ceil(len(data.train) / batch_size)
    return Context(dataset=data, device=torch.device("cpu"), steps_per_epoch=spe, total_steps=spe,
                   batch_size=batch_size, generator=torch.Generator().manual_seed(1), model=model, augment=augment)


def epoch_seconds(model, suite, ctx: Context, steps: int) -> float:
    model = copy.deepcopy(model).train()
    opt = build_optimizer(model, suite.optimizer)
    batches = list(ctx.batches(steps * ctx.batch_size, ctx.batch_size, ctx.augment))

    def run(bs):
        for x, y in bs:
            loss = ctx.loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    run(batches[:3])  # warm-up (first optimizer step, allocator)
    t = time.perf_counter()
    run(batches)
    return (time.perf_counter() - t) / len(batches) * ctx.steps_per_epoch


def growth(model, method_spec, ctx: Context, count: bool) -> tuple[float, int, dict]:
    model = copy.deepcopy(model).train()
    ctx.model = model
    method = method_spec.instantiate()
    t = time.perf_counter()
    if count:
        with FlopCounterMode(display=False) as fc:
            method.grow(model, ctx)
        flops = fc.get_total_flops()
    else:
        method.grow(model, ctx)
        flops = 0
    return time.perf_counter() - t, flops, model.widths()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30, help="SGD steps timed to estimate one epoch")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cases = [("mnist", "mlp", [16, 16]), ("mnist", "mlp", [128, 128]),
             ("cifar-small", "vgg", [4, 4, 8, 8]), ("cifar-small", "vgg", [16, 16, 32, 32])]
    rows = []
    for suite_name, _, hidden in cases:
        suite = load_suite(suite_name)
        shape, n = ((1, 28, 28), 60000) if suite_name == "mnist" else ((3, 32, 32), 50000)
        data = fake_data(shape, n)
        torch.manual_seed(0)
        model = build_model(suite.model, shape, 10, hidden=hidden)
        spec = resolve_method(suite, "firefly")
        ctx = context(data, suite.budget.batch_size, model, suite.dataset.augment)
        ep_flops = count_flops(model, 8, train=True) / 8 * n
        ep_wall = epoch_seconds(model, suite, ctx, args.steps)
        ctx.generator.manual_seed(1)
        g_wall, _, widths = growth(model, spec, ctx, count=False)
        ctx.generator.manual_seed(1)
        g_wall_fcm, g_flops, _ = growth(model, spec, ctx, count=True)
        rows.append((suite_name, str(hidden), str(list(widths.values())), g_flops / ep_flops, ep_wall, g_wall,
                     g_wall / ep_wall, g_wall_fcm, g_wall_fcm / ep_wall))
        s = spec.settings
        print(f"# {suite_name}: opt_epochs={s.opt_epochs} score_epochs={s.score_epochs} "
              f"K={s.new_candidates} grow_ratio={s.grow_ratio}", flush=True)

    head = ("suite", "widths", "after growth", "flops ratio", "epoch s", "growth s", "wall ratio",
            "growth s (FCM)", "wall ratio (FCM)")
    fmt = "{:<12} {:<16} {:<18} {:>11} {:>8} {:>9} {:>10} {:>15} {:>17}"
    print(fmt.format(*head))
    for r in rows:
        print(fmt.format(r[0], r[1], r[2], f"{r[3]:.3f}", f"{r[4]:.2f}", f"{r[5]:.2f}", f"{r[6]:.3f}",
                         f"{r[7]:.2f}", f"{r[8]:.3f}"))


if __name__ == "__main__":
    main()
