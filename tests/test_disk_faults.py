"""A full disk or a read-only output folder: one error line naming the path, earlier outputs intact,
and a rerun once there is room completes.

The tests mount their own small tmpfs (the suite runs as root on the CI machine), so the disk really is
full (ENOSPC) or really read-only (EROFS), not merely chmod-ed. A full disk is made by a filler file that
leaves a counted number of 4 KiB pages, so a per-shard command fits its first shards and fails on the
next, always the same one. Mutations checked for ``flyt sample``: ``atomic_path`` no longer translating
OSError (a traceback, exit 1 without the one line); the temporary file not removed on failure (the full
disk keeps a ``.tmp`` file). The read-only case fails at ``mkstemp``, before any byte.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flyt.demo import toydata

CLI = [sys.executable, "-m", "flyt.cli"]
PAGE = 4096  # tmpfs allocates whole pages
FIELDS = ["informative", "noise_a", "noise_b"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: a second thread only waits on the shared cores


@contextlib.contextmanager
def tmpfs(mount: Path, size: int | str):
    mount.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.fixture
def small_disk(tmp_path):
    with tmpfs(tmp_path / "disk", "2m") as mount:
        yield mount


@contextlib.contextmanager
def read_only(mount: Path):
    subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(mount)], check=True)


def _cli(argv: list[str], capsys=None) -> subprocess.CompletedProcess:
    """The command in a subprocess, or (with pytest's ``capsys``) in this one, which spares the imports."""
    if capsys is None:
        return subprocess.run(argv, capture_output=True, text=True, timeout=300, env=ENV)
    from flyt.cli import main

    code = main(argv[len(CLI):])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out, err)


def one_error_line(done: subprocess.CompletedProcess, reason: str, where: Path) -> str:
    """Exit 1, no traceback, exactly one ``error:`` line naming a path under ``where``, then ``: reason``
    (the system's words, not a library's wrapping of them)."""
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert len(errors) == 1 and f"{where}" in errors[0] and f": {reason}" in errors[0], done.stderr[-2000:]
    return errors[0]


def _scores(path: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    pd.DataFrame({"uid": [f"{i:032x}" for i in rng.choice(2**62, n, replace=False)],
                  "score": rng.normal(size=n)}).to_parquet(path)
    return path


def _sample(scores: Path, out: Path, seed: int) -> subprocess.CompletedProcess:
    return _cli([*CLI, "sample", "--scores", str(scores), "--method", "scs", "--total_size", "20000",
                 "--seed", str(seed), "--output", str(out)])


def _fill(disk: Path, leave: int) -> Path:
    """Take all but ``leave`` bytes of the disk."""
    filler = disk / "filler"
    filler.write_bytes(b"\0" * max(0, shutil.disk_usage(disk).free - leave))
    return filler


def test_sample_onto_a_full_disk(tmp_path, small_disk):
    scores = _scores(tmp_path / "scores.parquet", 30000)
    out = small_disk / "subset.npy"
    assert _sample(scores, out, seed=0).returncode == 0
    good = out.read_bytes()
    filler = _fill(small_disk, leave=4096)
    one_error_line(_sample(scores, out, seed=1), "No space left on device", small_disk)
    assert out.read_bytes() == good  # the previous subset is intact
    assert not list(small_disk.glob(".*.tmp"))  # and no half-written temporary is left behind
    filler.unlink()
    assert _sample(scores, out, seed=1).returncode == 0
    assert out.read_bytes() != good


def test_sample_into_a_read_only_folder(tmp_path, small_disk):
    scores = _scores(tmp_path / "scores.parquet", 3000)
    with read_only(small_disk):
        one_error_line(_sample(scores, small_disk / "subset.npy", seed=0), "Read-only file system", small_disk)
    assert _sample(scores, small_disk / "subset.npy", seed=0).returncode == 0


# ------------------------------------------------------------------------- the per-shard commands


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> dict:
    """A 6-shard pool of 48 samples, its input scores, an M-FLYT mixer, a tiny CLIP (teacher and eval
    model), a subset for resharding and an eval task."""
    import torch

    from flyt.data.subset import save_subset
    from flyt.models.networks import ScorerSpec, build_scorer, create_clip

    root = tmp_path_factory.mktemp("disk_faults")
    df = toydata.write_pool(root / "pool", 48, n_shards=6, seed=0, n_broken=0)
    toydata.write_score_parquets(df, root / "scores", columns=FIELDS)
    torch.manual_seed(0)
    spec = ScorerSpec("mflyt", parquet_fields=FIELDS)
    torch.save({"state_dict": build_scorer(spec, mixer_init="random").state_dict(), "flyt": {"scorer": spec.to_dict()}},
               root / "mflyt.pt")
    torch.save({"state_dict": create_clip("flyt-tiny")[0].state_dict()}, root / "clip.pt")
    uids = df["uid"].tolist()[::2]
    save_subset(root / "subset.npy", uids, [1 + i % 2 for i in range(len(uids))])
    task = toydata.write_task(root / "tasks", layout="simple", n_train=1, n_test=8)
    return {"root": root, "task": task.eval_dir}


def _argv(pool: dict, command: str, out: Path) -> list[str]:
    root = pool["root"]
    return [*CLI, command, "--output", str(out), *{
        "score": ["--checkpoint", str(root / "mflyt.pt"), "--upstream_data_dir", str(root / "pool"),
                  "--parquet_dir", str(root / "scores"), "--workers", "2"],
        "features": ["--upstream_data_dir", str(root / "pool"), "--scores", "clip_score", "caption_words",
                     "--teacher", f"a=flyt-tiny:{root / 'clip.pt'}", "--save_embeddings", "--batch_size", "16",
                     "--workers", "0"],
        "reshard": ["--pool", str(root / "pool"), "--subset", str(root / "subset.npy"), "--shard_size", "8",
                    "--seed", "3", "--workers", "1"],
        "eval": ["--model", "flyt-tiny", "--checkpoint", str(root / "clip.pt"), "--tasks", str(pool["task"]),
                 "--batch_size", "8", "--workers", "0"],
    }[command]]


# command -> (pages left free: room for the first two units' outputs, the files compared with an uninterrupted run)
# score and features first index the uids (a page per shard, one for the bucket: 7 pages in _repeats/)
FULL = {"score": (2 + 7, ["*.parquet"]),  # one page per shard's parquet
        "features": (10 + 7, ["*_scores.parquet", "embeddings/*.npy", "embeddings/*.parquet"]),  # 2 claims, 4 per shard
        "reshard": (30, ["*.tar", "*.parquet"])}  # the scan's index files (13 pages), then 10 per output shard


def _open_files(folder: Path) -> list[str]:
    """The files under ``folder`` that this process holds open (deleted temporaries included)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(str(folder)):
                found.append(target)
    return found


def _files(out: Path, patterns: list[str]) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for pattern in patterns for p in sorted(out.glob(pattern))}


@pytest.mark.parametrize("command", list(FULL))
def test_per_shard_command_onto_a_full_disk(pool, tmp_path, small_disk, capsys, command):
    """The disk fills after two units: one line naming the next unit's file, the job stopped there (not
    one failure per remaining shard, nor a summary that the full disk cannot take), the finished outputs
    those of an uninterrupted run, no temporary; once there is room, the rerun does only the rest (the
    kept files are not rewritten) and ends with the uninterrupted run's outputs.

    Mutations caught: ``run_job`` not stopping at a unit's StorageError (every remaining shard fails and
    the error line names the summary, which the full disk refuses too); ``atomic_path`` keeping its
    temporary on failure (features and reshard leave a ``.tmp``; pyarrow removes score's itself);
    ``run_job`` redoing done units (the kept files rewritten: new inodes); ``storage_error`` passing on
    pyarrow's "Error writing bytes to file. Detail: [errno 28] ..." instead of the system's reason;
    ``write_shard`` giving pyarrow the temporary's path rather than ``atomic_file``'s handle (score: the
    failed write's deleted temporary stays open in pyarrow's writer)."""
    leave, patterns = FULL[command]
    reference = tmp_path / "reference"
    assert _cli(_argv(pool, command, reference), capsys).returncode == 0
    expected = _files(reference, patterns)
    out = small_disk / "out"
    filler = _fill(small_disk, leave * PAGE)
    line = one_error_line(_cli(_argv(pool, command, out), capsys), "No space left on device", out)
    assert "stopped with" in line and "_summary" not in line, line
    assert not _open_files(small_disk)  # the failed writes closed their files (an open one keeps the disk full)
    kept = _files(out, patterns)
    assert kept and len(kept) < len(expected) and all(expected[name] == data for name, data in kept.items())
    assert not list(small_disk.rglob(".*.tmp"))
    identity = {name: (out / name).stat().st_ino for name in kept}
    filler.unlink()
    done = _cli(_argv(pool, command, out), capsys)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _files(out, patterns) == expected
    assert {name: (out / name).stat().st_ino for name in kept} == identity  # not rewritten by the rerun
    assert not list(small_disk.rglob(".*.tmp"))


@pytest.mark.parametrize("command", ["score", "features", "reshard", "eval"])
def test_per_shard_command_and_eval_into_a_read_only_folder(pool, small_disk, capsys, command):
    """One line naming the folder, exit 1, before any output. Mutation caught (eval): no
    ``check_writable`` before the evaluation (the line still comes, after the work: the test then sees
    the eval's progress on stderr)."""
    out = small_disk / "out" / ("results.jsonl" if command == "eval" else "")
    (small_disk / "out").mkdir()
    with read_only(small_disk):
        done = _cli(_argv(pool, command, out), capsys)
    one_error_line(done, "Read-only file system", small_disk / "out")
    assert not any((small_disk / "out").iterdir())
    if command == "eval":
        assert "flyt eval" not in done.stderr.replace("flyt eval: error:", ""), done.stderr  # failed before evaluating


# ------------------------------------------------------------------------------------ flyt train


def test_train_checkpoint_onto_a_full_disk_then_resume(train_runs):
    """The run folder on a tmpfs that takes the first epoch's checkpoints (the latest and numbered pairs)
    but not the second's: one line naming the checkpoint, exit 1, the first epoch's checkpoints intact and
    equal to the uninterrupted run's, no temporary; ``--resume latest`` once there is room ends with the
    uninterrupted run's checkpoints and metrics.

    Mutations caught: ``torch.save`` writing to the path itself, not through a Python file (torch's
    RuntimeError "iostream error" carries no OSError: a traceback); ``atomic_path`` translating only an
    OSError (the same traceback)."""
    import torch

    from train_runs import assert_bitwise_equal, assert_same_run, command, run

    data, out, uninterrupted = train_runs
    expected = uninterrupted("mflyt")
    size = (expected / "checkpoints" / "epoch_latest.pt").stat().st_size
    run_dir = out / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    with tmpfs(run_dir, 5 * size // 2 // PAGE * PAGE):  # the first epoch's two pairs, and half the second's
        failed = run(command(data, out, "mflyt"))
        one_error_line(failed, "No space left on device", run_dir / "checkpoints")
        assert not list(run_dir.rglob(".*.tmp"))
        load = lambda path: torch.load(path, weights_only=True)  # noqa: E731
        for name, epoch_1 in (("epoch_latest.pt", "epoch_1.pt"), ("scoring_epoch_latest.pt", "scoring_epoch_1.pt")):
            assert_bitwise_equal(load(expected / "checkpoints" / epoch_1), load(run_dir / "checkpoints" / name), name)
        subprocess.run(["mount", "-o", f"remount,size={6 * size}", str(run_dir)], check=True)
        resumed = run(command(data, out, "mflyt"))
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert_same_run(expected, run_dir)


def test_train_into_a_read_only_folder(train_runs, tmp_path, capsys):
    """One line naming the run folder, exit 1. Mutation caught: the CLI no longer translating an OSError
    (the run folder's ``mkdir``) into a StorageError (the OSError escapes)."""
    from train_runs import train_args

    data, _, _ = train_runs
    with tmpfs(tmp_path / "disk", "1m") as disk, read_only(disk):
        one_error_line(_cli([*CLI, "train", *train_args(data, disk, "mflyt")], capsys), "Read-only file system", disk)


def test_a_log_line_is_appended_whole_or_not_at_all(tmp_path):
    """metrics.jsonl on a full disk: a StorageError naming it, the file as it was (a half line would break
    the next run's resume). Mutation caught: no truncation after the failed write (the file keeps the
    part of the line that fitted)."""
    from flyt.atomic import append_whole
    from flyt.errors import StorageError

    with tmpfs(tmp_path / "disk", "64k") as disk:
        log = disk / "metrics.jsonl"
        log.write_text('{"step": 1}\n')
        _fill(disk, 2 * PAGE)
        with pytest.raises(StorageError, match=re.escape(f"cannot write {log}: No space left on device")):
            append_whole(log, '{"step": 2, "pad": "' + "x" * 4 * PAGE + '"}\n')
        assert log.read_text() == '{"step": 1}\n'
        append_whole(log, '{"step": 2}\n')
        assert log.read_text() == '{"step": 1}\n{"step": 2}\n'
