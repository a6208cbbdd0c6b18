"""``flyt reshard``: write the samples a DataComp subset selects as new WebDataset shards (docs/formats.md).

Every row of the subset becomes one output sample, so a uid listed k times is written k times. Two
phases, both per-shard jobs of ``flyt.runner`` (over ``--workers`` processes, or ``--engine ray``) and
both restartable, because every file is written atomically and skipped when it already exists:

1. scan: each input shard's tar headers and ``.json`` members are read (image bytes are seeked over)
   and the byte range of every sample whose uid is in the subset goes to ``OUTPUT/.work/index/``.
   A shard whose ``NNNNNNNN.parquet`` lists no selected uid is not opened at all.
2. write: the occurrences are laid out in input order (shard, then position; repeats adjacent) or in a
   seeded permutation (``--seed``), cut into ``--shard_size`` pieces, and each output shard
   copies its samples' member bytes from the pool, plus img2dataset's ``NNNNNNNN.parquet`` (``uid``,
   ``key``: the json's pool key) and ``NNNNNNNN_stats.json``, which DataComp's resharder reads.

Recording byte ranges rather than copying samples into intermediate tars keeps the work folder at
32 bytes per selected sample and reads every image once. ``meta.json`` (DataComp resharder fields,
plus counts and the fingerprints that stop two subsets from mixing in one folder) is written last:
its presence means the output is complete, and ``.work`` is then removed.

Keys: the first copy of a sample keeps its pool key (so ``key[:8]`` still names its pool shard), copy
r > 0 is ``KEY_r``; members are renamed accordingly, their bytes (the json's uid and key included)
unchanged, so ``json["key"]`` still names the pool sample (M-FLYT input scores are found by it).
"""

from __future__ import annotations

import argparse
import binascii
import hashlib
import io
import itertools
import json
import os
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from flyt import __version__
from flyt.atomic import atomic_file, atomic_path, sweep_folder
from flyt.data.webdataset import member_name
from flyt.data.shards import list_shards
from flyt.errors import FlytError
from flyt.data.subset import load_subset, uids_to_array
from flyt.runner.engines import add_engine_arguments, make_executor
from flyt.runner.job import Job, Unit, run_job

OUTPUT_SHARD_FORMAT = "{:08d}.tar"
KEY_FORMAT = "pool key for the first copy, KEY_r for copy r >= 1"
INDEX_DTYPE = np.dtype([("uid", "S16"), ("start", "<i8"), ("length", "<i8")])
# one scan statistic per input shard: samples read, samples without a usable uid, repeated selected
# uids within the shard, and 1 if the shard's parquet showed it holds no selected uid (never opened)
STATS = ("samples", "no_uid", "duplicates", "skipped")
JOB_KEYS = ("subset_sha256", "pool_sha256", "shard_size", "shuffle_seed")
_OPEN_FILES = 64  # input shards a writer keeps open at once (a shuffled output shard reads from many)
_STATE: dict = {}  # per-process inputs of the phase running now (set in every worker by its job's setup)


# ---------------------------------------------------------------------------------------------- command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--upstream_data_dir", "--pool", dest="pool", required=True, metavar="DIR",
                        help="pool: folder of WebDataset .tar shards (recursive) or one .tar")
    parser.add_argument("--subset", required=True, help="DataComp subset file (.npy of u8,u8 uids, repeats allowed)")
    parser.add_argument("--output", required=True, help="folder for the new shards (new, empty, or an unfinished run)")
    parser.add_argument("--shard_size", type=int, default=10000, help="samples per output shard")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes (default: CPU count; on Ray: as many actors as the cluster fits)")
    parser.add_argument(
        "--seed", "--shuffle_seed", dest="shuffle_seed", type=int, metavar="SEED",
        help="write the samples in a permutation drawn with this seed (default: pool order)"
    )
    parser.add_argument(
        "--allow_missing", action="store_true", help="write what was found even if some subset uids are not in the pool"
    )
    parser.add_argument(
        "--no_parquet", action="store_true", help="read every input tar, even if its .parquet lists no selected uid"
    )
    add_engine_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if args.shard_size < 1 or args.workers < 1:
        raise FlytError(f"--shard_size and --workers must be positive, got {args.shard_size} and {args.workers}")
    if args.shuffle_seed is not None and args.shuffle_seed < 0:
        raise FlytError(f"--seed must be a non-negative integer, got {args.shuffle_seed}")
    out, pool = Path(args.output), Path(args.pool)
    shards = list_shards(args.pool, "--upstream_data_dir")
    if pool.is_dir() and (out.resolve() == pool.resolve() or pool.resolve() in out.resolve().parents):
        raise FlytError(f"--output {out} lies inside --upstream_data_dir {pool}; its shards would join the pool")
    subset = load_subset(args.subset)
    job = {
        "subset_sha256": hashlib.sha256(np.ascontiguousarray(subset).view(np.uint8)).hexdigest(),
        "pool_sha256": _pool_fingerprint(pool, shards),
        "shard_size": args.shard_size,
        "shuffle_seed": args.shuffle_seed,
    }
    executor = make_executor(args, args.workers, "fork")  # no torch here: forked workers start at once
    if _claim(out, job, args):  # (after the executor: a Ray address that does not answer fails before any write)
        meta = json.loads((out / "meta.json").read_text())
        print(f"{out} is already complete: {meta['output_count']:,} samples in {meta['output_shard_count']} shards")
        shutil.rmtree(out / ".work", ignore_errors=True)  # left if the last run stopped right after meta.json
        return 0
    sweep_folder(out, out / ".work" / "index")  # temporaries of writes cut short by a kill

    keys, counts = _unique(_uid_bytes(subset))
    index_dir = out / ".work" / "index"
    scans = [(path, str(index_dir / f"{i:08d}.npz"), not args.no_parquet) for i, path in enumerate(shards)]
    _run_phase(Phase("scan", scans, {"keys": keys}), executor)
    index, stats = _load_index([t[1] for t in scans])
    index, duplicates = _first_occurrences(index)
    copies = counts[np.searchsorted(keys, index["uid"])]
    total = int(copies.sum())
    missing_unique, missing_rows = len(keys) - len(index), len(subset) - total
    if missing_unique and not args.allow_missing:
        raise FlytError(
            f"{missing_unique:,} of {len(keys):,} uids in {args.subset} ({missing_rows:,} of {len(subset):,} rows) "
            f"are not in the pool {pool}; pass --allow_missing to write the {total:,} samples found"
        )

    n_out = -(-total // args.shard_size)
    order = None if args.shuffle_seed is None else np.random.default_rng(args.shuffle_seed).permutation(total)
    state = {"shards": shards, "index": index, "ends": np.cumsum(copies), "copies": copies, "order": order,
             "shard_size": args.shard_size, "total": total, "out": str(out)}
    _run_phase(Phase("write", [(str(out), j) for j in range(n_out)], state), executor)

    scan = dict(zip(STATS, stats.sum(axis=0).tolist()))
    meta = {
        "output_shard_count": n_out,
        "output_shard_format": OUTPUT_SHARD_FORMAT,
        "shard_size": args.shard_size,
        "output_count": total,
        "processed_count": scan["samples"],
        "input_dir": str(pool),
        "input_shard_count": len(shards),
        "input_shards_skipped": scan["skipped"],
        "output_dir": str(out),
        "subset_file": str(args.subset),
        "requested_count": len(subset),
        "requested_unique": len(keys),
        "found_unique": len(index),
        "missing_unique": missing_unique,
        "missing_count": missing_rows,
        "duplicate_count": scan["duplicates"] + duplicates,
        "no_uid_count": scan["no_uid"],
        "key_format": KEY_FORMAT,
        "flyt_version": __version__,
        **job,
    }
    with atomic_path(out / "meta.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(out / ".work")
    _print_summary(meta)
    return 0


def _claim(out: Path, job: dict, args: argparse.Namespace) -> bool:
    """Make ``out`` this job's folder; True if it already holds this job's finished output.

    A folder that holds another job's output (finished or not), or anything else, is refused: mixing
    two subsets' shards in one folder would silently train on neither.
    """
    if out.exists() and not out.is_dir():
        raise FlytError(f"--output {out} is a file; expected a folder")
    for record, done in ((out / "meta.json", True), (out / ".work" / "job.json", False)):
        if record.exists():
            try:
                old = json.loads(record.read_text())
                old = {k: old[k] for k in JOB_KEYS} | {"subset_file": old.get("subset_file", "?")}
            except (ValueError, KeyError, TypeError):
                raise FlytError(f"{record} is not a flyt reshard record; use an empty --output folder") from None
            _check_same_job(out, old, job)
            return done
    if out.exists() and any(out.iterdir()):
        raise FlytError(f"--output {out} is not empty and holds no flyt reshard; use an empty or new folder")
    with atomic_path(out / ".work" / "job.json") as tmp:
        tmp.write_text(json.dumps({**job, "subset_file": str(args.subset), "pool": str(args.pool)}, indent=2))
    return False


def _check_same_job(out: Path, old: dict, job: dict) -> None:
    if old["subset_sha256"] != job["subset_sha256"]:
        raise FlytError(
            f"--output {out} holds a reshard of a different subset ({old['subset_file']}, sha256 "
            f"{old['subset_sha256'][:12]}, not {job['subset_sha256'][:12]}); use an empty or new folder"
        )
    if old["pool_sha256"] != job["pool_sha256"]:
        raise FlytError(f"--output {out} was started from a different pool (shard names or sizes differ)")
    for name in ("shard_size", "shuffle_seed"):
        if old[name] != job[name]:
            raise FlytError(f"--output {out} was started with --{name} {old[name]}, not {job[name]}")


def _pool_fingerprint(pool: Path, shards: list[str]) -> str:
    """Shard names (relative to the pool) and sizes: the pool may move, but its shards may not change."""
    root = pool if pool.is_dir() else pool.parent
    lines = (f"{Path(p).relative_to(root).as_posix()}\t{os.path.getsize(p)}\n" for p in shards)
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def _print_summary(meta: dict) -> None:
    skipped = meta["input_shards_skipped"]
    print(
        f"pool: {meta['input_shard_count']:,} shards ({skipped:,} skipped by their parquet), "
        f"{meta['processed_count']:,} samples read"
    )
    print(
        f"subset: {meta['requested_count']:,} rows, {meta['requested_unique']:,} unique uids; "
        f"found {meta['found_unique']:,}, missing {meta['missing_unique']:,} uids ({meta['missing_count']:,} rows)"
    )
    for name, what in (("duplicate_count", "pool samples repeat a selected uid already taken (first kept)"),
                       ("no_uid_count", "pool samples have no usable json uid")):
        if meta[name]:
            print(f"note: {meta[name]:,} {what}")
    print(
        f"wrote {meta['output_count']:,} samples in {meta['output_shard_count']:,} shards of up to "
        f"{meta['shard_size']:,} to {meta['output_dir']} (meta.json)"
    )


# ---------------------------------------------------------------------------------------------- uids


def _uid_bytes(arr: np.ndarray) -> np.ndarray:
    """``u8,u8`` uids -> 16-byte big-endian strings, whose byte order is the subset's (f0, f1) order.

    Read them as a whole buffer (``.tobytes()``): NumPy drops trailing zero bytes of a single ``S16``.
    """
    words = np.empty((len(arr), 2), dtype=">u8")
    words[:, 0], words[:, 1] = arr["f0"], arr["f1"]
    return words.reshape(-1).view("S16")


def _hex(uids: np.ndarray) -> list[str]:
    chars = binascii.hexlify(uids.astype("S16").tobytes()).decode()
    return [chars[i : i + 32] for i in range(0, len(chars), 32)]


def _unique(sorted_uids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct uids, times each occurs) of a sorted array."""
    first = np.ones(len(sorted_uids), dtype=bool)
    first[1:] = sorted_uids[1:] != sorted_uids[:-1]
    starts = np.flatnonzero(first)
    return sorted_uids[first], np.diff(np.append(starts, len(sorted_uids)))


def _isin(uids: np.ndarray, keys: np.ndarray) -> np.ndarray:
    if not len(keys):
        return np.zeros(len(uids), dtype=bool)
    pos = np.minimum(np.searchsorted(keys, uids), len(keys) - 1)
    return keys[pos] == uids


def _json_uid(data: bytes) -> bytes | None:
    """The 16 bytes of a sample json's ``uid``, or None when it has no well-formed one."""
    try:
        uid = json.loads(data)["uid"]
        raw = bytes.fromhex(uid) if isinstance(uid, str) and len(uid) == 32 else b""
    except (ValueError, KeyError, TypeError):
        return None
    return raw if len(raw) == 16 else None


def _samples(tar: tarfile.TarFile):
    """(key, members) of every sample: WebDataset groups consecutive members sharing a key."""
    return itertools.groupby((m for m in tar if m.isfile()), key=lambda m: member_name(m.name)[0])


def _sample_json(tar: tarfile.TarFile, members: list[tarfile.TarInfo]) -> bytes | None:
    member = next((m for m in members if member_name(m.name)[1] == "json"), None)
    return None if member is None else tar.extractfile(member).read()


def _sample_uid(tar: tarfile.TarFile, members: list[tarfile.TarInfo]) -> bytes | None:
    data = _sample_json(tar, members)
    return None if data is None else _json_uid(data)


# ---------------------------------------------------------------------------------------------- phase 1


def _scan_shard(task: tuple[str, str, bool]) -> int:
    """Record where the selected samples of one input shard lie; written atomically, so a rerun skips it."""
    path, index_path, use_parquet = task
    keys = _STATE["keys"]
    rows, samples, no_uid = [], 0, 0
    skipped = use_parquet and _parquet_selects_nothing(path, keys)
    if not skipped:
        try:
            with tarfile.open(path, "r:") as tar:
                for _, group in _samples(tar):
                    members = list(group)
                    uid = _sample_uid(tar, members)
                    samples += 1
                    if uid is None:
                        no_uid += 1
                        continue
                    end = members[-1].offset_data + -(-members[-1].size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                    rows.append((uid, members[0].offset, end - members[0].offset))
                _check_tar_end(tar, path)
        except (tarfile.TarError, OSError, EOFError, UnicodeError) as exc:
            raise FlytError(f"{path}: cannot read as a tar shard ({exc})") from None
    found = np.array(rows, dtype=INDEX_DTYPE)
    found, duplicates = _first_occurrences(found[_isin(found["uid"], keys)])
    stats = np.array([samples, no_uid, duplicates, int(skipped)], dtype=np.int64)
    with atomic_file(index_path) as handle:
        np.savez(handle, index=found, stats=stats)
    return samples


def _check_tar_end(tar: tarfile.TarFile, path: str) -> None:
    """tarfile stops quietly at a damaged header; only zero padding may follow the last member."""
    tar.fileobj.seek(tar.offset)
    while chunk := tar.fileobj.read(1 << 20):
        if chunk.count(0) != len(chunk):
            raise FlytError(f"{path}: damaged tar shard (unreadable data after byte {tar.offset})")


def _parquet_selects_nothing(path: str, keys: np.ndarray) -> bool:
    """True if the shard's img2dataset parquet lists no selected uid; any doubt means reading the tar."""
    meta = Path(path).with_suffix(".parquet")
    if not meta.is_file():
        return False
    try:
        uids = uids_to_array(pq.read_table(meta, columns=["uid"]).column("uid"))
    except (pa.ArrowException, OSError, KeyError, FlytError):
        return False
    return not _isin(_uid_bytes(uids), keys).any()


def _load_index(paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """All shards' records in pool order, with a ``shard`` column, and the (shards, STATS) statistics."""
    parts, stats = [], []
    for shard, path in enumerate(paths):
        with np.load(path, allow_pickle=False) as data:
            part, s = data["index"], data["stats"]
        full = np.empty(len(part), dtype=INDEX_DTYPE.descr + [("shard", "<i4")])
        for name in INDEX_DTYPE.names:
            full[name] = part[name]
        full["shard"] = shard
        parts.append(full)
        stats.append(s)
    return np.concatenate(parts), np.array(stats).reshape(len(paths), len(STATS))


def _first_occurrences(index: np.ndarray) -> tuple[np.ndarray, int]:
    """(the first pool sample of each uid, how many later ones were dropped): a pool holding a uid twice
    would otherwise give it more copies than the subset asks for."""
    _, first = np.unique(index["uid"], return_index=True)
    return index[np.sort(first)], len(index) - len(first)


# ---------------------------------------------------------------------------------------------- phase 2


def _output_paths(out: str | Path, j: int) -> tuple[Path, Path, Path]:
    """The tar and the two files img2dataset writes beside it: metadata parquet and stats json."""
    tar = Path(out) / OUTPUT_SHARD_FORMAT.format(j)
    return tar, tar.with_suffix(".parquet"), tar.with_name(f"{tar.stem}_stats.json")


def shard_stats(count: int, start_time: float, end_time: float) -> dict:
    """img2dataset's ``NNNNNNNN_stats.json`` of a shard whose ``count`` samples all succeeded."""
    return {"count": count, "successes": count, "failed_to_download": 0, "failed_to_resize": 0,
            "duration": end_time - start_time, "start_time": start_time, "end_time": end_time,
            "status_dict": {"success": count} if count else {}}


def _write_output_shard(j: int) -> int:
    """Output shard j: occurrences [j*S, (j+1)*S) of the layout, copied member by member from the pool."""
    st = _STATE
    size = st["shard_size"]
    occurrence = np.arange(j * size, min(st["total"], (j + 1) * size))
    if st["order"] is not None:
        occurrence = st["order"][occurrence]
    sample = np.searchsorted(st["ends"], occurrence, side="right")
    copy = occurrence - (st["ends"][sample] - st["copies"][sample])
    rows = st["index"][sample]
    uids = _hex(rows["uid"])
    tar_path, parquet_path, stats_path = _output_paths(st["out"], j)
    started = time.time()
    keys, pool_keys, handles = [], [], {}
    try:
        with atomic_path(tar_path) as tmp, tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as out:
            for row, r, uid in zip(rows, copy.tolist(), uids):
                source = st["shards"][row["shard"]]
                raw = _read_range(handles, source, int(row["start"]), int(row["length"]))
                key, pool_key = _copy_sample(raw, out, r, uid, source)
                keys.append(key)
                pool_keys.append(pool_key)
    finally:
        for handle in handles.values():
            handle.close()
    with atomic_path(stats_path) as tmp:
        tmp.write_text(json.dumps(shard_stats(len(keys), started, time.time()), indent=4))
    with atomic_file(parquet_path) as f:  # like img2dataset's: the json's key, which names the pool sample
        pq.write_table(pa.table({"uid": uids, "key": pool_keys}), f)
    return len(keys)


def _read_range(handles: dict, path: str, start: int, length: int) -> bytes:
    handle = handles.pop(path, None) or open(path, "rb")
    handles[path] = handle  # most recently used last; the least recent is closed past _OPEN_FILES
    if len(handles) > _OPEN_FILES:
        handles.pop(next(iter(handles))).close()
    handle.seek(start)
    data = handle.read(length)
    if len(data) != length:
        raise FlytError(f"{path}: shorter than when it was scanned; delete the --output folder and rerun")
    return data


def _copy_sample(raw: bytes, out: tarfile.TarFile, copy: int, uid: str, source: str) -> tuple[str, str]:
    """Append one sample (its members' bytes as they are) under its key, ``_<copy>`` added for copies >= 1;
    returns (its new member key, its pool key: the json's ``key``, else the key it had in the pool)."""
    from flyt.data.samples import pool_key

    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
            [(key, group)] = [(k, list(g)) for k, g in _samples(tar)]
            data = _sample_json(tar, group)
            found = None if data is None else _json_uid(data)
            if found is None or found.hex() != uid:
                raise ValueError(f"expected uid {uid}")
            name = key if copy == 0 else f"{key}_{copy}"
            for member in group:
                info = tarfile.TarInfo(f"{name}.{member_name(member.name)[1]}")
                info.size, info.mtime, info.mode = member.size, member.mtime, member.mode
                out.addfile(info, tar.extractfile(member))
    except (tarfile.TarError, ValueError, EOFError) as exc:
        raise FlytError(
            f"{source}: changed since it was scanned ({exc}); delete the --output folder and rerun"
        ) from None
    return name, pool_key(json.loads(data), key)


# ---------------------------------------------------------------------------------------------- jobs


class Phase(Job):
    """One phase as a per-shard job: ``scan`` (a unit per input shard, its index file) or ``write`` (a unit
    per output shard, its three files). ``state`` is what the phase's function reads from ``_STATE``."""

    def __init__(self, phase: str, tasks: list, state: dict):
        self.phase, self.tasks, self.state = phase, tasks, state
        self.title = f"flyt reshard: {phase}"

    def units(self) -> list[Unit]:
        return [Unit(f"{i:08d}", task) for i, task in enumerate(self.tasks)]

    def outputs(self, unit: Unit) -> list[Path]:
        if self.phase == "scan":
            return [Path(unit.payload[1])]
        return list(_output_paths(*unit.payload))

    def setup(self) -> None:
        _STATE.clear()
        _STATE.update(self.state)

    def run(self, unit: Unit, state) -> dict:
        if self.phase == "scan":
            return {"samples": _scan_shard(unit.payload) or 0}
        return {"samples": _write_output_shard(unit.payload[1]) or 0}


def _run_phase(job: Phase, executor) -> None:
    """Run a phase's pending units; the first failure (after the others are done) stops the command."""
    try:
        report = run_job(job, executor)
    finally:
        _STATE.clear()
    if report.failed:
        message = report.failed[min(report.failed)]
        more = f" (and {len(report.failed) - 1} other shard(s))" if len(report.failed) > 1 else ""
        raise FlytError(f"{message}{more}")
