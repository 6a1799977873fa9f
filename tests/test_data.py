"""Tests for growbench.data: readers, fingerprints, subsets, toys, augmentation."""
from __future__ import annotations

import gzip
import hashlib
import pickle
import struct
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from growbench.data import DATASETS, Dataset, DatasetError, load_dataset, resolve_root
from growbench.data import _balanced_quota
from growbench.data.augment import normalize, random_crop, random_flip
from growbench.data.fingerprint import JPEG_COPY_NOTE, combined_sha256

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
IDX_NAMES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


# --------------------------------------------------------------------------- tiny files
def idx_bytes(arr: np.ndarray) -> bytes:
    header = struct.pack(">I", 0x0800 + arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_idx(root: Path, folder: str = "MNIST/raw", gz: bool = False, plain: bool = True,
              n_train: int = 30, n_test: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    rs = np.random.RandomState(seed)
    arrays = {
        "train-images-idx3-ubyte": rs.randint(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rs.randint(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": np.arange(n_test) % 10,
    }
    d = root / folder
    d.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        if plain:
            (d / name).write_bytes(idx_bytes(arr))
        if gz:
            (d / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(arr)))
    return arrays


def write_cifar(root: Path, name: str = "cifar10", n: int = 12, seed: int = 0) -> dict[str, tuple]:
    """A tiny CIFAR layout: n images per batch file, labels cycling over the classes."""
    rs = np.random.RandomState(seed)
    if name == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        folder, label_key, classes = "cifar-10-batches-py", "labels", 10
        meta_file, meta = "batches.meta", {"label_names": [f"c{i}" for i in range(10)], "num_cases_per_batch": n}
    else:
        folder, files, label_key, classes = "cifar-100-python", ["train", "test"], "fine_labels", 100
        meta_file, meta = "meta", {"fine_label_names": [f"f{i}" for i in range(100)],
                                   "coarse_label_names": [f"g{i}" for i in range(20)]}
    d = root / folder
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, f in enumerate(files):
        data = rs.randint(0, 256, (n, 3072)).astype(np.uint8)
        labels = [int(v) for v in (np.arange(n) + i) % classes]
        batch = {"batch_label": f, label_key: labels, "data": data, "filenames": [f"{j}.png" for j in range(n)]}
        if name == "cifar100":
            batch["coarse_labels"] = [v // 5 for v in labels]
        (d / f).write_bytes(pickle.dumps(batch, protocol=2))
        out[f] = (data, labels)
    (d / meta_file).write_bytes(pickle.dumps(meta, protocol=2))
    return out


# --------------------------------------------------------------------------- real data
@pytest.fixture(scope="module")
def mnist(real_data_root: Path) -> Dataset:
    return load_dataset("mnist", str(real_data_root))


@pytest.fixture(scope="module")
def cifar10(real_data_root: Path) -> Dataset:
    return load_dataset("cifar10", str(real_data_root))


def test_real_mnist(mnist: Dataset) -> None:
    assert (len(mnist.train), len(mnist.test)) == (60000, 10000)
    assert mnist.input_shape == (1, 28, 28) and mnist.num_outputs == 10 and mnist.task == "classification"
    assert mnist.train.x.shape == (60000, 1, 28, 28) and mnist.train.x.dtype == torch.uint8
    assert mnist.train.y.dtype == torch.int64
    assert torch.bincount(mnist.train.y).tolist() == MNIST_TRAIN_COUNTS
    assert torch.bincount(mnist.test.y).tolist() == MNIST_TEST_COUNTS
    fp = mnist.fingerprint
    assert fp["release"] == "canonical" and fp["canonical"] is True
    assert sorted(fp["files"]) == sorted(f"MNIST/raw/{n}" for n in IDX_NAMES)  # plain files preferred
    assert fp["sha256"] == combined_sha256(fp["files"])
    assert mnist.mean == (0.1307,) and mnist.std == (0.3081,)


def test_real_fashion_mnist(real_data_root: Path) -> None:
    d = load_dataset("fashion-mnist", str(real_data_root))
    assert d.train.x.shape == (60000, 1, 28, 28) and d.test.x.shape == (10000, 1, 28, 28)
    assert torch.bincount(d.train.y).tolist() == [6000] * 10
    assert torch.bincount(d.test.y).tolist() == [1000] * 10
    assert d.fingerprint["release"] == "canonical" and d.fingerprint["canonical"] is True


def test_real_mnist_from_gz_only(real_data_root: Path, mnist: Dataset, tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for n in IDX_NAMES:
        (raw / f"{n}.gz").symlink_to(real_data_root / "MNIST" / "raw" / f"{n}.gz")
    d = load_dataset("mnist", str(tmp_path))
    assert d.fingerprint["release"] == "canonical"
    assert sorted(d.fingerprint["files"]) == sorted(f"MNIST/raw/{n}.gz" for n in IDX_NAMES)
    assert torch.equal(d.train.x, mnist.train.x) and torch.equal(d.test.y, mnist.test.y)


def test_real_cifar10_is_the_jpeg_copy(cifar10: Dataset) -> None:
    assert (len(cifar10.train), len(cifar10.test)) == (50000, 10000)
    assert cifar10.input_shape == (3, 32, 32) and cifar10.train.x.dtype == torch.uint8
    assert torch.bincount(cifar10.test.y).tolist() == [1000] * 10
    assert torch.bincount(cifar10.train.y).tolist() == [5000] * 10
    fp = cifar10.fingerprint
    assert fp["release"] == "cifar10-jpeg-q75-copy" and fp["canonical"] is False
    assert fp["note"] == JPEG_COPY_NOTE
    assert len(fp["files"]) == 7 and "cifar-10-batches-py/batches.meta" in fp["files"]
    # R, G, B planes in the right order: channel means match the published constants.
    means = (cifar10.test.x.float() / 255).mean(dim=(0, 2, 3))
    assert torch.allclose(means, torch.tensor(cifar10.mean), atol=0.01)


def test_real_cifar10_val_split(real_data_root: Path) -> None:
    d = load_dataset("cifar10", str(real_data_root), val_size=5000, train_subset=10000, test_subset=2000)
    assert torch.bincount(d.val.y).tolist() == [500] * 10
    assert torch.bincount(d.train.y).tolist() == [1000] * 10
    assert torch.bincount(d.test.y).tolist() == [200] * 10


# --------------------------------------------------------------------------- tiny files
def test_tiny_cifar10(tmp_path: Path) -> None:
    written = write_cifar(tmp_path, "cifar10", n=12)
    d = load_dataset("cifar10", str(tmp_path))
    assert d.train.x.shape == (60, 3, 32, 32) and d.test.x.shape == (12, 3, 32, 32)
    data, labels = written["data_batch_2"]
    x, y = d.train.x[12:24], d.train.y[12:24]
    assert y.tolist() == labels
    # pixel (c, h, w) of image i is row i, column c*1024 + h*32 + w
    assert x[3, 2, 5, 7] == data[3, 2 * 1024 + 5 * 32 + 7]
    assert torch.equal(x.reshape(12, -1), torch.from_numpy(data))
    fp = d.fingerprint
    assert fp["release"] == "unknown" and fp["canonical"] is False
    folder = tmp_path / "cifar-10-batches-py"
    assert fp["files"] == {f"cifar-10-batches-py/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest()
                           for p in folder.iterdir()}
    lines = "".join(f"{k}:{v}\n" for k, v in sorted(fp["files"].items()))
    assert fp["sha256"] == hashlib.sha256(lines.encode()).hexdigest()


def test_tiny_cifar100(tmp_path: Path) -> None:
    written = write_cifar(tmp_path, "cifar100", n=150)
    d = load_dataset("cifar100", str(tmp_path))
    assert d.num_outputs == 100 and d.input_shape == (3, 32, 32)
    assert d.train.y.tolist() == written["train"][1] and d.test.y.tolist() == written["test"][1]
    assert d.mean == (0.5071, 0.4865, 0.4409)
    assert d.fingerprint["release"] == "unknown"
    assert sorted(d.fingerprint["files"]) == [f"cifar-100-python/{n}" for n in ("meta", "test", "train")]


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST/raw"), ("fashion-mnist", "FashionMNIST/raw")])
@pytest.mark.parametrize("gz", [False, True])
def test_tiny_idx(tmp_path: Path, name: str, folder: str, gz: bool) -> None:
    arrays = write_idx(tmp_path, folder, gz=gz, plain=not gz)
    d = load_dataset(name, str(tmp_path))
    assert d.train.x.shape == (30, 1, 28, 28) and d.test.x.shape == (20, 1, 28, 28)
    assert torch.equal(d.train.x[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"]).to(torch.uint8))
    assert d.test.y.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert d.fingerprint["release"] == "unknown"
    suffix = ".gz" if gz else ""
    assert sorted(d.fingerprint["files"]) == sorted(f"{folder}/{n}{suffix}" for n in IDX_NAMES)


def test_idx_prefers_plain_over_gz(tmp_path: Path) -> None:
    write_idx(tmp_path, gz=True, plain=False, seed=1)
    plain = write_idx(tmp_path, gz=False, plain=True, seed=2)
    d = load_dataset("mnist", str(tmp_path))
    assert torch.equal(d.test.x[:, 0], torch.from_numpy(plain["t10k-images-idx3-ubyte"]).to(torch.uint8))


def _corrupt_idx(root: Path, name: str, mutate) -> Path:
    path = root / "MNIST/raw" / name
    path.write_bytes(mutate(path.read_bytes()))
    return path


CORRUPTIONS = {
    "idx bad magic": lambda r: _corrupt_idx(r, "train-images-idx3-ubyte", lambda b: b"\x00\x00\x08\x04" + b[4:]),
    "idx truncated": lambda r: _corrupt_idx(r, "t10k-images-idx3-ubyte", lambda b: b[:-100]),
    "idx trailing bytes": lambda r: _corrupt_idx(r, "t10k-labels-idx1-ubyte", lambda b: b + b"\x00"),
    "idx wrong dims": lambda r: _corrupt_idx(
        r, "t10k-images-idx3-ubyte", lambda b: idx_bytes(np.zeros((20, 14, 56), np.uint8))),
    "idx count mismatch": lambda r: _corrupt_idx(
        r, "train-labels-idx1-ubyte", lambda b: idx_bytes(np.zeros(29, np.uint8))),
    "idx label out of range": lambda r: _corrupt_idx(
        r, "train-labels-idx1-ubyte", lambda b: idx_bytes(np.full(30, 10, np.uint8))),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_idx_names_the_file(tmp_path: Path, case: str) -> None:
    write_idx(tmp_path)
    path = CORRUPTIONS[case](tmp_path)
    with pytest.raises(DatasetError, match="corrupt") as err:
        load_dataset("mnist", str(tmp_path))
    assert str(path) in str(err.value) and "download" in str(err.value)


def test_corrupt_gz_names_the_file(tmp_path: Path) -> None:
    write_idx(tmp_path, gz=True, plain=False)
    path = tmp_path / "MNIST/raw/t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(DatasetError, match="corrupt") as err:
        load_dataset("mnist", str(tmp_path))
    assert str(path) in str(err.value)


class _Evil:
    def __reduce__(self):
        return (print, ("this must not run",))


def _rewrite_batch(path: Path, change) -> None:
    batch = pickle.loads(path.read_bytes(), encoding="latin1")
    path.write_bytes(pickle.dumps(change(batch), protocol=2))


PICKLE_CORRUPTIONS = {
    "truncated pickle": lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
    "not a pickle": lambda p: p.write_bytes(b"<html>404 Not Found</html>"),
    "missing key": lambda p: _rewrite_batch(p, lambda b: {k: v for k, v in b.items() if k != "labels"}),
    "label out of range": lambda p: _rewrite_batch(p, lambda b: {**b, "labels": [10] * len(b["labels"])}),
    "label count": lambda p: _rewrite_batch(p, lambda b: {**b, "labels": b["labels"][:-1]}),
    "bad data shape": lambda p: _rewrite_batch(p, lambda b: {**b, "data": b["data"].reshape(-1, 1024)}),
    "code in pickle": lambda p: p.write_bytes(pickle.dumps({"data": _Evil(), "labels": []}, protocol=2)),
}


@pytest.mark.parametrize("case", sorted(PICKLE_CORRUPTIONS))
def test_corrupt_cifar_names_the_file(tmp_path: Path, case: str) -> None:
    write_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    PICKLE_CORRUPTIONS[case](path)
    with pytest.raises(DatasetError, match="corrupt") as err:
        load_dataset("cifar10", str(tmp_path))
    assert str(path) in str(err.value)


def test_corrupt_cifar100_meta(tmp_path: Path) -> None:
    write_cifar(tmp_path, "cifar100")
    path = tmp_path / "cifar-100-python" / "meta"
    path.write_bytes(pickle.dumps({"coarse_label_names": []}, protocol=2))
    with pytest.raises(DatasetError, match="fine_label_names") as err:
        load_dataset("cifar100", str(tmp_path))
    assert str(path) in str(err.value)


# --------------------------------------------------------------------------- missing / names / root
@pytest.mark.parametrize("name", ["cifar10", "cifar100", "mnist", "fashion-mnist"])
def test_missing_dataset_lists_expected_files(tmp_path: Path, name: str) -> None:
    with pytest.raises(DatasetError) as err:
        load_dataset(name, str(tmp_path))
    msg = str(err.value)
    expected = {"cifar10": tmp_path / "cifar-10-batches-py" / "test_batch",
                "cifar100": tmp_path / "cifar-100-python" / "train",
                "mnist": tmp_path / "MNIST/raw/train-images-idx3-ubyte",
                "fashion-mnist": tmp_path / "FashionMNIST/raw/t10k-labels-idx1-ubyte"}[name]
    assert str(expected) in msg
    for needle in ("dataset.root=PATH", "$GROWBENCH_DATA", "dataset.download=true", "growbench[download]"):
        assert needle in msg
    assert ("cs.toronto.edu" in msg) if name.startswith("cifar") else ("amazonaws.com" in msg)


def test_partly_missing_marks_the_missing_file(tmp_path: Path) -> None:
    write_idx(tmp_path)
    (tmp_path / "MNIST/raw/t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte \(or the same name \+ \.gz\)  \(missing\)"):
        load_dataset("mnist", str(tmp_path))


def test_download_without_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes `import torchvision` fail
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    with pytest.raises(DatasetError, match=r"needs torchvision.*pip install growbench\[download\]"):
        load_dataset("mnist", str(tmp_path), download=True)


def _fake_torchvision(monkeypatch: pytest.MonkeyPatch, mnist_class: type) -> None:
    datasets = types.ModuleType("torchvision.datasets")
    datasets.CIFAR10 = datasets.CIFAR100 = datasets.FashionMNIST = None
    datasets.MNIST = mnist_class
    tv = types.ModuleType("torchvision")
    tv.datasets = datasets
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", datasets)


def test_download_uses_torchvision_then_our_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    class FakeMNIST:
        def __init__(self, root: str, train: bool, download: bool) -> None:
            calls.append((root, train, download))
            write_idx(Path(root), gz=True, plain=True)

    _fake_torchvision(monkeypatch, FakeMNIST)
    d = load_dataset("mnist", str(tmp_path / "data"), download=True)
    assert calls == [(str(tmp_path / "data"), True, True), (str(tmp_path / "data"), False, True)]
    assert len(d.train) == 30 and d.fingerprint["release"] == "unknown"
    load_dataset("mnist", str(tmp_path / "data"), download=True)  # files present: no second download
    assert len(calls) == 2


def test_download_failure_is_a_dataset_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class OfflineMNIST:
        def __init__(self, root: str, train: bool, download: bool) -> None:
            raise OSError("Network is unreachable")

    _fake_torchvision(monkeypatch, OfflineMNIST)
    with pytest.raises(DatasetError, match="(?s)Network is unreachable.*dataset.root=PATH"):
        load_dataset("mnist", str(tmp_path), download=True)


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(DatasetError) as err:
        load_dataset("imagenet")
    assert all(n in str(err.value) for n in DATASETS)


def test_resolve_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GROWBENCH_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_root(str(tmp_path / "explicit")) == tmp_path / "explicit"
    assert resolve_root(None) == tmp_path / "env"
    monkeypatch.delenv("GROWBENCH_DATA")
    assert resolve_root(None) == tmp_path / "xdg" / "growbench" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert resolve_root(None) == Path.home() / ".cache" / "growbench" / "data"


# --------------------------------------------------------------------------- subsets and validation
def _rows(split) -> set[bytes]:
    return {row.numpy().tobytes() for row in split.x}


def test_subsets_are_deterministic_and_seed_independent() -> None:
    torch.manual_seed(1)
    a = load_dataset("toy-spirals", val_size=300, train_subset=1000, test_subset=500)
    torch.manual_seed(2)
    np.random.seed(2)
    b = load_dataset("toy-spirals", val_size=300, train_subset=1000, test_subset=500)
    for sa, sb in ((a.train, b.train), (a.val, b.val), (a.test, b.test)):
        assert torch.equal(sa.x, sb.x) and torch.equal(sa.y, sb.y)


def test_subsets_are_stratified_disjoint_and_nested() -> None:
    full = load_dataset("toy-spirals")
    d = load_dataset("toy-spirals", val_size=30, train_subset=301, test_subset=100)
    assert torch.bincount(d.val.y).tolist() == [10, 10, 10]
    assert torch.bincount(d.train.y).tolist() == [101, 100, 100]
    assert torch.bincount(d.test.y).tolist() == [34, 33, 33]
    assert not _rows(d.val) & _rows(d.train)
    # val comes out of the full training set, before train_subset: it does not depend on it
    only_val = load_dataset("toy-spirals", val_size=30)
    assert torch.equal(only_val.val.x, d.val.x)
    assert _rows(only_val.val) | _rows(only_val.train) == _rows(full.train)
    assert len(only_val.train) == len(full.train) - 30
    # a larger subset contains a smaller one
    bigger = load_dataset("toy-spirals", val_size=30, train_subset=900)
    assert _rows(d.train) <= _rows(bigger.train)


def test_subset_of_regression_toy() -> None:
    d = load_dataset("toy-regression", val_size=200, train_subset=500, test_subset=100)
    assert (len(d.train), len(d.val), len(d.test)) == (500, 200, 100)
    assert d.train.y.shape == (500, 1) and not _rows(d.val) & _rows(d.train)


def test_balanced_quota_with_small_classes() -> None:
    assert _balanced_quota([2, 10, 10], 12) == [2, 5, 5]
    assert _balanced_quota([2, 10, 10], 13) == [2, 6, 5]
    assert _balanced_quota([5, 5, 5], 15) == [5, 5, 5]
    for k in range(0, 21):  # grows monotonically, so subsets nest
        assert all(a <= b for a, b in zip(_balanced_quota([2, 7, 12], k), _balanced_quota([2, 7, 12], k + 1)))


def test_val_split_from_tiny_files(tmp_path: Path) -> None:
    write_idx(tmp_path, n_train=100)
    d = load_dataset("mnist", str(tmp_path), val_size=20, train_subset=50)
    assert torch.bincount(d.val.y).tolist() == [2] * 10
    assert torch.bincount(d.train.y).tolist() == [5] * 10
    assert not _rows(d.val) & _rows(d.train)


@pytest.mark.parametrize("kwargs,key", [
    ({"train_subset": -1}, "dataset.train_subset"),
    ({"train_subset": 0}, "dataset.train_subset"),
    ({"train_subset": 3001}, "dataset.train_subset"),
    ({"train_subset": 2990, "val_size": 20}, "dataset.train_subset"),
    ({"train_subset": "100"}, "dataset.train_subset"),
    ({"train_subset": True}, "dataset.train_subset"),
    ({"val_size": -5}, "dataset.val_size"),
    ({"val_size": 3000}, "dataset.val_size"),
    ({"val_size": 1.5}, "dataset.val_size"),
    ({"test_subset": 1001}, "dataset.test_subset"),
    ({"test_subset": -1}, "dataset.test_subset"),
])
def test_bad_sizes(kwargs: dict, key: str) -> None:
    with pytest.raises(DatasetError, match=key.replace(".", r"\.")):
        load_dataset("toy-spirals", **kwargs)


# --------------------------------------------------------------------------- toys
@pytest.mark.parametrize("name", ["toy-spirals", "toy-regression"])
def test_toys_are_deterministic(name: str) -> None:
    a, b = load_dataset(name), load_dataset(name)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    assert a.fingerprint == b.fingerprint
    assert a.fingerprint["release"] == "synthetic" and a.fingerprint["canonical"] is True
    assert a.fingerprint["generator"] == f"{name}-v1" and a.fingerprint["files"] == {}
    assert len(a.fingerprint["sha256"]) == 64
    assert a.mean is None and a.std is None and a.val is None
    assert a.train.x.dtype == torch.float32
    assert torch.allclose(a.train.x.mean(0), torch.zeros(a.input_shape), atol=1e-4)
    assert torch.allclose(a.train.x.std(0), torch.ones(a.input_shape), atol=1e-3)


def test_toy_shapes() -> None:
    s = load_dataset("toy-spirals")
    assert s.task == "classification" and s.input_shape == (2,) and s.num_outputs == 3
    assert s.train.x.shape == (3000, 2) and s.test.x.shape == (1000, 2) and s.train.y.dtype == torch.int64
    assert torch.bincount(s.train.y).tolist() == [1000] * 3
    r = load_dataset("toy-regression")
    assert r.task == "regression" and r.input_shape == (1,) and r.num_outputs == 1
    assert r.train.x.shape == (2000, 1) and r.train.y.shape == (2000, 1) and r.train.y.dtype == torch.float32
    assert r.test.x.shape == (1000, 1)


def _fit_mse(d: Dataset, hidden: int) -> float:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(1000):
        loss = torch.nn.functional.mse_loss(model(d.train.x), d.train.y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model(d.test.x), d.test.y).item()


def test_toy_regression_needs_capacity() -> None:
    d = load_dataset("toy-regression")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: extra threads only add contention on a busy machine
    try:
        small, large = _fit_mse(d, 2), _fit_mse(d, 32)
    finally:
        torch.set_num_threads(threads)
    assert small > 0.2  # the targets' variance is about 0.7
    assert large < 0.03  # the noise floor is 0.01


def test_dataset_to_moves_every_tensor() -> None:
    d = load_dataset("toy-spirals", val_size=30)
    m = d.to("meta")
    for split in (m.train, m.val, m.test):
        assert split.x.device.type == "meta" and split.y.device.type == "meta"
    assert d.train.x.device.type == "cpu" and m.fingerprint == d.fingerprint


# --------------------------------------------------------------------------- augmentation
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(b: int = 16) -> torch.Tensor:
    return torch.rand(b, 3, 8, 8, generator=_gen(123)) + 0.1  # nonzero, so padding is recognisable


def test_augment_is_deterministic_per_seed() -> None:
    x = _images(64)
    assert torch.equal(random_crop(x, 2, _gen(0)), random_crop(x, 2, _gen(0)))
    assert not torch.equal(random_crop(x, 2, _gen(0)), random_crop(x, 2, _gen(1)))
    assert torch.equal(random_flip(x, _gen(0)), random_flip(x, _gen(0)))
    assert not torch.equal(random_flip(x, _gen(0)), random_flip(x, _gen(1)))


def test_random_crop_windows() -> None:
    x = _images(32)
    out = random_crop(x, 2, _gen(5))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(random_crop(x, 0, _gen(5)), x)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    offsets = set()
    for i in range(len(x)):  # each output is some 8x8 window of its own padded input
        hits = [(dy, dx) for dy in range(5) for dx in range(5)
                if torch.equal(out[i], padded[i, :, dy:dy + 8, dx:dx + 8])]
        assert hits
        offsets.add(hits[0])
    assert len(offsets) > 5  # offsets differ per sample
    assert torch.equal(random_crop(x.to(torch.uint8), 2, _gen(5)), random_crop(x, 2, _gen(5)).to(torch.uint8))


def test_random_flip() -> None:
    x = _images(64)
    out = random_flip(x, _gen(3))
    flipped = [torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)]
    kept = [torch.equal(o, xi) for o, xi in zip(out, x)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 10 < sum(flipped) < 54
    assert torch.equal(random_flip(out, _gen(3)), x)  # the same mask twice undoes it


class _CountOps(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("augment", [lambda x, g: random_crop(x, 4, g), random_flip])
def test_augment_has_no_per_sample_loop(augment) -> None:
    counts = []
    for b in (2, 256):
        with _CountOps() as mode:
            augment(_images(b), _gen(0))
        counts.append(mode.calls)
    assert counts[0] == counts[1]


def test_normalize() -> None:
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    out = normalize(x, (0.0, 0.2, 0.5), (1.0, 0.5, 0.25))
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([0.0, 0.0, 2.0]))
    with pytest.raises(TypeError):
        normalize(x.float(), (0.0,), (1.0,))
