"""The shared homes of the on-disk formats: the WebDataset readers, the uid codec, the input-score join,
and the split of shards over DataLoader workers."""

from __future__ import annotations

import io
import tarfile
import tracemalloc
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import given, settings, strategies as st

from flyt.data.input_scores import IdIndex
from flyt.data.scores import ScoreLookup
from flyt.data.subset import array_to_uids, is_uid, uids_to_array, valid_uids
from flyt.data.webdataset import iter_tar, tar_samples
from flyt.demo import toydata
from flyt.errors import FlytError

HEX = "0123456789abcdef"
uid_strategy = st.text(alphabet=HEX, min_size=32, max_size=32)


def _odd_shard(path) -> None:
    """A tar with what pools hold besides plain samples: a folder entry, a file without extension, a hidden
    file, keys in sub-folders, a multi-dot extension, upper-case extensions, a sample without json."""
    members = [("a.jpg", b"A"), ("a.json", b"{}"), ("dir", None), ("README", b"x"), (".hidden.txt", b"h"),
               ("sub/b.JSON", b'{"k": 1}'), ("sub/b.txt", b"caption"), ("c.seg.png", b"P"), ("c.txt", b"c"),
               ("d.jpg", b"D")]
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _plain(samples) -> list[dict]:
    return [{k: v for k, v in s.items() if k != "__url__"} for s in samples]


def test_both_readers_give_webdatasets_samples(tmp_path):
    """``iter_tar`` (random access, torch-free) and ``tar_samples`` give what ``wds.tarfile_samples`` gives.

    Mutations run: ``split_member`` keeping the extension's case (fails ``sub/b``'s ``json``); splitting the
    key at the last dot (``base.rsplit``: fails ``c.seg.png``); ``iter_tar`` keeping the non-selected members'
    data with ``only`` (fails the json-only check).
    """
    import webdataset as wds

    toydata.write_pool(tmp_path / "pool", 12, n_shards=2, seed=0, n_broken=1)
    _odd_shard(tmp_path / "pool" / "odd.tar")
    shards = sorted(str(p) for p in (tmp_path / "pool").glob("*.tar"))
    direct = list(wds.tarfile_samples([{"url": s} for s in shards]))
    assert len(direct) == 17 and any(s["__key__"] == "c" and "seg.png" in s for s in direct)
    shared = list(tar_samples(shards))
    assert shared == direct  # __url__ included
    assert _plain(s for shard in shards for s in iter_tar(shard)) == _plain(direct)
    only_json = [s for shard in shards for s in iter_tar(shard, only=("json",))]
    assert [s["__key__"] for s in only_json] == [s["__key__"] for s in direct]
    assert all(set(s) <= {"__key__", "json"} for s in only_json)
    assert [s.get("json") for s in only_json] == [s.get("json") for s in direct]


def test_an_unreadable_shard_is_one_line_naming_it(tmp_path):
    """A file that is no tar, and a sample with two members of one extension (one would be lost): both
    readers refuse them in one line naming the shard.

    Mutations run: ``tar_samples`` without ``handler=reraise_with_shard`` (webdataset's own error: fails);
    ``iter_tar`` without its duplicate check (the second ``.txt`` silently wins: fails).
    """
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(FlytError, match=r"cannot read .*bad\.tar"):
        list(tar_samples([str(bad)]))
    twice = tmp_path / "twice.tar"
    with tarfile.open(twice, "w") as tar:
        for name in ("a.json", "a.txt", "a.txt"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    for read in (lambda: list(tar_samples([str(twice)])), lambda: list(iter_tar(twice, only=("json",)))):
        with pytest.raises(FlytError, match=r"cannot read .*twice\.tar.*(two \.txt|duplicate)") as err:
            read()
        assert "\n" not in str(err.value)


@settings(max_examples=50, deadline=None)
@given(st.lists(uid_strategy, max_size=40))
def test_uid_codec_round_trips(uids):
    """parse -> format gives the uids back; validation accepts them all; a single uid passes ``is_uid``.

    Mutation run: ``array_to_uids`` writing the halves little-endian (``dtype="<u8"``: fails the round trip).
    """
    arr = uids_to_array(uids)
    assert arr.dtype == np.dtype("u8,u8") and array_to_uids(arr).to_pylist() == uids
    assert [int(u[:16], 16) for u in uids] == arr["f0"].tolist()
    strings, ok = valid_uids(pa.array(uids, pa.string()))
    assert ok.all() and strings.to_pylist() == uids
    assert all(is_uid(u) for u in uids)


@settings(max_examples=50, deadline=None)
@given(st.lists(uid_strategy, min_size=1, max_size=10), st.integers(0, 9),
       st.sampled_from(["short", "long", "upper", "nonhex", "null"]))
def test_uid_codec_refuses_what_is_not_a_uid(uids, where, kind):
    """A bad uid is refused by the parser (one line naming its row), masked by the validator, and
    ``is_uid`` says no; upper-case hex is lower-cased by the validator.

    Mutations run: the validator's length mask dropped (no ``mask &= good_len``: the short and long uids
    pass, fails); the parser's message naming ``first_row`` instead of the bad row (fails); ``is_uid`` accepting
    upper case (``issuperset(text.lower())``: fails)."""
    where %= len(uids)
    bad = {"short": uids[where][:31], "long": uids[where] + "0", "upper": uids[where].upper().replace("0", "A"),
           "nonhex": "g" + uids[where][1:], "null": None}[kind]
    column = uids[:where] + [bad] + uids[where + 1:]
    with pytest.raises(FlytError, match=rf"row {where}\b.*32 lowercase hex") as err:
        uids_to_array(column)
    assert "\n" not in str(err.value)
    strings, ok = valid_uids(pa.array(column, pa.string()))
    if kind == "upper":  # upper-case hex is still a uid to the validator: the column comes back lower-cased
        assert ok.all() and strings.to_pylist() == [u.lower() for u in column]
    else:
        assert ok.tolist() == [i != where for i in range(len(uids))]
    assert bad is None or not is_uid(bad)


def test_score_lookup_on_100k_rows_holds_arrays_not_objects(tmp_path):
    """A released-layout folder of 100k rows: the lookup's memory is its arrays (no object per row), and a
    batch is one vectorised join, right for every row and a one-line error for a missing one.

    Mutations run: ``ScoreLookup`` indexing into a dict (``dict(zip(ids.to_pylist(), values))``, the old
    way: ~25 MB, fails the memory bound); ``rows`` returning ``values[pos]`` without the missing-row check
    (fails the error).
    """
    n, fields = 100_000, ["a", "b"]
    rng = np.random.default_rng(0)
    keys = np.char.add("1", np.char.zfill(rng.permutation(n).astype(str), 11))
    frame = pd.DataFrame({"key": keys, "a": rng.normal(size=n), "b": rng.integers(0, 9, n)})
    frame.iloc[: n // 2].to_parquet(tmp_path / "part-0.parquet", index=False)
    frame.iloc[n // 2:].to_parquet(tmp_path / "part-1.parquet", index=False)
    lookup = ScoreLookup(tmp_path, fields)
    tracemalloc.start()
    query = rng.integers(0, n, 4096)
    got = lookup.rows(keys[query].tolist(), ["0" * 32] * len(query))
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    (join, index, values), = lookup._tables.values()
    arrays = index.ids.nbytes + index.rows.nbytes + values.nbytes  # 12 + 8 + 16 bytes a row
    assert join == "key" and isinstance(index, IdIndex) and values.shape == (n, 2)
    assert held < arrays + (1 << 20), (held, arrays)
    np.testing.assert_array_equal(got, frame[fields].to_numpy(np.float64)[query])
    with pytest.raises(FlytError, match=r"no M-FLYT score row for key 999 in "):
        lookup.rows([keys[0], "999"], ["0" * 32] * 2)


def test_worker_shares_cover_every_shard_once(monkeypatch):
    """Over every (rank, worker) of a run, the shares are disjoint and cover the list; one process alone
    takes everything. Mutation run: the slot ``worker * world_size + rank`` with step ``workers`` (fails)."""
    import torch

    from flyt.streams.workers import current_worker, worker_share

    assert current_worker() == (0, 1) and list(worker_share(range(5))) == list(range(5))
    for items, world, workers in ((list(range(23)), 3, 4), (list(range(5)), 2, 4), (range(7), 1, 3)):
        taken = []
        for rank in range(world):
            for worker in range(workers):
                info = SimpleNamespace(id=worker, num_workers=workers)
                monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda info=info: info)
                taken += list(worker_share(items, rank, world))
        assert sorted(taken) == list(items)
