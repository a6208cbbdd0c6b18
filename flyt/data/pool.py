"""The pool's shards for ``flyt score``: their list and output names, and the uids/keys each one holds.

Ids come from a shard's metadata parquet when it has ``uid`` and ``key``, else from the tar's ``.json``
members only (images are never read). A uid held by several shards (a resharded subset's repeats) is
scored once, by the first shard in sorted order.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from flyt.data.subset import as_strings, valid_uids
from flyt.data.webdataset import iter_tar
from flyt.errors import FlytError


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
    keys = as_strings(keys)
    if not ok.all():
        skipped["missing_uid"] += int((~ok).sum())
        keep = pa.array(ok)
        uids, keys = uids.filter(keep), keys.filter(keep)
    if keys.null_count:
        skipped["missing_key"] += keys.null_count
        has_key = pc.invert(pc.is_null(keys))
        uids, keys = uids.filter(has_key), keys.filter(has_key)
    return uids, keys, skipped


def first_copies(uids, taken) -> object:
    """Mask of the samples that keep their uid: its first occurrence in the shard, unless ``taken`` (the
    uids an earlier shard holds) has it. Uids are lower-case hex here, so equal strings are equal uids."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    strings = as_strings(uids if isinstance(uids, (pa.Array, pa.ChunkedArray)) else pa.array(uids, pa.string()))
    if len(pc.unique(strings)) == len(strings):  # the common case, in a third of index_in's time
        keep = np.ones(len(strings), bool)
    else:
        keep = pc.index_in(strings, value_set=strings).to_numpy(zero_copy_only=False) == np.arange(len(strings))
    if taken is not None and len(taken):
        keep &= ~pc.is_in(strings, value_set=taken.cast(strings.type)).to_numpy(zero_copy_only=False)
    return keep
