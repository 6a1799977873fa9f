"""Growable ResNet-style CNN (CIFAR ResNet-18 layout by default).

As in TINY's and gromo's ResNets, growth happens in the hidden channels of each basic block
(conv1 out = conv2 in); the residual stream widths stay fixed. Depth grows by inserting a block
whose last BatchNorm has weight 0, so the new residual branch outputs exactly zero.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from growbench.models.growable import GrowableNet, Hidden


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, hidden: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, hidden, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(hidden, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNet(GrowableNet):
    family = "resnet"

    def __init__(self, input_shape: tuple[int, ...], num_outputs: int, stem: int, stages: list[dict]) -> None:
        """stages: [{"width": w, "stride": s, "hidden": [h for each block]}]"""
        super().__init__()
        self._input_shape = tuple(input_shape)
        self.stem = nn.Sequential(nn.Conv2d(input_shape[0], stem, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(stem), nn.ReLU())
        self.strides = [s["stride"] for s in stages]
        self.stages = nn.ModuleList()
        c = stem
        for st in stages:
            blocks = nn.ModuleList()
            for j, h in enumerate(st["hidden"]):
                blocks.append(BasicBlock(c, h, st["width"], st["stride"] if j == 0 else 1))
                c = st["width"]
            self.stages.append(blocks)
        self.fc = nn.Linear(c, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for blocks in self.stages:
            for block in blocks:
                x = block(x)
        return self.fc(x.mean((2, 3)))

    def hidden_layers(self) -> list[Hidden]:
        return [Hidden(f"s{i}.b{j}", b.conv1, b.bn1, b.act, b.conv2)
                for i, blocks in enumerate(self.stages) for j, b in enumerate(blocks)]

    def spec(self) -> dict:
        return {"family": "resnet", "input_shape": list(self._input_shape), "num_outputs": self.fc.out_features,
                "stem": self.stem[0].out_channels,
                "stages": [{"width": blocks[0].conv2.out_channels, "stride": s,
                            "hidden": [b.conv1.out_channels for b in blocks]}
                           for blocks, s in zip(self.stages, self.strides)]}

    @torch.no_grad()
    def insert_identity_layer(self, after: str, hidden: int | None = None) -> str:
        """Insert a basic block after block `after` (same stage). Its bn2 weight and bias are 0, so
        the block computes relu(0 + x) = x on the (non-negative) output of the previous block."""
        self.hidden(after)  # KeyError naming the valid layers
        i, j = (int(t[1:]) for t in after.split("."))
        prev = self.stages[i][j]
        w = prev.conv2.out_channels
        block = BasicBlock(w, hidden or prev.conv1.out_channels, w, 1).to(prev.conv1.weight)
        block.bn2.weight.zero_()
        block.bn2.bias.zero_()
        self.stages[i].insert(j + 1, block)
        return f"s{i}.b{j + 1}"
