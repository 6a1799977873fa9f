"""The growth FLOP meter counts what torch's FlopCounterMode counts, plus dense decompositions."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from growbench.config import ModelConfig
from growbench.flops import FlopCount
from growbench.models import build_model


def _train_steps(model, x):
    for _ in range(2):
        model(x).square().mean().backward()


def test_same_counts_as_flopcountermode_for_network_work():
    torch.manual_seed(0)
    model = build_model(ModelConfig(family="vgg", hidden=[3, 5], pool_after=[0], downsample="stride"), (3, 8, 8), 4)
    x = torch.randn(6, 3, 8, 8)
    with FlopCounterMode(display=False) as ref:
        _train_steps(model, x)
    with FlopCount() as ours:
        _train_steps(model, x)
    assert ours.total == ref.get_total_flops() > 0


def test_decompositions_are_counted():
    a = torch.randn(30, 20, dtype=torch.float64)
    s = a.T @ a + torch.eye(20, dtype=torch.float64)
    with FlopCount() as c_mm:
        a.T @ a
    assert c_mm.total == 2 * 30 * 20 * 20
    for fn, least in [(lambda: torch.linalg.eigh(s), 20 ** 3),
                      (lambda: torch.linalg.svd(a, full_matrices=False), 20 ** 3),
                      (lambda: torch.linalg.solve(s, a.T), 20 ** 3 / 3), (lambda: torch.linalg.pinv(a), 20 ** 3),
                      (lambda: torch.linalg.lstsq(a, a), 20 ** 3)]:
        with FlopCount() as c:
            fn()
        assert c.total >= least
    with FlopCount() as c:
        torch.linalg.svd(torch.randn(4, 30, 20), full_matrices=False)  # batched: four times one
    with FlopCount() as one:
        torch.linalg.svd(torch.randn(30, 20), full_matrices=False)
    assert c.total == 4 * one.total
