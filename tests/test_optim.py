"""Tests for growbench.optim: parameter groups, learning-rate schedules, and keeping the optimizer
right across growth (`sync_optimizer`).

The growth tests train real models for a few steps so optimizer state exists, grow them with the real
primitives, sync, and check the state entry by entry against a snapshot taken before growth.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from growbench.config import ModelConfig, OptimizerConfig, ScheduleConfig
from growbench.models import GrowableNet, build_model
from growbench.optim import build_optimizer, lr_factor, set_lr, sync_optimizer

BATCH = 16

FAMILIES: dict[str, tuple[ModelConfig, tuple[int, ...], int]] = {
    "mlp": (ModelConfig(family="mlp", hidden=[6, 5], activation="relu"), (8,), 3),
    "vgg-bn": (ModelConfig(family="vgg", hidden=[4, 6], pool_after=[0], batchnorm=True), (3, 8, 8), 3),
    "resnet": (ModelConfig(family="resnet", hidden=[2, 3], stem=8, widths=[8, 16], blocks=[1, 1]), (3, 8, 8), 3),
}

OPTIMIZERS = {
    "sgd": OptimizerConfig(name="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4),
    "sgd-nesterov": OptimizerConfig(name="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
    "adam": OptimizerConfig(name="adam", lr=0.01, weight_decay=5e-4),
}

GROWTHS = ["add", "split", "insert", "chain"]


def make(family: str, seed: int = 0) -> GrowableNet:
    cfg, shape, n_out = FAMILIES[family]
    torch.manual_seed(seed)
    return build_model(cfg, shape, n_out).train()


def data(family: str, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    _, shape, n_out = FAMILIES[family]
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, *shape, generator=g), torch.arange(BATCH) % n_out


def loss_of(model, x, y) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def train_steps(model, opt, x, y, n: int) -> list[float]:
    losses = []
    for _ in range(n):
        opt.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def zero_add(model: GrowableNet, name: str, k: int, seed: int = 3) -> None:
    h = model.hidden(name)
    g = torch.Generator().manual_seed(seed)
    W, O = h.inp.weight, h.out.weight
    model.add_units(name, torch.randn(k, *W.shape[1:], generator=g) * 0.3, torch.randn(k, generator=g) * 0.1,
                    torch.zeros(O.shape[0], k, *O.shape[2:]))


def zero_split(model: GrowableNet, name: str, idx: list[int]) -> None:
    W = model.hidden(name).inp.weight
    model.split_unit(name, torch.tensor(idx), torch.zeros(len(idx), *W.shape[1:]), 0.5)


def grow(model: GrowableNet, how: str) -> None:
    names = [h.name for h in model.hidden_layers()]
    if how == "add":
        for i, n in enumerate(names):
            zero_add(model, n, 2, seed=i)
    elif how == "split":
        zero_split(model, names[0], [0, 1])
    elif how == "insert":
        model.insert_identity_layer(names[0])
    elif how == "chain":
        # several replacements of the same parameters before one sync: old -> mid -> new
        zero_add(model, names[0], 2)            # inp of layer 0 grows rows, out (= inp of 1) grows columns
        zero_add(model, names[1], 1)            # ... which then grows rows
        zero_split(model, names[0], [1, model.hidden(names[0]).width - 1])  # inp of layer 0 replaced again
        new = model.insert_identity_layer(names[0])
        zero_add(model, new, 2)                 # parameters of the inserted layer replaced before any sync
    else:
        raise AssertionError(how)


# --------------------------------------------------------------------------- snapshots and checks
def group_of(opt) -> dict[int, int]:
    return {id(p): gi for gi, g in enumerate(opt.param_groups) for p in g["params"]}


def snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> list[tuple]:
    """(module, attribute, parameter, group, state copy) for every parameter. The primitives edit
    modules in place, so the module and attribute find the parameter that replaced this one."""
    groups = group_of(opt)
    out = []
    for mod in model.modules():
        for attr, p in mod.named_parameters(recurse=False):
            state = {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()} \
                if p in opt.state else {}
            out.append((mod, attr, p, groups[id(p)], state))
    return out


def expected_group(p: nn.Parameter, cfg: OptimizerConfig) -> int:
    return 0 if (p.dim() > 1 or cfg.decay_norm_and_bias) else 1


def check_synced(opt, model, cfg, slots, added: int) -> list[nn.Parameter]:
    """The policy of sync_optimizer; returns the inserted parameters."""
    params = [p for g in opt.param_groups for p in g["params"]]
    model_params = list(model.parameters())
    # the optimizer holds exactly the model's parameters, each once
    assert len({id(p) for p in params}) == len(params), "a parameter is in the optimizer twice"
    assert {id(p) for p in params} == {id(p) for p in model_params}
    assert len(params) == len(model_params)
    # no state is kept for parameters that are gone
    assert {id(p) for p in opt.state} <= {id(p) for p in model_params}, "stale optimizer state"
    groups = group_of(opt)
    known = set()
    for mod, attr, old, old_group, snap in slots:
        new = getattr(mod, attr)
        known.add(id(new))
        where = f"{type(mod).__name__}.{attr} {tuple(old.shape)} -> {tuple(new.shape)}"
        assert groups[id(new)] == old_group, where
        assert new.dim() == old.dim() and all(a >= b for a, b in zip(new.shape, old.shape)), where
        state = opt.state[new] if new in opt.state else {}
        assert set(state) == set(snap), where
        corner = tuple(slice(0, s) for s in old.shape)
        fresh = torch.ones(new.shape, dtype=torch.bool)
        fresh[corner] = False
        for key, before in snap.items():
            got = state[key]
            if torch.is_tensor(before) and before.shape == old.shape and before.dim() > 0:
                assert got.shape == new.shape, (where, key)
                assert torch.equal(got[corner], before), f"{where}: {key} of existing entries changed"
                assert torch.all(got[fresh] == 0), f"{where}: {key} of new entries is not zero"
            elif torch.is_tensor(before):
                assert torch.equal(got, before), (where, key)  # Adam's step count
            else:
                assert got == before, (where, key)
    inserted = [p for p in model_params if id(p) not in known]
    assert added == len(inserted)
    for p in inserted:
        assert not opt.state.get(p), "an inserted parameter has optimizer state"
        assert groups[id(p)] == expected_group(p, cfg)
    assert model.remaps == []
    assert opt.param_groups[0]["weight_decay"] == cfg.weight_decay
    assert opt.param_groups[1]["weight_decay"] == (cfg.weight_decay if cfg.decay_norm_and_bias else 0.0)
    return inserted


# --------------------------------------------------------------------------- build_optimizer
@pytest.mark.parametrize("family", list(FAMILIES))
def test_build_optimizer_groups(family):
    model = make(family)
    cfg = OPTIMIZERS["sgd"]
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.SGD)
    g0, g1 = opt.param_groups
    assert g0["weight_decay"] == cfg.weight_decay and g1["weight_decay"] == 0.0
    assert g0["params"] and g1["params"]
    assert all(p.dim() > 1 for p in g0["params"])
    assert all(p.dim() == 1 for p in g1["params"])
    assert sorted(map(id, g0["params"] + g1["params"])) == sorted(map(id, model.parameters()))
    assert g0["lr"] == cfg.lr and g0["momentum"] == cfg.momentum and not g0["nesterov"]

    cfg = OptimizerConfig(name="sgd", decay_norm_and_bias=True, weight_decay=1e-3)
    opt = build_optimizer(model, cfg)
    assert len(opt.param_groups[0]["params"]) == len(list(model.parameters()))
    assert opt.param_groups[1]["params"] == []
    assert opt.param_groups[1]["weight_decay"] == 1e-3


def test_build_optimizer_kinds():
    model = make("mlp")
    opt = build_optimizer(model, OPTIMIZERS["sgd-nesterov"])
    assert opt.param_groups[0]["nesterov"] is True
    opt = build_optimizer(model, OptimizerConfig(name="adam", lr=3e-3, betas=[0.8, 0.99]))
    assert type(opt) is torch.optim.Adam
    assert opt.param_groups[0]["betas"] == (0.8, 0.99) and opt.param_groups[0]["lr"] == 3e-3
    assert type(build_optimizer(model, OptimizerConfig(name="adamw"))) is torch.optim.AdamW
    with pytest.raises(ValueError, match="rmsprop"):
        build_optimizer(model, OptimizerConfig(name="rmsprop"))


# --------------------------------------------------------------------------- sync_optimizer
@pytest.mark.parametrize("how", GROWTHS)
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_sync_optimizer_after_growth(family, opt_name, how):
    cfg = OPTIMIZERS[opt_name]
    model = make(family)
    x, y = data(family)
    opt = build_optimizer(model, cfg)
    train_steps(model, opt, x, y, 3)
    slots = snapshot(model, opt)
    assert all(s[4] for s in slots), "every parameter should have optimizer state after 3 steps"
    if cfg.name == "adam":
        assert all(int(s[4]["step"]) == 3 for s in slots)

    model.eval()
    with torch.no_grad():
        before = model(x)
    grow(model, how)
    assert model.remaps or how == "insert"
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)  # growth was function-preserving
    model.train()

    added = sync_optimizer(opt, model, cfg)
    inserted = check_synced(opt, model, cfg, slots, added)
    assert (len(inserted) > 0) == (how in ("insert", "chain"))

    # training goes on: steps run, the state of every parameter has its shape, the loss decreases
    losses = train_steps(model, opt, x, y, 6)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0], losses
    for p in model.parameters():
        for key, v in opt.state[p].items():
            if torch.is_tensor(v) and v.dim() > 0:
                assert v.shape == p.shape, key
    if cfg.name == "adam":
        steps = {int(opt.state[p]["step"]) for p in inserted}
        assert steps <= {6}, "inserted parameters start their Adam step count at zero"
        olds = {int(opt.state[getattr(m, a)]["step"]) for m, a, *_ in slots}
        assert olds == {9}, "existing parameters keep their Adam step count"


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("family", ["mlp", "vgg-bn"])
def test_growth_is_invisible_to_existing_weights(family, opt_name):
    """Growth with zero out-weights does not change the function nor the gradients of existing
    weights, so with their optimizer state kept, the next step moves them exactly as without growth."""
    cfg = OPTIMIZERS[opt_name]
    model = make(family)
    x, y = data(family)
    opt = build_optimizer(model, cfg)
    train_steps(model, opt, x, y, 3)
    twin, twin_opt = copy.deepcopy((model, opt))  # one deepcopy: the twin optimizer holds the twin's params
    assert {id(p) for g in twin_opt.param_groups for p in g["params"]} == {id(p) for p in twin.parameters()}
    where = [(name, mod, attr, p.shape) for name, mod in model.named_modules()
             for attr, p in mod.named_parameters(recurse=False)]

    for n in [h.name for h in model.hidden_layers()]:
        zero_add(model, n, 2)
    sync_optimizer(opt, model, cfg)
    train_steps(model, opt, x, y, 1)
    train_steps(twin, twin_opt, x, y, 1)

    twin_modules = dict(twin.named_modules())
    for name, mod, attr, shape in where:
        corner = tuple(slice(0, s) for s in shape)
        torch.testing.assert_close(getattr(mod, attr)[corner], getattr(twin_modules[name], attr),
                                   msg=lambda m: f"{name}.{attr}: {m}")


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_sync_optimizer_chain_maps_state_through_intermediate(opt_name):
    """Two replacements of one parameter before a sync: the state lands on the final parameter."""
    cfg = OPTIMIZERS[opt_name]
    model = make("mlp")
    x, y = data("mlp")
    opt = build_optimizer(model, cfg)
    train_steps(model, opt, x, y, 2)
    lin0, lin1 = model.linears[0], model.linears[1]
    w0, w1 = lin0.weight, lin1.weight
    key = "momentum_buffer" if cfg.name == "sgd" else "exp_avg"
    s0, s1 = opt.state[w0][key].clone(), opt.state[w1][key].clone()
    zero_add(model, "fc0", 2)         # w0: (6, 8) -> (8, 8);  w1: (5, 6) -> (5, 8)
    mid1 = lin1.weight
    zero_add(model, "fc1", 3)         # w1: (5, 8) -> (8, 8)
    zero_split(model, "fc0", [0])     # w0: (8, 8) -> (9, 8);  w1: (8, 8) -> (8, 9)
    assert len([1 for old, _ in model.remaps if old is mid1]) == 1
    sync_optimizer(opt, model, cfg)
    assert lin0.weight.shape == (9, 8) and lin1.weight.shape == (8, 9)
    assert mid1 not in opt.state and w0 not in opt.state and w1 not in opt.state
    got0, got1 = opt.state[lin0.weight][key], opt.state[lin1.weight][key]
    assert torch.equal(got0[:6, :8], s0) and got0[6:].abs().sum() == 0
    assert torch.equal(got1[:5, :6], s1)
    assert got1[5:].abs().sum() == 0 and got1[:, 6:].abs().sum() == 0
    params = [p for g in opt.param_groups for p in g["params"]]
    assert {id(p) for p in params} == {id(p) for p in model.parameters()} and len(params) == 6


def test_sync_optimizer_without_growth_is_a_noop():
    cfg = OPTIMIZERS["adam"]
    model = make("vgg-bn")
    x, y = data("vgg-bn")
    opt = build_optimizer(model, cfg)
    train_steps(model, opt, x, y, 2)
    slots = snapshot(model, opt)
    groups = [list(g["params"]) for g in opt.param_groups]
    assert sync_optimizer(opt, model, cfg) == 0
    assert [list(g["params"]) for g in opt.param_groups] == groups
    check_synced(opt, model, cfg, slots, 0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sync_optimizer_before_any_step(family):
    """Growth in a method's setup happens before the first step: no state to carry, params swapped."""
    cfg = OPTIMIZERS["sgd"]
    model = make(family)
    x, y = data(family)
    opt = build_optimizer(model, cfg)
    slots = snapshot(model, opt)
    grow(model, "chain")
    added = sync_optimizer(opt, model, cfg)
    check_synced(opt, model, cfg, slots, added)
    assert len(opt.state) == 0
    losses = train_steps(model, opt, x, y, 6)
    assert losses[-1] < losses[0]


def test_sync_optimizer_inserted_params_group_with_decay_norm_and_bias():
    cfg = OptimizerConfig(name="sgd", lr=0.05, momentum=0.9, decay_norm_and_bias=True)
    model = make("resnet")
    x, y = data("resnet")
    opt = build_optimizer(model, cfg)
    train_steps(model, opt, x, y, 2)
    slots = snapshot(model, opt)
    model.insert_identity_layer("s1.b0")
    added = sync_optimizer(opt, model, cfg)
    inserted = check_synced(opt, model, cfg, slots, added)
    assert added == 6  # conv1, bn1 (2), conv2, bn2 (2)
    assert any(p.dim() == 1 for p in inserted)
    assert opt.param_groups[1]["params"] == []


# --------------------------------------------------------------------------- lr_factor
def test_lr_factor_cosine():
    cfg = ScheduleConfig(name="cosine")
    total, spe = 1000, 100
    f = [lr_factor(cfg, s, total, spe) for s in range(total + 1)]
    assert f[0] == pytest.approx(1.0)
    assert f[total // 2] == pytest.approx(0.5)
    assert f[total - 1] < 1e-4
    assert f[total] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(f, f[1:])), "cosine must decrease monotonically"
    assert f[250] == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(cfg, total + 50, total, spe) == pytest.approx(0.0, abs=1e-12)  # stays at 0 past the end


def test_lr_factor_warmup_is_linear_then_cosine():
    cfg = ScheduleConfig(name="cosine", warmup_epochs=2)
    total, spe = 200, 10
    warm = 20
    f = [lr_factor(cfg, s, total, spe) for s in range(total + 1)]
    for s in range(warm):
        assert f[s] == pytest.approx((s + 1) / warm)
    steps = [b - a for a, b in zip(f[:warm], f[1:warm])]
    assert max(steps) == pytest.approx(min(steps)), "warm-up is not linear"
    assert f[warm - 1] == pytest.approx(1.0)
    assert f[warm] == pytest.approx(1.0)
    assert f[warm + (total - warm) // 2] == pytest.approx(0.5)
    assert f[total] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(f[warm:], f[warm + 1:]))
    # fractional warm-up epochs round to steps
    half = ScheduleConfig(name="constant", warmup_epochs=0.5)
    assert [lr_factor(half, s, 100, 10) for s in range(6)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])


def test_lr_factor_step_schedule():
    cfg = ScheduleConfig(name="step", milestones=[2, 4.5], gamma=0.1)
    spe, total = 10, 100
    f = {s: lr_factor(cfg, s, total, spe) for s in range(total)}
    assert f[0] == 1.0 and f[19] == 1.0
    assert f[20] == pytest.approx(0.1) and f[44] == pytest.approx(0.1)
    assert f[45] == pytest.approx(0.01) and f[99] == pytest.approx(0.01)
    warm = ScheduleConfig(name="step", milestones=[2], gamma=0.5, warmup_epochs=1)
    assert lr_factor(warm, 0, total, spe) == pytest.approx(0.1)
    assert lr_factor(warm, 9, total, spe) == pytest.approx(1.0)
    assert lr_factor(warm, 10, total, spe) == 1.0
    assert lr_factor(warm, 20, total, spe) == pytest.approx(0.5)


def test_lr_factor_constant_and_unknown():
    assert lr_factor(ScheduleConfig(name="constant"), 37, 100, 10) == 1.0
    with pytest.raises(ValueError, match="linear"):
        lr_factor(ScheduleConfig(name="linear"), 0, 100, 10)


def test_set_lr_sets_every_group():
    model = make("mlp")
    opt = build_optimizer(model, OPTIMIZERS["sgd"])
    cfg = ScheduleConfig(name="cosine")
    set_lr(opt, 0.05, lr_factor(cfg, 50, 100, 10))
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.025, 0.025])
