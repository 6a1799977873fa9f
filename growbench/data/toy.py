"""Synthetic data sets made in code: no files, seconds to train on, same data every call.

They use numpy's legacy RandomState, whose stream numpy keeps frozen across releases,
and compute in float64 before rounding to float32, so the data (and its fingerprint)
stay the same across library versions. Inputs are standardised with the training
set's mean and std (the test set uses the same constants).

- toy-spirals: 3 interleaved spiral arms in 2-D, one class per arm, 1.5 turns each,
  Gaussian noise; 3000 train points (1000 per arm) and 1000 test points.
  Small MLPs get the coarse structure; the centre and the outer turns need capacity.
- toy-regression: y = sin(3x) + 0.3 x^2 + N(0, 0.1^2), x uniform on [-2, 2];
  2000 train and 1000 test points. Its two full sine periods plus the bowl need about
  a dozen ReLU kinks: 2 hidden units clearly underfit, 32 fit down to the noise.
  Targets are left in their natural units (float32, shape (N, 1)).
"""
from __future__ import annotations

import math

import numpy as np
import torch

SPIRAL_ARMS = 3
SPIRAL_TURNS = 1.5
SPIRAL_NOISE = 0.04
REGRESSION_NOISE = 0.1


def _standardize(train: np.ndarray, test: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = train.mean(axis=0), train.std(axis=0)
    return (torch.from_numpy(((train - mean) / std).astype(np.float32)),
            torch.from_numpy(((test - mean) / std).astype(np.float32)))


def _spiral_points(rs: np.random.RandomState, n: int) -> tuple[np.ndarray, np.ndarray]:
    labels = np.arange(n) % SPIRAL_ARMS
    t = rs.uniform(0.0, 1.0, n)  # position along the arm; also its radius
    angle = 2 * math.pi * (labels / SPIRAL_ARMS + SPIRAL_TURNS * t)
    points = np.stack([t * np.cos(angle), t * np.sin(angle)], axis=1)
    points += rs.normal(0.0, SPIRAL_NOISE, size=points.shape)
    return points, labels


def make_spirals() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train_x (3000, 2), train_y (3000,), test_x (1000, 2), test_y (1000,)); labels int64 in {0, 1, 2}."""
    rs = np.random.RandomState(20240601)
    train_x, train_y = _spiral_points(rs, 3000)
    test_x, test_y = _spiral_points(rs, 1000)
    train_x, test_x = _standardize(train_x, test_x)
    return train_x, torch.from_numpy(train_y).long(), test_x, torch.from_numpy(test_y).long()


def _regression_points(rs: np.random.RandomState, n: int) -> tuple[np.ndarray, np.ndarray]:
    x = rs.uniform(-2.0, 2.0, (n, 1))
    y = np.sin(3 * x) + 0.3 * x**2 + rs.normal(0.0, REGRESSION_NOISE, (n, 1))
    return x, y


def make_regression() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train_x (2000, 1), train_y (2000, 1), test_x (1000, 1), test_y (1000, 1)), all float32."""
    rs = np.random.RandomState(20240602)
    train_x, train_y = _regression_points(rs, 2000)
    test_x, test_y = _regression_points(rs, 1000)
    train_x, test_x = _standardize(train_x, test_x)
    return (train_x, torch.from_numpy(train_y.astype(np.float32)),
            test_x, torch.from_numpy(test_y.astype(np.float32)))


TOYS = {"toy-spirals": make_spirals, "toy-regression": make_regression}
