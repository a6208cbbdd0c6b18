"""Sorted runs on disk and their k-way merge: how a sorted output larger than memory is written.

A run is a ``.npy`` file of a structured array with ``f0, f1`` (a uid's two halves) and maybe more
fields, sorted by uid, written atomically. ``merge_runs`` reads every run a block at a time and yields
the union in uid order, one sorted chunk per round: each round takes, from every run, the rows before
the smallest last uid among the blocks still being read, so rows with equal uids always meet in one
chunk (a repeat is seen) and memory is bounded by runs x block rows.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np

from flyt.atomic import atomic_file
from flyt.data.subset import sort_order


def write_run(path: str | os.PathLike, rows: np.ndarray) -> None:
    """``rows`` (with fields f0, f1) sorted by uid, saved atomically as a run."""
    save_array(path, rows[sort_order(rows)] if len(rows) > 1 else rows)


def save_array(path: str | os.PathLike, rows: np.ndarray) -> None:
    """``rows`` saved atomically as a ``.npy`` file, in the order given."""
    with atomic_file(path) as handle:
        np.save(handle, rows)


class _Reader:
    """Blocks of one run, read with plain file reads (no memory map, so resident memory stays small)."""

    def __init__(self, path: Path):
        self.handle = open(path, "rb")
        major, _ = np.lib.format.read_magic(self.handle)
        header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, self.dtype = header(self.handle)
        self.left = shape[0]

    def read(self, rows: int) -> np.ndarray:
        rows = min(rows, self.left)
        self.left -= rows
        block = np.fromfile(self.handle, dtype=self.dtype, count=rows)
        if self.left == 0:
            self.handle.close()
        return block


def run_length(path: str | os.PathLike) -> int:
    """Rows in a run, from its header."""
    reader = _Reader(Path(path))
    if reader.left:
        reader.handle.close()
    return reader.left


def merge_runs(paths: list[Path], block_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(rows, index of the run each came from) in uid order, chunk by chunk, over all the runs."""
    readers = [_Reader(Path(path)) for path in paths]
    buffers = [reader.read(block_rows) for reader in readers]
    try:
        while any(len(buffer) for buffer in buffers):
            for i, reader in enumerate(readers):  # a block of one repeated uid: read on, so the repeat is seen whole
                while reader.left and len(buffers[i]) and _same(buffers[i][0], buffers[i][-1]):
                    buffers[i] = np.concatenate([buffers[i], reader.read(block_rows)])
            open_ends = [buffer[-1] for buffer, reader in zip(buffers, readers) if reader.left]
            frontier = min(open_ends, key=lambda row: (int(row["f0"]), int(row["f1"]))) if open_ends else None
            pieces, sources = [], []
            for i, buffer in enumerate(buffers):
                take = len(buffer) if frontier is None else _rows_below(buffer, frontier)
                pieces.append(buffer[:take])
                sources.append(np.full(take, i, dtype=np.int32))
                rest = buffer[take:]
                if len(rest) <= block_rows // 2 and readers[i].left:
                    rest = np.concatenate([rest, readers[i].read(block_rows - len(rest))])
                buffers[i] = rest
            rows, source = np.concatenate(pieces), np.concatenate(sources)
            order = sort_order(rows)
            yield rows[order], source[order]
    finally:
        for reader in readers:
            if reader.left:
                reader.handle.close()


def _same(a, b) -> bool:
    return a["f0"] == b["f0"] and a["f1"] == b["f1"]


def _rows_below(sorted_rows: np.ndarray, frontier) -> int:
    """How many leading rows of a uid-sorted block come before the uid ``frontier``."""
    f0, f1 = sorted_rows["f0"], sorted_rows["f1"]
    return int(np.count_nonzero((f0 < frontier["f0"]) | ((f0 == frontier["f0"]) & (f1 < frontier["f1"]))))


def read_range(path: str | os.PathLike, field: str, low, high=None) -> np.ndarray:
    """The rows of a run sorted by ``field`` whose ``field`` is in [low, high) (high None: to the end),
    found by a binary search over the file: a few small reads, no memory map, the file closed at once."""
    reader = _Reader(Path(path))
    with reader.handle as handle:
        start, size = handle.tell(), reader.dtype.itemsize
        offset, kind = reader.dtype.fields[field][1], reader.dtype.fields[field][0]

        def first_at_least(value) -> int:
            lo, hi = 0, reader.left
            while lo < hi:
                mid = (lo + hi) // 2
                handle.seek(start + mid * size + offset)
                if np.frombuffer(handle.read(kind.itemsize), kind)[0] < value:
                    lo = mid + 1
                else:
                    hi = mid
            return lo

        a = first_at_least(low)
        b = reader.left if high is None else first_at_least(high)
        handle.seek(start + a * size)
        return np.fromfile(handle, dtype=reader.dtype, count=max(0, b - a))
