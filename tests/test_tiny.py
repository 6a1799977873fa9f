"""Tests of the `tiny` growth method (growbench.methods.tiny, tiny_math).

Every hidden-layer coupling the harness has is covered: MLP linear -> act -> linear, VGG conv -> BN ->
ReLU -> stride-2 conv, the last VGG conv -> GAP -> classifier, and a ResNet block's conv1 (stride 2) ->
bn1 -> relu -> conv2. The math is checked against its definitions (least squares, whitening,
projection), against first-order loss changes measured on the network, and against gromo 0.1.0.
Small float64 networks on random inputs keep the whole file to a few seconds (plus one toy training).
"""
from __future__ import annotations

import copy
import math
import warnings
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from growbench.config import ConfigError, load_suite
from growbench.methods import resolve_method
from growbench.methods.tiny import (Tiny, TinySettings, apply_proposals, collect_projection, collect_statistics,
                                    compute_proposals, coupling, extended, summed_loss)
from growbench.methods.tiny_math import optimal_added_neurons, optimal_delta, unfold_input
from growbench.models import MLP, VGG, ResNet

N = 48  # examples of the statistics set
SEED_OFFSET = 0


def ce(out, y, reduction="mean"):
    return F.cross_entropy(out, y, reduction=reduction)


def make(case: str, smooth: bool = False) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """(model in eval mode, x, y) in float64. smooth=True swaps ReLU for Tanh, whose slope at 0 is exact,
    so the first-order prediction of TINY is the true derivative (ReLU is not differentiable at 0)."""
    seed = zlib.crc32(case.encode()) + SEED_OFFSET
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if case == "mlp":
        model = MLP((5,), 3, [4, 3], "tanh" if smooth else "relu")
        x = torch.randn(N, 5, generator=g, dtype=torch.float64)
    elif case == "vgg":  # conv0 -> conv1 (stride 2), conv1 -> conv2, conv2 -> GAP -> classifier
        model = VGG((3, 8, 8), 3, [3, 2, 4], strides=[1, 2, 1])
        x = torch.randn(N, 3, 8, 8, generator=g, dtype=torch.float64)
    elif case == "vgg-nobn":  # conv layers with bias (the ones row of the unfolded inputs)
        model = VGG((3, 8, 8), 3, [3, 2, 4], strides=[1, 2, 1], batchnorm=False)
        x = torch.randn(N, 3, 8, 8, generator=g, dtype=torch.float64)
    else:  # resnet: s1.b0 has conv1 with stride 2
        model = ResNet((3, 8, 8), 3, 4, [{"width": 4, "stride": 1, "hidden": [3]},
                                         {"width": 6, "stride": 2, "hidden": [2]}])
        x = torch.randn(N, 3, 8, 8, generator=g, dtype=torch.float64)
    model = model.double().eval()
    for m in model.modules():  # BatchNorm in eval mode with non-trivial running statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    if smooth:
        for m in model.modules():
            for k, sub in list(m._modules.items()):
                if isinstance(sub, nn.ReLU) and k == "act":
                    setattr(m, k, nn.Tanh())
    y = torch.randint(0, 3, (N,), generator=g)
    return model, x, y


def batches(x, y):
    return [(x[: N // 2], y[: N // 2]), (x[N // 2:], y[N // 2:])]


CASES = ["mlp", "vgg", "vgg-nobn", "resnet"]
LAYERS = [("mlp", "fc0"), ("mlp", "fc1"), ("vgg", "conv0"), ("vgg", "conv1"), ("vgg", "conv2"),
          ("vgg-nobn", "conv0"), ("vgg-nobn", "conv2"), ("resnet", "s0.b0"), ("resnet", "s1.b0")]
KIND = {"fc0": "linear", "fc1": "linear", "conv0": "conv", "conv1": "conv", "conv2": "gap",
        "s0.b0": "conv", "s1.b0": "conv"}


def test_couplings_and_skipped_pool_layers():
    for case, name in LAYERS:
        model, _, _ = make(case)
        assert coupling(model.hidden(name))[0] == KIND[name], (case, name)
    vgg_max = VGG((3, 8, 8), 3, [3, 4], pools=[True, False])
    kind, reason = coupling(vgg_max.hidden("conv0"))
    assert kind is None and "max-pool" in reason
    assert coupling(vgg_max.hidden("conv1"))[0] == "gap"


@pytest.mark.parametrize("compute_delta", [False, True], ids=["gromo-recipe", "with-delta"])
@pytest.mark.parametrize("case", CASES)
def test_function_preserved_at_zero_and_extended_forward_is_the_applied_network(case, compute_delta):
    model, x, y = make(case)
    s = TinySettings(compute_delta=compute_delta)
    props, _, _, _ = compute_proposals(model, model.hidden_layers(), batches(x, y), ce, s)
    chosen = [p for p in props.values() if p.units > 0]
    assert chosen
    with torch.no_grad():
        before = model(x)
        at_zero = copy.deepcopy(model)
        apply_proposals(at_zero, chosen, 0.0, compute_delta)
        torch.testing.assert_close(at_zero(x), before, rtol=0, atol=1e-12)  # zero columns (up to summation order)
        grown = copy.deepcopy(model)
        apply_proposals(grown, chosen, 0.3, compute_delta)  # every layer at once: shared layers are padded
        with extended(model, chosen, 0.3, compute_delta):
            hooked = model(x)
        torch.testing.assert_close(grown(x), hooked, rtol=1e-10, atol=1e-12)
        assert not torch.allclose(grown(x), before)
        assert torch.equal(model(x), before)  # hooks removed, model untouched


@pytest.mark.parametrize("case,name", LAYERS, ids=[f"{c}:{n}" for c, n in LAYERS])
def test_parameter_count_after_growth(case, name):
    model, x, y = make(case)
    h = model.hidden(name)
    props, _, _, _ = compute_proposals(model, [h], batches(x, y), ce, TinySettings(max_added_neurons=2))
    p = props[name]
    k = p.units
    assert 1 <= k <= 2
    fan_in = h.inp.weight[0].numel() + (h.inp.bias is not None)
    fan_out = h.out.weight.shape[0] * h.out.weight[0, 0].numel()
    before = model.param_count()
    apply_proposals(model, [p], 0.5, False)
    assert model.param_count() == before + k * fan_in + k * fan_out + 2 * k * (h.bn is not None)
    assert model.hidden(name).width == h.width


@pytest.mark.parametrize("compute_delta", [False, True], ids=["gromo-recipe", "with-delta"])
@pytest.mark.parametrize("case,name", LAYERS, ids=[f"{c}:{n}" for c, n in LAYERS])
def test_first_order_prediction_matches_observed_loss_change(case, name, compute_delta):
    """L(gamma) - L(0) = -gamma^2 * realised_first_order (+ O(gamma^3)) on the statistics set (the event's
    extra["predicted_linearised"]; gromo's first_order_improvement omits a projection term), for
    gamma in {1e-3, 1e-2} divided by the largest in-weight when it exceeds 1: after global average pooling
    the pooled patches are nearly collinear, S2 has eigenvalues just above the threshold and alpha gets
    entries ~100, so "small" has to be measured on gamma * alpha."""
    model, x, y = make(case, smooth=True)
    h = model.hidden(name)
    bs = batches(x, y)
    props, _, total, n = compute_proposals(model, [h], bs, ce, TinySettings(compute_delta=compute_delta))
    p = props[name]
    assert p.units > 0 and p.first_order > 0
    loss0 = summed_loss(model, bs, ce) / n
    assert loss0 == pytest.approx(total / n, rel=1e-12)
    scale = max(1.0, float(p.alpha_w.abs().max()))
    for gamma in (1e-3 / scale, 1e-2 / scale):
        with extended(model, [p], gamma, compute_delta):
            observed = summed_loss(model, bs, ce) / n - loss0
        predicted = -gamma ** 2 * p.realised_first_order  # statistics units: summed loss per example
        assert observed == pytest.approx(predicted, rel=0.1), gamma


def test_raw_residual_makes_both_first_orders_equal():
    """Without projection (GradMax-like N = -M2), alpha_j^T N omega_j = sigma_j^2 exactly."""
    model, x, y = make("mlp", smooth=True)
    s = TinySettings(use_projection=False)
    props, _, _, _ = compute_proposals(model, model.hidden_layers(), batches(x, y), ce, s)
    for p in props.values():
        assert p.realised_first_order == pytest.approx(p.first_order, rel=1e-9)


def _capture(model, h, x, y):
    """Raw B2 (input of inp), B1 (input of out) and G (d summed loss / d output of out) on x."""
    seen = {}
    hooks = [h.inp.register_forward_hook(lambda m, a, o: seen.__setitem__("b2", a[0].detach())),
             h.out.register_forward_hook(lambda m, a, o: seen.update(b1=a[0].detach(), a=o))]
    loss = ce(model(x), y, reduction="sum")
    (g,) = torch.autograd.grad(loss, [seen["a"]])
    for hd in hooks:
        hd.remove()
    return seen["b2"], seen["b1"], g


@pytest.mark.parametrize("case,name", [("mlp", "fc1"), ("vgg", "conv0"), ("resnet", "s1.b0")])
def test_delta_is_the_least_squares_solution(case, name):
    """Smooth activations: a dead ReLU unit makes S singular (that path is tested below with pinv)."""
    model, x, y = make(case, smooth=True)
    h = model.hidden(name)
    st, _, _ = collect_statistics(model, [h], batches(x, y), ce)
    delta, decrease = optimal_delta(st[name].tensor_s, st[name].tensor_m)
    _, b1, g = _capture(model, h, x, y)
    u = unfold_input(b1, h.out)  # rows = examples (x positions for a conv)
    if u.dim() == 3:
        u, g = u.transpose(1, 2).reshape(-1, u.shape[1]), g.flatten(2).transpose(1, 2).reshape(-1, g.shape[1])
    lstsq = torch.linalg.lstsq(u, g).solution.T  # argmin ||U X - G||
    torch.testing.assert_close(delta, lstsq, rtol=1e-6, atol=1e-9)
    assert decrease >= 0
    m = st[name].tensor_m
    assert decrease == pytest.approx(float(torch.trace(m.T @ torch.linalg.solve(st[name].tensor_s, m))))


def test_singular_s_falls_back_to_pinv():
    b = torch.randn(30, 3, dtype=torch.float64)
    b = torch.cat([b, b[:, :1]], 1)  # a duplicated column: S is singular
    g = torch.randn(30, 2, dtype=torch.float64)
    delta, decrease = optimal_delta(b.T @ b / 30, b.T @ g / 30)
    torch.testing.assert_close(delta, (torch.linalg.pinv(b) @ g).T, rtol=1e-6, atol=1e-9)
    assert decrease >= 0 and torch.isfinite(delta).all()


@pytest.mark.parametrize("case,name", LAYERS, ids=[f"{c}:{n}" for c, n in LAYERS])
def test_new_units_are_whitened_and_sorted(case, name):
    model, x, y = make(case)
    h = model.hidden(name)
    st = collect_statistics(model, [h], batches(x, y), ce)[0][name]
    delta, _ = optimal_delta(st.tensor_s, st.tensor_m)
    if st.kind == "conv":  # second pass for N
        collect_projection(model, [h], {name: st}, {name: delta}, batches(x, y), ce)
    n = st.tensor_n(delta)
    alpha, omega, sigma = optimal_added_neurons(st.tensor_s_growth, n)
    s2 = st.tensor_s_growth
    k = sigma.numel()
    assert 0 < k <= min(int(torch.linalg.matrix_rank(s2)), n.shape[1])
    assert torch.all(sigma[:-1] >= sigma[1:]) and torch.all(sigma >= min(1e-3, float(sigma[0])))
    torch.testing.assert_close(alpha @ s2 @ alpha.T, torch.diag(sigma), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(omega.T @ omega, torch.diag(sigma), rtol=1e-6, atol=1e-8)
    capped = optimal_added_neurons(s2, n, max_neurons=1)
    assert capped[2].numel() == 1 and torch.allclose(capped[2], sigma[:1])


@pytest.mark.parametrize("case,name", [("mlp", "fc0"), ("vgg", "conv0"), ("vgg", "conv2"), ("vgg-nobn", "conv0"),
                                       ("resnet", "s1.b0")])
def test_projected_residual_three_ways(case, name):
    """N = -M2 + C dW*^T (spec formula) = second-pass N (conv default) = -(1/n) B2^T V_proj from raw tensors."""
    model, x, y = make(case)
    h = model.hidden(name)
    bs = batches(x, y)
    with_c = collect_statistics(model, [h], bs, ce, cross_covariance=True)[0][name]
    delta, _ = optimal_delta(with_c.tensor_s, with_c.tensor_m)
    n_c = with_c.tensor_n(delta)
    if with_c.kind == "conv":
        direct = collect_statistics(model, [h], bs, ce)[0][name]
        collect_projection(model, [h], {name: direct}, {name: delta}, bs, ce)
        torch.testing.assert_close(direct.tensor_n(delta), n_c, rtol=1e-8, atol=1e-10)
    b2, b1, g = _capture(model, h, x, y)
    u1 = unfold_input(b2, h.inp)
    u2 = unfold_input(b1, h.out)
    if with_c.kind == "linear":
        v = g - u2 @ delta.T
        raw = -u1.T @ v / N
    elif with_c.kind == "gap":
        v = g - u2 @ delta.T
        raw = -u1.mean(2).T @ v / N
    else:  # exact conv coupling: new channel j at input position q of layer l is alpha_j . U1[:, q]
        v = g.flatten(2) - delta @ u2  # (n, C2, L2)
        img = u1.reshape(N, u1.shape[1], *b1.shape[2:])
        pat = F.unfold(img, h.out.kernel_size, h.out.dilation, h.out.padding, h.out.stride)  # (n, D1*E, L2)
        e = math.prod(h.out.kernel_size)
        raw = -torch.einsum("nael,ncl->ace", pat.reshape(N, -1, e, pat.shape[2]), v).reshape(u1.shape[1], -1) / N
    torch.testing.assert_close(n_c, raw, rtol=1e-8, atol=1e-10)


# --------------------------------------------------------------------------- gromo 0.1.0 as an oracle


class _GAP(nn.Module):
    def forward(self, x):
        return x.mean((2, 3))


def _gromo_pair(case):
    """growbench model + the same first hidden layer as a gromo (LinearGrowingModule | FullConv2dGrowingModule)
    pair whose post-layer function is the rest of the network, with copied weights."""
    gromo_lin = pytest.importorskip("gromo.modules.linear_growing_module")
    gromo_conv = pytest.importorskip("gromo.modules.conv2d_growing_module")
    if case == "linear":
        model, x, y = make("mlp", smooth=True)
        l1 = gromo_lin.LinearGrowingModule(5, 4, post_layer_function=nn.Tanh())
        rest = nn.Sequential(nn.Tanh(), model.linears[2])
        l2 = gromo_lin.LinearGrowingModule(4, 3, previous_module=l1, post_layer_function=rest)
        a, b = model.linears[0], model.linears[1]
    else:
        model, x, y = make("vgg-nobn", smooth=True)
        l1 = gromo_conv.FullConv2dGrowingModule(3, 3, 3, padding=1, post_layer_function=nn.Tanh())
        rest = nn.Sequential(nn.Tanh(), model.convs[2], nn.Tanh(), _GAP(), model.classifier)
        l2 = gromo_conv.FullConv2dGrowingModule(3, 2, 3, stride=2, padding=1, previous_module=l1,
                                                post_layer_function=rest)
        a, b = model.convs[0], model.convs[1]
    l1.next_module = l2
    l1.double()
    l2.double()
    with torch.no_grad():
        for src, dst in ((a, l1.layer), (b, l2.layer)):
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)
    return model, x, y, l1, l2


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize("compute_delta", [False, True], ids=["gromo-recipe", "with-delta"])
@pytest.mark.parametrize("case", ["linear", "conv"])
def test_matches_gromo(case, compute_delta):
    model, x, y, l1, l2 = _gromo_pair(case)
    default = torch.get_default_dtype()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.set_default_dtype(torch.float64)  # gromo builds its conv mask tensor in the default dtype
        l2.init_computation()
        for xb, yb in batches(x, y):
            ce(l2(l1(xb)), yb, reduction="sum").backward()
            l2.update_computation()
        l2.compute_optimal_updates(compute_delta=compute_delta, dtype=torch.float64)
        l2.reset_computation()
        torch.set_default_dtype(default)
    name = model.hidden_layers()[0].name
    props, _, _, _ = compute_proposals(model, [model.hidden(name)], batches(x, y), ce,
                                       TinySettings(compute_delta=compute_delta))
    p = props[name]
    ours_delta = torch.cat([p.delta_w.flatten(1), p.delta_b[:, None]], 1)
    assert _rel(ours_delta, l2.delta_raw) < 1e-4
    assert p.first_order == pytest.approx(float(l2.first_order_improvement), rel=1e-4)
    assert _rel(p.sigma, l2.eigenvalues_extension) < 1e-4
    ext = l1.extended_output_layer
    g_alpha = torch.cat([ext.weight.flatten(1), ext.bias[:, None]], 1)  # (K, D1)
    g_omega = l2.extended_input_layer.weight  # (C2, K[, kh, kw])
    ours_alpha = torch.cat([p.alpha_w.flatten(1), p.alpha_b[:, None]], 1)
    assert ours_alpha.shape == g_alpha.shape and p.omega.shape == g_omega.shape
    products = "ka,ck...->kac..."  # alpha_j omega_j^T per unit: invariant to the SVD's sign choice
    assert _rel(torch.einsum(products, ours_alpha, p.omega), torch.einsum(products, g_alpha, g_omega)) < 1e-4


# --------------------------------------------------------------------------- the method in the harness


class StubCtx:
    """The parts of growbench.trainer.Context that Tiny.grow uses."""

    def __init__(self, x, y, caps: dict[str, int] | None = None, task: str = "classification"):
        self.x, self.y, self.caps, self.task = x, y, caps or {}, task

    def batches(self, n, batch_size=None):
        for i in range(0, min(n, len(self.x)), batch_size or 16):
            yield self.x[i:i + (batch_size or 16)], self.y[i:i + (batch_size or 16)]

    def loss_fn(self, out, y, reduction="mean"):
        if self.task == "regression":
            return F.mse_loss(out, y, reduction=reduction)
        return ce(out, y, reduction)

    def room(self, name, model=None):
        return self.caps[name] - model.hidden(name).width if name in self.caps else 1 << 30


def test_selection_modes_caps_and_events():
    model, x, y = make("vgg")
    widths = model.widths()
    ctx = StubCtx(x, y, caps={"conv1": widths["conv1"]})  # conv1 is at its cap
    best = Tiny(TinySettings(stats_examples=N, stats_batch_size=N, max_added_neurons=2))
    (ev,) = best.grow(copy.deepcopy(model), ctx)
    gains = ev.extra["candidates_first_order"]
    assert set(gains) == {"conv0", "conv2"} and ev.where == max(gains, key=gains.get)
    assert 1 <= ev.units_added <= 2 and ev.extra["skipped"] == {"conv1": "at its width cap"}
    layer = ev.extra["layers"][ev.where]
    assert ev.predicted_loss_change == pytest.approx(-ev.extra["gamma"] ** 2 * layer["first_order_improvement"])
    assert ev.extra["predicted_linearised"] == pytest.approx(-ev.extra["gamma"] ** 2 * layer["realised_first_order"])
    assert layer["first_order_improvement"] == pytest.approx(max(gains.values())) and ev.predicted_loss_change < 0
    assert ev.observed_loss_change == pytest.approx(ev.extra["line_search"][f"{ev.extra['gamma']:.6g}"]
                                                    - ev.extra["line_search"]["0"])

    grown = copy.deepcopy(model)
    everything = Tiny(TinySettings(stats_examples=N, stats_batch_size=N, selection="all", max_added_neurons=1))
    (ev,) = everything.grow(grown, ctx)
    assert ev.where == "conv0,conv2" and ev.units_added == 2
    assert grown.widths() == {"conv0": widths["conv0"] + 1, "conv1": widths["conv1"], "conv2": widths["conv2"] + 1}
    assert grown.training is False  # grow restores the mode it found (eval here)

    seq = Tiny(TinySettings(stats_examples=N, stats_batch_size=N, selection="sequential", max_added_neurons=1))
    grown = copy.deepcopy(model)
    order = [seq.grow(grown, ctx)[0].where for _ in range(3)]
    assert order == ["conv0", "conv2", "conv0"]


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_event_predictions_are_in_the_trainers_loss_units(task):
    """At a small amplitude the event's linearised prediction is the observed change of the mean loss
    (averaged over outputs too for regression), and the line-search losses are mean losses."""
    model, x, y = make("mlp", smooth=True)
    if task == "regression":
        y = torch.randn(N, 3, dtype=torch.float64)
    ctx = StubCtx(x, y, task=task)
    s = TinySettings(stats_examples=N, stats_batch_size=16, compute_delta=True, gammas=[1e-3])
    (ev,) = Tiny(s).grow(copy.deepcopy(model), ctx)
    assert ev.extra["gamma"] == 1e-3 and ev.units_added > 0
    assert ev.observed_loss_change == pytest.approx(ev.extra["predicted_linearised"], rel=0.1)
    assert ev.predicted_loss_change < 0
    with torch.no_grad():
        mean_loss = ctx.loss_fn(model(x), y).item()
    assert ev.extra["line_search"]["0"] == pytest.approx(mean_loss, rel=1e-9)


def test_log_line_search_extends_while_the_loss_decreases():
    from growbench.methods.tiny import line_search

    s = TinySettings(line_search="log", log_points=4)
    # minimum at 30: ranges [1e-6, 1], [1, 10], [10, 100] improve, [100, 1000] does not and stops the search
    gamma, loss, history = line_search(lambda g: (g - 30.0) ** 2, 900.0, s)
    assert gamma == pytest.approx(10 ** (4 / 3)) and loss == min(history.values())
    assert max(history) == pytest.approx(1000.0)
    assert sorted(history)[:2] == [0.0, pytest.approx(1e-6)]


def test_settings_are_validated_and_suites_parse():
    with pytest.raises(ConfigError, match="selection"):
        TinySettings(selection="first")
    with pytest.raises(ConfigError, match="gammas"):
        TinySettings(gammas=[0.0])
    for suite in ("toy", "smoke", "mnist", "fashion-mnist", "cifar-small", "cifar"):
        s = load_suite(suite)
        assert "tiny" in s.methods
        spec = resolve_method(s, "tiny")
        assert spec.cls is Tiny and isinstance(spec.settings, TinySettings)


def test_toy_regression_grows_and_beats_the_same_start_fixed_network():
    from growbench.runner import load_data
    from growbench.models import build_model
    from growbench.trainer import derived_seed, train

    overrides = ["dataset.name=toy-regression", "budget.epochs=16", "budget.eval_every=4",
                 "growth.start_epoch=1", "growth.stop_epoch=13", "method_settings.tiny.growth.every_epochs=1"]
    suite = load_suite("toy", overrides)
    data = load_data(suite, "toy-regression")
    results = {}
    for name in ("fixed", "tiny"):
        spec = resolve_method(suite, name)
        torch.manual_seed(derived_seed(0, "init"))
        model = build_model(suite.model, data.input_shape, data.num_outputs, spec.hidden)
        results[name] = train(model, spec.instantiate(), data, suite, 0, torch.device("cpu"))
    fixed, tiny = results["fixed"], results["tiny"]
    assert fixed.final["widths"] == {"fc0": 2}
    assert tiny.final["widths"]["fc0"] >= 2 + 10 and len(tiny.events) == 12
    for ev in tiny.events:
        assert ev["units_added"] >= 1 and ev["params_after"] > ev["params_before"]
        assert math.isfinite(ev["observed_loss_change"]) and math.isfinite(ev["predicted_loss_change"])
    assert tiny.final["test_loss"] < 0.6 * fixed.final["test_loss"], (tiny.final, fixed.final)
