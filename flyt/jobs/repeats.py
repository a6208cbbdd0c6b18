"""The uids that an earlier shard of the sorted pool holds, found with bounded memory on any engine.

A resharded subset holds a uid once per repeat, possibly in several shards; its score (or feature row)
is written once, by the first shard that holds it. Two runner jobs find those repeats from the ids alone,
in a work folder beside the outputs:
1. ``ids``: per shard, its distinct uids as a sorted run (``u8,u8``);
2. ``buckets``: per range of uid prefixes (sized to about ``BUCKET_ROWS`` uids), that slice of every
   run; a uid in several shards stays with the first, and each later (uid, shard) goes to the bucket's
   file, sorted by shard.
A shard's repeats are then read from every bucket file with a binary search, so no process holds the
pool's uids, and every split job or engine computes the same answer. The bucket folder is named by the
shards whose ids it was built from, so a shard that could not be read before and can now gets a new one.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np

from flyt.data.pool import Shard, shard_ids
from flyt.data.runs import read_range, run_length, save_array, write_run
from flyt.data.subset import UID_DTYPE, array_to_uids, sort_order, uids_to_array
from flyt.errors import FlytError
from flyt.runner.job import Job, Unit, missing_units, run_job, share

BUCKET_ROWS = 1 << 24  # uids per bucket, on average: a bucket's sort takes ~0.5 GB
WORK = "_repeats"
TAKEN = np.dtype([("shard", "<i8"), ("f0", "<u8"), ("f1", "<u8")])


class ShardIds(Job):
    """Pass 1: each shard's distinct uids, sorted. A shard whose ids cannot be read writes nothing (its
    own scoring reports it) and is left out of the repeats; any other failure (a write) stops the job."""

    unit_label = "shard"

    def __init__(self, shards: list[Shard], work: Path, title: str):
        self.shards, self.work, self.title = shards, work, f"{title}: uid index"

    def units(self) -> list[Unit]:
        return [Unit(shard.name, shard) for shard in self.shards]

    def outputs(self, unit: Unit) -> list[Path]:
        return [self.work / "ids" / f"{unit.name}.npy"]

    def run(self, unit: Unit, state) -> dict:
        try:
            uids = uids_to_array(shard_ids(unit.payload)[0])
        except Exception:
            return {"unreadable": 1}
        uids = uids[sort_order(uids)]
        distinct = np.ones(len(uids), bool)
        distinct[1:] = uids[1:] != uids[:-1]
        write_run(self.outputs(unit)[0], uids[distinct])
        return {}


class Buckets(Job):
    """Pass 2: per bucket of uid prefixes, the (shard, uid) pairs whose uid an earlier shard holds."""

    unit_label = "bucket"

    def __init__(self, runs: list[tuple[int, Path]], bits: int, folder: Path, title: str):
        self.runs, self.bits, self.folder, self.title = runs, bits, folder, f"{title}: repeated uids"

    def units(self) -> list[Unit]:
        return [Unit(f"{b:06d}", b) for b in range(1 << self.bits)]

    def outputs(self, unit: Unit) -> list[Path]:
        return [self.folder / f"{unit.name}.npy"]

    def run(self, unit: Unit, state) -> dict:
        pieces, owners = [], []
        low, high = _bucket_bounds(unit.payload, self.bits)
        for shard, path in self.runs:
            piece = read_range(path, "f0", low, high)
            pieces.append(piece)
            owners.append(np.full(len(piece), shard, np.int64))
        rows = np.concatenate(pieces) if pieces else np.zeros(0, UID_DTYPE)
        owner = np.concatenate(owners) if owners else np.zeros(0, np.int64)
        order = sort_order(rows)  # stable: a uid's rows stay in shard order, the first is its owner's
        rows, owner = rows[order], owner[order]
        later = np.zeros(len(rows), bool)
        later[1:] = rows[1:] == rows[:-1]
        taken = np.empty(int(later.sum()), TAKEN)
        taken["shard"], taken["f0"], taken["f1"] = owner[later], rows["f0"][later], rows["f1"][later]
        save_array(self.outputs(unit)[0], taken[np.argsort(taken["shard"], kind="stable")])  # by shard, then uid
        return {}


def _bucket_bounds(bucket: int, bits: int) -> tuple[np.uint64, np.uint64 | None]:
    """The range of a uid's first half (f0) whose first ``bits`` bits are ``bucket`` (None: no end)."""
    shift = 64 - bits
    low = np.uint64(bucket << shift)
    return low, None if bucket + 1 == 1 << bits else np.uint64((bucket + 1) << shift)


class Repeats:
    """Per shard of the sorted pool, the uids an earlier shard holds; small and picklable (a folder and
    the shards' positions), read by whichever worker handles the shard."""

    def __init__(self, positions: dict[str, int], folder: Path | None, buckets: int):
        self.positions, self.folder, self.buckets = positions, folder, buckets

    def of(self, name: str):
        """The uids (an Arrow string array) that shard ``name`` must leave to an earlier shard, or None."""
        if self.folder is None or name not in self.positions:
            return None
        shard, parts = self.positions[name], []
        for b in range(self.buckets):
            parts.append(read_range(self.folder / f"{b:06d}.npy", "shard", shard, shard + 1))
        rows = np.concatenate(parts)
        if not len(rows):
            return None
        codes = np.empty(len(rows), UID_DTYPE)
        codes["f0"], codes["f1"] = rows["f0"], rows["f1"]
        return array_to_uids(codes)


def find_repeats(shards: list[Shard], upto: int, root: Path, executor, title: str) -> Repeats:
    """The repeats of the shards up to position ``upto`` (inclusive; -1: none), computed in ``root/_repeats``
    (kept for a rerun; ``clean_repeats`` removes it once the pool is done)."""
    shards = shards[: upto + 1]
    if not shards:
        return Repeats({}, None, 0)
    work = root / WORK
    ids = ShardIds(shards, work, title)
    _stop_on_failure(run_job(ids, executor), title)
    runs = [(j, ids.outputs(unit)[0]) for j, unit in enumerate(ids.units()) if ids.done(unit)]
    total = sum(run_length(path) for _, path in runs)
    bits = max(0, int(np.ceil(np.log2(max(total, 1) / BUCKET_ROWS))))
    digest = hashlib.sha1("\n".join([str(bits)] + [f"{j} {p.name}" for j, p in runs]).encode()).hexdigest()[:16]
    buckets = Buckets(runs, bits, work / f"buckets-{digest}", title)
    _stop_on_failure(run_job(buckets, executor), title)
    return Repeats({shard.name: j for j, shard in enumerate(shards)}, buckets.folder, 1 << bits)


def pending_repeats(job: Job, shards: list[Shard], part: int, parts: int, root: Path, executor) -> Repeats:
    """The repeats that this part's pending units of ``job`` (one per shard, named as the shard) need."""
    pending = {unit.name for unit in missing_units(job, share(job.units(), part, parts))}
    last = max((j for j, shard in enumerate(shards) if shard.name in pending), default=-1)
    return find_repeats(shards, last, root, executor, job.title)


def _stop_on_failure(report, title: str) -> None:
    """Repeats found from part of the pool would let a uid be scored twice: any failure stops here."""
    if report.failed:
        name, message = sorted(report.failed.items())[0]
        raise FlytError(f"{title}: finding repeated uids failed at {name}: {message}")


def clean_repeats(root: Path) -> None:
    """Remove the work folder once every shard of the pool has its output (no rerun needs it)."""
    shutil.rmtree(root / WORK, ignore_errors=True)
