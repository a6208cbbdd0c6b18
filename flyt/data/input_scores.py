"""M-FLYT input scores: parquet files of per-example score columns, joined to pool samples by img2dataset
key (or uid). Used by training (:class:`flyt.data.scores.ScoreLookup`) and by scoring (the mixer of
``flyt score``), so both read, check and join the files the same way.

Layouts: ``DIR/<first 8 chars of key>_scores.parquet`` (the original's: one file per pool shard), or any
set of parquet files under ``DIR`` (e.g. the released dataset), indexed whole. Joins are columnar: one
file's ids by pyarrow's ``index_in``, a folder's by a sorted fixed-width byte array and binary search, so
no Python object is made per row.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from flyt.runner.job import error_message
from flyt.data.subset import as_strings, fixed_chars, valid_uids
from flyt.errors import FlytError, remote_hint

PER_SHARD = "_scores.parquet"
_CHUNK = 1 << 16  # ids copied per step when their lengths differ


def score_files(parquet_dir: str | Path) -> tuple[Path, bool, list[Path]]:
    """(folder, whether it has the per-shard layout, its score files; for the per-shard layout those are
    read one by one as samples need them)."""
    folder = Path(parquet_dir)
    if not folder.is_dir():
        raise FlytError(f"--parquet_dir {parquet_dir} is not a folder{remote_hint(parquet_dir)}")
    per_shard = sorted(folder.glob(f"*{PER_SHARD}"))
    files = per_shard or sorted(p for p in folder.rglob("*.parquet") if not p.name.startswith("."))
    if not files:
        raise FlytError(f"--parquet_dir {folder} holds no .parquet files")
    return folder, bool(per_shard), files


def field_folders(parquet_dir: str | Path, fields: list[str]) -> list[tuple[str, list[int]]]:
    """``--parquet_dir``, one folder or several joined by ``::``: each folder with the positions (in ``fields``)
    of the columns it gives; a field must be in exactly one of several folders."""
    folders = [p for p in str(parquet_dir).split("::") if p]
    if len(folders) == 1:
        return [(folders[0], list(range(len(fields))))]
    owner: dict[str, str] = {}
    for folder in folders:
        names = pq.read_schema(score_files(folder)[2][0]).names
        for f in fields:
            if f in names and owner.setdefault(f, folder) != folder:
                raise FlytError(f"--parquet_fields {f}: both {owner[f]} and {folder} hold it; name it once")
    missing = [f for f in fields if f not in owner]
    if missing:
        raise FlytError(f"--parquet_fields {', '.join(missing)}: in none of the folders {' :: '.join(folders)}")
    return [(d, [j for j, f in enumerate(fields) if owner[f] == d]) for d in dict.fromkeys(owner.values())]


def shard_file(folder: Path, key: str) -> Path:
    """The per-shard layout's file holding the sample with this key."""
    path = folder / f"{key[:8]}{PER_SHARD}"
    if not path.exists():
        raise FlytError(f"no M-FLYT score file {path} for sample key {key}")
    return path


def join_column(path: Path, fields: list[str]) -> str:
    """``key`` or else ``uid``: the column a file's rows are joined on; its score columns are checked too."""
    names = pq.read_schema(path).names
    join = "key" if "key" in names else "uid" if "uid" in names else None
    if join is None:
        raise FlytError(f"{path} has neither a 'key' nor a 'uid' column to join scores on (has: {', '.join(names)})")
    missing = [f for f in fields if f not in names]
    if missing:
        raise FlytError(f"{path} lacks --parquet_fields column(s) {', '.join(missing)} (has: {', '.join(names)})")
    return join


def read_scores(path: Path, fields: list[str]) -> tuple[str, pa.Array, pa.Table]:
    """(join column, ids as strings (uids lower-cased), table of the score columns) of one file."""
    join = join_column(path, fields)
    table = pq.read_table(path, columns=[join, *fields])
    ids = as_strings(table[join])
    if join == "uid":
        ids = valid_uids(ids)[0]
    return join, ids, table.drop_columns([join])


def column_values(table: pa.Table, name: str) -> np.ndarray:
    """One score column as float64 (nulls give NaN); a column that is not numbers is a one-line error."""
    column = table[name]
    if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type) or pa.types.is_boolean(column.type)):
        raise FlytError(f"--parquet_fields column {name!r} has type {column.type}; expected numbers")
    return column.cast(pa.float64()).to_numpy()


def read_folder(folder: Path, files: list[Path], fields: list[str], values) -> tuple[str, "IdIndex", np.ndarray]:
    """(join column, index of every file's ids, ``values(table)`` of every file, concatenated)."""
    joins, ids, out = set(), [], []
    for path in files:
        try:
            join, file_ids, table = read_scores(path, fields)
            out.append(values(table))
        except FlytError:
            raise
        except Exception as exc:
            raise FlytError(f"cannot read score file {path}: {error_message(exc)}") from None
        joins.add(join)
        ids.append(file_ids.cast(pa.large_string()))  # the whole folder's ids may pass 2 GB
    if len(joins) > 1:
        raise FlytError(f"--parquet_dir {folder}: some files join on 'key', others on 'uid'; use one kind")
    return joins.pop(), IdIndex(pa.chunked_array(ids, pa.large_string())), np.concatenate(out)


def positions(values: pa.Array, query: pa.Array) -> np.ndarray:
    """Row of each query id among ``values`` (the first row of a repeated id), -1 where it has none: a
    one-off join (pyarrow hashes ``values`` on each call; :class:`IdIndex` serves repeated lookups).
    A query equal to ``values`` row for row is the row-aligned layout and maps row i to row i."""
    if query.type != values.type:
        query = query.cast(values.type)
    if len(query) == len(values) and pc.all(pc.equal(query, values), skip_nulls=False).as_py() is True:
        return np.arange(len(query), dtype=np.int64)  # the same ids in the same order: the common layout, no hashing
    return pc.index_in(query, value_set=values).fill_null(-1).to_numpy().astype(np.int64)


def _fixed_width(ids, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids as NumPy ``S<width>`` byte strings, mask of the usable ones: not null, at most ``width`` bytes).

    ``width`` defaults to the longest id. Built from the Arrow buffers: no Python object per id."""
    strings = as_strings(ids)
    n = len(strings)
    lengths = pc.fill_null(pc.binary_length(strings), -1).to_numpy().astype(np.int64)
    width = max(1, int(lengths.max(initial=0))) if width is None else width
    usable = (lengths >= 0) & (lengths <= width)
    chars = fixed_chars(strings, width)  # every id exactly `width` bytes (uids, img2dataset keys): no copy
    if chars is None:
        chars = np.zeros((n, width), np.uint8)
        strings = strings.cast(pa.large_string())
        offsets = np.frombuffer(strings.buffers()[1], np.int64)[strings.offset: strings.offset + n]
        data = strings.buffers()[2]
        data = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
        for lo in range(0, n, _CHUNK):  # bounded temporaries: a few arrays of a chunk's bytes
            take = np.where(usable[lo: lo + _CHUNK], lengths[lo: lo + _CHUNK], 0)
            rows = np.repeat(np.arange(lo, lo + len(take)), take)
            cols = np.arange(len(rows)) - np.repeat(np.cumsum(take) - take, take)
            chars[rows, cols] = data[np.repeat(offsets[lo: lo + len(take)], take) + cols]
    return np.ascontiguousarray(chars).view(f"S{width}").reshape(n), usable


class IdIndex:
    """Many ids (keys or uids), sorted once as fixed-width bytes; each lookup is a binary search of the
    sorted query. A repeated id finds its first row. Memory: the bytes of the ids plus 8 bytes a row."""

    def __init__(self, ids):
        fixed, usable = _fixed_width(ids)
        rows = np.flatnonzero(usable)
        order = np.argsort(fixed[rows], kind="stable")  # stable: the first of repeated ids comes first
        self.rows, self.ids = rows[order], fixed[rows][order]
        first = np.ones(len(self.ids), bool)
        first[1:] = self.ids[1:] != self.ids[:-1]
        self.rows, self.ids = self.rows[first], self.ids[first]

    def __call__(self, query) -> np.ndarray:
        """Row of each query id, -1 where it has none."""
        fixed, usable = _fixed_width(query, self.ids.itemsize)
        out = np.full(len(fixed), -1, np.int64)
        if not len(self.ids):
            return out
        order = np.argsort(fixed)  # a sorted query walks the index in order: far faster than scattered searches
        at = np.minimum(np.searchsorted(self.ids, fixed[order]), len(self.ids) - 1)
        hit = (self.ids[at] == fixed[order]) & usable[order]
        out[order[hit]] = self.rows[at[hit]]
        return out
