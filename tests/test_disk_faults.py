"""A full disk or a read-only output folder: one error line naming the path, earlier outputs intact,
and a rerun once there is room completes.

The test mounts its own small tmpfs (the suite runs as root on the CI machine), so the disk really is
full (ENOSPC) or really read-only (EROFS), not merely chmod-ed. Mutations checked: ``atomic_path`` no
longer translating OSError (a traceback, exit 1 without the one line); the temporary file not removed
on failure (the full disk keeps a ``.tmp`` file). The read-only case fails at ``mkstemp``, before any byte.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest



@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def _scores(path: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    pd.DataFrame({"uid": [f"{i:032x}" for i in rng.choice(2**62, n, replace=False)],
                  "score": rng.normal(size=n)}).to_parquet(path)
    return path


def _sample(scores: Path, out: Path, seed: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flyt.cli", "sample", "--scores", str(scores), "--method", "scs",
                           "--total_size", "20000", "--seed", str(seed), "--output", str(out)],
                          capture_output=True, text=True, timeout=300)


def _fill(disk: Path, leave: int) -> Path:
    """Take all but ``leave`` bytes of the disk."""
    import shutil

    filler = disk / "filler"
    filler.write_bytes(b"\0" * max(0, shutil.disk_usage(disk).free - leave))
    return filler


def test_sample_onto_a_full_disk(tmp_path, small_disk):
    scores = _scores(tmp_path / "scores.parquet", 30000)
    out = small_disk / "subset.npy"
    assert _sample(scores, out, seed=0).returncode == 0
    good = out.read_bytes()
    filler = _fill(small_disk, leave=4096)
    failed = _sample(scores, out, seed=1)
    errors = [line for line in failed.stderr.splitlines() if "error:" in line]
    assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr[-2000:]
    assert len(errors) == 1 and "No space left on device" in errors[0] and str(small_disk) in errors[0]
    assert out.read_bytes() == good  # the previous subset is intact
    assert not list(small_disk.glob(".*.tmp"))  # and no half-written temporary is left behind
    filler.unlink()
    assert _sample(scores, out, seed=1).returncode == 0
    assert out.read_bytes() != good


def test_sample_into_a_read_only_folder(tmp_path, small_disk):
    scores = _scores(tmp_path / "scores.parquet", 3000)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    failed = _sample(scores, small_disk / "subset.npy", seed=0)
    errors = [line for line in failed.stderr.splitlines() if "error:" in line]
    assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr[-2000:]
    assert len(errors) == 1 and "Read-only file system" in errors[0] and str(small_disk) in errors[0]
    subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    assert _sample(scores, small_disk / "subset.npy", seed=0).returncode == 0
