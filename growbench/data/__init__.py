"""Data sets for growbench: whole splits as tensors, plus a fingerprint of what was read.

Every method and every seed must see exactly the same examples, so subsets and the
validation split are chosen by a fixed hash of each example's index (never by the run
seed), stratified by class. Order of operations on the training set:

    1. val   = val_size examples taken from the full training set (stratified);
    2. train = train_subset examples taken from what is left (stratified);
    3. test  = test_subset examples of the test set (stratified).

So the validation split does not change with train_subset, and a larger train_subset
contains every example of a smaller one.
"""
from __future__ import annotations

import dataclasses
import numbers
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import readers, toy
from .fingerprint import file_fingerprint, toy_fingerprint
from .readers import DatasetError

__all__ = ["DATASETS", "Dataset", "DatasetError", "Split", "load_dataset", "resolve_root"]

DATASETS: tuple[str, ...] = ("cifar10", "cifar100", "mnist", "fashion-mnist", "toy-spirals", "toy-regression")

# Per-channel mean and std of the training images, in [0, 1] units.
_IMAGE_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
}
_NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "mnist": 10, "fashion-mnist": 10, "toy-spirals": toy.SPIRAL_ARMS}


@dataclass
class Split:
    x: torch.Tensor  # images: uint8 (N, C, H, W); toy: float32 (N, D)
    y: torch.Tensor  # classification: int64 (N,); regression: float32 (N, 1)

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device: torch.device | str) -> "Split":
        return Split(self.x.to(device), self.y.to(device))


@dataclass
class Dataset:
    name: str
    task: str  # "classification" | "regression"
    input_shape: tuple[int, ...]  # (C, H, W) or (D,)
    num_outputs: int  # classes, or regression output dim
    train: Split
    val: Split | None  # held out from the full training set when val_size > 0
    test: Split
    mean: tuple[float, ...] | None  # per-channel constants for uint8 images, [0, 1] units; None for toys
    std: tuple[float, ...] | None
    fingerprint: dict

    def to(self, device: torch.device | str) -> "Dataset":
        """A copy with every tensor on `device`."""
        return dataclasses.replace(self, train=self.train.to(device), test=self.test.to(device),
                                   val=None if self.val is None else self.val.to(device))


def resolve_root(root: str | None) -> Path:
    """Explicit root, else $GROWBENCH_DATA, else ($XDG_CACHE_HOME or ~/.cache)/growbench/data."""
    if root:
        return Path(root).expanduser()
    if os.environ.get("GROWBENCH_DATA"):
        return Path(os.environ["GROWBENCH_DATA"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME")
    base = Path(cache).expanduser() if cache and Path(cache).expanduser().is_absolute() else Path.home() / ".cache"
    return base / "growbench" / "data"


def load_dataset(name: str, root: str | None = None, *, download: bool = False,
                 train_subset: int | None = None, test_subset: int | None = None,
                 val_size: int = 0) -> Dataset:
    """Load a whole data set into memory (CPU tensors); see the module docstring for subsets."""
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    _check_int("dataset.val_size", val_size, minimum=0, allow_none=False)
    _check_int("dataset.train_subset", train_subset, minimum=1)
    _check_int("dataset.test_subset", test_subset, minimum=1)

    if name in toy.TOYS:
        train_x, train_y, test_x, test_y = toy.TOYS[name]()
        fingerprint = toy_fingerprint(f"{name}-v1", [train_x, train_y, test_x, test_y])
        mean = std = None
    else:
        path = resolve_root(root)
        missing = readers.missing_files(name, path)
        if missing and download:
            readers.download(name, path)
            missing = readers.missing_files(name, path)
        if missing:
            raise DatasetError(readers.missing_message(name, path, missing))
        raw = readers.read_files(name, path)
        train_x, train_y, test_x, test_y = raw.train_x, raw.train_y, raw.test_x, raw.test_y
        fingerprint = file_fingerprint(name, raw.hashes)
        mean, std = _IMAGE_STATS[name]

    classification = name != "toy-regression"
    strata_train = train_y if classification else torch.zeros(len(train_y), dtype=torch.long)
    strata_test = test_y if classification else torch.zeros(len(test_y), dtype=torch.long)
    _check_range("dataset.val_size", val_size, len(train_y) - 1,
                 f"{name} has {len(train_y)} training examples and at least one must stay for training")
    val_idx = _stratified_pick(strata_train, torch.arange(len(train_y)), val_size, salt=1)
    rest = torch.ones(len(train_y), dtype=torch.bool)
    rest[val_idx] = False
    train_idx = rest.nonzero().squeeze(1)
    if train_subset is not None:
        after_val = f" left after the {val_size} validation examples (val_size is taken first)" if val_size else ""
        _check_range("dataset.train_subset", train_subset, len(train_idx),
                     f"{name} has {len(train_idx)} training examples{after_val}")
        train_idx = _stratified_pick(strata_train[train_idx], train_idx, train_subset, salt=2)
    test_idx = torch.arange(len(test_y))
    if test_subset is not None:
        _check_range("dataset.test_subset", test_subset, len(test_y), f"{name} has {len(test_y)} test examples")
        test_idx = _stratified_pick(strata_test, test_idx, test_subset, salt=3)

    return Dataset(
        name=name,
        task="classification" if classification else "regression",
        input_shape=tuple(train_x.shape[1:]),
        num_outputs=_NUM_CLASSES[name] if classification else train_y.shape[1],
        train=Split(_take(train_x, train_idx), _take(train_y, train_idx)),
        val=Split(train_x[val_idx], train_y[val_idx]) if val_size else None,
        test=Split(_take(test_x, test_idx), _take(test_y, test_idx)),
        mean=mean,
        std=std,
        fingerprint=fingerprint,
    )


# --------------------------------------------------------------------------- sizes
def _check_int(key: str, value: object, minimum: int, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise DatasetError(f"{key} must be an integer{' or null' if allow_none else ''}, got {value!r}")
    if value < minimum:
        raise DatasetError(f"{key} must be at least {minimum}, got {value}")


def _check_range(key: str, value: int | None, available: int, why: str) -> None:
    if value is not None and value > available:
        raise DatasetError(f"{key}={value} is too large: {why}; use at most {available}")


# --------------------------------------------------------------------------- subsets
def _take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t[idx] for sorted unique idx; the whole tensor itself (no 150 MB copy) when nothing is left out."""
    return t if len(idx) == len(t) else t[idx]


def _stable_keys(index: torch.Tensor, salt: int) -> np.ndarray:
    """A fixed pseudo-random key per example index (splitmix64), the same on every platform and
    library version, unlike a seeded torch/numpy permutation."""
    z = index.numpy().astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(salt)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _balanced_quota(counts: list[int], k: int) -> list[int]:
    """Split k over classes as evenly as their sizes allow; leftovers go to the lowest class ids."""
    if not 0 <= k <= sum(counts):
        raise ValueError(f"cannot pick {k} of {sum(counts)} examples")
    quota = [0] * len(counts)
    left = k
    while left > 0:
        open_classes = [c for c in range(len(counts)) if quota[c] < counts[c]]
        share = left // len(open_classes)
        if share == 0:
            for c in open_classes[:left]:
                quota[c] += 1
            break
        for c in open_classes:
            add = min(share, counts[c] - quota[c])
            quota[c] += add
            left -= add
    return quota


def _stratified_pick(labels: torch.Tensor, index: torch.Tensor, k: int, salt: int) -> torch.Tensor:
    """k of the examples `index` (with these labels), balanced over classes, sorted by index.

    Within a class, examples are taken in the order of their fixed keys, so a larger k
    always contains a smaller one.
    """
    if k == 0:
        return index[:0]
    order = torch.from_numpy(np.argsort(_stable_keys(index, salt), kind="stable"))
    labels, index = labels[order], index[order]
    classes, counts = torch.unique(labels, return_counts=True)
    quota = _balanced_quota(counts.tolist(), k)
    picked = [index[labels == c][:q] for c, q in zip(classes, quota)]
    return torch.cat(picked).sort().values
