"""Tests for growbench.models: the growth primitives preserve the network function, validate their
inputs, keep parameter and FLOP counts equal to a freshly built network of the grown shape, and leave
a network that still trains.

Every family is tested with real modules on small inputs; the cases are parametrised so a failure
names the family, the hidden layer and the primitive.
"""
from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from growbench.config import ModelConfig
from growbench.models import VGG, GrowableNet, ResNet, build_model, count_flops, from_spec

ATOL = 1e-5
RTOL = 1e-5
BATCH = 8

# --------------------------------------------------------------------------- the families
# name -> (ModelConfig, input_shape, num_outputs)
FAMILIES: dict[str, tuple[ModelConfig, tuple[int, ...], int]] = {
    "mlp-relu": (ModelConfig(family="mlp", hidden=[5, 4, 3], activation="relu"), (2, 3), 3),
    "mlp-selu": (ModelConfig(family="mlp", hidden=[5, 4], activation="selu"), (6,), 3),
    "vgg-bn": (ModelConfig(family="vgg", hidden=[4, 6, 5], pool_after=[0, 2], batchnorm=True), (3, 8, 8), 4),
    "vgg-nobn": (ModelConfig(family="vgg", hidden=[4, 5], pool_after=[1], batchnorm=False), (3, 8, 8), 4),
    "vgg-stride": (ModelConfig(family="vgg", hidden=[4, 6, 5], pool_after=[0, 1], downsample="stride"), (3, 8, 8), 4),
    "resnet": (ModelConfig(family="resnet", hidden=[2, 3], stem=8, widths=[8, 16], blocks=[1, 1]), (3, 16, 16), 5),
}

# Parameters a new unit of each hidden layer brings, written out by hand from the configs above:
# (in-weights per unit, bias per unit, BatchNorm params per unit, out-weights per unit).
PER_UNIT: dict[tuple[str, str], tuple[int, int, int, int]] = {
    ("mlp-relu", "fc0"): (6, 1, 0, 4),
    ("mlp-relu", "fc1"): (5, 1, 0, 3),
    ("mlp-relu", "fc2"): (4, 1, 0, 3),
    ("mlp-selu", "fc0"): (6, 1, 0, 4),
    ("mlp-selu", "fc1"): (5, 1, 0, 3),
    ("vgg-bn", "conv0"): (3 * 9, 0, 2, 6 * 9),
    ("vgg-bn", "conv1"): (4 * 9, 0, 2, 5 * 9),
    ("vgg-bn", "conv2"): (6 * 9, 0, 2, 4),  # the classifier after global average pooling
    ("vgg-nobn", "conv0"): (3 * 9, 1, 0, 5 * 9),
    ("vgg-nobn", "conv1"): (4 * 9, 1, 0, 4),
    ("vgg-stride", "conv0"): (3 * 9, 0, 2, 6 * 9),
    ("vgg-stride", "conv1"): (4 * 9, 0, 2, 5 * 9),  # conv2 has stride 2
    ("vgg-stride", "conv2"): (6 * 9, 0, 2, 4),
    ("resnet", "s0.b0"): (8 * 9, 0, 2, 8 * 9),  # conv1 (no bias) + bn1 + conv2
    ("resnet", "s1.b0"): (8 * 9, 0, 2, 16 * 9),
}

LAYER_CASES = list(PER_UNIT)
LAYER_IDS = [f"{f}:{n}" for f, n in LAYER_CASES]
FAMILY_IDS = list(FAMILIES)

# Insert keyword arguments that make the inserted layer function-preserving for each family.
INSERT_KW = {"mlp-selu": {"activation": "identity"}}


def make(family: str, seed: int = 0) -> GrowableNet:
    """A model of `family` with non-trivial BatchNorm affine parameters and running statistics, in eval mode."""
    cfg, shape, n_out = FAMILIES[family]
    torch.manual_seed(seed)
    model = build_model(cfg, shape, n_out)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def batch(family: str, n: int = BATCH, seed: int = 1) -> torch.Tensor:
    _, shape, _ = FAMILIES[family]
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def gen(seed: int = 2) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_same_function(model: nn.Module, ref: nn.Module, x: torch.Tensor) -> None:
    """Outputs agree in eval mode (running statistics) and in train mode (batch statistics)."""
    for train in (False, True):
        model.train(train)
        ref.train(train)
        with torch.no_grad():
            got, want = model(x), ref(x)
        mode = "train" if train else "eval"
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL,
                                   msg=lambda m: f"function changed in {mode} mode: {m}")
    model.eval()
    ref.eval()


def max_change(model: nn.Module, ref: nn.Module, x: torch.Tensor) -> float:
    model.eval()
    ref.eval()
    with torch.no_grad():
        return (model(x) - ref(x)).abs().max().item()


def random_add_args(model: GrowableNet, name: str, k: int, g: torch.Generator, w_out_scale: float = 0.0):
    h = model.hidden(name)
    W, O = h.inp.weight, h.out.weight
    w_in = torch.randn(k, *W.shape[1:], generator=g)
    b_in = torch.randn(k, generator=g)
    w_out = torch.randn(O.shape[0], k, *O.shape[2:], generator=g) * w_out_scale
    return w_in, b_in, w_out


def add_zero(model: GrowableNet, name: str, k: int, seed: int = 3) -> None:
    model.add_units(name, *random_add_args(model, name, k, gen(seed)))


def split_zero(model: GrowableNet, name: str, idx: list[int], out_fraction: float = 0.5) -> None:
    W = model.hidden(name).inp.weight
    model.split_unit(name, torch.tensor(idx), torch.zeros(len(idx), *W.shape[1:]), out_fraction)


def split_idx(model: GrowableNet, name: str) -> list[int]:
    """The first and the last unit (just the first when the layer has one unit)."""
    w = model.hidden(name).width
    return sorted({0, w - 1})


# --------------------------------------------------------------------------- construction
@pytest.mark.parametrize("family", FAMILY_IDS)
def test_build_model_names_and_forward(family):
    model = make(family)
    _, shape, n_out = FAMILIES[family]
    names = [n for f, n in LAYER_CASES if f == family]
    assert [h.name for h in model.hidden_layers()] == names
    assert model.input_shape() == shape
    assert model(batch(family)).shape == (BATCH, n_out)
    assert model.remaps == []


def test_build_model_resnet_layout():
    model = make("resnet")
    assert isinstance(model, ResNet)
    assert model.spec()["stages"] == [{"width": 8, "stride": 1, "hidden": [2]},
                                      {"width": 16, "stride": 2, "hidden": [3]}]
    assert model.stem[0].out_channels == 8


def test_build_model_rejects_flat_input_for_cnn():
    cfg, _, _ = FAMILIES["vgg-bn"]
    with pytest.raises(ValueError, match="image inputs"):
        build_model(cfg, (10,), 3)


# --------------------------------------------------------------------------- add_units
@pytest.mark.parametrize("family,name", LAYER_CASES, ids=LAYER_IDS)
def test_add_units_zero_out_weights_preserves_function(family, name):
    model = make(family)
    x = batch(family)
    ref = copy.deepcopy(model)
    width = model.hidden(name).width
    add_zero(model, name, 3)
    assert model.hidden(name).width == width + 3
    assert model.widths()[name] == width + 3
    assert_same_function(model, ref, x)


@pytest.mark.parametrize("family,name", LAYER_CASES, ids=LAYER_IDS)
def test_add_units_nonzero_out_weights_changes_function(family, name):
    model = make(family)
    x = batch(family)
    ref = copy.deepcopy(model)
    model.add_units(name, *random_add_args(model, name, 3, gen(), w_out_scale=1.0))
    assert max_change(model, ref, x) > 1e-3


@pytest.mark.parametrize("family,name", LAYER_CASES, ids=LAYER_IDS)
def test_add_units_param_count_matches_hand_formula(family, name):
    model = make(family)
    fan_in, bias, bn, fan_out = PER_UNIT[(family, name)]
    before = model.param_count()
    k = 3
    add_zero(model, name, k)
    assert model.param_count() - before == k * (fan_in + bias + bn + fan_out)
    # a split adds the same parameters per new unit
    before = model.param_count()
    split_zero(model, name, [0, 1])
    assert model.param_count() - before == 2 * (fan_in + bias + bn + fan_out)


@pytest.mark.parametrize("name,fan_in,fan_out", [("fc0", 6, 4), ("fc1", 5, 3), ("fc2", 4, 3)])
def test_add_units_mlp_flops_hand_formula(name, fan_in, fan_out):
    model = make("mlp-relu")
    before1, before4 = count_flops(model, 1), count_flops(model, 4)
    k = 2
    add_zero(model, name, k)
    # a matrix product of (b x n) by (n x m) is 2*b*n*m FLOPs
    assert count_flops(model, 1) - before1 == 2 * k * (fan_in + fan_out)
    assert count_flops(model, 4) - before4 == 4 * 2 * k * (fan_in + fan_out)


BN_CASES = [(f, n) for f, n in LAYER_CASES if PER_UNIT[(f, n)][2]]


@pytest.mark.parametrize("family,name", BN_CASES, ids=[f"{f}:{n}" for f, n in BN_CASES])
def test_add_units_new_batchnorm_channels_start_as_identity(family, name):
    model = make(family)
    n = model.hidden(name).width
    add_zero(model, name, 2)
    bn = model.hidden(name).bn
    assert bn.num_features == n + 2
    assert torch.equal(bn.weight[n:], torch.ones(2))
    assert torch.equal(bn.bias[n:], torch.zeros(2))
    assert torch.equal(bn.running_mean[n:], torch.zeros(2))
    assert torch.equal(bn.running_var[n:], torch.ones(2))


@pytest.mark.parametrize("family,name", LAYER_CASES, ids=LAYER_IDS)
def test_add_units_keeps_old_weights_and_logs_remaps(family, name):
    model = make(family)
    h = model.hidden(name)
    inp_mod, out_mod = h.inp, h.out
    old_in, old_out = inp_mod.weight, out_mod.weight
    n = h.width
    w_in, b_in, w_out = random_add_args(model, name, 2, gen(), w_out_scale=1.0)
    model.add_units(name, w_in, b_in, w_out)
    h = model.hidden(name)
    # the modules are edited in place (hooks on them survive), the parameters are replaced
    assert h.inp is inp_mod and h.out is out_mod
    assert torch.equal(h.inp.weight[:n], old_in) and torch.equal(h.inp.weight[n:], w_in)
    assert torch.equal(h.out.weight[:, :n], old_out) and torch.equal(h.out.weight[:, n:], w_out)
    if h.inp.bias is not None:
        assert torch.equal(h.inp.bias[n:], b_in)
    pairs = {id(old): new for old, new in model.remaps}
    assert pairs[id(old_in)] is h.inp.weight
    assert pairs[id(old_out)] is h.out.weight
    for old, new in model.remaps:
        assert torch.equal(new[tuple(slice(0, s) for s in old.shape)], old)
    assert all(p.requires_grad for p in model.parameters())
    # modules report their new sizes
    if isinstance(h.inp, nn.Linear):
        assert h.inp.out_features == n + 2
    else:
        assert h.inp.out_channels == n + 2
    if isinstance(h.out, nn.Linear):
        assert h.out.in_features == n + 2
    else:
        assert h.out.in_channels == n + 2


@pytest.mark.parametrize("family", ["mlp-relu", "vgg-nobn"])
def test_add_units_without_bias_gives_zero_bias(family):
    model = make(family)
    name = model.hidden_layers()[0].name
    n = model.hidden(name).width
    w_in, _, w_out = random_add_args(model, name, 2, gen())
    model.add_units(name, w_in, None, w_out)
    assert torch.equal(model.hidden(name).inp.bias[n:], torch.zeros(2))


# --------------------------------------------------------------------------- split_unit
@pytest.mark.parametrize("out_fraction", [0.5, 0.3])
@pytest.mark.parametrize("family,name", LAYER_CASES, ids=LAYER_IDS)
def test_split_unit_zero_delta_preserves_function(family, name, out_fraction):
    model = make(family)
    x = batch(family)
    ref = copy.deepcopy(model)
    idx = split_idx(model, name)
    width = model.hidden(name).width
    split_zero(model, name, idx, out_fraction)
    assert model.hidden(name).width == width + len(idx)
    assert_same_function(model, ref, x)


@pytest.mark.parametrize("family,name", LAYER_CASES, ids=LAYER_IDS)
def test_split_unit_nonzero_delta_changes_function(family, name):
    model = make(family)
    x = batch(family)
    ref = copy.deepcopy(model)
    idx = split_idx(model, name)
    W = model.hidden(name).inp.weight
    delta = torch.randn(len(idx), *W.shape[1:], generator=gen()) * 2.0
    model.split_unit(name, torch.tensor(idx), delta, 0.3)
    assert max_change(model, ref, x) > 1e-4


@pytest.mark.parametrize("family,name", LAYER_CASES, ids=LAYER_IDS)
def test_split_unit_weights_and_batchnorm_copies(family, name):
    model = make(family)
    h = model.hidden(name)
    n = h.width
    W, O = h.inp.weight.detach().clone(), h.out.weight.detach().clone()
    bn_state = None if h.bn is None else {k: v.detach().clone() for k, v in h.bn.state_dict().items()}
    idx = split_idx(model, name)
    delta = torch.randn(len(idx), *W.shape[1:], generator=gen())
    model.split_unit(name, idx, delta, 0.3)  # a plain list of indices is accepted
    h = model.hidden(name)
    torch.testing.assert_close(h.inp.weight[idx], W[idx] + delta)
    torch.testing.assert_close(h.inp.weight[n:], W[idx] - delta)
    torch.testing.assert_close(h.out.weight[:, idx], O[:, idx] * 0.3)
    torch.testing.assert_close(h.out.weight[:, n:], O[:, idx] * 0.7)
    if bn_state is not None:
        for key in ("weight", "bias", "running_mean", "running_var"):
            got = getattr(h.bn, key)
            assert torch.equal(got[:n], bn_state[key]), key
            assert torch.equal(got[n:], bn_state[key][idx]), key
        assert h.bn.num_features == n + len(idx)


# --------------------------------------------------------------------------- insert_identity_layer
@pytest.mark.parametrize("family,name", LAYER_CASES, ids=LAYER_IDS)
def test_insert_identity_layer_preserves_function(family, name):
    model = make(family)
    x = batch(family)
    ref = copy.deepcopy(model)
    names_before = [h.name for h in model.hidden_layers()]
    width = model.hidden(name).width
    new = model.insert_identity_layer(name, **INSERT_KW.get(family, {}))
    names = [h.name for h in model.hidden_layers()]
    assert len(names) == len(names_before) + 1
    assert names[names.index(name) + 1] == new
    assert model.hidden(new).width == width
    assert model.hidden(name).width == width
    assert_same_function(model, ref, x)
    # the inserted layer is itself growable, and growing it preserves the function too
    add_zero(model, new, 2)
    split_zero(model, new, [0], 0.3)
    assert model.hidden(new).width == width + 3
    assert_same_function(model, ref, x)


@pytest.mark.parametrize("family,name", LAYER_CASES, ids=LAYER_IDS)
def test_insert_identity_layer_perturbed_changes_function(family, name):
    model = make(family)
    x = batch(family)
    ref = copy.deepcopy(model)
    before = {id(p) for p in model.parameters()}
    model.insert_identity_layer(name, **INSERT_KW.get(family, {}))
    new_params = [p for p in model.parameters() if id(p) not in before]
    assert new_params, "the inserted layer has no parameters"
    with torch.no_grad():
        for p in new_params:
            p.add_(torch.randn(p.shape, generator=gen()))
    assert max_change(model, ref, x) > 1e-3


def test_insert_identity_layer_mlp_relu_is_linear_identity():
    model = make("mlp-relu")
    new = model.insert_identity_layer("fc1")
    assert new == "fc2"
    lin = model.hidden("fc2").inp
    assert isinstance(lin, nn.Linear)
    assert torch.equal(lin.weight, torch.eye(4)) and torch.equal(lin.bias, torch.zeros(4))
    assert isinstance(model.hidden("fc2").act, nn.ReLU)
    assert model.spec()["hidden"] == [5, 4, 4, 3]
    assert model.spec()["activation"] == ["relu"] * 4


@pytest.mark.parametrize("name", ["fc0", "fc1"])
def test_insert_identity_layer_mlp_selu_rejects_relu(name):
    model = make("mlp-selu")
    x = batch("mlp-selu")
    ref = copy.deepcopy(model)
    n_params = len(list(model.parameters()))
    with pytest.raises(ValueError, match="identity"):
        model.insert_identity_layer(name, activation="relu")
    with pytest.raises(ValueError):
        model.insert_identity_layer(name)  # the default is relu
    # nothing was inserted by the failed calls
    assert [h.name for h in model.hidden_layers()] == ["fc0", "fc1"]
    assert len(list(model.parameters())) == n_params
    assert max_change(model, ref, x) == 0.0
    new = model.insert_identity_layer(name, activation="identity")
    assert isinstance(model.hidden(new).act, nn.Identity)
    assert model.spec()["activation"][int(new[2:])] == "identity"
    assert_same_function(model, ref, x)


@pytest.mark.parametrize("name", ["conv0", "conv1", "conv2"])
def test_insert_identity_layer_vgg_is_dirac_conv_without_bn(name):
    model = make("vgg-bn")
    new = model.insert_identity_layer(name)
    h = model.hidden(new)
    assert isinstance(h.inp, nn.Conv2d) and h.bn is None
    c = h.width
    want = torch.zeros(c, c, 3, 3)
    want[range(c), range(c), 1, 1] = 1.0
    assert torch.equal(h.inp.weight, want)
    assert torch.equal(h.inp.bias, torch.zeros(c))
    i = int(new[4:])
    assert model.spec()["batchnorm"][i] is False
    pools = model.spec()["pools"]
    assert [j for j, p in enumerate(pools) if p] == [p + (p >= i) for p in [0, 2]]


def test_insert_identity_layer_resnet_block_width():
    model = make("resnet")
    x = batch("resnet")
    ref = copy.deepcopy(model)
    new = model.insert_identity_layer("s1.b0", hidden=7)
    assert new == "s1.b1"
    assert model.widths() == {"s0.b0": 2, "s1.b0": 3, "s1.b1": 7}
    assert model.spec()["stages"][1] == {"width": 16, "stride": 2, "hidden": [3, 7]}
    assert_same_function(model, ref, x)


def test_insert_identity_layer_keeps_dtype():
    model = make("mlp-relu").double()
    model.insert_identity_layer("fc0")
    vgg = make("vgg-bn").double()
    vgg.insert_identity_layer("conv1")
    res = make("resnet").double()
    res.insert_identity_layer("s0.b0")
    for m in (model, vgg, res):
        assert {p.dtype for p in m.parameters()} == {torch.float64}


# --------------------------------------------------------------------------- update_weights
@pytest.mark.parametrize("family", FAMILY_IDS)
def test_update_weights(family):
    model = make(family)
    x = batch(family)
    ref = copy.deepcopy(model)
    name = model.hidden_layers()[0].name
    out = model.hidden(name).out
    weight = out.weight
    model.update_weights(name, torch.zeros_like(weight))
    assert out.weight is weight and model.remaps == []
    assert_same_function(model, ref, x)
    delta = torch.randn(weight.shape, generator=gen())
    model.update_weights(name, delta)
    assert out.weight is weight
    torch.testing.assert_close(out.weight, ref.hidden(name).out.weight + delta)
    assert max_change(model, ref, x) > 1e-3
    # a module works as well as a name; the bias moves when there is one
    lin = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]  # the classifier
    b0 = lin.bias.detach().clone()
    model.update_weights(lin, torch.zeros_like(lin.weight), torch.ones_like(lin.bias))
    torch.testing.assert_close(lin.bias, b0 + 1)


# --------------------------------------------------------------------------- shapes and errors
def _param_ids(model):
    return [id(p) for p in model.parameters()]


@pytest.mark.parametrize("family,name", LAYER_CASES, ids=LAYER_IDS)
def test_add_units_wrong_shapes_raise(family, name):
    model = make(family)
    ids = _param_ids(model)
    h = model.hidden(name)
    W, O = h.inp.weight, h.out.weight
    k = 2
    good_in = torch.zeros(k, *W.shape[1:])
    good_out = torch.zeros(O.shape[0], k, *O.shape[2:])
    bad_in = torch.zeros(k, W.shape[1] + 1, *W.shape[2:])
    with pytest.raises(ValueError, match=re.escape(str(tuple(W.shape[1:])))):
        model.add_units(name, bad_in, None, good_out)
    with pytest.raises(ValueError, match=re.escape(str(tuple(W.shape[1:])))):
        model.add_units(name, torch.zeros(k, W[0].numel() + 5), None, good_out)  # wrong rank
    want_out = (O.shape[0], k, *O.shape[2:])
    for bad_out in (torch.zeros(O.shape[0], k + 1, *O.shape[2:]),   # k does not match w_in
                    torch.zeros(O.shape[0] + 1, k, *O.shape[2:]),   # wrong fan-out
                    torch.zeros(k, O.shape[0], *O.shape[2:])):      # transposed
        with pytest.raises(ValueError, match=re.escape(str(want_out))):
            model.add_units(name, good_in, None, bad_out)
    # a failed call leaves the model as it was
    assert _param_ids(model) == ids and model.remaps == []
    assert model.hidden(name).width == W.shape[0]


@pytest.mark.parametrize("family", ["mlp-relu", "vgg-nobn"])
def test_add_units_wrong_bias_shape_raises(family):
    """b_in must be (k,) when the in-layer has a bias; a wrong length must not corrupt the model."""
    model = make(family)
    ids = _param_ids(model)
    name = model.hidden_layers()[0].name
    w_in, _, w_out = random_add_args(model, name, 2, gen())
    with pytest.raises(ValueError, match=re.escape("(2,)")):
        model.add_units(name, w_in, torch.zeros(3), w_out)
    assert _param_ids(model) == ids and model.remaps == []
    model(batch(family))


@pytest.mark.parametrize("family,name", LAYER_CASES, ids=LAYER_IDS)
def test_split_unit_wrong_delta_shape_raises(family, name):
    model = make(family)
    ids = _param_ids(model)
    W = model.hidden(name).inp.weight
    idx = torch.tensor([0, 1])
    want = str((2, *W.shape[1:]))
    for bad in (torch.zeros(3, *W.shape[1:]),                   # not one row per index
                torch.zeros(2, W.shape[1] + 1, *W.shape[2:]),   # wrong fan-in
                torch.zeros(2, W[0].numel())):                  # flattened conv kernel / fine for linear
        if tuple(bad.shape) == (2, *W.shape[1:]):
            continue
        with pytest.raises(ValueError, match=re.escape(want)):
            model.split_unit(name, idx, bad)
    assert _param_ids(model) == ids and model.remaps == []


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_split_unit_repeated_index_raises(family):
    """Splitting one unit twice in one call would hand out 1.5x its out-weights."""
    model = make(family)
    name = model.hidden_layers()[0].name
    W = model.hidden(name).inp.weight
    with pytest.raises(ValueError, match="repeated"):
        model.split_unit(name, torch.tensor([0, 0]), torch.zeros(2, *W.shape[1:]))
    assert model.remaps == []


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_unknown_hidden_layer_raises_keyerror_listing_names(family):
    model = make(family)
    valid = [h.name for h in model.hidden_layers()]
    h = model.hidden_layers()[0]
    calls = {
        "hidden": lambda: model.hidden("nope"),
        "add_units": lambda: model.add_units("nope", torch.zeros(1, *h.inp.weight.shape[1:]), None,
                                             torch.zeros(h.out.weight.shape[0], 1, *h.out.weight.shape[2:])),
        "split_unit": lambda: model.split_unit("nope", torch.tensor([0]),
                                               torch.zeros(1, *h.inp.weight.shape[1:])),
        "update_weights": lambda: model.update_weights("nope", torch.zeros(1)),
    }
    for what, call in calls.items():
        with pytest.raises(KeyError) as info:
            call()
        msg = info.value.args[0]
        assert "nope" in msg, what
        for n in valid:
            assert n in msg, (what, n)


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_insert_identity_layer_unknown_name_raises_keyerror(family):
    """insert_identity_layer takes a hidden layer name like the other primitives, so an unknown one
    must fail the same way: KeyError listing the valid names, and nothing inserted."""
    model = make(family)
    valid = [h.name for h in model.hidden_layers()]
    n_params = len(list(model.parameters()))
    bad = {"resnet": "s0.b7"}.get(family, "fc9" if family.startswith("mlp") else "conv9")
    with pytest.raises(KeyError) as info:
        model.insert_identity_layer(bad, **INSERT_KW.get(family, {}))
    for n in valid:
        assert n in info.value.args[0]
    assert len(list(model.parameters())) == n_params


# --------------------------------------------------------------------------- counts after growth
def grow_sequence(model: GrowableNet, family: str) -> list[int]:
    """Adds to every layer, splits, inserts and grows the inserted layer; returns the expected widths."""
    names = [h.name for h in model.hidden_layers()]
    widths = [model.hidden(n).width for n in names]
    for i, n in enumerate(names):
        add_zero(model, n, 2, seed=10 + i)
    split_zero(model, names[0], [0, 1], 0.3)
    new = model.insert_identity_layer(names[0], **INSERT_KW.get(family, {}))
    add_zero(model, new, 3, seed=20)
    split_zero(model, model.hidden_layers()[-1].name, [1])  # the last original layer (names shift)
    expected = [widths[0] + 4, widths[0] + 7, *(w + 2 for w in widths[1:])]
    expected[-1] += 1
    return expected


def _flat_hidden(spec: dict) -> list[int]:
    if spec["family"] == "resnet":
        return [h for st in spec["stages"] for h in st["hidden"]]
    return list(spec["hidden"])


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_counts_after_growth_match_fresh_network(family):
    model = make(family)
    x = batch(family)
    ref = copy.deepcopy(model)
    expected = grow_sequence(model, family)
    assert_same_function(model, ref, x)  # the whole sequence was function-preserving

    spec = model.spec()
    assert list(model.widths().values()) == expected
    assert _flat_hidden(spec) == expected
    fresh = from_spec(spec)
    assert type(fresh) is type(model)
    assert fresh.spec() == spec
    assert fresh.widths() == model.widths()
    assert fresh.param_count() == model.param_count()
    assert model.param_count() == sum(p.numel() for p in model.parameters())
    assert count_flops(model, 1) == count_flops(fresh, 1)
    assert count_flops(model, 4, train=True) == count_flops(fresh, 4, train=True)
    assert count_flops(model, 1) > count_flops(ref, 1)
    assert model.param_count() > ref.param_count()

    # the fresh network has exactly the grown architecture: it takes the grown weights and computes
    # the same function, on the same inputs
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    assert fresh(x).shape == model(x).shape
    assert_same_function(fresh, model, x)


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_count_flops_has_no_side_effects(family):
    model = make(family)
    add_zero(model, model.hidden_layers()[0].name, 1)
    remaps = list(model.remaps)
    assert remaps
    calls = []
    handle = model.hidden_layers()[0].inp.register_forward_hook(lambda *a: calls.append(1))
    params = [(p, p.detach().clone()) for p in model.parameters()]
    model.train()
    f_inf = count_flops(model, 2)
    f_train = count_flops(model, 2, train=True)
    assert f_train > f_inf > 0
    assert calls == [], "count_flops ran the model's own hooks"
    assert model.training, "count_flops changed the model's mode"
    assert [id(a) for a, _ in model.remaps] == [id(a) for a, _ in remaps]
    for p, v in params:
        assert p.device.type == "cpu" and torch.equal(p, v) and p.grad is None
    model(batch(family))
    assert calls == [1], "the hook was removed from the model"
    handle.remove()
    # FLOPs of inference grow linearly with the batch size
    assert count_flops(model, 4) == 4 * count_flops(model, 1)


# --------------------------------------------------------------------------- training after growth
@pytest.mark.parametrize("family,name", LAYER_CASES, ids=LAYER_IDS)
def test_gradients_reach_new_units(family, name):
    model = make(family).train()
    n = model.hidden(name).width
    k = 3
    model.add_units(name, *random_add_args(model, name, k, gen(), w_out_scale=0.5))
    x = batch(family)
    y = torch.arange(BATCH) % FAMILIES[family][2]
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    h = model.hidden(name)
    for p in model.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert h.inp.weight.grad.shape == h.inp.weight.shape
    assert h.inp.weight.grad[n:].abs().sum() > 0, "no gradient reached the new in-weights"
    assert h.out.weight.grad[:, n:].abs().sum() > 0, "no gradient reached the new out-weights"
    if h.bn is not None:
        assert h.bn.weight.grad[n:].abs().sum() > 0


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_grown_network_trains(family):
    model = make(family).train()
    grow_sequence(model, family)
    model.add_units(model.hidden_layers()[0].name,
                    *random_add_args(model, model.hidden_layers()[0].name, 2, gen(), w_out_scale=0.1))
    x = batch(family, n=16)
    y = torch.arange(16) % FAMILIES[family][2]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(map(lambda v: v == v, losses))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("act", [nn.Identity, nn.ReLU], ids=["Identity", "ReLU"])
def test_insert_identity_layer_mlp_module_activation_keeps_spec_buildable(act):
    """insert_identity_layer accepts an activation module; spec() must still be something `from_spec`
    builds (the harness records it as the architecture), with the same counts."""
    model = make("mlp-relu")
    x = batch("mlp-relu")
    ref = copy.deepcopy(model)
    new = model.insert_identity_layer("fc1", activation=act())
    assert isinstance(model.hidden(new).act, act)
    assert_same_function(model, ref, x)
    fresh = from_spec(model.spec())
    assert isinstance(fresh.hidden(new).act, act)
    assert fresh.param_count() == model.param_count()
    assert count_flops(fresh, 1) == count_flops(model, 1)


def test_add_units_takes_the_new_batchnorm_channels_and_keeps_the_function():
    torch.manual_seed(0)
    m = VGG((3, 8, 8), 4, [2, 3], strides=[1, 2], batchnorm=True)
    x = torch.randn(16, 3, 8, 8)
    m.eval()
    before = m(x)
    w = torch.tensor([0.5, 2.0]), torch.tensor([0.1, -0.2]), torch.tensor([0.3, 0.0]), torch.tensor([4.0, 0.5])
    h = m.hidden_layers()[0]
    m.add_units(h.name, torch.randn(2, 3, 3, 3), None, torch.zeros(3, 2, 3, 3), bn_init=w)
    torch.testing.assert_close(m(x), before)
    for got, want in zip((h.bn.weight, h.bn.bias, h.bn.running_mean, h.bn.running_var), w):
        torch.testing.assert_close(got[-2:].detach(), want)
    with pytest.raises(ValueError, match="bn_init"):
        m.add_units(h.name, torch.randn(1, 3, 3, 3), None, torch.zeros(3, 1, 3, 3), bn_init=w)
