"""What ``flyt sample`` reads: parquet files of uid and a numeric score column, checked on the way in.

A score file (as ``flyt score`` writes one per pool shard) is read batch by batch, so a pass over a pool
of any size holds one batch at a time; ``read_scores`` reads the whole pool for the in-memory path.
Everything that would silently distort a subset is refused, naming the file: missing columns, a folder
mixing uid- and key-joined files, malformed or repeated uids, non-finite scores, an empty pool.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from flyt.data.subset import array_to_uids, sort_order, uids_to_array
from flyt.errors import FlytError, remote_hint

BATCH_ROWS = 1 << 20


def score_files(path: str, column: str) -> tuple[list[str], list[int]]:
    """The parquet files under ``path`` (a file or a folder; hidden entries are unfinished work) and
    their row counts, from the footers only; their columns are checked here."""
    if os.path.isdir(path):
        files = sorted(str(file) for file in Path(path).rglob("*.parquet")
                       if not any(part.startswith(".") for part in file.relative_to(path).parts))
        if not files:
            raise FlytError(f"--scores {path}: no .parquet files in this folder")
    elif os.path.exists(path):
        files = [path]
    else:
        raise FlytError(f"--scores {path}: no such file or folder{remote_hint(path)}")
    rows, by_uid, by_key = [], [], []
    for file in files:
        try:
            meta = pq.read_metadata(file)
            schema = meta.schema.to_arrow_schema()
        except (pa.ArrowException, OSError) as exc:
            raise FlytError(f"--scores {file}: cannot read as parquet ({exc})") from None
        (by_uid if "uid" in schema.names else by_key if "key" in schema.names else by_uid).append(file)
        if by_uid and by_key:
            raise FlytError(
                f"--scores {path} mixes uid-joined files ({by_uid[0]}) and key-joined files without uids "
                f"({by_key[0]}); flyt sample needs a uid column in every file"
            )
        missing = [name for name in ("uid", column) if name not in schema.names]
        if missing:
            raise FlytError(
                f"--scores {file}: no column {', '.join(map(repr, missing))} (columns: "
                f"{', '.join(schema.names) or 'none'}); expected uid and the score column (--score_column)"
            )
        kind = schema.field(column).type
        if not (pa.types.is_floating(kind) or pa.types.is_integer(kind)):
            raise FlytError(f"--scores {file}: column {column!r} has type {kind}; expected numbers")
        rows.append(meta.num_rows)
    if sum(rows) == 0:
        raise FlytError(f"--scores {path}: no rows; the pool is empty")
    return files, rows


def read_batches(file: str, column: str, rows: int = BATCH_ROWS) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(uids ``u8,u8``, float64 scores) of one file, ``rows`` at a time, in file order, validated."""
    try:
        reader = pq.ParquetFile(file)
        first = 0
        for batch in reader.iter_batches(batch_size=rows, columns=["uid", column]):
            yield _checked(file, batch.column(0), batch.column(1), first)
            first += batch.num_rows
    except pa.ArrowException as exc:
        raise FlytError(f"--scores {file}: cannot read as parquet ({exc})") from None


def _checked(file: str, uid_column, score_column, first_row: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        uids = uids_to_array(uid_column)
    except FlytError as exc:
        raise FlytError(f"--scores {file}: {exc}" + (f" (batch from row {first_row})" if first_row else "")) from None
    scores = _floats(score_column)
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:
        example = array_to_uids(uids[bad[:1]])[0].as_py()
        raise FlytError(f"--scores {file}: {bad.size} scores are NaN, infinite or missing, e.g. uid {example}")
    return uids, scores


def _floats(column: pa.Array) -> np.ndarray:
    """float64 values, NaN where missing, read from the Arrow buffer (``to_numpy`` would import pandas)."""
    column = column.cast(pa.float64())
    if column.null_count:
        column = column.fill_null(math.nan)
    return np.frombuffer(column.buffers()[1], dtype=np.float64)[column.offset : column.offset + len(column)]


def read_scores(path: str, column: str) -> tuple[np.ndarray, np.ndarray]:
    """The whole pool: uids (``u8,u8``, sorted) and float64 scores, from a parquet file or folder."""
    files, _ = score_files(path, column)
    parts = [list(zip(*read_batches(file, column))) or [[], []] for file in files]
    uids = np.concatenate([part for uid_parts, _ in parts for part in uid_parts])
    scores = np.concatenate([part for _, score_parts in parts for part in score_parts])
    source = np.repeat(np.arange(len(files)), [sum(map(len, uid_parts)) for uid_parts, _ in parts])
    del parts
    order = sort_order(uids)
    uids, scores = uids[order], scores[order]
    repeated = np.flatnonzero(uids[1:] == uids[:-1])
    if repeated.size:
        first, second = sorted(source[order[repeated[0] : repeated[0] + 2]])
        raise repeated_uid(path, uids[repeated[0]], repeated.size, files[first], files[second])
    return uids, scores


def repeated_uid(path: str, uid, times: int | None, first: str, second: str) -> FlytError:
    """The error for a uid found twice: the two files holding it (one file when it repeats in one)."""
    where = f"twice in {first}" if first == second else f"in both {first} and {second}"
    name = array_to_uids(np.array([uid], dtype=uid.dtype))[0].as_py()
    repeats = f" ({times} repeated rows)" if times else ""
    return FlytError(f"--scores {path}: uid {name} appears more than once{repeats}, {where}")
