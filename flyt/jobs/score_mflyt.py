"""M-FLYT scoring: the mixer (one float64 matrix-vector product) over input-score parquet files, read and
joined to each pool shard's samples by key (or uid) by :mod:`flyt.data.input_scores`; no image is opened."""

from __future__ import annotations

import time
from collections import Counter
from functools import partial

from flyt.data.score_files import Output, shard_stats, write_shard
from flyt.data.pool import Shard, first_copies, shard_ids


def _mixed(table, fields, weight, bias):
    """bias + sum_j weight_j * column_j in float64 (nulls give NaN)."""
    import numpy as np

    from flyt.data.input_scores import column_values

    out = np.full(table.num_rows, bias, dtype=np.float64)
    for w, name in zip(weight, fields):
        out += w * column_values(table, name)
    return out


class MixerScores:
    """The M-FLYT mixer applied to input-score parquet files, joined to pool samples by key (or uid); over
    several folders (``a::b``) the mixer is linear, so each folder adds its columns' part."""

    def __init__(self, parquet_dir: str, fields: list[str], weight, bias: float):
        from flyt.data.input_scores import field_folders

        parts = field_folders(parquet_dir, fields)
        self.parts = [_FolderMix(folder, [fields[j] for j in where], [weight[j] for j in where], bias * (i == 0))
                      for i, (folder, where) in enumerate(parts)]

    def shard_scores(self, uids, keys, timings: Counter):
        """Per sample: the float64 mixer output (NaN where an input is null) and whether every folder has
        its score row."""
        out, found = self.parts[0].shard_scores(uids, keys, timings)
        for part in self.parts[1:]:
            more, also = part.shard_scores(uids, keys, timings)
            out, found = out + more, found & also
        return out, found


class _FolderMix:
    """One folder's part of the mixer: bias + sum of its columns times their weights."""

    def __init__(self, parquet_dir: str, fields: list[str], weight, bias: float):
        from flyt.data.input_scores import join_column, read_folder, score_files

        self.dir, self.per_shard, files = score_files(parquet_dir)
        self.fields, self.weight, self.bias = list(fields), weight, float(bias)
        join_column(files[0], self.fields)  # a wrong --parquet_fields fails here, once
        self._global = None
        if not self.per_shard:
            self._global = read_folder(self.dir, files, self.fields, self._mix)

    def _mix(self, table):
        return _mixed(table, self.fields, self.weight, self.bias)

    def shard_scores(self, uids, keys, timings: Counter):
        """Per sample: this folder's part (NaN where an input is null) and whether it has a score row."""
        import numpy as np
        import pyarrow.compute as pc

        from flyt.data.input_scores import positions, read_scores, shard_file

        if self._global is not None:
            tables = [self._global]
        else:
            started = time.perf_counter()
            prefixes = pc.utf8_slice_codeunits(keys, 0, 8)
            read = []
            for prefix in sorted(pc.unique(prefixes).to_pylist()):
                path = shard_file(self.dir, keys[pc.index(prefixes, prefix).as_py()].as_py())
                read.append(read_scores(path, self.fields))
            timings["read_s"] += time.perf_counter() - started
            started = time.perf_counter()
            tables = [(join, partial(positions, ids), self._mix(table)) for join, ids, table in read]
            timings["compute_s"] += time.perf_counter() - started
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
    ``taken``: the uids an earlier shard scores (see :mod:`flyt.jobs.repeats`)."""
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
