"""M-FLYT scoring: the mixer (one float64 matrix-vector product) over input-score parquet files, joined
to each pool shard's samples by key (or uid) with pyarrow's ``index_in``; no image is opened."""

from __future__ import annotations

import time
from collections import Counter
from functools import partial
from pathlib import Path

from flyt.errors import FlytError
from flyt.data.score_files import Output, shard_stats, write_shard
from flyt.data.pool import Shard, as_strings, first_copies, shard_ids, valid_uids
from flyt.runner.job import error_message


def positions(values, query):
    """Row of each query id among ``values`` (the first row of a repeated id), -1 where it has none."""
    import numpy as np
    import pyarrow.compute as pc

    if query.type != values.type:
        query = query.cast(values.type)
    if len(query) == len(values) and pc.all(pc.equal(query, values), skip_nulls=False).as_py() is True:
        return np.arange(len(query), dtype=np.int64)  # the same ids in the same order: the common layout, no hashing
    return pc.index_in(query, value_set=values).fill_null(-1).to_numpy().astype(np.int64)


class FolderIds:
    """The ids of every score file of a folder, hashed once (a pandas index) for all shards' lookups."""

    def __init__(self, values):
        import numpy as np
        import pandas as pd

        index = pd.Index(values.to_pandas())
        first = ~index.duplicated(keep="first")  # repeated ids: the first row wins
        self.rows, self.index = np.flatnonzero(first), index[first]
        self.index.get_indexer(self.index[:1])  # builds the hash table now, before threads share it

    def __call__(self, query):
        import numpy as np

        pos = self.index.get_indexer(query.to_pandas())
        return np.where(pos >= 0, self.rows[pos], -1)


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
        ids = as_strings(table[join])
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
                raise FlytError(f"cannot read score file {path}: {error_message(exc)}") from None
            joins.add(join)
            ids.append(i.cast(pa.large_string()))  # the whole folder's ids may pass 2 GB
        if len(joins) > 1:
            raise FlytError(f"--parquet_dir {self.dir}: some files join on 'key', others on 'uid'; use one kind")
        return joins.pop(), FolderIds(pa.concat_arrays(ids)), np.concatenate(scores)

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
            tables = [(join, partial(positions, ids), scores) for join, ids, scores in tables]
        started = time.perf_counter()
        out = np.full(len(keys), np.nan)
        found = np.zeros(len(keys), bool)
        for join, lookup, scores in tables:
            pos = lookup(keys if join == "key" else uids)
            hit = (pos >= 0) & ~found
            out[hit] = scores[pos[hit]]
            found |= hit
        timings["join_s"] += time.perf_counter() - started
        return out, found


def score_shard(shard: Shard, output: Output, mixer: MixerScores, taken=None) -> dict:
    """Score one shard and write its file; returns its statistics (timings included).
    ``taken``: the uids an earlier shard scores (see :func:`repeats_of_earlier_shards`)."""
    import numpy as np
    import pyarrow as pa

    timings = Counter()
    started = time.perf_counter()
    uids, keys, skipped = shard_ids(shard)
    read = len(uids) + sum(skipped.values())
    first = first_copies(uids, taken)
    if not first.all():
        skipped["repeated_uid"] += int((~first).sum())
        uids, keys = uids.filter(pa.array(first)), keys.filter(pa.array(first))
    timings["read_s"] += time.perf_counter() - started
    scores, found = mixer.shard_scores(uids, keys, timings)
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
    stats = shard_stats(shard, len(scores), skipped)
    write_shard(output.part(shard), uids, keys, scores, stats)
    timings["write_s"] += time.perf_counter() - started
    return {**stats, "samples": read, "timings": dict(timings)}
