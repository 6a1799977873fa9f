"""Growable model families and how to build them from a suite's `model:` section."""
from __future__ import annotations

from growbench.models.growable import GrowableNet, Hidden, count_flops
from growbench.models.mlp import MLP
from growbench.models.resnet import ResNet
from growbench.models.vgg import VGG, vgg_layout

__all__ = ["GrowableNet", "Hidden", "MLP", "VGG", "ResNet", "build_model", "from_spec", "count_flops"]

RESNET_STRIDES = (1, 2, 2, 2, 2, 2)


def build_model(cfg, input_shape: tuple[int, ...], num_outputs: int, hidden: list[int] | None = None) -> GrowableNet:
    """Build the starting network of a suite (`cfg` is a `growbench.config.ModelConfig`)."""
    hidden = list(hidden if hidden is not None else cfg.hidden)
    if cfg.family == "mlp":
        return MLP(input_shape, num_outputs, hidden, cfg.activation)
    if len(input_shape) != 3:
        raise ValueError(f"model.family={cfg.family} needs image inputs (C, H, W); this dataset gives {input_shape}")
    if cfg.family == "vgg":
        pools, strides = vgg_layout(len(hidden), cfg.pool_after, cfg.downsample)
        return VGG(input_shape, num_outputs, hidden, pools, strides, cfg.batchnorm)
    if cfg.family == "resnet":
        stages = [{"width": w, "stride": RESNET_STRIDES[i], "hidden": [h] * n}
                  for i, (w, n, h) in enumerate(zip(cfg.widths, cfg.blocks, hidden))]
        return ResNet(input_shape, num_outputs, cfg.stem, stages)
    raise ValueError(f"unknown model family {cfg.family!r}")


def from_spec(spec: dict) -> GrowableNet:
    """A freshly initialised network with the shape described by `GrowableNet.spec()`."""
    s = dict(spec)
    family = s.pop("family")
    shape, n_out = tuple(s.pop("input_shape")), s.pop("num_outputs")
    cls = {"mlp": MLP, "vgg": VGG, "resnet": ResNet}[family]
    return cls(shape, n_out, **s)
