"""Batch augmentation with plain tensor ops, on whatever device the batch lives on.

Whole batches at once (no Python loop over samples) so that augmentation costs next to
nothing next to the model. All randomness comes from the generator passed in and is
drawn on the generator's device, so a run is reproducible from its seed.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def random_crop(x: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Zero-pad (B, C, H, W) by `padding` on each side, then crop H x W at a random offset per sample."""
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    b, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=generator.device).to(x.device)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=generator.device).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (B, 1, 1, W)
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


def random_flip(x: Tensor, generator: torch.Generator) -> Tensor:
    """Flip each sample of (B, C, H, W) left-right with probability 0.5."""
    flip = torch.rand(x.shape[0], generator=generator, device=generator.device) < 0.5
    return torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)


def normalize(x_uint8: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 images (..., C, H, W) -> float32 (x / 255 - mean) / std, per channel."""
    if x_uint8.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 images, got {x_uint8.dtype}")
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=x_uint8.device).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=x_uint8.device).view(-1, 1, 1)
    return (x_uint8.float() / 255 - mean_t) / std_t
