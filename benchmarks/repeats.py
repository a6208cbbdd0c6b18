"""The pool-wide repeated-uid index of ``flyt score`` / ``flyt features`` (``flyt.jobs.repeats``): peak
memory and time as the pool grows, with the bucket size fixed, beside the index held in memory.

    python benchmarks/repeats.py --sizes 2000000 8000000 --bucket_rows 1048576

For each size, writes a pool of metadata parquets (``--rows_per_shard`` uids each, 1% of them repeating
a uid of an earlier shard, as in a resharded subset), then runs ``find_repeats`` in a child process, which
reports its own peak RSS, and the baseline flyt had before: every uid of the pool in one pyarrow array,
each row's first occurrence found with ``index_in``. The index holds a bucket at a time, so its peak
should stay flat while the pool grows; the per-uid time projects it to 12.8B uids. Checks that both find
every planted repeat.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
XLARGE = 12_800_000_000
BASELINE = """
import json, resource, sys, time
import numpy as np, pyarrow as pa, pyarrow.compute as pc
from flyt.data.pool import pool_shards, shard_ids
shards = pool_shards(sys.argv[1])
started = time.perf_counter()
uids = [shard_ids(s)[0].cast(pa.large_string()) for s in shards]
owners = np.concatenate([np.full(len(u), j) for j, u in enumerate(uids)])
uids = pa.concat_arrays(uids)
first = pc.index_in(uids, value_set=uids).to_numpy(zero_copy_only=False)
taken = int((owners != owners[first]).sum())
seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "taken": taken, "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""
CHILD = """
import json, sys, time
from pathlib import Path
from flyt.data.pool import pool_shards
from flyt.jobs import repeats
from flyt.runner.local import InProcess
pool, work, bucket_rows = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
repeats.BUCKET_ROWS = bucket_rows
shards = pool_shards(pool)
started = time.perf_counter()
found = repeats.find_repeats(shards, len(shards) - 1, work, InProcess(1), "bench")
seconds = time.perf_counter() - started
taken = sum(len(found.of(s.name) or []) for s in shards)
import resource
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "taken": taken, "buckets": found.buckets, "peak_kib": peak}))
"""


def write_pool(folder: Path, rows: int, per_shard: int, repeat: float) -> int:
    """Shard parquets of random uids; a ``repeat`` share of each later shard's rows copies earlier uids."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from flyt.data.subset import array_to_uids

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    planted, previous = 0, None
    for j in range(rows // per_shard):
        codes = np.empty(per_shard, "u8,u8")
        codes["f0"], codes["f1"] = rng.integers(0, 2**63, per_shard, np.uint64) * 2, rng.integers(0, 2**63, per_shard)
        uids = array_to_uids(codes)
        if previous is not None:
            n = int(per_shard * repeat)
            uids = pa.concat_arrays([previous.slice(0, n), uids.slice(n)])
            planted += n
        keys = pa.array([f"{j:08d}{i:06d}" for i in range(per_shard)])
        pq.write_table(pa.table({"uid": uids, "key": keys}), folder / f"{j:08d}.parquet")
        (folder / f"{j:08d}.tar").touch()
        previous = uids
    return planted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2_000_000, 8_000_000])
    parser.add_argument("--rows_per_shard", type=int, default=10_000)
    parser.add_argument("--bucket_rows", type=int, default=1 << 20)
    parser.add_argument("--repeat", type=float, default=0.01)
    parser.add_argument("--workdir", default="/tmp/flyt_bench_repeats")
    args = parser.parse_args()
    root = Path(args.workdir)
    print("| uids | shards | buckets | in memory: s / peak MiB | buckets: s / peak MiB | time ratio | memory ratio |")
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes:
        shutil.rmtree(root, ignore_errors=True)
        planted = write_pool(root / "pool", size, args.rows_per_shard, args.repeat)
        run = lambda code, *extra: json.loads(subprocess.run(
            [sys.executable, "-c", code, str(root / "pool"), *extra], capture_output=True, text=True, check=True,
            cwd=REPO).stdout.splitlines()[-1])
        base = run(BASELINE)
        result = run(CHILD, str(root / "out"), str(args.bucket_rows))
        assert result["taken"] == base["taken"] == planted, (result, base, planted)
        print(f"| {size:,} | {size // args.rows_per_shard:,} | {result['buckets']} | {base['seconds']:.1f} / "
              f"{base['peak_kib'] / 1024:.0f} | {result['seconds']:.1f} / {result['peak_kib'] / 1024:.0f} | "
              f"{result['seconds'] / base['seconds']:.2f} | {result['peak_kib'] / base['peak_kib']:.2f} |")
        per_uid = result["seconds"] / size
    print(f"projected for {XLARGE:,} uids on one process: {per_uid * XLARGE / 3600:.1f} h "
          f"(each pass's units split over nodes on Ray)")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
