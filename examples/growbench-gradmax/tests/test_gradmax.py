"""GradMax's invariants (baselines spec, section 1(g)), its statistics against TINY's, and its suites."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

from growbench.cli import main
from growbench.config import ConfigError
from growbench.data import load_dataset
from growbench.methods import load_method_class
from growbench.methods.tiny import collect_statistics
from growbench.models import MLP, VGG
from growbench.testing import make_context, synthetic_images

gm = pytest.importorskip("growbench_gradmax", reason="the GradMax plugin is not installed: "
                         "pip install -c constraints.txt -e examples/growbench-gradmax")
GradMax, GradMaxSettings, ReLU1, growth_matrices = gm.GradMax, gm.GradMaxSettings, gm.ReLU1, gm.growth_matrices

# small problems whose whole training set is the statistics set (stats_examples >= examples)
N = 96


def mlp_problem():
    torch.manual_seed(0)
    data = load_dataset("toy-spirals", train_subset=N, test_subset=30)
    return MLP((2,), 3, [3, 3]), data, [8, 8]


def vgg_problem():
    torch.manual_seed(0)
    data = synthetic_images(n_train=N, n_test=32)
    return VGG((3, 8, 8), 4, [3, 4], strides=[1, 2], batchnorm=True), data, [8, 8]


PROBLEMS = {"mlp": mlp_problem, "vgg": vgg_problem}


def grown(family: str, **settings):
    """A network trained for a few steps (so gradients are not those of the initialisation), then grown
    once by GradMax with its whole training set as the statistics set."""
    model, data, caps = PROBLEMS[family]()
    method = GradMax(GradMaxSettings(stats_examples=N, stats_batch_size=32, **settings))
    ctx = make_context(model, data, caps=caps)
    method.setup(model, ctx)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = ctx.prepare(data.train.x), data.train.y
    for _ in range(5):
        opt.zero_grad()
        ctx.loss_fn(model(x), y).backward()
        opt.step()
    before = copy.deepcopy(model)
    events = method.grow(model, ctx)
    return model, before, events, ctx, x, y


def test_plugin_is_registered_and_listed(capsys):
    assert load_method_class("gradmax") is GradMax
    assert main(["list"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.split()[:1] == ["gradmax"])
    assert "GradMax" in line and "BROKEN" not in line


@pytest.mark.parametrize("family", PROBLEMS)
def test_setup_swaps_relus_without_changing_the_function(family):
    model, data, _ = PROBLEMS[family]()
    x = make_context(model, data).prepare(data.train.x[:16])
    before = model(x)
    GradMax().setup(model, make_context(model, data))
    assert not [m for m in model.modules() if type(m) is nn.ReLU] and any(isinstance(m, ReLU1) for m in model.modules())
    assert torch.equal(model(x), before)
    z = torch.zeros(4, requires_grad=True)
    ReLU1()(z).sum().backward()
    assert torch.equal(z.grad, torch.ones(4))  # nn.ReLU gives 0 here: zero-in-weight units would never train


@pytest.mark.parametrize("family", PROBLEMS)
def test_zero_in_weights_leave_the_function_unchanged(family):
    model, before, events, ctx, x, _ = grown(family, units_per_step=2)
    assert events and all(ev.units_added > 0 and ev.predicted_loss_change == 0.0 for ev in events)
    for ev in events:
        h = model.hidden(ev.where)
        assert torch.count_nonzero(h.inp.weight[-ev.units_added:]) == 0
        new_out = h.out.weight[:, -ev.units_added:]
        assert torch.count_nonzero(new_out) > 0
    for mode in (False, True):  # eval, and train mode (BatchNorm on batch statistics: the zero channel stays 0)
        model.train(mode)
        before.train(mode)
        with torch.no_grad():
            assert torch.allclose(model(x), before(x), atol=1e-6, rtol=0)


def in_weight_grad_sq(model, h, k, x, y, ctx) -> float:
    """|dL/d(new in-weights and biases)|^2 by autograd, BatchNorm in eval mode, on the statistics set."""
    model.eval()
    params = [h.inp.weight] + ([h.inp.bias] if h.inp.bias is not None else [])
    grads = torch.autograd.grad(ctx.loss_fn(model(x), y), params)
    return sum(float((g[-k:].double() ** 2).sum()) for g in grads)


@pytest.mark.parametrize("family", PROBLEMS)
def test_out_weights_maximise_the_gradient_of_the_new_in_weights(family):
    """Invariants 2 and 3: right after growth |dL/dalpha|^2 = sigma'(0)^2 c^2 sum_j s_j^2 (autograd), and no
    other out-weights of the same norms (one random unit vector per unit, orthonormal when several: the
    paper's constraint) give a larger gradient."""
    model, _, events, ctx, x, y = grown(family, units_per_step=2)
    gen = torch.Generator().manual_seed(1)
    for ev in events:
        h, k = model.hidden(ev.where), ev.units_added
        chosen = in_weight_grad_sq(model, h, k, x, y, ctx)
        assert chosen > 0
        assert chosen == pytest.approx(ev.extra["grad_norm_sq"], rel=1e-4)
        cols = h.out.weight[:, -k:].detach().clone()
        c = ev.extra["out_norm"]
        assert torch.allclose(cols.transpose(0, 1).flatten(1).norm(dim=1), torch.full((k,), c), rtol=1e-5)
        shape = cols.shape
        for _ in range(30):
            frame, _ = torch.linalg.qr(torch.randn(cols[:, 0].numel(), k, generator=gen, dtype=torch.float64))
            rand = (frame.T * c).reshape(k, shape[0], *shape[2:]).transpose(0, 1).to(cols)
            with torch.no_grad():
                h.out.weight[:, -k:] = rand
            assert in_weight_grad_sq(model, h, k, x, y, ctx) <= chosen * (1 + 1e-5)
        with torch.no_grad():
            h.out.weight[:, -k:] = cols


@pytest.mark.parametrize("family", PROBLEMS)
def test_growth_gradient_equals_tinys_m2(family):
    """GradMax is TINY with its switches off: M2 here equals TINY's statistics E[B_{l-2} G^T]."""
    model, data, caps = PROBLEMS[family]()
    ctx = make_context(model, data, caps=caps)
    GradMax().setup(model, ctx)
    model.eval()
    batches = list(ctx.batches(N, 32))
    hiddens = model.hidden_layers()
    mine = growth_matrices(model, hiddens, batches, ctx.loss_fn)
    tiny, _, _ = collect_statistics(model, hiddens, batches, ctx.loss_fn)
    for h in hiddens:
        assert torch.allclose(mine[h.name], tiny[h.name].tensor_m_prev, rtol=1e-5, atol=1e-9), h.name


def test_units_per_event_respect_caps_rank_and_round_robin():
    """Units per layer and event: min(units_per_step, room under the cap, non-zero singular values of M2),
    where M2 has one column per output of the next layer; round-robin grows one layer per event in turn."""
    model, data, _ = mlp_problem()  # widths 3, 3; 3 classes
    method = GradMax(GradMaxSettings(units_per_step=10, layers="round-robin", stats_examples=N))
    ctx = make_context(model, data, caps=[4, 20])
    method.setup(model, ctx)

    def rank(name: str) -> int:
        model.eval()
        m2 = growth_matrices(model, [model.hidden(name)], list(ctx.batches(N, N)), ctx.loss_fn)[name]
        sv = torch.linalg.svdvals(m2)
        return int((sv > 1e-6 * sv[0]).sum())

    assert rank("fc0") >= 1
    (ev,) = method.grow(model, ctx)
    assert (ev.where, ev.units_added) == ("fc0", 1)  # room 1 under the cap 4
    expected = min(10, rank("fc1"))
    assert 1 <= expected <= 3  # M2 of fc1 has 3 columns: at most 3 orthogonal out-weight vectors
    (ev,) = method.grow(model, ctx)
    assert (ev.where, ev.units_added) == ("fc1", expected)
    assert len(ev.extra["singular_values"]) == expected
    assert method.grow(model, ctx)[0].where == "fc1"  # fc0 is at its cap: round-robin moves on
    assert model.widths()["fc0"] == 4 and method.state_dict()["cursor"] == 0


def test_settings_are_checked():
    for bad, needle in [({"layers": "some"}, "layers"), ({"scale": 0}, "scale"), ({"units_per_step": 0}, "units"),
                        ({"scale_method": "norm"}, "scale_method")]:
        with pytest.raises(ConfigError, match=needle):
            GradMaxSettings(**bad)


FAST_TOY = ["budget.epochs=6", "budget.eval_every=2", "growth.start_epoch=1", "growth.every_epochs=2",
            "growth.stop_epoch=5", "--quiet"]


def test_runs_in_the_toy_suite_and_its_leaderboard(tmp_path, capsys):
    """The toy suite's `gradmax:` settings block is used as soon as the method is named in `methods=`."""
    args = ["suite=toy", f"results_dir={tmp_path}", "seeds=[0]", "methods=[fixed,gradmax]", *FAST_TOY]
    assert main(["run", *args]) == 0
    recs = [json.loads(p.read_text()) for p in (tmp_path / "runs" / "toy").rglob("*.json")]
    grad = [r for r in recs if r["method"] == "gradmax"]
    assert len(grad) == 2 and all(r["status"] == "ok" and r["events"] for r in grad)
    assert all(r["method_config"]["settings"]["units_per_step"] == 4 for r in grad)  # from suites/toy.yaml
    assert all(ev["probe_loss_after"] == pytest.approx(ev["probe_loss_before"], abs=1e-5) for r in grad
               for ev in r["events"])
    capsys.readouterr()
    assert main(["leaderboard", f"results_dir={tmp_path}", "suite=toy", "methods=[fixed,gradmax]",
                 "--no-figures"]) == 0
    assert "gradmax" in capsys.readouterr().out


def test_mnist_suite_plan_with_gradmax(capsys):
    assert main(["run", "suite=mnist", "methods=[fixed,gradmax]", "seeds=[0]", "--dry-run"]) == 0
    assert "mnist/gradmax/seed0" in capsys.readouterr().out


def test_runs_on_real_mnist(tmp_path, mnist_root):
    """A short MNIST cell with the mnist suite's settings (2000 examples, 4 epochs): GradMax grows both
    layers and learns."""
    args = ["suite=mnist", f"results_dir={tmp_path}", f"dataset.root={mnist_root}", "seeds=[0]",
            "methods=[gradmax]", "dataset.train_subset=2000", "dataset.test_subset=500", "budget.epochs=4",
            "budget.eval_every=2", "growth.start_epoch=0.1", "growth.stop_epoch=3", "--quiet"]
    assert main(["run", *args]) == 0
    (rec,) = [json.loads(p.read_text()) for p in (tmp_path / "runs").rglob("*.json")]
    assert rec["status"] == "ok", rec.get("failure")
    widths = rec["final"]["widths"]
    assert widths["fc0"] > 1 and widths["fc1"] > 1
    assert rec["final"]["test_acc"] > 0.3  # the 1-unit start (and `fixed`) stay at chance, 0.1
    assert math.isfinite(rec["final"]["test_loss"])
