"""The uids an earlier shard holds (``flyt.jobs.repeats``), against a plain sequential reference.

Pools of a few shards drawn by hypothesis from a small set of uids (so that repeats within and across
shards are common), with ``BUCKET_ROWS`` made tiny so that the pool spreads over many buckets, some
empty. Mutations caught: a bucket's lower bound taken without the shift (a uid in several buckets, so
given twice); the owner taken as the last shard of a uid instead of the first; ``of`` reading
one bucket file only; a shard that could not be read keeping an (empty) ids file, so that once fixed it
is never indexed.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flyt.data.pool import Shard
from flyt.jobs import repeats
from flyt.runner.local import InProcess

UIDS = [f"{i * 0x9E3779B97F4A7C15F39CC0605CEDC835 % 2**128:032x}" for i in range(1, 40)]  # spread over the prefix range


def _pool(root: Path, shards: list[list[str]]) -> list[Shard]:
    """Shards as their metadata parquets (the ids are read from them; no tar is opened)."""
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for j, uids in enumerate(shards):
        path = root / f"{j:08d}.tar"
        pd.DataFrame({"uid": uids, "key": [f"{j:08d}{i:04d}" for i in range(len(uids))]}).to_parquet(
            path.with_suffix(".parquet"))
        out.append(Shard(path, path.stem))
    return out


def _reference(shards: list[list[str]]) -> dict[str, list[str]]:
    """Per shard, its uids that a shard before it holds (each once, sorted), one shard at a time."""
    seen, out = set(), {}
    for j, uids in enumerate(shards):
        out[f"{j:08d}"] = sorted(set(uids) & seen)
        seen |= set(uids)
    return out


def _found(found: repeats.Repeats, names) -> dict[str, list[str]]:
    return {name: [] if (t := found.of(name)) is None else t.to_pylist() for name in names}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shards=st.lists(st.lists(st.sampled_from(UIDS), max_size=12), min_size=1, max_size=6),
       bucket_rows=st.sampled_from([1, 3, 1000]))
def test_repeats_equal_the_sequential_reference(tmp_path_factory, monkeypatch, shards, bucket_rows):
    monkeypatch.setattr(repeats, "BUCKET_ROWS", bucket_rows)
    root = tmp_path_factory.mktemp("pool")
    pool = _pool(root / "pool", shards)
    found = repeats.find_repeats(pool, len(pool) - 1, root / "out", InProcess(1), "test")
    assert _found(found, [s.name for s in pool]) == _reference(shards)
    upto = len(pool) // 2  # only the shards up to a split job's last one are indexed
    found = repeats.find_repeats(pool, upto, root / "part", InProcess(1), "test")
    assert _found(found, [s.name for s in pool[: upto + 1]]) == _reference(shards[: upto + 1])


def test_an_unreadable_shard_is_left_out_then_indexed_once_readable(tmp_path, monkeypatch):
    monkeypatch.setattr(repeats, "BUCKET_ROWS", 2)
    shards = [UIDS[:4], UIDS[2:6], UIDS[3:8]]
    pool = _pool(tmp_path / "pool", shards)
    good = pool[1].metadata.read_bytes()
    pool[1].metadata.write_bytes(b"not a parquet file")  # and no tar: its ids cannot be read
    found = repeats.find_repeats(pool, 2, tmp_path / "out", InProcess(2), "test")
    assert _found(found, ["00000000", "00000002"]) == {"00000000": [], "00000002": [UIDS[3]]}
    pool[1].metadata.write_bytes(good)
    found = repeats.find_repeats(pool, 2, tmp_path / "out", InProcess(2), "test")  # the rerun of the job
    assert _found(found, [s.name for s in pool]) == _reference(shards)
    repeats.clean_repeats(tmp_path / "out")
    assert not (tmp_path / "out" / repeats.WORK).exists()


def test_a_failed_write_stops_with_the_unit_named(tmp_path, monkeypatch):
    pool = _pool(tmp_path / "pool", [UIDS[:3]])

    def full_disk(path, rows):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(repeats, "write_run", full_disk)
    with pytest.raises(repeats.FlytError, match="finding repeated uids failed at 00000000: .*No space left"):
        repeats.find_repeats(pool, 0, tmp_path / "out", InProcess(1), "test")


@settings(max_examples=60, deadline=None)
@given(uids=st.lists(st.sampled_from(UIDS[:8]), max_size=20), taken=st.sets(st.sampled_from(UIDS[:8]), max_size=3))
def test_first_copies_keeps_each_uid_once_unless_taken(uids, taken):
    """A shard's rows that keep their uid: the first row of each, unless an earlier shard holds it.
    Mutation caught: the all-distinct shortcut taken whenever the shard has rows (repeats kept)."""
    import pyarrow as pa

    from flyt.data.pool import first_copies

    seen, expected = set(taken), []
    for uid in uids:
        expected.append(uid not in seen)
        seen.add(uid)
    got = first_copies(pa.array(uids, pa.string()), pa.array(sorted(taken), pa.string()) if taken else None)
    assert got.tolist() == expected
