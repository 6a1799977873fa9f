"""Dataset fingerprints: which bytes a run was trained on.

Every run record carries one, so results made on different copies of a data set
(the canonical release, our offline JPEG copy of CIFAR-10, anything else) are never
mixed up silently. Hashes are computed while the files are read (one pass, sha256
and md5 together), so fingerprinting costs no extra I/O.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

_CHUNK = 1 << 20


@dataclass(frozen=True)
class FileHash:
    sha256: str
    md5: str


def read_hashed(path: Path) -> tuple[bytes, FileHash]:
    """Read a whole file once, hashing it on the way (sha256 and md5 in the same pass)."""
    sha, md5 = hashlib.sha256(), hashlib.md5()
    chunks = []
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
            md5.update(chunk)
            chunks.append(chunk)
    return b"".join(chunks), FileHash(sha.hexdigest(), md5.hexdigest())


@dataclass(frozen=True)
class Release:
    """A known set of files, recognised by md5 (any file) or sha256 (files torchvision lists by md5 only as .gz)."""

    name: str
    canonical: bool
    note: str
    md5: dict[str, str]
    sha256: dict[str, str]

    def matches(self, name: str, h: FileHash) -> bool:
        return self.md5.get(name) == h.md5 or self.sha256.get(name) == h.sha256


# Canonical batch md5s of cifar-10-python.tar.gz (as in torchvision and
# shared/data/cifar10-canonical-labels.json).
CIFAR10_CANONICAL_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}
# The offline copy written by shared/data/materialize.py: canonical order, labels
# and batches.meta, but pixels decoded from JPEGs (quality about 75).
CIFAR10_JPEG_COPY_MD5 = {
    "data_batch_1": "17dd4947a234af954649b24becbcc5eb",
    "data_batch_2": "7d4fcc0cc5a894056c3dadd4cb32b9c5",
    "data_batch_3": "13deb634f82ead1d12f72b28de8bdcac",
    "data_batch_4": "26bbcc915f80f3158a9bc202b6085d92",
    "data_batch_5": "a990c34d08ac215b5f21a245ec5dd139",
    "test_batch": "771d8ce78175e9b2c377f48e3b224c2a",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}
CIFAR100_CANONICAL_MD5 = {
    "train": "16019d7e3df5f24257cddd939b257f8d",
    "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    "meta": "7973b15100ade9c7d40fb424638fde48",
}
# torchvision's md5s of the .gz files; the decompressed files by their sha256.
MNIST_CANONICAL_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
MNIST_CANONICAL_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
FASHION_CANONICAL_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
FASHION_CANONICAL_SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}

JPEG_COPY_NOTE = ("CIFAR-10 (JPEG q≈75 copy, canonical order): accuracies are close to but not "
                  "the same as canonical CIFAR-10")

_PRETTY = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}


def _canonical(dataset: str, md5: dict[str, str], sha256: dict[str, str] | None = None) -> Release:
    note = f"canonical {_PRETTY[dataset]} release (all file checksums match)"
    return Release("canonical", True, note, md5, sha256 or {})


KNOWN_RELEASES: dict[str, list[Release]] = {
    "cifar10": [
        _canonical("cifar10", CIFAR10_CANONICAL_MD5),
        Release("cifar10-jpeg-q75-copy", False, JPEG_COPY_NOTE, CIFAR10_JPEG_COPY_MD5, {}),
    ],
    "cifar100": [_canonical("cifar100", CIFAR100_CANONICAL_MD5)],
    "mnist": [_canonical("mnist", MNIST_CANONICAL_MD5, MNIST_CANONICAL_SHA256)],
    "fashion-mnist": [_canonical("fashion-mnist", FASHION_CANONICAL_MD5, FASHION_CANONICAL_SHA256)],
}


def combined_sha256(files: dict[str, str]) -> str:
    """sha256 over the sorted "relative_path:sha256" lines, each ending in a newline."""
    lines = "".join(f"{line}\n" for line in sorted(f"{rel}:{sha}" for rel, sha in files.items()))
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


def file_fingerprint(dataset: str, hashes: dict[str, FileHash]) -> dict:
    """Fingerprint of a data set read from files; `hashes` is keyed by path relative to the root.

    The release is the first known one that every file matches (by its base name),
    else "unknown".
    """
    files = {rel: h.sha256 for rel, h in sorted(hashes.items())}
    release, canonical = "unknown", False
    note = (f"{_PRETTY.get(dataset, dataset)}: the files match no known release; results may not be "
            "comparable with published numbers")
    for known in KNOWN_RELEASES.get(dataset, []):
        if hashes and all(known.matches(rel.rsplit("/", 1)[-1], h) for rel, h in hashes.items()):
            release, canonical, note = known.name, known.canonical, known.note
            break
    return {"files": files, "sha256": combined_sha256(files), "canonical": canonical,
            "release": release, "note": note}


def toy_fingerprint(generator: str, tensors: list[torch.Tensor]) -> dict:
    """Fingerprint of generated data: sha256 of the tensors' bytes, in the order given."""
    sha = hashlib.sha256()
    for t in tensors:
        sha.update(t.detach().cpu().contiguous().numpy().tobytes())
    return {"files": {}, "sha256": sha.hexdigest(), "canonical": True, "release": "synthetic",
            "generator": generator, "note": f"synthetic data made in code by {generator}"}
