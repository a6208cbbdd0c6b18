"""M-FLYT input scores for training: each upstream batch's score vectors, looked up by key (or uid).

The files are read and joined by :mod:`flyt.data.input_scores`, the same code ``flyt score`` uses. The
per-shard layout reads a file when a batch first needs it (and keeps the last few); any other layout is
indexed whole on first use, in arrays: a loader worker holds no Python object per row. Columns may have
any numeric dtype; vectors come back as float64 (the model casts them).
Several folders joined by ``::`` (the released scores beside ``flyt features`` output) each give the
columns their files hold.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flyt.data.input_scores import IdIndex, column_values, field_folders, read_folder, score_files, shard_file
from flyt.errors import FlytError

_OPEN_FILES = 64  # per-shard files kept loaded per process: a stream reads a few shards at a time


class ScoreLookup:
    """(key, uid) batches -> float64 score matrices, reading only the files the samples seen so far need."""

    def __init__(self, parquet_dir: str | Path, fields: list[str]):
        if not fields:
            raise FlytError("--parquet_fields: name at least one score column")
        self.dir, self.per_shard, self._files = score_files(parquet_dir)
        self.fields = list(fields)
        self._tables: OrderedDict[str, tuple[str, IdIndex, np.ndarray]] = OrderedDict()

    def _matrix(self, table: pa.Table) -> np.ndarray:
        return np.column_stack([column_values(table, f) for f in self.fields])

    def _table(self, name: str, paths: list[Path]) -> tuple[str, IdIndex, np.ndarray]:
        if name in self._tables:
            self._tables.move_to_end(name)
        else:
            self._tables[name] = read_folder(self.dir, paths, self.fields, self._matrix)
            if len(self._tables) > _OPEN_FILES:
                self._tables.popitem(last=False)
        return self._tables[name]

    def rows(self, keys: list[str], uids: list[str]) -> np.ndarray:
        """The (len(keys), len(fields)) score matrix of a batch, in its order."""
        keys, uids = pa.array(keys, pa.string()), pc.utf8_lower(pa.array(uids, pa.string()))
        out = np.empty((len(keys), len(self.fields)))
        if not self.per_shard:
            out[:] = self._join(self._table("*", self._files), keys, uids, self.dir)
            return out
        prefixes = pc.utf8_slice_codeunits(keys, 0, 8)
        for prefix in pc.unique(prefixes).to_pylist():
            mine = pc.equal(prefixes, prefix)
            where = np.flatnonzero(mine.to_numpy(zero_copy_only=False))
            path = shard_file(self.dir, keys[int(where[0])].as_py())
            out[where] = self._join(self._table(path.name, [path]), keys.filter(mine), uids.filter(mine), path)
        return out

    @staticmethod
    def _join(table: tuple[str, IdIndex, np.ndarray], keys: pa.Array, uids: pa.Array, where: Path) -> np.ndarray:
        join, index, values = table
        query = keys if join == "key" else uids
        pos = index(query)
        if (pos < 0).any():
            raise FlytError(f"no M-FLYT score row for {join} {query[int(np.argmax(pos < 0))].as_py()} in {where}")
        return values[pos]


def open_scores(parquet_dir: str, fields: list[str]):
    """The lookup of ``--parquet_dir``: one folder, or several joined by ``::``."""
    parts = field_folders(parquet_dir, fields)
    return ScoreLookup(parts[0][0], fields) if len(parts) == 1 else ScoreFolders(parts, fields)


class ScoreFolders:
    """Several score folders as one lookup: each field comes from the one folder whose files hold it."""

    def __init__(self, parts: list[tuple[str, list[int]]], fields: list[str]):
        self.fields = list(fields)
        self.parts = [(ScoreLookup(d, [fields[j] for j in where]), where) for d, where in parts]

    def rows(self, keys: list[str], uids: list[str]) -> np.ndarray:
        """The (len(keys), len(fields)) score matrix of a batch, each folder's columns from its own files."""
        out = np.empty((len(keys), len(self.fields)))
        for lookup, where in self.parts:
            out[:, where] = lookup.rows(keys, uids)
        return out
