"""Where ``flyt score`` writes: one parquet file per pool shard (uid, score float32, key; the shard's
statistics in the file's metadata), written atomically, optionally merged into one file."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from flyt.errors import FlytError
from flyt.data.pool import Shard

SUMMARY = "_summary.json"


META_KEY = b"flyt_score"  # per-shard statistics in each output file's parquet metadata
WRITE_OPTIONS = {"compression": "zstd", "use_dictionary": False, "write_statistics": ["score"]}


class Output:
    """Where each shard's scores go: the output folder, or the hidden parts folder of a merged file."""

    def __init__(self, path: str, job: int, jobs: int):
        self.path = Path(path)
        self.merged = self.path.suffix == ".parquet" and not self.path.is_dir()
        if self.merged:
            self.parts = self.path.parent / f".{self.path.name}.parts"
            summary = self.path.parent / f"{self.path.stem}{SUMMARY}"
        else:
            if self.path.exists() and not self.path.is_dir():
                raise FlytError(f"--output {self.path} is a file: give a folder, or a path ending in .parquet to merge")
            self.parts = self.path
            summary = self.path / SUMMARY
        if jobs > 1:  # one summary per job, so concurrent jobs never overwrite each other's
            summary = summary.with_name(summary.name.replace(".json", f".{job:0{len(str(jobs - 1))}d}-of-{jobs}.json"))
        self.summary = summary

    def part(self, shard: Shard) -> Path:
        return self.parts / f"{shard.name}.parquet"


def write_shard(path: Path, uids, keys, scores, stats: dict) -> None:
    """One shard's scores, atomically: uid (string), score (float32), key (string); stats in the metadata."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from flyt.atomic import atomic_file

    def strings(values):
        return values.cast(pa.string()) if isinstance(values, pa.Array) else pa.array(values, pa.string())

    table = pa.table({"uid": strings(uids), "score": pa.array(np.asarray(scores, dtype=np.float32), pa.float32()),
                      "key": strings(keys)})
    table = table.replace_schema_metadata({META_KEY: json.dumps(stats).encode()})
    with atomic_file(path) as f:
        pq.write_table(table, f, **WRITE_OPTIONS)


def read_stats(path: Path) -> dict | None:
    import pyarrow.parquet as pq

    try:
        meta = pq.read_schema(path).metadata or {}
        return json.loads(meta[META_KEY])
    except Exception:
        return None


def merge(parts: list[Path], target: Path) -> int:
    """Concatenate the parts (in shard order) into ``target`` atomically; returns the number of rows."""
    import pyarrow.parquet as pq

    from flyt.atomic import atomic_path

    rows = 0
    with atomic_path(target) as tmp:
        writer = None
        try:
            for part in parts:
                table = pq.read_table(part).replace_schema_metadata(None)
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema, **WRITE_OPTIONS)
                writer.write_table(table)
                rows += table.num_rows
        finally:
            if writer is not None:
                writer.close()
        if writer is None:  # no parts: an empty file with the schema
            write_shard(tmp, [], [], [], {})
    return rows


def shard_stats(shard: Shard, scored: int, skipped: Counter) -> dict:
    """What a shard's output file records about it (in its parquet metadata) and the summary lists."""
    return {"shard": str(shard.path), "scored": int(scored), "skipped": dict(sorted(skipped.items()))}
