"""Growable multi-layer perceptron: hidden layer i sits between linears[i] and linears[i+1]."""
from __future__ import annotations

import torch
from torch import nn

from growbench.models.activations import Rational
from growbench.models.growable import GrowableNet, Hidden

ACTIVATIONS = {"relu": nn.ReLU, "selu": nn.SELU, "tanh": nn.Tanh, "gelu": nn.GELU, "identity": nn.Identity,
               "rational": Rational}


def make_activation(name: str, width: int, identity: bool = False) -> nn.Module:
    """An activation module; `rational` is per-unit (learnable (v, c, l) per unit, see activations.py)."""
    if name == "rational":
        return Rational(width, identity=identity)
    return ACTIVATIONS[name]()


class MLP(GrowableNet):
    family = "mlp"

    def __init__(self, input_shape: tuple[int, ...], num_outputs: int, hidden: list[int],
                 activation: str | list[str] = "relu") -> None:
        super().__init__()
        self._input_shape = tuple(input_shape)
        acts = [activation] * len(hidden) if isinstance(activation, str) else list(activation)
        dims = [int(torch.tensor(input_shape).prod()), *hidden, num_outputs]
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.acts = nn.ModuleList(make_activation(a, w) for a, w in zip(acts, hidden))
        self.act_names = acts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for lin, act in zip(self.linears, self.acts):
            x = act(lin(x))
        return self.linears[-1](x)

    def hidden_layers(self) -> list[Hidden]:
        return [Hidden(f"fc{i}", self.linears[i], None, self.acts[i], self.linears[i + 1])
                for i in range(len(self.acts))]

    def spec(self) -> dict:
        return {"family": "mlp", "input_shape": list(self._input_shape),
                "num_outputs": self.linears[-1].out_features,
                "hidden": [h.width for h in self.hidden_layers()], "activation": list(self.act_names)}

    @torch.no_grad()
    def insert_identity_layer(self, after: str, activation: str | nn.Module = "relu") -> str:
        """Insert Linear(d, d) = I after hidden layer `after`. With ReLU this is exact because the
        input is already a ReLU output (relu(relu(z)) = relu(z)); other activations need `identity`
        ("identity"); `activation` may be a name or an instance of one of ACTIVATIONS. `rational` (SENN's
        per-unit activation) is created at its identity (v, c, l) = (0, 0, 1): exact after any layer."""
        self.hidden(after)  # KeyError naming the valid layers
        i = [h.name for h in self.hidden_layers()].index(after)
        d = self.linears[i].out_features
        if isinstance(activation, str):
            if activation == "relu" and self.act_names[i] != "relu":
                raise ValueError(f"an identity layer with ReLU after a {self.act_names[i]} layer is not "
                                 "function-preserving; use activation='identity'")
            act, act_name = make_activation(activation, d, identity=True), activation
        else:
            act_name = next((n for n, cls in ACTIVATIONS.items() if type(activation) is cls), None)
            if act_name is None:  # spec() must stay buildable by from_spec
                raise ValueError(f"activation module {type(activation).__name__} is not one of "
                                 f"{', '.join(ACTIVATIONS)}; pass its name instead")
            if isinstance(activation, Rational) and activation.width != d:
                raise ValueError(f"a rational activation of width {activation.width} cannot follow {after} (width {d})")
            act = activation
        ref = self.linears[i].weight
        lin = nn.Linear(d, d).to(ref)
        lin.weight.copy_(torch.eye(d))
        lin.bias.zero_()
        self.linears.insert(i + 1, lin)
        self.acts.insert(i + 1, act.to(ref.device))
        self.act_names.insert(i + 1, act_name)
        return f"fc{i + 1}"
