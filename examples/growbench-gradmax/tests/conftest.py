"""The real MNIST files, when this example sits in a growbench checkout with the shared data beside it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]  # growbench checkout: examples/growbench-gradmax/tests/..


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny networks on shared CPU cores: one torch thread is the fastest."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """A folder with MNIST in torchvision's layout: $GROWBENCH_TEST_CACHE (else ~/.cache/growbench-test-data),
    written by the shared data's materialize.py when missing (as growbench's own tests do)."""
    cache = Path(os.environ.get("GROWBENCH_TEST_CACHE") or Path.home() / ".cache" / "growbench-test-data")
    shared = Path(os.environ.get("GROWBENCH_SHARED_DATA") or REPO.parent / "shared" / "data")
    script = shared / "materialize.py"
    if not (cache / "MNIST").is_dir():
        if not script.is_file():
            pytest.skip(f"MNIST not available: {cache / 'MNIST'} missing and {script} not found")
        proc = subprocess.run([sys.executable, str(script), str(cache)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"materialize.py could not write the data sets: {proc.stderr.strip()[-300:]}")
    return cache
