"""Growable VGG-style CNN: conv3x3-BN-ReLU layers, downsampling, global average pool, linear.

Global average pooling makes channel j of the last conv feed exactly column j of the classifier,
so every conv layer is a growable hidden layer with the same primitive code. Downsampling is either
a 2x2 max-pool after a layer (classic VGG) or a stride-2 next conv (all-convolutional): with strides
the path between two convs is linear up to the activation, which first-order methods such as TINY
need to be exact; `Hidden.pool` tells a method where a max-pool sits in between.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from growbench.models.growable import GrowableNet, Hidden


class VGG(GrowableNet):
    family = "vgg"

    def __init__(self, input_shape: tuple[int, ...], num_outputs: int, hidden: list[int],
                 pools: list[bool] | None = None, strides: list[int] | None = None,
                 batchnorm: bool | list[bool] = True) -> None:
        """pools[i]: 2x2 max-pool after conv i; strides[i]: stride of conv i (see `vgg_layout`)."""
        super().__init__()
        self._input_shape = tuple(input_shape)
        bns = [batchnorm] * len(hidden) if isinstance(batchnorm, bool) else list(batchnorm)
        strides = list(strides or [1] * len(hidden))
        chans = [input_shape[0], *hidden]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, stride=st, padding=1, bias=not bn)
                                   for a, b, st, bn in zip(chans[:-1], chans[1:], strides, bns))
        self.bns = nn.ModuleList(nn.BatchNorm2d(c) if bn else nn.Identity() for c, bn in zip(hidden, bns))
        self.pools = list(pools or [False] * len(hidden))
        self.act = nn.ReLU()
        self.classifier = nn.Linear(hidden[-1], num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, bn, pool in zip(self.convs, self.bns, self.pools):
            x = self.act(bn(conv(x)))
            if pool:
                x = F.max_pool2d(x, 2)
        return self.classifier(x.mean((2, 3)))

    def hidden_layers(self) -> list[Hidden]:
        outs = [*self.convs[1:], self.classifier]
        return [Hidden(f"conv{i}", conv, bn if isinstance(bn, nn.BatchNorm2d) else None, self.act, out, pool)
                for i, (conv, bn, out, pool) in enumerate(zip(self.convs, self.bns, outs, self.pools))]

    def spec(self) -> dict:
        return {"family": "vgg", "input_shape": list(self._input_shape),
                "num_outputs": self.classifier.out_features,
                "hidden": [c.out_channels for c in self.convs], "pools": list(self.pools),
                "strides": [c.stride[0] for c in self.convs],
                "batchnorm": [isinstance(b, nn.BatchNorm2d) for b in self.bns]}

    @torch.no_grad()
    def insert_identity_layer(self, after: str) -> str:
        """Insert a 3x3 conv with a Dirac kernel (and ReLU, no BatchNorm) after layer `after` and its
        pool. Exact: its input is a ReLU output. No BatchNorm because train-mode BN would renormalise
        the activations and break function preservation."""
        self.hidden(after)  # KeyError naming the valid layers
        i = [h.name for h in self.hidden_layers()].index(after)
        c = self.convs[i].out_channels
        ref = self.convs[i].weight
        conv = nn.Conv2d(c, c, 3, padding=1, bias=True).to(ref)
        nn.init.dirac_(conv.weight)
        conv.bias.zero_()
        self.convs.insert(i + 1, conv)
        self.bns.insert(i + 1, nn.Identity())
        self.pools.insert(i + 1, False)
        return f"conv{i + 1}"


def vgg_layout(n: int, pool_after: list[int], downsample: str) -> tuple[list[bool], list[int]]:
    """(pools, strides) for n convs that halve the resolution after each layer in `pool_after`:
    by a max-pool there, or by giving the next conv stride 2 (after the last conv: nothing, the
    global average pool follows)."""
    after = set(pool_after)
    if downsample == "max":
        return [i in after for i in range(n)], [1] * n
    return [False] * n, [2 if (i - 1) in after else 1 for i in range(n)]
