"""One JSON record per cell, written atomically; reading tolerates corrupt or foreign files.

A record is written once, when its cell ends (ok or failed), through a temporary file in the same
folder that is fsynced and renamed into place: a killed run leaves either the complete record or
nothing, and a full disk leaves the previous state intact.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

SCHEMA_VERSION = 1
KIND = "growbench.cell"

# key -> type(s) a valid record must have there (None allowed where listed)
REQUIRED = {
    "schema": int, "kind": str, "suite": str, "method": str, "seed": int, "config_hash": str,
    "config": dict, "dataset": dict, "env": dict, "status": str, "curve": list, "events": list, "final": dict,
}
CURVE_KEYS = ("step", "epoch", "samples", "wall_train", "wall_growth", "wall_eval", "train_flops",
              "growth_flops", "params", "train_loss", "test_loss", "test_acc")
FINAL_KEYS = ("test_acc", "test_loss", "params", "inference_flops", "train_flops", "growth_flops",
              "wall_train", "wall_growth", "wall_total")


class RecordError(Exception):
    """A results file that is not a valid growbench record (corrupt, foreign, or another schema)."""


class RecordWriteError(Exception):
    """Writing a record failed (e.g. disk full); nothing already recorded was changed."""


def record_path(results_dir: str | Path, suite: str, dataset: str, method: str, seed: int, config_hash: str) -> Path:
    """results/runs/<suite>/<dataset>/<method>/seed<seed>-<hash12>.json (the hash is the cell's whole config)."""
    return Path(results_dir) / "runs" / suite / dataset / method / f"seed{seed}-{config_hash[:12]}.json"


def validate(rec: object) -> list[str]:
    """Problems that make `rec` unusable as a record; empty when valid."""
    if not isinstance(rec, dict):
        return ["not a JSON object"]
    if rec.get("kind") != KIND:
        return [f"not a growbench cell record (kind={rec.get('kind')!r})"]
    if rec.get("schema") != SCHEMA_VERSION:
        return [f"schema version {rec.get('schema')!r}, this growbench reads {SCHEMA_VERSION}"]
    problems = [f"missing or mistyped key {k!r}" for k, t in REQUIRED.items() if not isinstance(rec.get(k), t)]
    if problems:
        return problems
    if rec["status"] not in ("ok", "failed"):
        problems.append(f"status {rec['status']!r} is not ok/failed")
    if rec["status"] == "ok":
        if not rec["curve"]:
            problems.append("an ok record has an empty curve")
        for i, row in enumerate(rec["curve"]):
            missing = [k for k in CURVE_KEYS if k not in row]
            if missing:
                problems.append(f"curve[{i}] lacks {', '.join(missing)}")
                break
        missing = [k for k in FINAL_KEYS if k not in rec["final"]]
        if missing:
            problems.append(f"final lacks {', '.join(missing)}")
    elif not isinstance(rec.get("failure"), dict):
        problems.append("a failed record needs a failure {reason, message}")
    return problems


def read_record(path: Path) -> dict:
    try:
        rec = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecordError(f"{path}: unreadable ({e.__class__.__name__}: {e})") from None
    problems = validate(rec)
    if problems:
        raise RecordError(f"{path}: {'; '.join(problems)}")
    return rec


def write_record(path: Path, rec: dict) -> None:
    problems = validate(rec)
    if problems:
        raise ValueError(f"refusing to write an invalid record: {'; '.join(problems)}")
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".json", dir=path.parent)
    except OSError as e:
        raise RecordWriteError(f"cannot write {path}: {e.strerror or e}; free space or fix permissions, "
                               "then rerun (finished cells are kept)") from None
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(rec, f, indent=1, sort_keys=False, allow_nan=False, default=_json_default)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except (OSError, ValueError) as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, ValueError):
            raise
        raise RecordWriteError(f"cannot write {path}: {e.strerror or e}; free space or fix permissions, "
                               "then rerun (finished cells are kept)") from None


def temp_prefix(path: Path) -> str:
    """Temporary files of an atomic write of `path` are named .tmp-<stem>-*: scans skip them, and the
    process holding the cell's lock may delete them (they were left by a process killed mid-write)."""
    return f".tmp-{Path(path).stem}-"


def remove_stale_temp_files(path: Path) -> None:
    path = Path(path)
    if path.parent.is_dir():
        for p in path.parent.glob(temp_prefix(path) + "*"):
            try:
                p.unlink()
            except OSError:
                pass


def _json_default(o: object) -> object:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def scan(results_dir: str | Path, suite: str | None = None) -> tuple[list[dict], list[str]]:
    """All valid records under results/runs (of one suite if given), and one message per bad file."""
    root = Path(results_dir) / "runs"
    if suite is not None:
        root = root / suite
    records, problems = [], []
    if not root.is_dir():
        return records, problems
    for p in sorted(root.rglob("*.json")):
        if p.name.startswith(".tmp-") or "attempts" in p.parts:
            continue
        try:
            rec = read_record(p)
        except RecordError as e:
            problems.append(f"skipped {e}")
            continue
        rec["_path"] = str(p)
        records.append(rec)
    return records, problems


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@lru_cache(maxsize=1)
def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str) -> dict:
    import numpy
    import torch

    import growbench

    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") and torch.cuda.is_available() else None
    return {
        "growbench": growbench.__version__, "git_commit": _git_commit(), "torch": torch.__version__,
        "numpy": numpy.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "device": device, "cpu": _cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
    }
