"""M-FLYT input scores: per-example score vectors joined to pool samples by img2dataset key (or uid).

Original layout: ``PARQUET_DIR/<first 8 chars of key>_scores.parquet``, loaded lazily per shard. Any
other set of parquet files (e.g. the released dataset) is indexed whole on first use. Columns may have
any numeric dtype; vectors come back as float64 (the model casts them). Several folders joined by
``::`` (the released scores beside ``flyt features`` output) each give the columns their files hold.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from flyt.errors import FlytError


def read_score_table(path: Path, fields: list[str]) -> tuple[str, np.ndarray, np.ndarray]:
    """(join column, ids, float64 matrix) of one parquet file; the join column is ``key`` or else ``uid``."""
    names = pq.read_schema(path).names
    join = "key" if "key" in names else "uid" if "uid" in names else None
    if join is None:
        raise FlytError(f"{path} has neither a 'key' nor a 'uid' column to join scores on (has: {', '.join(names)})")
    missing = [f for f in fields if f not in names]
    if missing:
        raise FlytError(f"{path} lacks --parquet_fields column(s) {', '.join(missing)} (has: {', '.join(names)})")
    table = pq.read_table(path, columns=[join, *fields])
    ids = np.asarray(table.column(join).to_pylist(), dtype=object)
    try:
        values = np.column_stack([table.column(f).to_numpy(zero_copy_only=False).astype(np.float64) for f in fields])
    except (TypeError, ValueError) as exc:
        raise FlytError(f"{path}: --parquet_fields must be numeric columns ({exc})") from None
    return join, ids, values


class ScoreLookup:
    """key/uid -> score vector, reading only the files the samples seen so far need."""

    def __init__(self, parquet_dir: str | Path, fields: list[str]):
        self.dir = Path(parquet_dir)
        if not self.dir.is_dir():
            raise FlytError(f"--parquet_dir {self.dir} is not a folder")
        if not fields:
            raise FlytError("--parquet_fields: name at least one score column")
        self.fields = list(fields)
        self.per_shard = any(self.dir.glob("*_scores.parquet"))
        if not self.per_shard and not any(self.dir.rglob("*.parquet")):
            raise FlytError(f"--parquet_dir {self.dir} holds no .parquet files")
        self._tables: dict[str, tuple[str, dict]] = {}

    def _table(self, name: str, paths: list[Path]) -> tuple[str, dict]:
        if name not in self._tables:
            join, index = None, {}
            for path in paths:
                join, ids, values = read_score_table(path, self.fields)
                index.update(zip(ids.tolist(), values))
            self._tables[name] = (join, index)
        return self._tables[name]

    def __call__(self, key: str, uid: str) -> np.ndarray:
        if self.per_shard:
            path = self.dir / f"{key[:8]}_scores.parquet"
            if not path.exists():
                raise FlytError(f"no M-FLYT score file {path} for sample key {key}")
            where, (join, index) = path, self._table(path.name, [path])
        else:
            where, (join, index) = self.dir, self._table("*", sorted(self.dir.rglob("*.parquet")))
        row = index.get(key if join == "key" else uid)
        if row is None:
            raise FlytError(f"no M-FLYT score row for {join} {key if join == 'key' else uid} in {where}")
        return row


def open_scores(parquet_dir: str, fields: list[str]):
    """The lookup of ``--parquet_dir``: one folder, or several joined by ``::``."""
    folders = [p for p in str(parquet_dir).split("::") if p]
    return ScoreLookup(folders[0], fields) if len(folders) == 1 else ScoreFolders(folders, fields)


class ScoreFolders:
    """Several score folders as one lookup: each field comes from the one folder whose files hold it."""

    def __init__(self, folders: list[str], fields: list[str]):
        owner: dict[str, str] = {}
        for folder in folders:
            path = Path(folder)
            files = sorted(path.glob("*_scores.parquet")) or sorted(path.rglob("*.parquet")) if path.is_dir() else []
            if not files:
                raise FlytError(f"--parquet_dir {folder} is not a folder of .parquet files")
            names = pq.read_schema(files[0]).names
            for f in fields:
                if f in names and owner.setdefault(f, folder) != folder:
                    raise FlytError(f"--parquet_fields {f}: both {owner[f]} and {folder} hold it; name it once")
        missing = [f for f in fields if f not in owner]
        if missing:
            raise FlytError(f"--parquet_fields {', '.join(missing)}: in none of the folders {' :: '.join(folders)}")
        self.fields = list(fields)
        self.parts = []  # (lookup of one folder, positions of its fields in the vector)
        for d in dict.fromkeys(owner.values()):
            where = [j for j, f in enumerate(fields) if owner[f] == d]
            self.parts.append((ScoreLookup(d, [fields[j] for j in where]), where))

    def __call__(self, key: str, uid: str) -> np.ndarray:
        row = np.empty(len(self.fields))
        for lookup, where in self.parts:
            row[where] = lookup(key, uid)
        return row
