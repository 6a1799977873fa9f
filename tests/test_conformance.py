"""Every registered method (built-ins and installed plugins such as growbench-gradmax) through the
conformance kit `growbench.testing.MethodConformance`: one test class parametrized over the registry."""
from __future__ import annotations

import pytest
import torch

from growbench.methods import GrowthEvent, GrowthMethod, method_names
from growbench.testing import MethodConformance, run_conformance

# Cheap settings for the kit's tiny runs; keys a method does not have are dropped, so this never breaks it.
QUICK = {
    "senn": {"proposals": 4, "layer_proposals": 4, "ascent_steps": 10, "stats_examples": 200,
             "validation_examples": 200, "abs_thresh": 0.0},  # abs_thresh 0: SENN grows in 40 steps
    "firefly": {"new_candidates": 8, "opt_epochs": 0.5, "score_epochs": 0.5},
}
QUICK["senn-sgd"] = QUICK["senn"]

# Where a built-in method does not pass the kit (see the reasons); strict: a fix that makes the check pass
# fails here until the entry is removed, a fix that makes it skip (e.g. declaring `families`) just skips.
KNOWN_FAILURES: dict[tuple[str, str, str], str] = {}  # (method, family or *, test or *) -> why


def known_failure(method: str, family: str | None, test: str) -> str | None:
    for (m, f, t), reason in KNOWN_FAILURES.items():
        if m == method and f in ("*", family) and t in ("*", test) and not (t == "*" and family is None):
            return reason
    return None


class TestRegisteredMethods(MethodConformance):
    # optuna-fixed and fixed-matched need a search result / another method's records (tests/test_search.py):
    # their cells fail with MissingPrerequisite, so the kit checks their registration and settings only
    @pytest.fixture(scope="class", params=method_names())
    def conformance_method(self, request) -> str:
        return request.param

    @pytest.fixture(scope="class")
    def conformance_settings(self, conformance_method: str) -> dict:
        import dataclasses

        from growbench.methods import load_method_class

        fields = {f.name for f in dataclasses.fields(load_method_class(conformance_method).Settings)}
        return {k: v for k, v in QUICK.get(conformance_method, {}).items() if k in fields}

    @pytest.fixture(autouse=True)
    def _known_failures(self, request) -> None:
        params = request.node.callspec.params if hasattr(request.node, "callspec") else {}
        reason = known_failure(params.get("conformance_method"), params.get("conformance_family"),
                               request.node.originalname)
        if reason:
            request.applymarker(pytest.mark.xfail(reason=reason, strict=True))


# --------------------------------------------------------------------------- the kit catches what it claims to


class _Base(GrowthMethod):
    """Adds one unit with zero out-weights to every layer with room (a correct method); the bugs below
    each break one rule."""

    units = 1

    def _add(self, model, ctx, h, k, out_scale=0.0):
        w_in = torch.randn(k, *h.inp.weight.shape[1:], generator=ctx.generator)
        w_out = out_scale * torch.randn(h.out.weight.shape[0], k, *h.out.weight.shape[2:], generator=ctx.generator)
        model.add_units(h.name, w_in, None, w_out)
        return GrowthEvent(where=h.name, kind="add", units_added=k, predicted_loss_change=0.0)

    def grow(self, model, ctx):
        return [self._add(model, ctx, h, 1) for h in model.hidden_layers() if ctx.room(h.name) > 0]


class SteppingInGrow(_Base):
    def grow(self, model, ctx):
        ctx.optimizer.step()  # an extra training step, outside the budget
        return super().grow(model, ctx)


class GrowingInAfterStep(_Base):
    def after_step(self, model, ctx):
        if ctx.step == 5:
            self._add(model, ctx, model.hidden_layers()[0], 1)


class IgnoringCaps(_Base):
    def grow(self, model, ctx):
        return [self._add(model, ctx, h, 3) for h in model.hidden_layers()]


class ChangingFunction(_Base):
    def grow(self, model, ctx):
        return [self._add(model, ctx, h, 1, out_scale=1.0) for h in model.hidden_layers() if ctx.room(h.name) > 0]


class MiscountingUnits(_Base):
    def grow(self, model, ctx):
        events = super().grow(model, ctx)
        for ev in events:
            ev.units_added = 5
        return events


class BypassingPrimitives(_Base):
    """Widens a layer by swapping in new Parameters without logging them in model.remaps: the optimizer
    keeps the old tensors and never sees the new ones."""

    def grow(self, model, ctx):
        h = model.hidden_layers()[0]
        if ctx.room(h.name) <= 0:
            return []
        with torch.no_grad():
            h.inp.weight = torch.nn.Parameter(torch.cat([h.inp.weight, torch.zeros_like(h.inp.weight[:1])]))
            h.inp.bias = torch.nn.Parameter(torch.cat([h.inp.bias, torch.zeros(1)]))
            h.out.weight = torch.nn.Parameter(torch.cat([h.out.weight, torch.zeros_like(h.out.weight[:, :1])], 1))
        h.inp.out_features += 1
        h.out.in_features += 1
        return [GrowthEvent(where=h.name, kind="add", units_added=1)]


class HiddenParameter(_Base):
    def grow(self, model, ctx):
        model.linears[0].extra = torch.nn.Parameter(torch.zeros(3))  # not in spec(): counts and checkpoints break
        return super().grow(model, ctx)


@pytest.fixture
def register(monkeypatch):
    """Methods the registry finds by name for this test only."""
    import growbench.methods as gm

    extra: dict[str, type] = {}
    load = gm.load_method_class
    monkeypatch.setattr(gm, "load_method_class", lambda name: extra[name] if name in extra else load(name))
    return extra


@pytest.mark.parametrize("cls, check, needle", [
    (SteppingInGrow, "test_respects_budget", "inside hooks"),
    (GrowingInAfterStep, "test_grows_only_when_told", "outside grow()"),
    (IgnoringCaps, "test_width_caps", "cap"),
    (ChangingFunction, "test_function_preserved", "changed the function"),
    (MiscountingUnits, "test_events_report_growth", "widths grew by"),
    (BypassingPrimitives, "test_optimizer_follows_growth", "no longer in the model"),
    (HiddenParameter, "test_counts_exact", "from_spec"),
])
def test_the_kit_catches_broken_methods(register, tmp_path, cls, check, needle):
    name = f"bug-{cls.__name__.lower()}"
    register[name] = cls
    run = run_conformance(name, "mlp")
    assert run.ok, run.record.get("failure")
    kit = MethodConformance()
    args = (run, tmp_path) if check == "test_record_validates" else (run,)
    with pytest.raises(AssertionError, match=needle):
        getattr(kit, check)(*args)
    register["ok-base"] = _Base  # the same method without the bug passes that check
    getattr(kit, check)(*((run_conformance("ok-base", "mlp"),) + args[1:]))


def test_broken_plugin_is_named_with_its_error_by_list_and_the_kit(monkeypatch, capsys):
    from importlib.metadata import EntryPoint

    import growbench.methods as gm
    from growbench.cli import main

    eps = gm._entry_points()
    broken = EntryPoint("broken-xyz", "no_such_module_xyz.sub:Method", gm.GROUP)
    monkeypatch.setattr(gm, "_entry_points", lambda: {**eps, "broken-xyz": broken})
    assert main(["list"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "broken-xyz" in ln)
    assert "BROKEN" in line and "ModuleNotFoundError" in line and "no_such_module_xyz" in line
    with pytest.raises(pytest.fail.Exception, match="no_such_module_xyz"):
        MethodConformance().test_registered("broken-xyz")
