"""``flyt score``: run a trained scoring model over a whole pool, one score per uid (docs/formats.md).

Every sample of the pool is read exactly once (no resampling). A uid held several times (the repeats
of a resharded subset) is written once, by the first shard in sorted order that holds it; the other
copies count as skipped ``repeated_uid``, so ``flyt sample`` takes the output as it is.

The output is a folder with one parquet
file per pool shard (columns ``uid``, ``score`` float32, ``key``), named after the shard, so the scores
of a huge pool stay shardable; ``--output x.parquet`` merges them into one file at the end (the parts
live in the hidden folder ``.x.parquet.parts`` beside it).

Two paths:

* **M-FLYT** (a mixing model over input scores) needs no images. Per pool shard the sample ids come from
  the metadata parquet beside the ``.tar`` (``uid``, ``key``; rows whose ``status`` is not ``success`` are
  not in the shard) or, without one, from the tar's ``.json`` members (their ``key``, which resharders
  keep while they rename the members); their input scores are joined from
  ``PARQUET_DIR/<key[:8]>_scores.parquet`` (on ``key``, or ``uid`` if the file has no key) or, when no such
  files exist, from an index of every parquet file of ``PARQUET_DIR`` built once. The mixer is one
  float64 matrix-vector product computed with numpy from the checkpoint's weight and bias.
* **FLYT** (CLIP base + GLU head) decodes images: a DataLoader whose workers each read whole shards,
  apply the model's validation transform and tokenizer, and send batches that never cross a shard
  boundary; the last batch of a shard is flagged so its file is written as soon as it is complete.

Restartable and parallel: a shard whose output exists is skipped, outputs are written atomically, and
jobs split the sorted shard list without overlap (shard j belongs to job j % N; ``--shard_index I
--num_shards N``, or the RANK/WORLD_SIZE of torchrun, or both: job I*WORLD_SIZE + RANK of N*WORLD_SIZE).
A shard that cannot be read is reported by name, the others are finished, and the exit code is 1.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from flyt.errors import FlytError

SUMMARY = "_summary.json"
META_KEY = b"flyt_score"  # per-shard statistics in each output file's parquet metadata
# uids and keys are unique (no dictionary) and hex (zstd halves them); min/max statistics only for scores
WRITE_OPTIONS = {"compression": "zstd", "use_dictionary": False, "write_statistics": ["score"]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from flyt.config import add_job_split_arguments

    parser.add_argument("--checkpoint", required=True,
                        help="scoring checkpoint (scoring_epoch_<n>.pt of flyt train, or the original's released .pt)")
    parser.add_argument("--upstream_data_dir", required=True,
                        help="pool: a folder of .tar shards (recursive), one .tar, or several joined by '::'")
    parser.add_argument("--output", required=True,
                        help="folder for one <shard>.parquet per pool shard, or a file x.parquet to merge them into")
    parser.add_argument("--parquet_dir", default=None,
                        help="M-FLYT: folder of <shard>_scores.parquet input scores (or any parquet files with key/uid)")
    parser.add_argument("--parquet_fields", nargs="+", default=None,
                        help="M-FLYT: the score columns, in the mixer's order (needed for the original's .pt files)")
    parser.add_argument("--model", default=None,
                        help="FLYT: OpenCLIP name of the scoring base (needed for the original's .pt files)")
    parser.add_argument("--batch_size", type=int, default=256, help="FLYT: samples per forward pass")
    parser.add_argument("--workers", type=int, default=4,
                        help="FLYT: data-loader processes (each reads whole shards); M-FLYT: threads, one shard each")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--precision", default=None,
                        help="fp32; amp / amp_bf16 (= amp_bfloat16): autocast (fp16 needs CUDA); bf16: bf16 weights "
                             "(default: amp on CUDA, else fp32)")
    add_job_split_arguments(parser)


# ---------------------------------------------------------------------------------------------- shards


@dataclass(frozen=True)
class Shard:
    path: Path  # the pool's .tar
    name: str  # output file stem: the shard's stem, or its relative path with '/' -> '__' if stems collide

    @property
    def metadata(self) -> Path:
        return self.path.with_suffix(".parquet")


def pool_shards(spec: str) -> list[Shard]:
    """Every shard of the pool (``a::b`` sources allowed), sorted by path, with its output name."""
    from flyt.data.shards import list_shards

    roots = [Path(p) for p in spec.split("::") if p]
    if not roots:
        raise FlytError("--upstream_data_dir is empty")
    found: dict[Path, Path] = {}  # shard -> the root its relative name is taken from
    for root in roots:
        for shard in list_shards(root, "--upstream_data_dir"):
            found.setdefault(Path(shard), root if root.is_dir() else root.parent)
    paths = sorted(found, key=str)
    stems = Counter(p.stem for p in paths)
    if max(stems.values()) == 1:
        names = [p.stem for p in paths]
    else:  # shards in different subfolders share a stem: name every output by its relative path
        names = [str(p.relative_to(found[p]).with_suffix("")).replace(os.sep, "__").replace("/", "__") for p in paths]
        repeated = [n for n, c in Counter(names).items() if c > 1]
        if repeated:
            raise FlytError(f"--upstream_data_dir: several shards would write the output {repeated[0]}.parquet; "
                            "score the sources separately")
    return [Shard(p, n) for p, n in zip(paths, names)]


def job_split(shard_index: int | None, num_shards: int | None, env=os.environ) -> tuple[int, int]:
    """(this job, number of jobs) from the flags and torchrun's RANK/WORLD_SIZE."""
    if (shard_index is None) != (num_shards is None):
        raise FlytError("--shard_index and --num_shards go together")
    index, count = (0, 1) if num_shards is None else (shard_index, num_shards)
    if count < 1 or not 0 <= index < count:
        raise FlytError(f"--shard_index must be in [0, --num_shards) and --num_shards >= 1 (got {index}, {count})")
    try:
        rank, world = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
    except ValueError:
        raise FlytError(f"RANK/WORLD_SIZE must be integers (got {env.get('RANK')!r}, {env.get('WORLD_SIZE')!r})") from None
    if world < 1 or not 0 <= rank < world:
        raise FlytError(f"RANK {rank} is not in [0, WORLD_SIZE {world})")
    return index * world + rank, count * world


class Output:
    """Where each shard's scores go: the output folder, or the hidden parts folder of a merged file."""

    def __init__(self, path: str, job: int, jobs: int):
        self.path = Path(path)
        self.merged = self.path.suffix == ".parquet" and not self.path.is_dir()
        if self.merged:
            self.parts = self.path.parent / f".{self.path.name}.parts"
            summary = self.path.parent / f"{self.path.stem}{SUMMARY}"
        else:
            if self.path.exists() and not self.path.is_dir():
                raise FlytError(f"--output {self.path} is a file: give a folder, or a path ending in .parquet to merge")
            self.parts = self.path
            summary = self.path / SUMMARY
        if jobs > 1:  # one summary per job, so concurrent jobs never overwrite each other's
            summary = summary.with_name(summary.name.replace(".json", f".{job:0{len(str(jobs - 1))}d}-of-{jobs}.json"))
        self.summary = summary

    def part(self, shard: Shard) -> Path:
        return self.parts / f"{shard.name}.parquet"



# ---------------------------------------------------------------------------------------------- output files


def remove_stale_temporaries(path: Path) -> None:
    """The temporary files (``atomic_path``'s) that a killed run left for ``path``: a rerun writes it again."""
    for tmp in glob.glob(str(path.parent / glob.escape(f".{path.name}.")) + "*.tmp"):
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def write_shard(path: Path, uids, keys, scores, stats: dict) -> None:
    """One shard's scores, atomically: uid (string), score (float32), key (string); stats in the metadata."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from flyt.atomic import atomic_path

    def strings(values):
        return values.cast(pa.string()) if isinstance(values, pa.Array) else pa.array(values, pa.string())

    table = pa.table({"uid": strings(uids), "score": pa.array(np.asarray(scores, dtype=np.float32), pa.float32()),
                      "key": strings(keys)})
    table = table.replace_schema_metadata({META_KEY: json.dumps(stats).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, **WRITE_OPTIONS)


def read_stats(path: Path) -> dict | None:
    import pyarrow.parquet as pq

    try:
        meta = pq.read_schema(path).metadata or {}
        return json.loads(meta[META_KEY])
    except Exception:
        return None


def merge(parts: list[Path], target: Path) -> int:
    """Concatenate the parts (in shard order) into ``target`` atomically; returns the number of rows."""
    import pyarrow.parquet as pq

    from flyt.atomic import atomic_path

    rows = 0
    with atomic_path(target) as tmp:
        writer = None
        try:
            for part in parts:
                table = pq.read_table(part).replace_schema_metadata(None)
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema, **WRITE_OPTIONS)
                writer.write_table(table)
                rows += table.num_rows
        finally:
            if writer is not None:
                writer.close()
        if writer is None:  # no parts: an empty file with the schema
            write_shard(tmp, [], [], [], {})
    return rows


# ---------------------------------------------------------------------------------------------- report


def shard_stats(shard: Shard, scored: int, skipped: Counter) -> dict:
    """What a shard's output file records about it (in its parquet metadata) and the summary lists."""
    return {"shard": str(shard.path), "scored": int(scored), "skipped": dict(sorted(skipped.items()))}


@dataclass
class Report:
    """What happened to this job's shards; printed and written as the summary."""

    shards_total: int = 0
    shards_skipped_existing: int = 0
    done: dict = field(default_factory=dict)  # shard name -> {"scored", "skipped"}
    failed: dict = field(default_factory=dict)  # shard path -> message
    skipped: Counter = field(default_factory=Counter)
    scored: int = 0
    timings: Counter = field(default_factory=Counter)

    def shard_done(self, shard: Shard, scored: int, skipped: Counter) -> dict:
        stats = shard_stats(shard, scored, skipped)
        self.done[shard.name] = stats
        self.scored += int(scored)
        self.skipped.update(skipped)
        return stats

    def shard_failed(self, shard: Shard, message: str) -> None:
        self.failed[str(shard.path)] = message
        from tqdm import tqdm

        tqdm.write(f"flyt score: cannot read shard {shard.path}: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------- ids


def _strings(column):
    """A pyarrow (chunked) column as one string (or large_string) array."""
    import pyarrow as pa

    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    if not (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)):
        array = array.cast(pa.string())
    return array


def _offsets(array):
    import numpy as np
    import pyarrow as pa

    dtype = np.int64 if pa.types.is_large_string(array.type) else np.int32
    return np.frombuffer(array.buffers()[1], dtype=dtype)[array.offset: array.offset + len(array) + 1]


def _fixed_chars(array, width: int):
    """(n, width) uint8 view of a string array whose every value is ``width`` bytes long, or None."""
    import numpy as np
    import pyarrow.compute as pc

    n = len(array)
    if array.null_count:
        return None
    if n == 0:
        return np.zeros((0, width), np.uint8)
    lengths = pc.binary_length(array)
    lo_hi = pc.min_max(lengths).as_py()
    if lo_hi["min"] != width or lo_hi["max"] != width:
        return None
    start = int(_offsets(array)[0])
    data = np.frombuffer(array.buffers()[2], dtype=np.uint8)
    return data[start: start + n * width].reshape(n, width)


_HEX = None


def _hex_table():
    import numpy as np

    global _HEX
    if _HEX is None:
        _HEX = np.full(256, 255, np.uint8)
        for i, c in enumerate(b"0123456789abcdef"):
            _HEX[c] = i
        for i, c in enumerate(b"ABCDEF"):
            _HEX[c] = 10 + i
    return _HEX


def valid_uids(uids):
    """(lower-case uid array, mask of well-formed uids: 32 hex characters, not null)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    uids = _strings(uids)
    chars = _fixed_chars(uids, 32)
    good_len = None
    if chars is None:  # some uid is null or not 32 bytes long: check the others
        good_len = pc.fill_null(pc.equal(pc.binary_length(uids), 32), False)
        chars = _fixed_chars(_strings(pc.if_else(good_len, uids, pa.scalar("0" * 32))), 32)
    lower = ((chars - np.uint8(ord("0"))) < 10) | ((chars - np.uint8(ord("a"))) < 6)  # uint8 wraps below '0', 'a'
    mask = np.ones(len(uids), bool) if lower.all() else lower.all(axis=1)
    if not mask.all():
        upper = lower | ((chars - np.uint8(ord("A"))) < 6)
        if upper.all(axis=1).sum() > mask.sum():
            mask = upper.all(axis=1)
            uids = pc.utf8_lower(uids)
    if good_len is not None:
        mask &= good_len.to_numpy(zero_copy_only=False)
    return uids, mask


def _id_codes(array):
    """Integer codes that identify each string exactly, for fast joins: ("digits<L>", (n, 1) int64) for
    equal-length digit strings (img2dataset keys), ("hex", (n, 2) int64) for lower-case uids, else None."""
    import numpy as np

    n = len(array)
    if n == 0 or array.null_count:
        return None
    offsets = _offsets(array)
    width, rest = divmod(int(offsets[-1] - offsets[0]), n)
    chars = _fixed_chars(array, width) if width and not rest else None
    if chars is None:
        return None
    if width <= 18:
        digits = chars - np.uint8(ord("0"))  # wraps around below '0'
        if (digits > 9).any():
            return None
        value = np.zeros(n, np.int64)
        for j in range(width):
            value *= 10
            value += digits[:, j]
        return f"digits{width}", value[:, None]
    if width == 32:
        nib = _hex_table()[chars]
        if (nib == 255).any() or ((chars >= ord("A")) & (chars <= ord("F"))).any():
            return None  # upper case would give equal codes to unequal strings
        packed = np.ascontiguousarray((nib[:, 0::2] << 4) | nib[:, 1::2])
        return "hex", packed.view(">u8").astype(np.uint64).view(np.int64)
    return None


class IdIndex:
    """Positions of query ids among a fixed set of ids (-1 where absent; the first of repeated ids).

    Equal order is checked first; ids with integer codes (img2dataset keys, uids) are then found through a
    direct-address table (dense keys), a binary search (sorted ids) or a hash table; anything else through
    pyarrow's ``index_in``. The structures are built on first use, once, also when threads share the index.
    """

    def __init__(self, values):
        import threading

        self.values = _strings(values)
        self._lock = threading.Lock()
        self._ready = False

    def _prepare(self) -> None:
        import numpy as np
        import pandas as pd

        with self._lock:
            if self._ready:
                return
            self.kind, self.codes = _id_codes(self.values) or (None, None)
            self.dense = self.hash = None
            self.increasing = False
            if self.kind is not None:
                primary = self.codes[:, 0]
                low, high = int(primary.min()), int(primary.max())
                if self.kind.startswith("digits") and high - low < 4 * len(primary) + 1024:
                    # dense keys (img2dataset: shard id + running index): a direct-address table, first row wins
                    table = np.full(high - low + 1, -1, np.int64)
                    table[primary[::-1] - low] = np.arange(len(primary) - 1, -1, -1)
                    self.dense = low, table
                elif np.all(primary[1:] > primary[:-1]):
                    self.increasing = True  # sorted, no repeats: a binary search
                else:
                    index = pd.Index(primary)
                    self.hash = index if index.is_unique else None  # repeats: the generic join keeps the first
                    if self.hash is None:
                        self.kind = None
            self._ready = True

    def lookup(self, query):
        import numpy as np
        import pyarrow.compute as pc

        query = _strings(query)
        if query.type != self.values.type:
            query = query.cast(self.values.type)
        n = len(query)
        if n == len(self.values) and pc.all(pc.equal(query, self.values), skip_nulls=False).as_py() is True:
            return np.arange(n, dtype=np.int64)  # the same ids in the same order: the common layout
        self._prepare()
        q = _id_codes(query) if self.kind else None
        if q is None or q[0] != self.kind:
            return self._generic(query)
        qcodes, primary = q[1], self.codes[:, 0]
        if self.dense is not None:
            low, table = self.dense
            offset = qcodes[:, 0] - low
            inside = (offset >= 0) & (offset < len(table))
            pos = np.full(n, -1, np.int64)
            pos[inside] = table[offset[inside]]
            return pos
        if self.increasing:
            pos = np.minimum(np.searchsorted(primary, qcodes[:, 0]), len(primary) - 1)
            found = primary[pos] == qcodes[:, 0]
        else:
            pos = self.hash.get_indexer(qcodes[:, 0]).astype(np.int64)
            found = pos >= 0
        if self.codes.shape[1] > 1:
            found &= self.codes[pos, 1] == qcodes[:, 1]
        pos[~found] = -1
        return pos

    def _generic(self, query):
        import pyarrow.compute as pc

        return pc.index_in(query, value_set=self.values).fill_null(-1).to_numpy().astype("int64")


# ---------------------------------------------------------------------------------------------- tar reading


def iter_tar(path: Path, only: tuple[str, ...] | None = None):
    """The samples of a WebDataset shard: dicts of extension -> bytes plus ``__key__`` (consecutive members
    sharing a key form a sample). With ``only``, the other members' data is never read."""
    import tarfile

    with tarfile.open(path, "r") as tar:
        sample = None
        for member in tar:
            if not member.isfile():
                continue
            directory, _, base = member.name.rpartition("/")
            if "." not in base or base.startswith("."):
                continue
            stem, ext = base.split(".", 1)
            key = f"{directory}/{stem}" if directory else stem
            if sample is None or sample["__key__"] != key:
                if sample is not None:
                    yield sample
                sample = {"__key__": key}
            ext = ext.lower()
            if only is None or ext in only:
                sample[ext] = tar.extractfile(member).read()
        if sample is not None:
            yield sample


# ---------------------------------------------------------------------------------------------- M-FLYT


def shard_ids(shard: Shard) -> tuple[object, object, Counter]:
    """(uids, keys, skipped) of a pool shard, from its metadata parquet or else the tar's .json members.

    The keys are pool keys: the json's ``key`` where it has one, since resharders rename tar members."""
    import json as json_mod

    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    skipped = Counter()
    names = pq.read_schema(shard.metadata).names if shard.metadata.exists() else []
    if "uid" in names and "key" in names:
        table = pq.read_table(shard.metadata, columns=["uid", "key"] + (["status"] if "status" in names else []))
        if "status" in names:  # img2dataset lists failed downloads too: they are not in the shard
            table = table.filter(pc.fill_null(pc.equal(table["status"].cast(pa.string()), "success"), False))
        uids, keys = table["uid"], table["key"]
    else:
        uid_list, key_list = [], []
        from flyt.data.samples import pool_key

        for raw in iter_tar(shard.path, only=("json",)):
            try:
                meta = json_mod.loads(raw["json"])
                uid = str(meta["uid"])
            except Exception:
                skipped["missing_uid"] += 1
                continue
            uid_list.append(uid)
            key_list.append(pool_key(meta, raw["__key__"]))
        uids, keys = pa.array(uid_list, pa.string()), pa.array(key_list, pa.string())
    uids, ok = valid_uids(uids)
    keys = _strings(keys)
    if not ok.all():
        skipped["missing_uid"] += int((~ok).sum())
        keep = pa.array(ok)
        uids, keys = uids.filter(keep), keys.filter(keep)
    if keys.null_count:
        skipped["missing_key"] += keys.null_count
        has_key = pc.invert(pc.is_null(keys))
        uids, keys = uids.filter(has_key), keys.filter(has_key)
    return uids, keys, skipped


def repeats_of_earlier_shards(shards: list[Shard]) -> dict[str, object]:
    """Per shard name, the sorted ``u8,u8`` uids it shares with an earlier shard of the sorted list.

    A resharded subset holds a uid once per repeat, possibly in several shards; its score is written
    once, by the first shard. Every job computes the same answer from the ids alone, so split jobs agree.
    A shard whose ids cannot be read is left out here (its own scoring reports it).
    """
    import numpy as np

    from flyt.subset import UID_DTYPE, uids_to_array

    codes, owners = [np.zeros(0, UID_DTYPE)], [np.zeros(0, np.int64)]
    for j, shard in enumerate(shards):
        try:
            uids = uids_to_array(shard_ids(shard)[0])
        except Exception:
            continue
        codes.append(uids)
        owners.append(np.full(len(uids), j))
    codes, owners = np.concatenate(codes), np.concatenate(owners)
    order = np.argsort(codes, kind="stable")  # by uid, then by shard: the first of a run is the owner
    codes, owners = codes[order], owners[order]
    starts = np.ones(len(codes), bool)
    starts[1:] = codes[1:] != codes[:-1]
    owner = owners[np.flatnonzero(starts)[np.cumsum(starts) - 1]]
    later = owners != owner
    return {shards[j].name: np.unique(codes[later & (owners == j)]) for j in np.unique(owners[later]).tolist()}


def first_copies(uids, taken) -> object:
    """Mask of the samples that keep their uid: its first occurrence in the shard, unless ``taken`` (the
    uids an earlier shard holds, sorted ``u8,u8``) has it."""
    import numpy as np

    from flyt.subset import uids_to_array

    codes = uids_to_array(uids)
    keep = np.zeros(len(codes), bool)
    keep[np.unique(codes, return_index=True)[1]] = True
    if taken is not None and len(taken):
        pos = np.minimum(np.searchsorted(taken, codes), len(taken) - 1)
        keep &= taken[pos] != codes
    return keep


def _mixed(table, fields, weight, bias):
    """bias + sum_j weight_j * column_j in float64 (nulls give NaN)."""
    import numpy as np
    import pyarrow as pa

    out = np.full(table.num_rows, bias, dtype=np.float64)
    for w, name in zip(weight, fields):
        column = table[name]
        if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type) or pa.types.is_boolean(column.type)):
            raise FlytError(f"--parquet_fields column {name!r} has type {column.type}; expected numbers")
        values = column.cast(pa.float64()).to_numpy()
        out += w * values
    return out


class MixerScores:
    """The M-FLYT mixer applied to input-score parquet files, joined to pool samples by key (or uid)."""

    def __init__(self, parquet_dir: str, fields: list[str], weight, bias: float):
        import pyarrow.parquet as pq

        self.dir = Path(parquet_dir)
        if not self.dir.is_dir():
            raise FlytError(f"--parquet_dir {self.dir} is not a folder")
        self.fields, self.weight, self.bias = list(fields), weight, float(bias)
        per_shard = sorted(self.dir.glob("*_scores.parquet"))
        self.per_shard = bool(per_shard)
        files = per_shard or sorted(p for p in self.dir.rglob("*.parquet") if not p.name.startswith("."))
        if not files:
            raise FlytError(f"--parquet_dir {self.dir} holds no .parquet files")
        self._join_of(files[0], pq.read_schema(files[0]).names)  # a wrong --parquet_fields fails here, once
        self._global = None
        if not self.per_shard:
            self._global = self._index(files)

    def _join_of(self, path: Path, names: list[str]) -> str:
        join = "key" if "key" in names else "uid" if "uid" in names else None
        if join is None:
            raise FlytError(f"{path} has neither a 'key' nor a 'uid' column to join scores on (has: {', '.join(names)})")
        missing = [f for f in self.fields if f not in names]
        if missing:
            raise FlytError(f"{path} lacks --parquet_fields column(s) {', '.join(missing)} (has: {', '.join(names)})")
        return join

    def _read(self, path: Path):
        """(join column, ids, table of the score columns) of one score file."""
        import pyarrow.parquet as pq

        join = self._join_of(path, pq.read_schema(path).names)
        table = pq.read_table(path, columns=[join, *self.fields])
        ids = _strings(table[join])
        if join == "uid":
            ids = valid_uids(ids)[0]
        return join, ids, table

    def _index(self, files: list[Path]):
        import numpy as np
        import pyarrow as pa

        joins, ids, scores = set(), [], []
        for path in files:
            try:
                join, i, table = self._read(path)
                scores.append(_mixed(table, self.fields, self.weight, self.bias))
            except FlytError:
                raise
            except Exception as exc:
                raise FlytError(f"cannot read score file {path}: {_message(exc)}") from None
            joins.add(join)
            ids.append(i.cast(pa.large_string()))  # the whole folder's ids may pass 2 GB
        if len(joins) > 1:
            raise FlytError(f"--parquet_dir {self.dir}: some files join on 'key', others on 'uid'; use one kind")
        return joins.pop(), IdIndex(pa.concat_arrays(ids)), np.concatenate(scores)

    def shard_scores(self, uids, keys, timings: Counter):
        """Per sample: the float64 mixer output (NaN where an input is null) and whether a score row exists."""
        import numpy as np
        import pyarrow.compute as pc

        if self._global is not None:
            tables = [self._global]
        else:
            started = time.perf_counter()
            prefixes = sorted(p for p in pc.unique(pc.utf8_slice_codeunits(keys, 0, 8)).to_pylist())
            read = []
            for prefix in prefixes:
                path = self.dir / f"{prefix}_scores.parquet"
                if not path.exists():
                    raise FlytError(f"no M-FLYT score file {path} for its samples (keys {prefix}...)")
                read.append(self._read(path))
            timings["read_s"] += time.perf_counter() - started
            started = time.perf_counter()
            tables = [(join, ids, _mixed(table, self.fields, self.weight, self.bias)) for join, ids, table in read]
            timings["compute_s"] += time.perf_counter() - started
            tables = [(join, IdIndex(ids), scores) for join, ids, scores in tables]
        started = time.perf_counter()
        out = np.full(len(keys), np.nan)
        found = np.zeros(len(keys), bool)
        for join, index, scores in tables:
            pos = index.lookup(keys if join == "key" else uids)
            hit = (pos >= 0) & ~found
            out[hit] = scores[pos[hit]]
            found |= hit
        timings["join_s"] += time.perf_counter() - started
        return out, found


def _mflyt_shard(shard: Shard, output: Output, mixer: MixerScores, taken=None) -> tuple:
    """Score one shard and write its file; (scored, skipped, timings) or, if it cannot be read, the error.
    ``taken``: the uids an earlier shard scores (see :func:`repeats_of_earlier_shards`)."""
    import numpy as np
    import pyarrow as pa

    timings = Counter()
    try:
        started = time.perf_counter()
        uids, keys, skipped = shard_ids(shard)
        first = first_copies(uids, taken)
        if not first.all():
            skipped["repeated_uid"] += int((~first).sum())
            uids, keys = uids.filter(pa.array(first)), keys.filter(pa.array(first))
        timings["read_s"] += time.perf_counter() - started
        scores, found = mixer.shard_scores(uids, keys, timings)
    except Exception as exc:  # an unreadable shard or score file: the others still get scored
        return None, exc, timings
    started = time.perf_counter()
    finite = np.isfinite(scores)
    keep = found & finite
    skipped["missing_scores"] += int((~found).sum())
    skipped["nonfinite_score"] += int((found & ~finite).sum())
    skipped = +skipped
    if not keep.all():
        mask = pa.array(keep)
        uids, keys, scores = uids.filter(mask), keys.filter(mask), scores[keep]
    scores = scores.astype(np.float32)
    timings["compute_s"] += time.perf_counter() - started
    started = time.perf_counter()
    write_shard(output.part(shard), uids, keys, scores, shard_stats(shard, len(scores), skipped))
    timings["write_s"] += time.perf_counter() - started
    return len(scores), skipped, timings


def score_mflyt(shards: list[Shard], output: Output, mixer: MixerScores, report: Report, bar, workers: int,
                taken: dict) -> None:
    """Shard by shard, or ``workers`` shards at a time in threads (pyarrow and numpy release the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    def record(shard: Shard, result: tuple) -> None:
        scored, skipped, timings = result
        report.timings.update(timings)
        if scored is None:
            report.shard_failed(shard, _message(skipped))
        else:
            report.shard_done(shard, scored, skipped)
            bar.update(scored + sum(skipped.values()))

    if workers <= 1 or len(shards) <= 1:
        for shard in shards:
            record(shard, _mflyt_shard(shard, output, mixer, taken.get(shard.name)))
        return
    with ThreadPoolExecutor(min(workers, len(shards)), thread_name_prefix="flyt-score") as pool:
        for shard, result in zip(shards, pool.map(lambda s: _mflyt_shard(s, output, mixer, taken.get(s.name)), shards)):
            record(shard, result)


# ---------------------------------------------------------------------------------------------- FLYT


def _shard_batches_class():
    import torch

    class ShardBatches(torch.utils.data.IterableDataset):
        """Each worker reads whole shards (its share of the list) and yields batches within one shard.

        Items: {"shard", "image", "text", "uid", "key", "read", "last"[, "skipped"]} or, for a shard that
        cannot be read, {"shard", "error"} (its earlier batches are then to be discarded).
        """

        def __init__(self, shards: list[str], batch_size: int, preprocess, tokenizer):
            self.shards, self.batch_size, self.preprocess, self.tokenizer = shards, batch_size, preprocess, tokenizer

        def __iter__(self):
            info = torch.utils.data.get_worker_info()
            first, step = (0, 1) if info is None else (info.id, info.num_workers)
            for index in range(first, len(self.shards), step):  # an idle worker (more workers than shards) yields nothing
                yield from self._shard(index)

        def _shard(self, index: int):
            from flyt.data.samples import decode_pair

            skipped, samples, read = Counter(), [], 0
            try:
                for raw in iter_tar(Path(self.shards[index])):
                    read += 1
                    sample = decode_pair(raw, skipped)
                    if sample is None:
                        continue
                    try:
                        sample["image"] = self.preprocess(sample["image"])
                    except Exception:
                        skipped["bad_image"] += 1
                        continue
                    if len(samples) == self.batch_size:  # a next sample exists: this batch is not the last
                        batch = self._batch(index, samples, read - 1, last=False)
                        samples, read = [], 1
                        yield batch
                    samples.append(sample)
            except Exception as exc:
                yield {"shard": index, "error": _message(exc)}
                return
            batch = self._batch(index, samples, read, last=True)
            batch["skipped"] = dict(skipped)
            yield batch

        def _batch(self, index: int, samples: list[dict], read: int, last: bool) -> dict:
            has = bool(samples)
            return {"shard": index, "last": last, "read": read,
                    "image": torch.stack([s["image"] for s in samples]) if has else None,
                    "text": self.tokenizer([s["text"] for s in samples]) if has else None,
                    "uid": [s["uid"] for s in samples], "key": [s["key"] for s in samples]}

    return ShardBatches


def val_transforms(model, spec):
    """The scoring base's validation transform and tokenizer, as OpenCLIP builds them for its name."""
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from flyt.models import register_model_configs

    register_model_configs()
    preprocess = image_transform_v2(PreprocessCfg(**model.clip_model.visual.preprocess_cfg), is_train=False)
    return preprocess, open_clip.get_tokenizer(spec.model)


def forward_scores(model, image, text, device, precision: str):
    """Scores of one batch under inference mode (and autocast for amp / amp_bf16), as float32 numpy."""
    import contextlib

    import torch

    autocast = contextlib.nullcontext()
    if precision in ("amp", "amp_bf16"):
        autocast = torch.autocast(device.type, dtype=torch.float16 if precision == "amp" else torch.bfloat16)
    dtype = torch.bfloat16 if precision == "bf16" else None
    with torch.inference_mode(), autocast:
        out = model({"image": image.to(device, dtype=dtype, non_blocking=True), "text": text.to(device, non_blocking=True)})
    return out.float().cpu().numpy()


def score_flyt(shards: list[Shard], output: Output, model, spec, args, device, report: Report, bar, taken: dict) -> None:
    import torch

    if not shards:
        return
    preprocess, tokenizer = val_transforms(model, spec)
    dataset = _shard_batches_class()([str(s.path) for s in shards], args.batch_size, preprocess, tokenizer)
    workers = min(args.workers, len(shards))
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                         pin_memory=device.type == "cuda",
                                         prefetch_factor=4 if workers else None)
    threads = torch.get_num_threads()
    if device.type == "cpu" and workers:  # the loader's processes need cores too: do not oversubscribe them
        torch.set_num_threads(max(1, min(threads, _cpu_count() - workers)))
    try:
        _flyt_loop(loader, shards, output, model, args, device, report, bar, taken)
    finally:
        torch.set_num_threads(threads)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _flyt_loop(loader, shards: list[Shard], output: Output, model, args, device, report: Report, bar,
               taken: dict) -> None:
    import numpy as np

    partial: dict[int, list] = defaultdict(list)
    waited = time.perf_counter()
    for item in loader:
        report.timings["data_wait_s"] += time.perf_counter() - waited
        index = item["shard"]
        shard = shards[index]
        if "error" in item:
            partial.pop(index, None)
            report.shard_failed(shard, item["error"])
            waited = time.perf_counter()
            continue
        if item["image"] is not None:
            started = time.perf_counter()
            scores = forward_scores(model, item["image"], item["text"], device, args.precision)
            report.timings["model_s"] += time.perf_counter() - started
            partial[index].append((item["uid"], item["key"], scores))
        bar.update(item["read"])
        if item["last"]:
            started = time.perf_counter()
            parts = partial.pop(index, [])
            uids = [u for p in parts for u in p[0]]
            keys = [k for p in parts for k in p[1]]
            scores = np.concatenate([p[2] for p in parts]) if parts else np.zeros(0, np.float32)
            skipped = Counter(item["skipped"])
            first = first_copies(uids, taken.get(shard.name))
            skipped["repeated_uid"] += int((~first).sum())
            finite = np.isfinite(scores)
            skipped["nonfinite_score"] += int((first & ~finite).sum())
            keep = first & finite
            if not keep.all():
                uids = [u for u, f in zip(uids, keep) if f]
                keys = [k for k, f in zip(keys, keep) if f]
                scores = scores[keep]
            write_shard(output.part(shard), uids, keys, scores, report.shard_done(shard, len(scores), +skipped))
            report.timings["write_s"] += time.perf_counter() - started
        waited = time.perf_counter()


# ---------------------------------------------------------------------------------------------- command


def _message(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1]}" if text else type(exc).__name__


def _check_flags(args) -> None:
    if args.batch_size < 1:
        raise FlytError(f"--batch_size must be >= 1 (got {args.batch_size})")
    if args.workers < 0:
        raise FlytError(f"--workers must be >= 0 (got {args.workers})")
    if not Path(args.checkpoint).is_file():
        raise FlytError(f"--checkpoint {args.checkpoint} does not exist")


def _load(args, device):
    from flyt.checkpoint import load_scorer

    model, spec = load_scorer(args.checkpoint, args.model, args.parquet_fields, device=device,
                              precision="bf16" if args.precision == "bf16" else "fp32")
    if spec.mode == "mflyt":
        if not args.parquet_dir:
            raise FlytError(f"{args.checkpoint} is an M-FLYT mixer over {', '.join(spec.parquet_fields)}: "
                            "give --parquet_dir with those input scores")
        given = list(args.parquet_fields or [])
        if given and set(given) != set(spec.parquet_fields):  # the same names in another order change nothing
            if len(given) != len(spec.parquet_fields):
                raise FlytError(f"--parquet_fields names {len(given)} columns but the mixer mixes "
                                f"{len(spec.parquet_fields)} ({', '.join(spec.parquet_fields)})")
            print(f"flyt score: the mixer's inputs {', '.join(spec.parquet_fields)} are read from the columns "
                  f"{', '.join(given)} (--parquet_fields, in the mixer's order)", file=sys.stderr)
            spec.parquet_fields = given
    else:
        if args.parquet_dir or args.parquet_fields:
            raise FlytError(f"{args.checkpoint} is a FLYT image-text scorer: --parquet_dir/--parquet_fields are for M-FLYT")
        if args.model and spec.model != args.model:
            raise FlytError(f"{args.checkpoint} holds a scorer on {spec.model}, not --model {args.model}")
    return model, spec


def _summarise(report: Report, output: Output, mine: list[Shard], spec, args, job: int, jobs: int, seconds: float) -> dict:
    totals = Counter()
    all_skipped = Counter()
    for shard in mine:
        stats = report.done.get(shard.name)
        if stats is None and output.part(shard).exists():
            stats = read_stats(output.part(shard))
        if stats:
            totals["scored"] += stats.get("scored", 0)
            all_skipped.update(stats.get("skipped", {}))
    return {
        "mode": spec.mode, "checkpoint": str(args.checkpoint), "pool": str(args.upstream_data_dir),
        "output": str(output.path), "job": job, "jobs": jobs,
        "shards": report.shards_total, "shards_done": len(report.done),
        "shards_skipped_existing": report.shards_skipped_existing, "shards_failed": len(report.failed),
        "failed": report.failed, "samples_scored": report.scored, "skipped": dict(sorted(report.skipped.items())),
        "seconds": round(seconds, 3), "scoring_seconds": round(report.timings["scoring_s"], 3),
        "samples_per_s": round(report.scored / report.timings["scoring_s"], 1) if report.timings["scoring_s"] > 0 else None,
        "timings": {k: round(v, 4) for k, v in sorted(report.timings.items())},
        "per_shard": report.done,
        "all_outputs": {"samples_scored": totals["scored"], "skipped": dict(sorted(all_skipped.items()))},
    }


def _print_summary(summary: dict, output: Output) -> None:
    skipped = ", ".join(f"{k} {v}" for k, v in summary["skipped"].items()) or "none"
    rate = summary["samples_per_s"]
    print(f"flyt score: {summary['shards_done']} shard(s) scored, {summary['shards_skipped_existing']} already done, "
          f"{summary['shards_failed']} failed (of {summary['shards']}); {summary['samples_scored']} samples scored "
          f"in {summary['scoring_seconds']:.1f} s ({rate if rate is not None else '-'} samples/s; {summary['seconds']:.1f} s "
          f"in all); skipped: {skipped}")
    for shard, message in summary["failed"].items():
        print(f"flyt score: FAILED shard {shard}: {message}")
    print(f"flyt score: summary in {output.summary}")


def run(args: argparse.Namespace) -> int:
    from flyt import progress

    started = time.perf_counter()
    _check_flags(args)
    job, jobs = job_split(args.shard_index, args.num_shards)
    output = Output(args.output, job, jobs)
    shards = pool_shards(args.upstream_data_dir)
    for shard in shards:
        if output.part(shard).resolve() == shard.metadata.resolve():
            raise FlytError(f"--output {output.path} would overwrite the pool's metadata {shard.metadata}: "
                            "write the scores to another folder")
    mine = [s for j, s in enumerate(shards) if j % jobs == job]
    from flyt.precision import resolve_device, resolve_precision

    args.precision = resolve_precision(args.precision)
    device = resolve_device(args.device, args.precision)
    model, spec = _load(args, device)
    mixer = None
    if spec.mode == "mflyt":
        layer = model.layers[0]
        weight = layer.weight.detach().double().cpu().numpy().reshape(-1)
        bias = float(layer.bias.detach().double().cpu().reshape(-1)[0])
        mixer = MixerScores(args.parquet_dir, spec.parquet_fields, weight, bias)

    report = Report(shards_total=len(mine))
    pending = [s for s in mine if not output.part(s).exists()]
    report.shards_skipped_existing = len(mine) - len(pending)
    output.parts.mkdir(parents=True, exist_ok=True)
    for shard in pending:
        remove_stale_temporaries(output.part(shard))
    total = _expected_samples(pending)
    taken = repeats_of_earlier_shards(shards[: shards.index(pending[-1]) + 1]) if pending else {}
    scoring_started = time.perf_counter()
    with progress.bar(total=total, desc=f"flyt score ({spec.mode})", unit="sample", unit_scale=True, mininterval=1.0,
                      file=sys.stderr) as bar:
        if mixer is not None:
            score_mflyt(pending, output, mixer, report, bar, args.workers, taken)
        else:
            score_flyt(pending, output, model, spec, args, device, report, bar, taken)
    report.timings["scoring_s"] = time.perf_counter() - scoring_started
    summary = _summarise(report, output, mine, spec, args, job, jobs, time.perf_counter() - started)
    if output.merged:
        missing = [s for s in shards if not output.part(s).exists()]
        if missing:
            summary["merged"] = None
            print(f"flyt score: {len(missing)} shard(s) of the pool have no scores yet "
                  f"(e.g. {missing[0].path}): {output.path} is written once all are done")
        else:
            if jobs == 1:  # a merge killed earlier left its temporary file (with peers, it may be theirs)
                remove_stale_temporaries(output.path)
            summary["merged"] = {"path": str(output.path), "rows": merge([output.part(s) for s in shards], output.path)}
            print(f"flyt score: merged {summary['merged']['rows']} scores into {output.path}")
    from flyt.atomic import atomic_path

    with atomic_path(output.summary) as tmp:
        tmp.write_text(json.dumps(summary, indent=1) + "\n")
    _print_summary(summary, output)
    return 1 if report.failed else 0


def _expected_samples(shards: list[Shard]) -> int | None:
    """Rows of the pending shards' metadata parquets (for the progress bar), None if any is missing."""
    import pyarrow.parquet as pq

    total = 0
    for shard in shards:
        try:
            total += pq.read_metadata(shard.metadata).num_rows
        except Exception:
            return None
    return total
