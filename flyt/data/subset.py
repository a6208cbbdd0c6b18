"""The DataComp subset format, and the uid codec every module uses: validate, parse, format.

A subset is uids as pairs of unsigned 64-bit ints, sorted, one row per occurrence.

A uid is 32 lowercase hex characters; it is stored as ``(int(uid[:16], 16), int(uid[16:], 16))`` in a
NumPy structured array of dtype ``u8,u8``, sorted lexicographically and saved with ``np.save``.
DataComp's resharder writes each row as its own sample, so repeats mean repeated training examples.
Conversions work on whole byte buffers (hexlify/unhexlify, no Python loop per uid), so a 128M-uid
pool stays cheap.
"""

from __future__ import annotations

import binascii
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flyt.atomic import atomic_file, atomic_path
from flyt.errors import FlytError

UID_DTYPE = np.dtype("u8,u8")
UID_LENGTH = 32

_HEX_CODES = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_HEX_SET = frozenset("0123456789abcdef")
_EXPECTED = f"expected {UID_LENGTH} lowercase hex characters"
_CHUNK = 1 << 20  # uids decoded per step, bounding the temporaries to 16 MB


def is_uid(text: str) -> bool:
    """Whether one string is a uid as stored: 32 lowercase hex characters (for a sample decoded alone)."""
    return len(text) == UID_LENGTH and _HEX_SET.issuperset(text)


def as_strings(column) -> pa.Array:
    """A pyarrow (chunked) column as one string (or large_string) array."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    if not (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)):
        array = array.cast(pa.string())
    return array


def fixed_chars(array: pa.Array, width: int) -> np.ndarray | None:
    """A zero-copy (n, width) uint8 view of a string array whose every value is ``width`` bytes, else None."""
    if array.null_count:
        return None
    n = len(array)
    if n == 0:
        return np.zeros((0, width), np.uint8)
    lengths = pc.min_max(pc.binary_length(array)).as_py()
    if lengths["min"] != width or lengths["max"] != width:
        return None
    offset_dtype = np.int64 if pa.types.is_large_string(array.type) else np.int32
    start = int(np.frombuffer(array.buffers()[1], dtype=offset_dtype)[array.offset])
    data = np.frombuffer(array.buffers()[2], dtype=np.uint8)  # every value is `width` bytes: one contiguous block
    return data[start : start + n * width].reshape(n, width)


def valid_uids(uids) -> tuple[pa.Array, np.ndarray]:
    """Validate without refusing: (lower-case uid strings, mask of the well-formed ones: 32 hex characters,
    not null). A column written in upper case is lower-cased; the caller skips and counts the others."""
    uids = as_strings(uids)
    chars = fixed_chars(uids, UID_LENGTH)
    good_len = None
    if chars is None:  # some uid is null or not 32 bytes long: check the others
        good_len = pc.fill_null(pc.equal(pc.binary_length(uids), UID_LENGTH), False)
        chars = fixed_chars(as_strings(pc.if_else(good_len, uids, pa.scalar("0" * UID_LENGTH))), UID_LENGTH)
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


def uids_to_array(uids) -> np.ndarray:
    """Parse, refusing any malformed uid: strings (list, NumPy, Arrow or chunked Arrow array) -> ``u8,u8``
    array, same order (not sorted)."""
    if isinstance(uids, pa.ChunkedArray):
        chunks = uids.chunks
    elif isinstance(uids, pa.Array):
        chunks = [uids]
    else:
        try:
            chunks = [pa.array(uids, type=pa.large_string())]
        except (pa.ArrowException, TypeError, ValueError) as exc:
            raise FlytError(f"uids must be strings ({exc}); {_EXPECTED}") from None
    out = np.empty(sum(len(chunk) for chunk in chunks), dtype=UID_DTYPE)
    row = 0
    for chunk in chunks:
        chars = _uid_chars(chunk, row)
        for lo in range(0, len(chars), _CHUNK):
            block = chars[lo : lo + _CHUNK]
            raw = None
            if not np.any(block - np.uint8(ord("A")) < 6):  # unhexlify accepts upper case; uids are lower case
                try:
                    raw = binascii.unhexlify(block)
                except binascii.Error:  # a character that is not hex at all
                    pass
            if raw is None:
                bad = lo + int(np.flatnonzero(~np.isin(block, _HEX_CODES).all(axis=1))[0])
                raise FlytError(f"malformed uid at row {row + bad}: {chunk[bad].as_py()!r}; {_EXPECTED}")
            words = np.frombuffer(raw, dtype=">u8").reshape(-1, 2)
            out["f0"][row + lo : row + lo + len(block)] = words[:, 0]
            out["f1"][row + lo : row + lo + len(block)] = words[:, 1]
        row += len(chars)
    return out


def _uid_chars(uids: pa.Array, first_row: int) -> np.ndarray:
    """The (n, 32) uint8 characters of an Arrow array of uids, or a one-line error naming the first bad row."""
    if getattr(pa.types, "is_string_view", lambda _: False)(uids.type):
        uids = uids.cast(pa.large_string())
    if not (pa.types.is_string(uids.type) or pa.types.is_large_string(uids.type)):
        raise FlytError(f"uids must be strings, got type {uids.type}; {_EXPECTED}")
    chars = fixed_chars(uids, UID_LENGTH)
    if chars is not None:
        return chars
    if uids.null_count:
        row = first_row + int(np.flatnonzero(uids.is_null().to_numpy(zero_copy_only=False))[0])
        raise FlytError(f"uid at row {row} is missing (null); {_EXPECTED}")
    lengths = pc.binary_length(uids).to_numpy()
    i = int(np.flatnonzero(lengths != UID_LENGTH)[0])  # none is null, so some uid has another length
    raise FlytError(
        f"malformed uid at row {first_row + i}: {uids[i].as_py()!r} is {lengths[i]} bytes long; {_EXPECTED}"
    )


def array_to_uids(arr: np.ndarray) -> pa.Array:
    """``u8,u8`` array -> Arrow array of uid strings (call ``.to_pylist()`` for Python strings)."""
    arr = _check_dtype(arr, "uid array")
    n = len(arr)
    words = np.empty((n, 2), dtype=">u8")
    words[:, 0] = arr["f0"]
    words[:, 1] = arr["f1"]
    chars = binascii.hexlify(words)
    offsets = np.arange(0, UID_LENGTH * (n + 1), UID_LENGTH, dtype=np.int64)
    return pa.Array.from_buffers(pa.large_string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(chars)])


def counts_table(uids: np.ndarray, counts: np.ndarray) -> pa.Table:
    """The counts file's rows: uid (string) and count (int64), built from buffers (``pa.array`` on NumPy
    input would import pandas, a second of start-up for ``flyt sample``)."""
    counts = np.ascontiguousarray(counts, dtype=np.int64)
    column = pa.Array.from_buffers(pa.int64(), len(counts), [None, pa.py_buffer(counts)])
    return pa.Table.from_arrays([array_to_uids(uids), column], names=["uid", "count"])


def sort_order(arr: np.ndarray) -> np.ndarray:
    """Indices that sort ``arr`` lexicographically by (f0, f1).

    NumPy's argsort on a structured dtype is ~10x slower than sorting plain uint64, so this sorts one
    uint64 key per row: the high bits of f0 with the row number in the low bits. Rows whose keys tie on
    those high bits (rare: they need equal leading bits) are then put in (f0, f1) order explicitly.
    """
    n = len(arr)
    bits = max(1, (n - 1).bit_length())
    key = ((arr["f0"] >> bits) << bits) | np.arange(n, dtype=np.uint64)
    key.sort()
    order = (key & ((1 << bits) - 1)).astype(np.intp)
    high = key >> bits
    tie = high[1:] == high[:-1]
    if tie.any():
        in_run = np.zeros(n, dtype=bool)
        in_run[1:] |= tie
        in_run[:-1] |= tie
        pos = np.flatnonzero(in_run)
        run_id = np.cumsum(np.concatenate([[True], ~tie])[pos])
        rows = order[pos]
        order[pos] = rows[np.lexsort((arr["f1"][rows], arr["f0"][rows], run_id))]
    return order


def is_sorted(arr: np.ndarray) -> bool:
    """Whether ``arr`` is in lexicographic (f0, f1) order (repeats allowed)."""
    f0, f1 = arr["f0"], arr["f1"]
    return bool(np.all((f0[1:] > f0[:-1]) | ((f0[1:] == f0[:-1]) & (f1[1:] >= f1[:-1]))))


def save_subset(path: str | os.PathLike, uids, counts=None) -> int:
    """Write uids (strings or ``u8,u8``), each repeated ``counts`` times, as a sorted DataComp subset.

    Rows with count 0 are dropped. The file appears only once complete. Returns the number of rows.
    """
    arr = uids if isinstance(uids, np.ndarray) and uids.dtype == UID_DTYPE else uids_to_array(uids)
    if counts is None:
        counts = np.ones(len(arr), dtype=np.int64)
    counts = np.asarray(counts) if len(counts) else np.zeros(0, np.int64)  # [] would be float64
    if counts.shape != arr.shape or not np.issubdtype(counts.dtype, np.integer) or (counts < 0).any():
        raise FlytError(f"{path}: counts must be {len(arr)} non-negative integers, one per uid")
    if not is_sorted(arr):
        order = sort_order(arr)
        arr, counts = arr[order], counts[order]
    rows = np.repeat(arr, counts)
    with atomic_file(path) as handle:  # np.save appends ".npy" to a bare path: a handle keeps the exact name
        np.save(handle, rows)
    return len(rows)


def load_subset(path: str | os.PathLike) -> np.ndarray:
    """Read a DataComp subset file, refusing anything that is not a sorted 1-D ``u8,u8`` array."""
    try:
        arr = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise FlytError(f"{path}: no such file; expected a DataComp subset (.npy of dtype u8,u8)") from None
    except (OSError, ValueError) as exc:
        raise FlytError(f"{path}: not a NumPy .npy file ({exc}); expected a DataComp subset") from None
    if not isinstance(arr, np.ndarray) or arr.ndim != 1:
        raise FlytError(f"{path}: expected a 1-D array of dtype u8,u8 (a DataComp subset)")
    arr = _check_dtype(arr, path)
    if not is_sorted(arr):
        raise FlytError(f"{path}: uids are not sorted; a DataComp subset is sorted lexicographically")
    return arr


def _check_dtype(arr: np.ndarray, name) -> np.ndarray:
    if not isinstance(arr, np.ndarray) or arr.dtype != UID_DTYPE:
        got = arr.dtype if isinstance(arr, np.ndarray) else type(arr).__name__
        raise FlytError(f"{name}: expected dtype u8,u8 (DataComp uids), got {got}")
    return arr


class SubsetWriter:
    """A DataComp subset written in sorted blocks (each after the previous one), never held whole:
    ``with SubsetWriter(path, rows) as out: out.write(uids, counts)``. The row count is fixed up front
    (it is in the .npy header) and checked at the end; the file appears only once complete."""

    def __init__(self, path: str | os.PathLike, rows: int):
        self.path, self.rows, self.written = path, int(rows), 0

    def __enter__(self) -> "SubsetWriter":
        self._atomic = atomic_path(self.path)
        self._handle = open(self._atomic.__enter__(), "wb")
        header = np.lib.format.header_data_from_array_1_0(np.empty(0, dtype=UID_DTYPE))
        header["shape"] = (self.rows,)
        np.lib.format.write_array_header_1_0(self._handle, header)
        return self

    def write(self, uids: np.ndarray, counts: np.ndarray) -> None:
        """The next uids (sorted, after every earlier one), each repeated ``counts`` times."""
        packed = np.empty(len(uids), dtype=UID_DTYPE)
        packed["f0"], packed["f1"] = uids["f0"], uids["f1"]
        rows = np.repeat(packed, counts)
        self._handle.write(rows.data)
        self.written += len(rows)

    def __exit__(self, kind, error, trace) -> bool:
        self._handle.close()
        if kind is None and self.written != self.rows:
            error = FlytError(f"{self.path}: {self.written} subset rows written, {self.rows} announced")
            kind, trace = FlytError, None
        self._atomic.__exit__(kind, error, trace)
        if kind is FlytError and error is not None and trace is None:
            raise error
        return False
