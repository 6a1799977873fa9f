"""Optimizer and learning-rate schedule, and keeping optimizer state right across growth."""
from __future__ import annotations

import math

import torch
from torch import nn

from growbench.config import OptimizerConfig, ScheduleConfig


def _group_index(p: nn.Parameter, cfg: OptimizerConfig) -> int:
    return 0 if (p.dim() > 1 or cfg.decay_norm_and_bias) else 1


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """Two parameter groups: 0 = weights (weight decay), 1 = BatchNorm/bias (no decay unless asked)."""
    groups: list[list[nn.Parameter]] = [[], []]
    for p in model.parameters():
        groups[_group_index(p, cfg)].append(p)
    params = [{"params": groups[0], "weight_decay": cfg.weight_decay},
              {"params": groups[1], "weight_decay": cfg.weight_decay if cfg.decay_norm_and_bias else 0.0}]
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas))
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas))
    raise ValueError(f"unknown optimizer {cfg.name!r}")


def lr_factor(cfg: ScheduleConfig, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Multiplier of the base learning rate at `step` (linear warm-up, then the schedule)."""
    warm = int(round(cfg.warmup_epochs * steps_per_epoch))
    if step < warm:
        return (step + 1) / warm
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "cosine":
        t = (step - warm) / max(1, total_steps - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
    if cfg.name == "step":
        epoch = step / steps_per_epoch
        return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    raise ValueError(f"unknown schedule {cfg.name!r}")


def set_lr(opt: torch.optim.Optimizer, base_lr: float, factor: float) -> None:
    for g in opt.param_groups:
        g["lr"] = base_lr * factor


def _pad_like(old: torch.Tensor, new_shape: torch.Size) -> torch.Tensor:
    out = old.new_zeros(new_shape)
    out[tuple(slice(0, s) for s in old.shape)] = old
    return out


@torch.no_grad()
def sync_optimizer(opt: torch.optim.Optimizer, model: nn.Module, cfg: OptimizerConfig) -> int:
    """After growth: swap replaced parameters into the optimizer, keep the state of their existing
    entries (momentum, Adam moments, step counts) and start the new entries at zero; add parameters
    of inserted layers with empty (zero) state. Returns the number of parameters newly added."""
    where = {id(p): (gi, pi) for gi, g in enumerate(opt.param_groups) for pi, p in enumerate(g["params"])}
    for old, new in getattr(model, "remaps", []):
        loc = where.pop(id(old), None)
        if loc is None:
            continue
        gi, pi = loc
        opt.param_groups[gi]["params"][pi] = new
        where[id(new)] = loc
        state = opt.state.pop(old, None)
        if state:
            opt.state[new] = {k: (_pad_like(v, new.shape) if torch.is_tensor(v) and v.shape == old.shape else v)
                              for k, v in state.items()}
    if hasattr(model, "remaps"):
        model.remaps.clear()
    added = 0
    for p in model.parameters():
        if id(p) not in where:
            opt.param_groups[_group_index(p, cfg)]["params"].append(p)
            where[id(p)] = None
            added += 1
    return added
