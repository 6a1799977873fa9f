"""Throughput of growbench's trainer against a bare hand-written PyTorch loop, in one run.

Both train the `fixed` model of a suite (default: cifar-small) on the same in-memory tensors with the
same preprocessing (uint8 -> normalised float, random crop + flip on the device), the same optimizer,
schedule and batch size. The harness's time is its training clock (evaluation is not charged, as in
every record); the bare loop has no clock, hooks, FLOP meter or divergence checks. Runs alternate
(bare, harness, bare, harness, ...) so that machine noise hits both; the best of the repeats is kept.

    python benchmarks/harness_vs_bare.py [--steps 300] [--repeats 2] [--suite cifar-small] [key=value ...]
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from growbench.config import load_suite
from growbench.data.augment import normalize, random_crop, random_flip
from growbench.methods import resolve_method
from growbench.models import build_model
from growbench.optim import build_optimizer, lr_factor, set_lr
from growbench.runner import load_data, resolve_device
from growbench.trainer import derived_seed, loss_fn, train


def bare_loop(suite, data, device, seed: int) -> float:
    """Seconds for the same number of steps, written the way one would by hand."""
    b = suite.budget
    torch.manual_seed(derived_seed(seed, "init"))
    model = build_model(suite.model, data.input_shape, data.num_outputs).to(device).train()
    opt = build_optimizer(model, suite.optimizer)
    n = len(data.train)
    spe = math.ceil(n / b.batch_size)
    total = max(1, round(b.epochs * spe))
    order = torch.Generator().manual_seed(derived_seed(seed, "order"))
    aug = torch.Generator(device=device).manual_seed(derived_seed(seed, "augment"))
    images = data.train.x.dim() == 4
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for step in range(total):
        pos = step % spe
        if pos == 0:
            perm = torch.randperm(n, generator=order).to(device)
        idx = perm[pos * b.batch_size:(pos + 1) * b.batch_size]
        x = data.train.x[idx]
        if images:
            x = normalize(x, data.mean, data.std)
            if suite.dataset.augment:
                x = random_flip(random_crop(x, suite.dataset.crop_padding, aug), aug)
        set_lr(opt, suite.optimizer.lr, lr_factor(suite.schedule, step, total, spe))
        loss = loss_fn(data.task, model(x), data.train.y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def harness_loop(suite, data, device, seed: int) -> tuple[float, int]:
    spec = resolve_method(suite, "fixed")
    torch.manual_seed(derived_seed(seed, "init"))
    model = build_model(suite.model, data.input_shape, data.num_outputs, spec.hidden)
    result = train(model, spec.instantiate(), data, suite, seed, device)
    return result.final["wall_train"], result.final["steps"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", default="cifar-small")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    probe = load_suite(args.suite, args.overrides)
    batch = probe.budget.batch_size
    suite = load_suite(args.suite, [
        *args.overrides, f"dataset.train_subset={args.steps * batch}", "dataset.test_subset=500",
        "budget.epochs=1", "budget.eval_every=1", "methods=[fixed]"])
    device = resolve_device(suite.device)
    data = load_data(suite, suite.dataset.names[0]).to(device)
    torch.manual_seed(0)
    n_params = build_model(suite.model, data.input_shape, data.num_outputs).param_count()
    print(f"suite {args.suite}: fixed model with {n_params} params, {args.steps} steps of batch {batch} on {device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    bare_loop(suite, data, device, 0)  # warm-up (allocator, kernels), not timed
    bare, harness = [], []
    imgs = args.steps * batch
    for r in range(args.repeats):  # ABBA order so drift and warm caches favour neither side
        order = ("bare", "harness") if r % 2 == 0 else ("harness", "bare")
        for which in order:
            if which == "bare":
                bare.append(bare_loop(suite, data, device, r))
            else:
                harness.append(harness_loop(suite, data, device, r)[0])
        print(f"  repeat {r}: bare {imgs / bare[-1]:.0f} img/s, harness {imgs / harness[-1]:.0f} img/s")
    tb, th = min(bare), min(harness)
    ratios = sorted(b / h for b, h in zip(bare, harness))
    print(f"bare loop:  {imgs / tb:8.0f} images/s (best of {args.repeats})")
    print(f"harness:    {imgs / th:8.0f} images/s (best of {args.repeats})")
    print(f"harness/bare throughput ratio: {tb / th:.3f} (best vs best); "
          f"median of paired repeats {ratios[len(ratios) // 2]:.3f}")

if __name__ == "__main__":
    main()
