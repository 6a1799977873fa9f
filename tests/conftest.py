"""Shared fixtures: the real data sets, materialised once per machine from shared/data."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def real_data_root() -> Path:
    """A folder holding CIFAR-10, MNIST and Fashion-MNIST in their standard layouts.

    shared/data/materialize.py writes them from the compact copies in the shared data
    folder ($GROWBENCH_SHARED_DATA, else <repo>/../shared/data) into
    $GROWBENCH_TEST_CACHE (else ~/.cache/growbench-test-data). It is idempotent:
    about 8 s the first time, under a second after that.
    """
    shared = Path(os.environ.get("GROWBENCH_SHARED_DATA") or REPO.parent / "shared" / "data")
    script = shared / "materialize.py"
    if not script.is_file():
        pytest.skip(f"real data sets not available: {script} not found "
                    "(set $GROWBENCH_SHARED_DATA to the shared data folder)")
    cache = Path(os.environ.get("GROWBENCH_TEST_CACHE") or Path.home() / ".cache" / "growbench-test-data")
    # This interpreter, not whatever python3 is on PATH: it must have numpy and Pillow.
    proc = subprocess.run([sys.executable, str(script), str(cache)], capture_output=True, text=True)
    if proc.returncode == 2:
        pytest.skip(f"materialize.py cannot run here: {proc.stderr.strip()}")
    if proc.returncode != 0:
        pytest.fail(f"materialize.py {cache} failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return cache
