"""Cost of one TINY growth step (statistics + closed-form solve) in growbench and in gromo 0.1.0, in one run.

Both compute the proposal for the same hidden layer of the same network (same weights) on the same
statistics set: growbench's `compute_proposals` (one pass, plus a second pass for conv -> conv to get
the projected residual N, then eigh/SVD), and gromo's `init_computation` / forward / backward /
`update_computation` per batch, then `compute_optimal_updates` (its TINY recipe, compute_delta=False).
Each side uses its default linear-algebra dtype (growbench float64, gromo float32). Runs alternate
(gromo, growbench, gromo, growbench, ...) and the best of the repeats is kept (a case stops repeating
after --budget seconds: gromo's conv step takes seconds). Cases:

    mlp:  MNIST-shaped MLP 784-128-128-10, hidden layer fc1 (Linear -> ReLU -> Linear)
    conv: cifar-small VGG at widths 12-12-28-28 (BatchNorm, stride-2 downsampling), hidden layer conv1
          (conv1 stride 2 -> BN -> ReLU -> conv2 3x3): gromo's FullConv2dGrowingModule pair

    python benchmarks/tiny_vs_gromo.py [--case mlp|conv|both] [--examples 256] [--batch 128] [--repeats 5]
                                        [--budget 20] [--suite mnist] [--results results]

It ends with the growth share of tiny's wall-clock in a suite's records (default: mnist, from
`growbench run suite=mnist methods=[tiny]`), per seed: growth s / (train s + growth s), as the
leaderboard computes it; the records' FLOPs give the load-independent share beside it.
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from growbench.methods.tiny import TinySettings, compute_proposals
from growbench.models import MLP, VGG


def loss_fn(out, y, reduction="mean"):
    return F.cross_entropy(out, y, reduction=reduction)


class _GAP(nn.Module):
    def forward(self, x):
        return x.mean((2, 3))


def build(case: str):
    """(growbench model, hidden name, gromo model, gromo layer l, input shape)."""
    from gromo.modules.conv2d_growing_module import FullConv2dGrowingModule
    from gromo.modules.linear_growing_module import LinearGrowingModule

    torch.manual_seed(0)
    if case == "mlp":
        model = MLP((1, 28, 28), 10, [128, 128]).eval()
        a, b = model.linears[1], model.linears[2]
        l1 = LinearGrowingModule(128, 128, post_layer_function=nn.ReLU())
        l2 = LinearGrowingModule(128, 10, previous_module=l1)
        prefix = nn.Sequential(nn.Flatten(), model.linears[0], nn.ReLU())
        name, shape = "fc1", (1, 28, 28)
    else:
        model = VGG((3, 32, 32), 10, [12, 12, 28, 28], strides=[1, 2, 1, 2]).eval()
        a, b = model.convs[1], model.convs[2]
        l1 = FullConv2dGrowingModule(12, 12, 3, stride=2, padding=1, use_bias=False,
                                     post_layer_function=nn.Sequential(model.bns[1], nn.ReLU()))
        rest = nn.Sequential(model.bns[2], nn.ReLU(), model.convs[3], model.bns[3], nn.ReLU(), _GAP(),
                             model.classifier)
        l2 = FullConv2dGrowingModule(12, 28, 3, padding=1, use_bias=False, previous_module=l1,
                                     post_layer_function=rest)
        prefix = nn.Sequential(model.convs[0], model.bns[0], nn.ReLU())
        name, shape = "conv1", (3, 32, 32)
    l1.next_module = l2
    with torch.no_grad():
        for src, dst in ((a, l1.layer), (b, l2.layer)):
            dst.weight.copy_(src.weight)
            if src.bias is not None:
                dst.bias.copy_(src.bias)
    gromo_model = nn.Sequential(prefix, l1, l2).eval()
    return model, name, gromo_model, l2, shape


def time_growbench(model, name, batches) -> tuple[float, float]:
    """(seconds, first-order improvement)"""
    t = time.perf_counter()
    props, *_ = compute_proposals(model, [model.hidden(name)], batches, loss_fn, TinySettings())
    return time.perf_counter() - t, props[name].first_order


def time_gromo(gromo_model, l2, batches) -> tuple[float, float]:
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        l2.init_computation()
        for x, y in batches:
            gromo_model.zero_grad()
            loss_fn(gromo_model(x), y, reduction="sum").backward()
            l2.update_computation()
        l2.compute_optimal_updates(compute_delta=False)
        l2.reset_computation()
        first_order = float(l2.first_order_improvement)
        l2.delete_update()
    return time.perf_counter() - t, first_order


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", choices=["mlp", "conv", "both"], default="both")
    ap.add_argument("--examples", type=int, default=256)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--budget", type=float, default=20.0, help="stop repeating a case after this many seconds")
    ap.add_argument("--suite", default="mnist", help="suite whose tiny records give the growth share")
    ap.add_argument("--results", default="results", help="results folder of those records")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.examples} examples, "
          f"batch {args.batch}, best of up to {args.repeats} repeats ({args.budget:g} s per case)")
    for case in (["mlp", "conv"] if args.case == "both" else [args.case]):
        model, name, gromo_model, l2, shape = build(case)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(args.examples, *shape, generator=g)
        y = torch.randint(0, 10, (args.examples,), generator=g)
        batches = [(x[i:i + args.batch], y[i:i + args.batch]) for i in range(0, args.examples, args.batch)]
        time_growbench(model, name, batches[:1])  # warm-up both (lazy LAPACK / kernel init)
        time_gromo(gromo_model, l2, batches[:1])
        ours, theirs = [], []
        start = time.perf_counter()
        for _ in range(args.repeats):
            theirs.append(time_gromo(gromo_model, l2, batches))
            ours.append(time_growbench(model, name, batches))
            if time.perf_counter() - start > args.budget:
                break
        t_ours, t_theirs = min(t for t, _ in ours), min(t for t, _ in theirs)
        fo_ours, fo_theirs = ours[0][1], theirs[0][1]
        print(f"{case:5s} hidden {name}: growbench {t_ours:.3f} s, gromo {t_theirs:.3f} s, "
              f"growbench/gromo = {t_ours / t_theirs:.2f}  (first-order gain {fo_ours:.6g} vs {fo_theirs:.6g}, "
              f"rel. diff {abs(fo_ours - fo_theirs) / abs(fo_theirs):.1e})")

    growth_share(args.suite, args.results)


def growth_share(suite_name: str, results: str) -> None:
    """tiny's growth share in the records of `suite_name` that match the suite as configured now."""
    from growbench.config import load_suite
    from growbench.report.collect import collect

    board = collect(load_suite(suite_name, [f"results_dir={results}"]))
    cells = board.cells[(board.cells["method"] == "tiny") & (board.cells["status"] == "ok")]
    if cells.empty:
        print(f"suite {suite_name}: no tiny records under {results}/ (growbench run suite={suite_name} methods=[tiny])")
        return
    for _, c in cells.iterrows():
        flops = c["growth_flops"] / (c["growth_flops"] + c["train_flops"])
        print(f"suite {suite_name} {c['dataset']} seed {c['seed']}: tiny growth {c['wall_growth']:.1f} s of "
              f"{c['wall_growth'] + c['wall_train']:.1f} s = {c['growth_share']:.1%} of wall-clock "
              f"({flops:.1%} of FLOPs)")
    print(f"suite {suite_name}: tiny growth share {cells['growth_share'].mean():.1%} of wall-clock (mean of "
          f"{len(cells)} seeds)")


if __name__ == "__main__":
    main()
