"""Readers for the standard on-disk layouts (the ones torchvision writes).

We read the files ourselves instead of going through torchvision so that (a) the
benchmark runs where torchvision is not installed, (b) every file is validated with
an error that says which file is broken and what to do, and (c) the bytes are hashed
in the same pass for the run's fingerprint.

    cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}
    cifar-100-python/{train,test,meta}
    MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]
    FashionMNIST/raw/...   (same names)
"""
from __future__ import annotations

import gzip
import io
import pickle
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .fingerprint import FileHash, read_hashed


class DatasetError(Exception):
    """A data set cannot be used as asked; the message names the files or keys and the fix."""


@dataclass
class RawData:
    """What a reader returns: uint8 images (N, C, H, W), int64 labels, and the file hashes."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    hashes: dict[str, FileHash]


CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR100_DIR = "cifar-100-python"
IDX_DIRS = {"mnist": "MNIST/raw", "fashion-mnist": "FashionMNIST/raw"}
IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
PRETTY = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}
SOURCES = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (unpack it into the root)",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz (unpack it into the root)",
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/ (the four .gz files, into MNIST/raw/)",
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/ "
                      "(the four .gz files, into FashionMNIST/raw/)"),
}


# --------------------------------------------------------------------------- files
def expected_files(name: str, root: Path) -> list[Path]:
    """Every file the layout needs (IDX files by their plain name; the .gz works too)."""
    if name == "cifar10":
        return [root / CIFAR10_DIR / f for f in CIFAR10_TRAIN + ["test_batch", "batches.meta"]]
    if name == "cifar100":
        return [root / CIFAR100_DIR / f for f in ("train", "test", "meta")]
    return [root / IDX_DIRS[name] / f for f in IDX_FILES.values()]


def _idx_path(path: Path) -> Path | None:
    """The plain IDX file if present, else its .gz, else None."""
    gz = path.with_name(path.name + ".gz")
    return path if path.is_file() else gz if gz.is_file() else None


def missing_files(name: str, root: Path) -> list[Path]:
    if name in IDX_DIRS:
        return [p for p in expected_files(name, root) if _idx_path(p) is None]
    return [p for p in expected_files(name, root) if not p.is_file()]


def missing_message(name: str, root: Path, missing: list[Path]) -> str:
    lines = [f"{PRETTY[name]} not found under {root}: {len(missing)} of its files are missing. Expected files:"]
    for p in expected_files(name, root):
        mark = "  (missing)" if p in missing else ""
        alt = " (or the same name + .gz)" if name in IDX_DIRS else ""
        lines.append(f"  {p}{alt}{mark}")
    lines += [
        f"Get them from {SOURCES[name]}, or:",
        "  - point growbench at the folder that holds them with dataset.root=PATH or $GROWBENCH_DATA;",
        "  - set dataset.download=true to download them with torchvision "
        "(needs torchvision: pip install growbench[download]).",
    ]
    return "\n".join(lines)


def download(name: str, root: Path) -> None:
    """Fetch the canonical files with torchvision, which checks their md5s."""
    try:
        import torchvision.datasets as tvd
    except Exception as exc:  # ImportError, or a broken install (e.g. a mismatched torch)
        raise DatasetError(
            f"dataset.download=true needs torchvision, which cannot be imported here "
            f"({type(exc).__name__}: {exc}); install it with: pip install growbench[download]\n"
            + missing_message(name, root, missing_files(name, root))) from exc
    cls = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100,
           "mnist": tvd.MNIST, "fashion-mnist": tvd.FashionMNIST}[name]
    try:
        root.mkdir(parents=True, exist_ok=True)
        for train in (True, False):
            cls(root=str(root), train=train, download=True)
    except Exception as exc:
        raise DatasetError(f"downloading {PRETTY[name]} into {root} with torchvision failed "
                           f"({type(exc).__name__}: {exc}).\n"
                           + missing_message(name, root, missing_files(name, root))) from exc


def _corrupt(path: Path, name: str, problem: str) -> DatasetError:
    return DatasetError(f"{path} is corrupt: {problem}. Delete it and download it again: "
                        f"set dataset.download=true, or get it from {SOURCES[name]}.")


# --------------------------------------------------------------------------- CIFAR
class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a data file must not run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 writes bytes in protocol 2
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in the pickle")
        return super().find_class(module, name)


def _unpickle(path: Path, name: str) -> tuple[dict, FileHash]:
    raw, h = read_hashed(path)
    try:
        obj = _ArrayUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except Exception as exc:
        raise _corrupt(path, name, f"cannot unpickle it ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise _corrupt(path, name, f"expected a pickled dict, found {type(obj).__name__}")
    return obj, h


def _need_keys(obj: dict, keys: list[str], path: Path, name: str) -> None:
    missing = [k for k in keys if k not in obj]
    if missing:
        raise _corrupt(path, name, f"missing key(s) {missing} (has {sorted(map(str, obj))})")


def _cifar_batch(path: Path, name: str, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray, FileHash]:
    obj, h = _unpickle(path, name)
    _need_keys(obj, ["data", label_key], path, name)
    data = obj["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        what = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise _corrupt(path, name, f"'data' should be a uint8 array of shape (N, 3072), found {what}")
    try:
        labels = np.asarray(obj[label_key], dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise _corrupt(path, name, f"'{label_key}' is not a list of integers ({exc})") from exc
    if labels.shape != (data.shape[0],):
        raise _corrupt(path, name, f"{data.shape[0]} images but '{label_key}' has shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise _corrupt(path, name, f"labels out of range [0, {num_classes}): min {labels.min()}, max {labels.max()}")
    return data, labels, h


def _cifar_meta(path: Path, name: str, key: str, num_classes: int) -> FileHash:
    obj, h = _unpickle(path, name)
    _need_keys(obj, [key], path, name)
    if len(obj[key]) != num_classes:
        raise _corrupt(path, name, f"'{key}' has {len(obj[key])} entries, expected {num_classes}")
    return h


def _to_images(rows: list[np.ndarray]) -> torch.Tensor:
    """(N, 3072) rows (R plane, G plane, B plane) -> uint8 (N, 3, 32, 32); concatenate copies."""
    return torch.from_numpy(np.concatenate(rows).reshape(-1, 3, 32, 32))


def read_cifar(name: str, root: Path) -> RawData:
    if name == "cifar10":
        folder, train, label_key, meta, meta_key, classes = (
            CIFAR10_DIR, CIFAR10_TRAIN, "labels", "batches.meta", "label_names", 10)
        test = "test_batch"
    else:
        folder, train, label_key, meta, meta_key, classes = (
            CIFAR100_DIR, ["train"], "fine_labels", "meta", "fine_label_names", 100)
        test = "test"
    hashes = {}
    split = {}
    for part, files in (("train", train), ("test", [test])):
        xs, ys = [], []
        for f in files:
            x, y, hashes[f"{folder}/{f}"] = _cifar_batch(root / folder / f, name, label_key, classes)
            xs.append(x)
            ys.append(y)
        split[part] = (_to_images(xs), torch.from_numpy(np.concatenate(ys)))
    hashes[f"{folder}/{meta}"] = _cifar_meta(root / folder / meta, name, meta_key, classes)
    return RawData(*split["train"], *split["test"], hashes)


# --------------------------------------------------------------------------- IDX
def _parse_idx(raw: bytes, ndim: int, path: Path, name: str) -> np.ndarray:
    """IDX: big-endian magic 0x000008NN (uint8, NN dims), NN big-endian uint32 dims, then the bytes."""
    want = 0x0800 + ndim
    if len(raw) < 4:
        raise _corrupt(path, name, f"only {len(raw)} bytes, too short for an IDX header")
    magic = int.from_bytes(raw[:4], "big")
    if magic != want:
        raise _corrupt(path, name, f"bad IDX magic 0x{magic:08x}, expected 0x{want:08x}")
    start = 4 + 4 * ndim
    if len(raw) < start:
        raise _corrupt(path, name, "truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:start])
    size = int(np.prod(dims, dtype=np.int64))
    if len(raw) - start != size:
        how = "truncated" if len(raw) - start < size else "has trailing bytes"
        raise _corrupt(path, name, f"{how}: {len(raw) - start} data bytes, but the header's dims {dims} need {size}")
    return np.frombuffer(raw, np.uint8, count=size, offset=start).reshape(dims).copy()


def _read_idx(path: Path, ndim: int, name: str) -> tuple[np.ndarray, FileHash]:
    raw, h = read_hashed(path)
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise _corrupt(path, name, f"cannot decompress it ({type(exc).__name__}: {exc})") from exc
    return _parse_idx(raw, ndim, path, name), h


def read_idx_dataset(name: str, root: Path) -> RawData:
    folder = IDX_DIRS[name]
    hashes = {}
    arrays = {}
    paths = {}
    for key, fname in IDX_FILES.items():
        path = _idx_path(root / folder / fname)
        if path is None:
            raise DatasetError(missing_message(name, root, missing_files(name, root)))
        paths[key] = path
        arrays[key], hashes[f"{folder}/{path.name}"] = _read_idx(path, 3 if key.endswith("_x") else 1, name)
    for part in ("train", "test"):
        x, y = arrays[f"{part}_x"], arrays[f"{part}_y"]
        if x.shape[1:] != (28, 28):
            raise _corrupt(paths[f"{part}_x"], name, f"images should be 28x28, found {x.shape[1]}x{x.shape[2]}")
        if len(x) != len(y):
            raise _corrupt(paths[f"{part}_y"], name,
                           f"{len(y)} labels but {paths[f'{part}_x'].name} has {len(x)} images")
        if y.size and y.max() >= 10:
            raise _corrupt(paths[f"{part}_y"], name, f"labels out of range [0, 10): max {y.max()}")
    return RawData(
        torch.from_numpy(arrays["train_x"]).unsqueeze(1), torch.from_numpy(arrays["train_y"]).long(),
        torch.from_numpy(arrays["test_x"]).unsqueeze(1), torch.from_numpy(arrays["test_y"]).long(),
        hashes,
    )


def read_files(name: str, root: Path) -> RawData:
    return read_cifar(name, root) if name.startswith("cifar") else read_idx_dataset(name, root)
