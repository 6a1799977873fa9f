"""Tests for the `splitting` (exact S2D) and `splitting-fast` growth methods (docs/methods/splitting.md).

Second-order checks run in float64 on networks whose activation is smooth (tanh MLP; VGG and ResNet with
their ReLU swapped for softplus β=3, whose σ'' the method uses exactly), so the identity
ΔL = ε²/2 · Σλ + O(ε⁴) holds without the ReLU surrogate's approximation. Tolerance: 10 % at ε = 0.05 and
3 % at ε = 0.02 (the O(ε⁴) remainder measured here is ~1-5 % and ~0.2-1 %).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from growbench.cli import main
from growbench.data import Dataset, Split
from growbench.methods import load_method_class
from growbench.methods.splitting import (Splitting, SplittingExactSettings, SplittingFast, SplittingFastSettings,
                                         SplittingSettings, collect_statistics, exact_min_eigen, fast_min_eigen,
                                         select_units)
from growbench.methods.splitting_math import activation_d2, splitting_matrices, splitting_products, patches, rows
from growbench.models import MLP, VGG, ResNet
from growbench.models.vgg import vgg_layout
from growbench.records import scan
from growbench.trainer import Context


# --------------------------------------------------------------------------- helpers
def make_ctx(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 64, seed: int = 0) -> Context:
    ds = Dataset("synthetic", "classification", tuple(x.shape[1:]), int(y.max()) + 1, Split(x, y), None,
                 Split(x, y), None, None, {})
    return Context(dataset=ds, device=torch.device("cpu"), steps_per_epoch=1, total_steps=1, batch_size=batch_size,
                   generator=torch.Generator().manual_seed(seed), model=model)


def smooth(model: nn.Module) -> nn.Module:
    """Swap every ReLU activation module for softplus β=3 (the surrogate itself), so σ'' is exact."""
    if isinstance(model, VGG):
        model.act = nn.Softplus(beta=3.0)
    if isinstance(model, ResNet):
        for blocks in model.stages:
            for b in blocks:
                b.act = nn.Softplus(beta=3.0)
    return model


def random_bn(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """Non-trivial eval-mode BatchNorm so that its scale c = γ/sqrt(var + eps) matters."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(0.2 * torch.randn(n, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
            m.weight.data.copy_(0.5 + torch.rand(n, generator=gen))
            m.bias.data.copy_(0.1 * torch.randn(n, generator=gen))
    return model


def build(kind: str, dtype=torch.float32) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """(model, x, y): small networks of each supported hidden-layer shape."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if kind == "mlp":
        model = MLP((6,), 3, [5, 4], "tanh")
        x = torch.randn(256, 6, generator=g)
    elif kind == "mlp-relu":
        model = MLP((6,), 3, [5, 4], "relu")
        x = torch.randn(256, 6, generator=g)
    elif kind == "vgg":  # stride-2 downsampling; last conv -> BN -> act -> global average pool -> Linear
        pools, strides = vgg_layout(3, [0], "stride")
        model = random_bn(VGG((3, 8, 8), 3, [3, 4, 3], pools, strides), g)
        x = torch.randn(128, 3, 8, 8, generator=g)
    elif kind == "vgg-max":  # classic 2x2 max-pool between a layer and the next
        pools, strides = vgg_layout(2, [0], "max")
        model = random_bn(VGG((3, 8, 8), 3, [3, 4], pools, strides), g)
        x = torch.randn(128, 3, 8, 8, generator=g)
    elif kind == "resnet":
        stages = [{"width": 4, "stride": 1, "hidden": [2]}, {"width": 6, "stride": 2, "hidden": [3]}]
        model = random_bn(ResNet((3, 8, 8), 3, 4, stages), g)
        x = torch.randn(128, 3, 8, 8, generator=g)
    else:
        raise ValueError(kind)
    y = torch.randint(0, 3, (len(x),), generator=g)
    return model.to(dtype), x.to(dtype), y


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


# --------------------------------------------------------------------------- registry and settings
def test_registered_and_settings_validated():
    assert load_method_class("splitting") is Splitting
    assert load_method_class("splitting-fast") is SplittingFast
    from growbench.config import ConfigError

    with pytest.raises(ConfigError, match="scope"):
        SplittingExactSettings(scope="everywhere")
    with pytest.raises(ConfigError, match="solver"):
        SplittingFastSettings(solver="power")
    with pytest.raises(ConfigError, match="fraction"):
        SplittingSettings(fraction=0)


# --------------------------------------------------------------------------- function preservation
@pytest.mark.parametrize("kind", ["mlp-relu", "vgg", "vgg-max", "resnet"])
@pytest.mark.parametrize("cls", [Splitting, SplittingFast], ids=["exact", "fast"])
def test_function_unchanged_at_zero_epsilon(kind, cls):
    model, x, y = build(kind)
    ctx = make_ctx(model, x, y)
    method = cls(cls.Settings(fraction=1.0, epsilon=0.0, stats_examples=128))
    before, widths = outputs(model, x), model.widths()
    model.train()
    for _ in range(2):  # a second step runs on the grown network (fast: warm starts with grown fan-in)
        events = method.grow(model, ctx)
        assert events and all(e.kind == "split" and e.units_added > 0 for e in events)
        assert all(e.predicted_loss_change == 0.0 and abs(e.observed_loss_change) < 1e-6 for e in events)
    assert model.training  # the eval mode of the statistics pass was undone
    assert sum(model.widths().values()) > sum(widths.values())
    torch.testing.assert_close(outputs(model, x), before, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- second-order prediction
@pytest.mark.parametrize("kind", ["mlp", "vgg", "resnet"])
def test_observed_loss_change_is_second_order_prediction(kind):
    """ΔL / (ε²/2 · Σλ) -> 1 as ε -> 0, per grown layer, on smooth networks (exact σ'')."""
    base, x, y = build(kind, torch.float64)
    smooth(base)
    ratios = {}
    for eps in (0.05, 0.02):
        model = copy.deepcopy(base)
        method = Splitting(SplittingExactSettings(fraction=0.5, scope="layer", epsilon=eps, stats_examples=len(x)))
        events = method.grow(model, make_ctx(model, x, y))
        assert len(events) >= 2
        for e in events:
            assert e.predicted_loss_change < 0
            ratios[eps, e.where] = e.observed_loss_change / e.predicted_loss_change
    for (eps, where), r in ratios.items():
        assert abs(r - 1) < (0.10 if eps == 0.05 else 0.03), (where, eps, r)
        assert abs(ratios[0.02, where] - 1) <= abs(ratios[0.05, where] - 1) + 1e-3  # converges as ε shrinks


def test_splitting_matrix_matches_autograd_second_derivative():
    """vᵀ S_i v equals d²L/dε² at ε = 0 for the split θ_i ± εv (halved out-weights), by double autograd."""
    model, x, y = build("vgg", torch.float64)
    smooth(model).eval()
    h = model.hidden_layers()[1]
    ctx = make_ctx(model, x, y, batch_size=len(x))
    stats = collect_statistics(model, ctx, [h], SplittingSettings(stats_examples=len(x)))
    S = splitting_matrices(patches(h.inp, stats.inputs[h.name][0]), rows(stats.weights[h.name][0]))  # (C, d, d)
    assert torch.allclose(S, S.transpose(1, 2))
    i = 2
    v = torch.randn(S.shape[1], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    W0, O0 = h.inp.weight.detach().clone(), h.out.weight.detach().clone()

    def loss_at(eps: torch.Tensor) -> torch.Tensor:
        m = copy.deepcopy(model)
        m.split_unit(h.name, torch.tensor([i]), torch.zeros(1, *W0.shape[1:], dtype=torch.float64))
        hh = m.hidden(h.name)
        delta = (eps * v).view(W0.shape[1:])
        W = torch.cat([W0[:i], (W0[i] + delta)[None], W0[i + 1:], (W0[i] - delta)[None]])
        del hh.inp.weight
        hh.inp.weight = W
        return ctx.loss_fn(m(x), y)

    eps = torch.zeros((), dtype=torch.float64, requires_grad=True)
    (d1,) = torch.autograd.grad(loss_at(eps), eps, create_graph=True)
    (d2,) = torch.autograd.grad(d1, eps)
    assert abs(float(d1.detach())) < 1e-12  # the first-order term of a symmetric split vanishes
    torch.testing.assert_close(d2, v @ S[i] @ v, rtol=1e-8, atol=1e-12)
    assert torch.equal(h.out.weight, O0)


# --------------------------------------------------------------------------- exact vs fast
@pytest.mark.parametrize("kind", ["mlp", "vgg"])
def test_fast_matches_exact(kind):
    model, x, y = build(kind, torch.float32)
    if kind == "mlp":  # train a little so the spectra are not those of a random network
        opt = torch.optim.Adam(model.parameters(), 1e-2)
        for _ in range(100):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    layers = model.hidden_layers()
    stats = collect_statistics(model, make_ctx(model, x, y), layers, SplittingSettings(stats_examples=len(x)))
    gen = torch.Generator().manual_seed(1)
    for h in layers:
        xs, ws = stats.inputs[h.name], stats.weights[h.name]
        lam_e, v_e = exact_min_eigen(h, xs, ws, 1 << 20)
        V0 = torch.randn(h.width, h.inp.weight[0].numel(), generator=gen)
        lam_f, v_f = fast_min_eigen(h, xs, ws, V0, passes=20)
        assert torch.all((lam_f - lam_e).abs() <= 0.01 * lam_e.abs() + 1e-7), (h.name, lam_e, lam_f)
        assert torch.all((v_e * v_f).sum(1).abs() > 0.99), (h.name, (v_e * v_f).sum(1))
        # the products used by the fast variant are S·v of the exact matrices
        S = exact_S(h, xs, ws)
        torch.testing.assert_close(sum(splitting_products(h.inp, a, b, V0) for a, b in zip(xs, ws)),
                                   torch.einsum("cde,ce->cd", S, V0), rtol=1e-4, atol=1e-6)
    # the spec's RMSprop solver gets close too, given many steps (its noisy steps limit the precision)
    h = layers[0]
    lam_e, _ = exact_min_eigen(h, stats.inputs[h.name], stats.weights[h.name], 1 << 20)
    lam_r, _ = fast_min_eigen(h, stats.inputs[h.name], stats.weights[h.name],
                              torch.randn(h.width, h.inp.weight[0].numel(), generator=gen), 300, "rmsprop", 3e-3)
    assert torch.all(lam_r >= lam_e - 1e-6) and torch.all(lam_r - lam_e <= 0.1 * lam_e.abs())


def exact_S(h, xs, ws) -> torch.Tensor:
    return sum(splitting_matrices(patches(h.inp, a), rows(b)) for a, b in zip(xs, ws))


# --------------------------------------------------------------------------- selection
def test_select_units_fraction_sign_and_caps():
    lams = {"a": torch.tensor([-3.0, -1.0, 2.0, -0.5]), "b": torch.tensor([-2.0, 0.0, -4.0, 1.0, -0.1, -0.2])}
    room = {"a": 100, "b": 100}
    # global: floor(0.3 · 10) = 3 most negative overall
    assert select_units(lams, room, 0.3) == {"b": [2, 0], "a": [0]}
    # every negative one at fraction 1, never λ >= 0 (λ = 0 included)
    sel = select_units(lams, room, 1.0)
    assert sorted(sel["a"]) == [0, 1, 3] and sorted(sel["b"]) == [0, 2, 4, 5]
    # room and max_per_layer cap a layer; its place goes to the next candidate
    assert select_units(lams, {"a": 100, "b": 1}, 0.3) == {"b": [2], "a": [0, 1]}
    assert select_units(lams, room, 0.5, max_per_layer=2) == {"b": [2, 0], "a": [0, 1]}
    assert select_units(lams, {"a": 0, "b": 100}, 0.3) == {"b": [2, 0, 5]}
    # layer scope: floor(fraction · width) per layer
    assert select_units(lams, room, 0.5, scope="layer") == {"a": [0, 1], "b": [2, 0, 5]}
    # at least one unit even when the fraction rounds to zero (width-1 layers), if λ < 0
    one = {"a": torch.tensor([-1.0]), "b": torch.tensor([-2.0])}
    assert select_units(one, room, 0.3) == {"b": [0]}
    assert select_units(one, room, 0.3, scope="layer") == {"a": [0], "b": [0]}
    assert select_units({"a": torch.tensor([0.5])}, {"a": 5}, 1.0) == {}


def test_grow_respects_room_fraction_and_positive_lambda():
    model, x, y = build("mlp-relu")
    ctx = make_ctx(model, x, y)
    fc0, fc1 = model.hidden("fc0"), model.hidden("fc1")
    fc0.inp.growbench_max_width = 6  # room 1
    fc1.inp.growbench_max_width = 4  # room 0: not even looked at
    events = Splitting(SplittingExactSettings(fraction=1.0)).grow(model, ctx)
    assert [e.where for e in events] == ["fc0"] and events[0].units_added == 1
    assert model.widths() == {"fc0": 6, "fc1": 4}
    assert len(events[0].extra["lambda_split"]) == 1 and events[0].extra["lambda_split"][0] < 0
    # the fraction: floor(0.4 · 9) = 3 units over both layers
    model, x, y = build("mlp-relu")
    events = SplittingFast(SplittingFastSettings(fraction=0.4)).grow(model, make_ctx(model, x, y))
    assert sum(e.units_added for e in events) == 3
    # exact σ'' of ReLU is 0: S = 0, λ = 0, never split
    model, x, y = build("mlp-relu")
    for cls in (Splitting, SplittingFast):
        assert cls(cls.Settings(fraction=1.0, relu_surrogate="none")).grow(model, make_ctx(model, x, y)) == []
    assert model.widths() == {"fc0": 5, "fc1": 4}


def test_relu_surrogate_is_softplus_second_derivative():
    a = torch.linspace(-3, 3, 61, dtype=torch.float64, requires_grad=True)
    (d1,) = torch.autograd.grad(nn.functional.softplus(a, beta=3.0).sum(), a, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), a)
    torch.testing.assert_close(activation_d2(nn.ReLU(), a.detach(), "softplus", 3.0), d2)
    for act in (nn.Tanh(), nn.GELU(), nn.SiLU(), nn.Sigmoid(), nn.SELU(), nn.Mish(), nn.ELU()):  # last two: autograd
        (d1,) = torch.autograd.grad(act(a).sum(), a, create_graph=True)
        (d2,) = torch.autograd.grad(d1.sum(), a)
        torch.testing.assert_close(activation_d2(act, a.detach()), d2, msg=type(act).__name__)


# --------------------------------------------------------------------------- end to end
def test_toy_cli_run_grows_and_records(tmp_path):
    rc = main(["run", "suite=toy", f"results_dir={tmp_path}", "methods=[splitting,splitting-fast]", "seeds=[0]",
               "budget.epochs=6", "growth.start_epoch=1", "growth.every_epochs=2", "--quiet"])
    assert rc == 0
    recs, problems = scan(tmp_path, "toy")
    assert not problems and len(recs) == 4  # 2 datasets x 2 methods
    for r in recs:
        assert r["status"] == "ok", r.get("error")
        assert r["events"], (r["method"], r["dataset"]["name"])
        assert r["final"]["params"] > r["curve"][0]["params"]
        for ev in r["events"]:
            assert ev["kind"] == "split" and ev["units_added"] > 0
            assert ev["predicted_loss_change"] < 0 and ev["observed_loss_change"] is not None
            assert ev["params_after"] > ev["params_before"]
            # ε = 0.01: the function barely moves (second order)
            assert abs(ev["probe_loss_after"] - ev["probe_loss_before"]) < 1e-3
