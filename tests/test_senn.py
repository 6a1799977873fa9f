"""Tests for SENN (`senn`, `senn-sgd`): the rational activation, growth with per-unit activation
parameters, the Kronecker-factored score and its lower bound, the Theorem 3.1 bound, where units go,
depth growth through the CLI, and the natural-gradient optimizer across growth. Spec: docs/methods/senn.md.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from growbench.config import ConfigError, OptimizerConfig
from growbench.methods.senn import (Proposal, Senn, SennNaturalSettings, SennSgd, SennSgdSettings, ascend,
                                    candidate_features, make_target, score, theorem_bound)
from growbench.methods.senn_conv import ConvCandidates, channel_moments
from growbench.methods.senn_kfac import (KFACNaturalGradient, damped, observe, with_ones)
from growbench.models import MLP, VGG, from_spec
from growbench.models.activations import Rational, rational, rational_param_grads, rational_with_grads
from growbench.optim import build_optimizer, sync_optimizer


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: intra-op threads only add contention (10x slower on a loaded 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def cls_loss(out, y, reduction="mean"):
    return F.cross_entropy(out, y, reduction=reduction)


def mse_loss(out, y, reduction="mean"):
    return F.mse_loss(out, y, reduction=reduction)


def spiral_like(n: int = 300, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    t = torch.rand(n, generator=g)
    ang = 2 * math.pi * (y / 3 + 1.5 * t)
    x = torch.stack([t * torch.cos(ang), t * torch.sin(ang)], 1) + 0.03 * torch.randn(n, 2, generator=g)
    return x / x.std(0), y


class Ctx:
    """The parts of growbench.trainer.Context SENN uses, over an in-memory data set."""

    def __init__(self, model, X, Y, loss, seed: int = 0):
        self.model, self.X, self.Y, self.loss_fn = model, X, Y, loss
        self.generator = torch.Generator().manual_seed(seed)
        self.step = 0
        self.device = torch.device("cpu")

    def batches(self, n, batch_size=None):
        idx = torch.randperm(len(self.X), generator=self.generator)[:n]
        yield self.X[idx], self.Y[idx]

    def room(self, name, model=None):
        h = (model or self.model).hidden(name)
        cap = getattr(h.inp, "growbench_max_width", None)
        return (1 << 30) if cap is None else max(0, cap - h.width)


def trained_mlp(hidden, X, Y, loss, steps=150, seed=0, lr=0.05):
    torch.manual_seed(seed)
    n_out = int(Y.max()) + 1 if Y.dtype == torch.long else Y.shape[1]
    m = MLP((X.shape[1],), n_out, hidden, "rational")
    opt = torch.optim.Adam(m.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss(m(X), Y).backward()
        opt.step()
    return m


# --------------------------------------------------------------------------- the rational activation
def test_rational_identity_is_exact_and_grads_match_autograd():
    x = torch.cat([torch.linspace(-1e4, 1e4, 1001), torch.randn(1000)])[None].repeat(3, 1).T  # (N, 3)
    act = Rational(3, identity=True)
    assert torch.equal(act(x), x)  # (0, 0, 1): exactly x in float32 (1 + 1e-8 rounds to 1)
    z = torch.randn(20, 4, dtype=torch.float64, requires_grad=True)
    coef = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    out = rational(z, *coef)
    gz, gc = torch.autograd.grad(out.sum(), [z, coef])
    phi, dphi, parts = rational_with_grads(z.detach(), *coef.detach())
    torch.testing.assert_close(phi, out.detach())
    torch.testing.assert_close(dphi, gz)
    torch.testing.assert_close(torch.stack(parts).sum(1), gc)
    torch.testing.assert_close(rational_param_grads(z.detach(), *coef.detach()).sum(0), gc.T)


# --------------------------------------------------------------------------- growth preserves the function
def test_rational_mlp_primitives_preserve_function_and_spec():
    torch.manual_seed(0)
    m = MLP((3,), 2, [4, 3], "rational")
    x = torch.randn(32, 3)
    ref = copy.deepcopy(m)
    cfg = OptimizerConfig(name="adam", lr=0.01)
    opt = build_optimizer(m, cfg)
    F.mse_loss(m(x), torch.zeros(32, 2)).backward()
    opt.step()
    ref.load_state_dict(m.state_dict())
    m.add_units("fc0", torch.randn(2, 3), torch.randn(2), torch.zeros(3, 2), act_init=torch.randn(2, 3))
    m.split_unit("fc1", [0, 2], torch.zeros(2, 6))
    new = m.insert_identity_layer("fc1", activation="rational")
    assert new == "fc2" and isinstance(m.hidden("fc2").act, Rational) and m.hidden("fc2").act.width == 5
    assert m.acts[0].width == 6 and m.acts[1].width == 5
    torch.testing.assert_close(m(x), ref(x), atol=1e-6, rtol=1e-6)
    # the activation parameters were replaced through the remap log: the optimizer keeps their state
    old_v = ref.acts[0].v
    sync_optimizer(opt, m, cfg)
    st = opt.state[m.acts[0].v]
    assert st["exp_avg"].shape == (6,) and torch.equal(st["exp_avg"][4:], torch.zeros(2))
    assert old_v.shape == (4,)
    twin = from_spec(m.spec())
    twin.load_state_dict(m.state_dict())
    torch.testing.assert_close(twin(x), m(x))
    assert m.spec()["activation"] == ["rational"] * 3


def test_senn_applies_width_and_depth_without_changing_the_function():
    X, Y = spiral_like(200)
    m = trained_mlp([4], X, Y, cls_loss, steps=50)
    method = SennSgd(SennSgdSettings(stats_examples=200, validation_examples=0))
    ctx = Ctx(m, X, Y, cls_loss)
    method.setup(m, ctx)
    ref = copy.deepcopy(m)
    g = torch.Generator().manual_seed(3)
    p = Proposal("width", 0, torch.randn(1, 2, generator=g), torch.randn(1, generator=g),
                 torch.randn(1, 3, generator=g), 0, 0, 0, 0, 1)
    method._apply(m, ctx, p, X, 1.0, 0)
    assert m.widths() == {"fc0": 5}
    B = torch.randn(5, 5, generator=g) + 2 * torch.eye(5)  # an invertible basis: the next layer gets B⁻¹
    p = Proposal("depth", 0, B, torch.randn(5, generator=g), torch.randn(5, 3, generator=g), 0, 0, 0, 0, 1)
    ev = method._apply(m, ctx, p, X, 1.0, 1)
    assert ev.kind == "insert" and ev.extra["basis"] == "optimised" and m.widths() == {"fc0": 5, "fc1": 5}
    assert torch.allclose(m.linears[1].weight, B)
    with torch.no_grad():
        torch.testing.assert_close(m(X), ref(X), atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- the score
def test_kfac_layer_score_equals_kron_formula():
    """Spec (g.4): tr(Γ Â⁻¹ Γᵀ Ĝ⁻¹) = vec(Γ)ᵀ (Â ⊗ Ĝ)⁻¹ vec(Γ) with torch.kron."""
    X, Y = spiral_like(120)
    m = trained_mlp([3, 4], X, Y, cls_loss, steps=20).double()
    s = SennSgdSettings(a_damping=0.05, damping=0.1)
    obs = observe(m, cls_loss, X.double(), Y, None)
    for j in (1, 2):
        t = make_target(obs, j, s)
        A = obs.A[j]
        A_hat = A + s.a_damping * torch.diagonal(A).mean() * torch.eye(A.shape[0], dtype=A.dtype)
        G_hat = damped(obs.G[j], s.damping)
        vec = obs.Gamma[j].T.reshape(-1)  # column-stacking of Γ (d_out, d_in+1)
        exact = vec @ torch.linalg.solve(torch.kron(A_hat, G_hat), vec)
        assert t.eta_layer == pytest.approx(float(exact), rel=1e-6)
        assert t.eta_layer > 0


def _extended_eta(obs, j, H, delta_abs, s):
    """η of layer j with the candidates' activations H (N, k) as extra inputs, Â_ext = A_ext + δI (same δ)."""
    a = torch.cat([with_ones(obs.inputs[j]), H], 1)
    n = a.shape[0]
    A = a.T @ a / n + delta_abs * torch.eye(a.shape[1], dtype=a.dtype)
    Gam = obs.grads[j].T @ a / n  # the new columns' gradient E[g hᵀ] (zero out-weights: g unchanged)
    G_hat = damped(obs.G[j], s.damping)
    return float((torch.linalg.solve(A, Gam.T).T * torch.linalg.solve(G_hat, Gam)).sum())


@pytest.mark.parametrize("k", [1, 3])
def test_lower_bound_never_exceeds_the_exact_kfac_gain(k):
    """With the raw gradient as residual (pure_kfac), Δη = tr(Cᵀ A_h⁻¹ C G⁻¹) is the Schur-complement
    lower bound of the increase of the layer's K-FAC score; checked against the extended layer."""
    X, Y = spiral_like(150)
    m = trained_mlp([4, 5], X, Y, cls_loss, steps=40).double()
    s = SennSgdSettings(a_damping=1e-3)
    obs = observe(m, cls_loss, X.double(), Y, None, pure_kfac=True)
    g = torch.Generator().manual_seed(k)
    for i in (0, 1):
        j = i + 1
        t = make_target(obs, j, s)
        x = obs.inputs[i] if k == 1 else obs.inputs[j]
        P = 12
        W = torch.randn(P, k, x.shape[1], generator=g, dtype=torch.float64)
        b = torch.randn(P, k, generator=g, dtype=torch.float64)
        coef = torch.randn(P, k, 3, generator=g, dtype=torch.float64)
        H = candidate_features(x, W, b, coef, None)
        bound = score(H, t)
        base = _extended_eta(obs, j, H[0, :, :0], t.delta, s)
        assert base == pytest.approx(t.eta_layer, rel=1e-6)
        for p in range(P):
            gain = _extended_eta(obs, j, H[p], t.delta, s) - base
            assert 0 <= float(bound[p]) <= gain * (1 + 1e-6) + 1e-12, (i, p, float(bound[p]), gain)


def _per_sample_normalised_grads(m, X, Y):
    """ψ_n = ∇θ ℓ_n / ‖e_n‖ (N, P) and s_n = ‖e_n‖: the exact normalised Fisher is ΨᵀΨ/N, ḡ = Ψᵀs/N."""
    params = list(m.parameters())
    rows, norms = [], []
    for x, y in zip(X, Y):
        out = m(x[None])
        e = torch.autograd.grad(mse_loss(out, y[None]), out, retain_graph=True)[0]
        gs = torch.autograd.grad(mse_loss(out, y[None]), params)
        nrm = e.norm()
        rows.append(torch.cat([g.reshape(-1) for g in gs]) / nrm)
        norms.append(nrm)
    return torch.stack(rows), torch.stack(norms)


def _tangent_structure(m, t_flat):
    """A flat parameter vector in `observe`'s tangent format."""
    out, i = {"lin": [None] * len(m.linears), "act": {}}, 0
    sizes = [p.numel() for p in m.parameters()]
    chunks = list(torch.split(t_flat, sizes))
    names = [n for n, _ in m.named_parameters()]
    by = dict(zip(names, chunks))
    for j, lin in enumerate(m.linears):
        out["lin"][j] = (by[f"linears.{j}.weight"].view_as(lin.weight), by[f"linears.{j}.bias"])
    for i, act in enumerate(m.acts):
        out["act"][i] = torch.stack([by[f"acts.{i}.{c}"] for c in "vcl"], 1)
    return out


def test_eta_after_insertion_exceeds_eta_before_plus_bound_with_exact_fisher():
    """Spec (g.3): with the exact (normalised) Fisher and its natural gradient as the current direction,
    adding the scored unit raises the measured η by at least the cheap bound (scalar output: the K-FAC
    factor of the output layer is exact)."""
    torch.manual_seed(0)
    X = torch.linspace(-2, 2, 120)[:, None].double()
    Y = torch.sin(3 * X) + 0.3 * X ** 2
    m = trained_mlp([3], X.float(), Y.float(), mse_loss, steps=100).double()

    def exact_eta(model):
        Psi, s_ = _per_sample_normalised_grads(model, X, Y)
        n = len(s_)
        Fm = Psi.T @ Psi / n
        gbar = Psi.T @ s_ / n
        t = torch.linalg.solve(Fm + 1e-9 * torch.eye(len(gbar), dtype=Fm.dtype), gbar)
        return float(gbar @ t), t

    eta0, t = exact_eta(m)
    s = SennSgdSettings(a_damping=1e-6, damping=0.0)
    obs = observe(m, mse_loss, X, Y, None, tangent=_tangent_structure(m, t))
    target = make_target(obs, 1, s)
    g = torch.Generator().manual_seed(1)
    W, b, coef = (torch.randn(8, 1, 1, generator=g, dtype=torch.float64),
                  torch.randn(8, 1, generator=g, dtype=torch.float64),
                  torch.randn(8, 1, 3, generator=g, dtype=torch.float64))
    W, b, coef, val = ascend(obs.inputs[0], target, W, b, coef, None, 20, 0.3, 1e-2)
    for p in range(3):
        grown = copy.deepcopy(m)
        grown.add_units("fc0", W[p], b[p], torch.zeros(1, 1, dtype=torch.float64), act_init=coef[p])
        eta1, _ = exact_eta(grown)
        assert eta1 >= eta0 + float(val[p]) * (1 - 1e-3) - 1e-9, (eta0, eta1, float(val[p]))
    assert eta0 <= obs.loss_sqnorm * (1 + 1e-6)  # η ≤ ‖dL‖² (λ of Theorem 3.1)
    assert float(val.max()) > 0.01 * (obs.loss_sqnorm - eta0)  # not vacuous: a share of what is left


def test_ascent_never_decreases_the_score():
    """Spec (g.5): a step that does not increase Δη is undone and its step size divided by 3."""
    X, Y = spiral_like(200)
    m = trained_mlp([4, 4], X, Y, cls_loss, steps=30)
    obs = observe(m, cls_loss, X, Y, None)
    t = make_target(obs, 2, SennSgdSettings())
    g = torch.Generator().manual_seed(0)
    for k, x in ((1, obs.inputs[1]), (4, obs.inputs[2])):
        W = torch.randn(16, k, 4, generator=g) / 2
        b, coef = torch.randn(16, k, generator=g), torch.randn(16, k, 3, generator=g)
        before = score(candidate_features(x, W, b, coef, None), t)
        *_, after = ascend(x, t, W, b, coef, None, 15, 0.3, 1e-2)
        assert (after >= before * (1 - 1e-5)).all()
        assert after.max() > before.max()


# --------------------------------------------------------------------------- acceptance and the rate bound
def _one_check(m, X, Y, loss, **kw):
    settings = dict(stats_examples=len(X), validation_examples=0, proposals=24, layer_proposals=4, ascent_steps=15,
                    depth=False)
    settings.update(kw)
    method = SennSgd(SennSgdSettings(**settings))
    ctx = Ctx(m, X, Y, loss)
    method.setup(m, ctx)
    return method, method.grow(m, ctx)


def test_additions_respect_the_theorem_bound_and_larger_tau_adds_fewer():
    """Spec (g.6/g.7), Theorem 3.1: in one check on fixed data (no training in between, validation pass =
    statistics pass, raw-gradient residual so Δη bounds each layer's K-FAC gain), every accepted unit
    multiplies its layer's η by more than 1+τ after the first clears the floor α·‖dL‖², so a layer takes
    at most 1 + ln(λ/α)/ln(1+τ) units, λ = the layer's final η/‖dL‖²."""
    X, Y = spiral_like(300)
    counts = {}
    for tau in (0.3, 1.0, 5.0):
        m = trained_mlp([3, 3], X, Y, cls_loss, steps=60)
        alpha = 0.01
        method, events = _one_check(m, X, Y, cls_loss, tau=tau, abs_thresh=alpha, pure_kfac=True,
                                    max_additions_per_check=40)
        counts[tau] = len(events)
        rounds = method.check_log[-1]["rounds"]
        for pos in (0, 1):
            name = f"fc{pos}"
            n_added = sum(e.where == name for e in events)
            etas = [next(p for p in r if p["position"] == pos) for r in rounds]
            lam = max(p["eta_layer"] / p["loss_sqnorm"] for p in etas)
            assert n_added <= theorem_bound(tau, alpha, max(lam, alpha)) + 1e-9, (tau, name, n_added, lam)
            # the chain behind it: each addition raised its layer's η by at least the bound
            for r0, r1 in zip(rounds, rounds[1:]):
                p0 = next(p for p in r0 if p["position"] == pos)
                p1 = next(p for p in r1 if p["position"] == pos)
                if any(e.where == name and e.extra["round"] == rounds.index(r0) for e in events):
                    assert p1["eta_layer"] >= p0["eta_layer"] + p0["delta_eta"] * (1 - 1e-3)
    assert counts[0.3] >= counts[1.0] >= counts[5.0]
    assert counts[0.3] > 0


def test_units_go_where_the_fit_is_poor():
    """1-D regression fitted everywhere but around x = 1 (a bump the network misses): the accepted unit's
    least-squares correction removes the residual there and leaves the rest alone."""
    X = torch.linspace(-2, 2, 400)[:, None]
    Y = torch.exp(-8 * (X - 1) ** 2)
    torch.manual_seed(0)
    m = MLP((1,), 1, [1], "rational")
    with torch.no_grad():  # the network predicts the mean: residual = the bump
        m.linears[1].weight.zero_()
        m.linears[1].bias.fill_(float(Y.mean()))
    method, events = _one_check(m, X, Y, mse_loss, tau=0.01, abs_thresh=1e-3, recursive=False, proposals=64,
                                ascent_steps=60)
    assert len(events) == 1 and events[0].where == "fc0"
    with torch.no_grad():
        h = m.acts[0](m.linears[0](X))[:, 1:]  # the new unit
        r = Y - m(X)
        basis = torch.cat([h, torch.ones_like(h)], 1)
        fit = basis @ torch.linalg.lstsq(basis, r).solution
        gain = r ** 2 - (r - fit) ** 2
    poor = (X - 1).abs()[:, 0] < 0.5
    assert float(gain.sum()) > 0.5 * float((r ** 2).sum())
    assert float(gain[poor].sum()) > 0.8 * float(gain.sum())


def test_spirals_get_layers_through_the_cli(tmp_path):
    from growbench.cli import main
    from growbench.records import scan

    settings = ("{tau: 0.2, abs_thresh: 1.0e-3, layer_cost_mul: 1, layer_cooldown: 1, proposals: 16, "
                "layer_proposals: 4, ascent_steps: 10, stats_examples: 600, validation_examples: 600, "
                "max_additions_per_check: 2, lr: 0.3}")
    rc = main(["run", "suite=toy", f"results_dir={tmp_path}", "dataset.name=toy-spirals", "methods=[senn]", "seeds=[0]",
               "budget.epochs=4", "budget.eval_every=2", "growth.start_epoch=1", "growth.every_epochs=1",
               "growth.stop_epoch=4", f"method_settings.senn={settings}", "--quiet"])
    assert rc == 0
    recs, problems = scan(tmp_path, "toy")
    assert not problems and len(recs) == 1 and recs[0]["status"] == "ok", recs[0].get("error")
    events = recs[0]["events"]
    assert any(e["kind"] == "insert" for e in events), [(e["kind"], e["where"]) for e in events]
    assert len(recs[0]["architecture"]["hidden"]) > 1
    for e in events:
        assert e["probe_loss_after"] == pytest.approx(e["probe_loss_before"], rel=1e-4, abs=1e-6)


# --------------------------------------------------------------------------- natural-gradient training
def test_natural_gradient_optimizer_trains_across_growth():
    X, Y = spiral_like(300)
    torch.manual_seed(0)
    m = MLP((2,), 3, [4], "rational")
    cfg = OptimizerConfig(name="sgd", lr=1.0, weight_decay=0.0)  # 1.0: the least-squares step along t
    method = Senn(SennNaturalSettings(stats_examples=300, validation_examples=0, inverse_every=5))
    opt = method.configure_optimizer(m, cfg)
    assert isinstance(opt, KFACNaturalGradient)
    ctx = Ctx(m, X, Y, cls_loss)
    method.setup(m, ctx)
    sync_optimizer(opt, m, cfg)

    def train(n):
        losses = []
        for _ in range(n):
            loss = cls_loss(m(X), Y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            method.after_step(m, ctx)
            losses.append(float(loss.detach()))
        return losses

    first = train(30)
    assert first[-1] < 0.9 * first[0]
    g = torch.Generator().manual_seed(0)
    method._apply(m, ctx, Proposal("width", 0, torch.randn(1, 2, generator=g), torch.randn(1, generator=g),
                                   torch.randn(1, 3, generator=g), 0, 0, 0, 0, 1), X, 1.0, 0)
    method._apply(m, ctx, Proposal("depth", 0, torch.eye(5), torch.zeros(5), torch.randn(5, 3), 0, 0, 0, 0, 1),
                  X, 1.0, 0)
    observe(m, cls_loss, X, Y, method._stats, residual=False)  # what grow() does after its additions
    assert sync_optimizer(opt, m, cfg) == 5  # the inserted layer's weight, bias, v, c, l
    new_out = m.linears[1].weight.detach().clone()
    new_act = m.acts[1].v.detach().clone()
    second = train(30)
    assert all(math.isfinite(x) for x in second)
    assert second[-1] < first[-1]
    assert not torch.equal(m.linears[1].weight, new_out)  # the inserted layer trains
    assert not torch.equal(m.acts[1].v, new_act)  # ... and leaves the identity
    assert m.linears[2].weight[:, 4].abs().sum() > 0  # the new unit's zero out-weights grew


def test_resnet_is_refused_with_a_clear_error():
    from growbench.models.resnet import ResNet

    assert SennSgd.families == ("mlp", "vgg") and Senn.families == ("mlp", "vgg")
    m = ResNet((3, 8, 8), 4, 2, [{"width": 2, "stride": 1, "hidden": [2]}])
    with pytest.raises(ConfigError, match="mlp and vgg"):
        SennSgd().setup(m, Ctx(m, torch.zeros(4, 3, 8, 8), torch.zeros(4, dtype=torch.long), cls_loss))
    with pytest.raises(ConfigError, match="depth_basis"):
        SennSgdSettings(depth_basis="random")


# --------------------------------------------------------------------------- conv layers (KFC)
def images(n: int = 96, classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Class templates plus noise, 3x8x8, standardised."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(classes, 3, 8, 8, generator=g)
    y = torch.arange(n) % classes
    x = templates[y] + 0.8 * torch.randn(n, 3, 8, 8, generator=g)
    return x, y


def trained_vgg(X, Y, hidden=(2, 3), steps=30, seed=0, batchnorm=True):
    torch.manual_seed(seed)
    m = VGG((3, 8, 8), int(Y.max()) + 1, list(hidden), strides=[1, 2][:len(hidden)], batchnorm=batchnorm)
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        cls_loss(m(X), Y).backward()
        opt.step()
    return m


def test_kfc_factors_match_a_brute_force_computation():
    """A = mean over examples and positions of [patch, 1][patch, 1]ᵀ, G = mean over examples of the sum over
    positions of ĝĝᵀ (ĝ = g/‖e‖), Γ = the real gradient of the mean loss, by explicit loops over positions."""
    X, Y = images(12)
    m = trained_vgg(X, Y, steps=5).double()
    X = X.double()
    obs = observe(m, cls_loss, X, Y, None, residual=False)
    m.eval()
    conv = m.convs[1]  # 2 -> 3 channels, 3x3, stride 2, padding 1, no bias (BatchNorm)
    x_in = m.act(m.bns[0](m.convs[0](X))).detach()  # (N, 2, 8, 8)
    y = conv(x_in).detach().requires_grad_(True)  # (N, 3, 4, 4)
    out = m.classifier(m.act(m.bns[1](y)).mean((2, 3)))
    e = torch.autograd.grad(cls_loss(out, Y, "sum"), out, retain_graph=True)[0]  # (N, 4)
    g = torch.autograd.grad(cls_loss(out, Y, "sum"), y)[0]  # (N, 3, 4, 4)
    xp = F.pad(x_in, (1, 1, 1, 1))
    n, L = X.shape[0], 16
    A = torch.zeros(19, 19, dtype=torch.float64)
    G = torch.zeros(3, 3, dtype=torch.float64)
    Gam = torch.zeros(3, 19, dtype=torch.float64)
    for i in range(n):
        for r in range(4):
            for c in range(4):
                a = torch.cat([xp[i, :, 2 * r:2 * r + 3, 2 * c:2 * c + 3].reshape(-1), torch.ones(1, dtype=xp.dtype)])
                A += torch.outer(a, a) / (n * L)
                gh = g[i, :, r, c] / e[i].norm()
                G += torch.outer(gh, gh) / n
                Gam += torch.outer(g[i, :, r, c], a) / n
    assert obs.A[1].shape == (19, 19) and obs.G[1].shape == (3, 3) and obs.positions == [64, 16, 1]
    assert obs.inputs[1].shape == (n * L, 18) and obs.grads[1].shape == (n * L, 3)
    torch.testing.assert_close(obs.A[1], A)
    torch.testing.assert_close(obs.G[1], G)
    torch.testing.assert_close(obs.Gamma[1], Gam)
    # Γ's weight part is the real kernel gradient of the mean loss (eval mode)
    m.zero_grad()
    cls_loss(m(X), Y).backward()
    torch.testing.assert_close(obs.Gamma[1][:, :-1], conv.weight.grad.reshape(3, -1))


def _grown_copy(m, i, W, b, X):
    """m with candidate channel (W (1, D), b (1,)) added to conv hidden layer i the way SENN applies it."""
    grown = copy.deepcopy(m)
    h = grown.hidden_layers()[i]
    p = Proposal("width", i, W.reshape(1, *h.inp.weight.shape[1:]), b, None, 0, 0, 0, 0, 1)
    x = observe(grown, cls_loss, X, torch.zeros(len(X), dtype=torch.long), None, residual=False).images[i]
    p.moments = channel_moments(x, h.inp, W)
    grown.add_units(h.name, p.W, p.b, torch.zeros(h.out.weight.shape[0], 1, *h.out.weight.shape[2:],
                                                 dtype=W.dtype), bn_init=Senn.bn_channel(h.bn, p))
    return grown


def test_conv_channel_keeps_the_function_and_computes_the_scored_features():
    X, Y = images(64)
    m = trained_vgg(X, Y)
    method = SennSgd(SennSgdSettings(stats_examples=64, validation_examples=0, proposals=4, ascent_steps=3))
    ctx = Ctx(m, X, Y, cls_loss)
    method.setup(m, ctx)
    obs = observe(m, cls_loss, X, Y, method._stats)
    t = make_target(obs, 1, method.settings)
    h = m.hidden_layers()[0]
    p = method._width_conv(h, 0, obs, obs, t, t, ctx.generator)
    ref = copy.deepcopy(m)
    m.eval(), ref.eval()
    method._apply(m, ctx, p, X, obs.eta, 0)
    assert m.widths() == {"conv0": 3, "conv1": 3}
    with torch.no_grad():
        torch.testing.assert_close(m(X), ref(X), atol=1e-6, rtol=1e-6)
        m.train(), ref.train()  # batch statistics: the new channel has its own, its out-weights are zero
        torch.testing.assert_close(m(X), ref(X), atol=1e-6, rtol=1e-6)
        m.eval()
        # BatchNorm init: in eval mode the new channel is relu(w·u + b), what was scored, at unit scale
        bn = m.bns[0]
        sigma = float(torch.sqrt(bn.running_var[-1] + bn.eps))
        new = m.act(bn(m.convs[0](X)))[:, 2:] * sigma
        want = torch.relu(F.conv2d(X, p.W, p.b, padding=1))
        torch.testing.assert_close(new, want, atol=1e-4, rtol=1e-4)  # float32 rounding of the BN affine
        assert float(bn.weight[-1]) == 1.0
        H = ConvCandidates(h, X)(p.W.reshape(1, 1, -1), p.b.reshape(1, 1))
        u = F.unfold(new, 3, padding=1, stride=2)  # what conv1 reads of the new channel
        torch.testing.assert_close(H[0], u.transpose(1, 2).reshape(-1, 9), atol=1e-4, rtol=1e-4)


def _conv_extended_eta(obs, j, H, delta, s):
    """η of conv layer j with extra input columns H (N·L, k), Â_ext = A_ext + δI; brute force from the rows."""
    a = torch.cat([with_ones(obs.inputs[j]), H], 1)  # (N·L, D+1+k)
    A = a.T @ a / a.shape[0] + delta * torch.eye(a.shape[1], dtype=a.dtype)
    Gam = obs.grads[j].T @ a / obs.n  # sum over positions, mean over examples
    G_hat = damped(obs.G[j], s.damping)
    return float((torch.linalg.solve(A, Gam.T).T * torch.linalg.solve(G_hat, Gam)).sum())


def test_conv_lower_bound_never_exceeds_the_exact_kfac_gain():
    """The conv mirror of the MLP test: with the raw gradient as residual, the cheap Δη of a candidate
    channel never exceeds the increase of the consumer's KFC score, measured on the network with the
    channel really added (zero out-weights) and re-observed, for a consumer conv and for the classifier."""
    X, Y = images(48)
    m = trained_vgg(X, Y, steps=20).double()
    X = X.double()
    s = SennSgdSettings(a_damping=1e-3)
    obs = observe(m, cls_loss, X, Y, None, pure_kfac=True)
    g = torch.Generator().manual_seed(0)
    for i in (0, 1):
        j = i + 1
        t = make_target(obs, j, s)
        h = m.hidden_layers()[i]
        d = h.inp.weight[0].numel()
        P = 6
        W = torch.randn(P, 1, d, generator=g, dtype=torch.float64) / math.sqrt(d)
        b = torch.randn(P, 1, generator=g, dtype=torch.float64) * 0.3
        bound = score(ConvCandidates(h, obs.images[i])(W, b), t)
        base = _conv_extended_eta(obs, j, obs.inputs[j][:, :0], t.delta, s)
        assert base == pytest.approx(t.eta_layer, rel=1e-6)
        for p in range(P):
            grown = _grown_copy(m, i, W[p], b[p], X)
            o2 = observe(grown, cls_loss, X, Y, None, pure_kfac=True, residual=False)
            old = obs.inputs[j].shape[1]
            E = o2.inputs[j].shape[1] - old  # the new channel's slice of the consumer's patch
            # the consumer's unfolded patch is channel-major: the new channel's E entries come last
            bn = grown.hidden_layers()[i].bn  # the channel is installed at unit scale: relu(w·u + b)/σ
            sigma = torch.sqrt(bn.running_var[-1] + bn.eps)
            Hp = o2.inputs[j][:, old:] * sigma if E else None
            torch.testing.assert_close(Hp, ConvCandidates(h, obs.images[i])(W[p:p + 1], b[p:p + 1])[0])
            gain = _conv_extended_eta(obs, j, Hp, t.delta, s) - base
            assert 0 <= float(bound[p]) <= gain * (1 + 1e-6) + 1e-12, (i, p, float(bound[p]), gain)
        assert float(bound.max()) > 0


def test_senn_grows_a_small_vgg_within_its_caps():
    """One recursive check on a small VGG adds channels (senn-sgd), respecting the width caps; then `senn`'s
    natural-gradient optimizer trains the grown CNN."""
    X, Y = images(128)
    m = trained_vgg(X, Y, steps=10)
    m.convs[0].growbench_max_width = 4
    m.convs[1].growbench_max_width = 4
    method, events = _one_check(m, X, Y, cls_loss, tau=0.01, abs_thresh=1e-3, proposals=8, ascent_steps=5,
                                max_additions_per_check=6, depth=True)
    assert events and all(e.kind == "add" for e in events)  # depth is not proposed for conv families
    assert sum(m.widths().values()) == 5 + len(events) and all(w <= 4 for w in m.widths().values())
    cfg = OptimizerConfig(name="sgd", lr=0.5, weight_decay=0.0)
    nat = Senn(SennNaturalSettings(stats_examples=128, validation_examples=0, inverse_every=2))
    opt = nat.configure_optimizer(m, cfg)
    ctx = Ctx(m, X, Y, cls_loss)
    nat.setup(m, ctx)
    m.train()
    losses = []
    for _ in range(15):
        loss = cls_loss(m(X), Y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        nat.after_step(m, ctx)
        losses.append(float(loss.detach()))
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert isinstance(opt.last_scale, dict) and opt.last_scale  # per-layer lengths, from forward mode


def test_cnn_step_lengths_are_the_per_layer_least_squares_and_move_the_kernels(real_data_root):
    """On real CIFAR-10 images and cifar-small's network, KFC directions of the conv kernels are mis-scaled
    against the classifier's by orders of magnitude. One c per layer must fit e at least as well as the best
    single c (least squares over a superset), train clearly faster than the single c did, and move every
    layer."""
    from growbench.config import load_suite
    from growbench.data.readers import read_cifar
    from growbench.methods.senn_conv import net_jvp
    from growbench.models import build_model

    raw = read_cifar("cifar10", real_data_root)
    X = (raw.train_x[:256].float() / 255 - 0.5) / 0.25
    Y = raw.train_y[:256].long()
    suite = load_suite("cifar-small", [])
    torch.manual_seed(0)
    m = build_model(suite.model, tuple(X.shape[1:]), 10, [4, 4, 8, 8])
    cfg = OptimizerConfig(name="sgd", lr=0.5, weight_decay=0.0)
    nat = Senn(SennNaturalSettings(stats_examples=128, validation_examples=0, inverse_every=1))
    opt = nat.configure_optimizer(m, cfg)
    ctx = Ctx(m, X, Y, cls_loss)
    nat.setup(m, ctx)
    m.train()
    losses = []
    for _ in range(10):  # the mismatch grows once the factors follow training (single c: 3e-4, then ~1e-8)
        opt.zero_grad()
        loss = cls_loss(m(X), Y)
        loss.backward()
        losses.append(float(loss.detach()))
        opt.step()
        nat.after_step(m, ctx)
    # measured: per-layer lengths 2.345 -> 2.100 in these 10 steps; the single official c 2.345 -> 2.254
    # (its c follows the over-long conv directions: the classifier moves ~0.4 % a step, late convs 8-14 %)
    assert losses[0] - losses[-1] > 0.17, losses
    loss = cls_loss(m(X), Y)
    opt.zero_grad()
    loss.backward()
    stats = opt.stats
    dirs = {}
    for mod in stats.linears():
        w, b = stats.natural_linear(mod, mod.weight.grad, None if mod.bias is None else mod.bias.grad)
        dirs[mod.weight] = w
        if b is not None:
            dirs[mod.bias] = b
    per = stats.layer_step_lengths(dirs)
    e = stats._g[stats.linears()[-1]] * X.shape[0]

    def misfit(scale):
        jt = net_jvp(m, X, {p: d * scale(p) for p, d in dirs.items()}, train=True)
        return float(((e - jt) ** 2).sum())

    J = net_jvp(m, X, dirs, train=True)
    c1 = float((J * e).sum() / (J * J).sum())
    assert misfit(lambda p: per[p]) <= misfit(lambda p: c1) * (1 + 1e-6)  # least squares over a superset
    layers = [*m.convs, stats.linears()[-1]]
    before = [c.weight.detach().clone() for c in layers]
    opt.step()
    moved = [float((c.weight - w0).norm() / w0.norm()) for c, w0 in zip(layers, before)]
    assert min(moved) > 1e-3, moved  # every layer, the classifier included, takes a real step


def test_running_factors_survive_a_checkpoint():
    X, Y = spiral_like(100)
    m = trained_mlp([3], X, Y, cls_loss, steps=5)
    a = SennSgd(SennSgdSettings(stats_examples=100))
    a.setup(m, Ctx(m, X, Y, cls_loss))
    for _ in range(3):
        cls_loss(m(X[:50]), Y[:50]).backward()
        a.after_step(m, None)
    state = a.state_dict()
    b = SennSgd(SennSgdSettings(stats_examples=100))
    b.setup(m, Ctx(m, X, Y, cls_loss, seed=5))
    b.load_state_dict(state)
    for lin in m.linears:
        torch.testing.assert_close(b._stats.layers[lin].A, a._stats.layers[lin].A)
        torch.testing.assert_close(b._stats.layers[lin].G_inv, a._stats.layers[lin].G_inv)
    assert b._stats.updates == 3
