"""``flyt sample`` out of core on a generated score folder: peak memory, wall time, and the same subset as
the in-memory path on a slice.

    python benchmarks/sample_out_of_core.py --rows 200000000 --workdir /work/tmp/ooc    # ~ GBs of disk
    python benchmarks/sample_out_of_core.py --rows 10000000 --check_rows 2000000        # quick

Writes ``--rows`` rows (uid, float32 score, key, as ``flyt score`` writes them) in files of
``--rows_per_file``, runs the whole ``flyt sample`` (SCS, total_size = pool size, default --memory_limit)
as a child process and reads its peak RSS (getrusage of the children), then runs the first
``--check_rows`` rows (whole files) both in memory and out of core (``--memory_limit 100MB``) and
compares the subsets byte for byte. Prints a projection to 12.8B rows from the measured per-row costs:
the passes split over nodes (each file is a unit), the uniqueness check and the merge stay on one.
The generated folder is deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import binascii
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
XLARGE = 12_800_000_000


def generate(folder: Path, rows: int, per_file: int) -> float:
    import pyarrow as pa
    import pyarrow.parquet as pq

    started = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index, first in enumerate(range(0, rows, per_file)):
        path = folder / f"{index:08d}.parquet"
        if path.exists():
            continue
        n = min(per_file, rows - first)
        chars = binascii.hexlify(rng.bytes(16 * n))
        offsets = pa.py_buffer(np.arange(0, 32 * (n + 1), 32, dtype=np.int32))
        uids = pa.Array.from_buffers(pa.string(), n, [None, offsets, pa.py_buffer(chars)])
        keys = pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(np.arange(0, 9 * (n + 1), 9, dtype=np.int32)),
                                                      pa.py_buffer(b"".join(b"%09d" % (first + i) for i in range(n)))])
        scores = rng.normal(0.0, 1.0, n).astype(np.float32)
        table = pa.Table.from_arrays([uids, pa.Array.from_buffers(pa.float32(), n, [None, pa.py_buffer(scores)]), keys],
                                     names=["uid", "score", "key"])
        pq.write_table(table, folder / f".{path.name}.tmp", compression="zstd", use_dictionary=False)
        os.replace(folder / f".{path.name}.tmp", path)
    return time.perf_counter() - started


def run_sample(scores: Path, out: Path, total: int, *flags: str) -> tuple[float, float, dict]:
    """(wall seconds, peak RSS in GB of the child, its summary) of one whole ``flyt sample``."""
    argv = [sys.executable, "-m", "flyt.cli", "sample", "--scores", str(scores), "--method", "scs", "--total_size",
            str(total), "--seed", "0", "--output", str(out), "--counts_output", f"{out}.counts.parquet", *flags]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    started = time.perf_counter()
    log = Path(f"{out}.log")
    with open(log, "w") as handle:
        child = subprocess.Popen(argv, env=env, stdout=handle, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own peak RSS, not the largest of all children
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"flyt sample failed:\n{log.read_text()}")
    peak = usage.ru_maxrss / 1e6  # KiB on Linux
    return wall, peak, json.loads(Path(f"{out}.summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000_000)
    parser.add_argument("--rows_per_file", type=int, default=1_000_000)
    parser.add_argument("--check_rows", type=int, default=10_000_000, help="rows of the in-memory comparison")
    parser.add_argument("--workdir", default="/work/tmp/sample_out_of_core")
    parser.add_argument("--workers", default="2")
    parser.add_argument("--keep", action="store_true", help="keep the generated score folder")
    args = parser.parse_args()
    work = Path(args.workdir)
    pool, check = work / "pool", work / "check"
    print(f"free disk at {work.parent}: {shutil.disk_usage(work.parent if work.parent.exists() else '/').free / 1e9:.0f} GB")
    seconds = generate(pool, args.rows, args.rows_per_file)
    size = sum(path.stat().st_size for path in pool.glob("*.parquet"))
    print(f"generated {args.rows:,} rows in {len(list(pool.glob('*.parquet')))} files ({size / 1e9:.1f} GB) in {seconds:.0f} s")
    try:
        # the slice first: the comparison, in memory and out of core, on the first whole files
        check.mkdir(parents=True, exist_ok=True)
        files = sorted(pool.glob("*.parquet"))[: max(1, args.check_rows // args.rows_per_file)]
        for path in files:
            if not (check / path.name).exists():
                (check / path.name).symlink_to(path)
        slice_rows = min(args.rows, len(files) * args.rows_per_file)
        mem = run_sample(check, work / "memory.npy", slice_rows, "--memory_limit", "64GB")
        ooc = run_sample(check, work / "disk.npy", slice_rows, "--memory_limit", "100MB", "--workers", args.workers)
        same = (work / "memory.npy").read_bytes() == (work / "disk.npy").read_bytes()
        print(f"slice of {slice_rows:,} rows: in memory {mem[0]:.1f} s ({mem[1]:.2f} GB peak, {mem[2]['path']}); "
              f"out of core at 100MB {ooc[0]:.1f} s ({ooc[1]:.2f} GB peak, {ooc[2]['path']}); "
              f"subsets identical: {same}")
        for name in ("memory.npy", "disk.npy"):  # and their counts, summaries, plots and logs
            for path in work.glob(f"{name}*"):
                path.unlink()
        wall, peak, summary = run_sample(pool, work / "subset.npy", args.rows, "--workers", args.workers)
        print(f"whole `flyt sample` (SCS, {args.rows:,} -> {args.rows:,}, default --memory_limit 4GB, "
              f"{summary['path']}): {wall:.0f} s, peak RSS {peak:.2f} GB (goal <= 4 GB); "
              f"{summary['unique']:,} unique; by step: {summary.get('seconds_by_step')}")
        steps = summary.get("seconds_by_step", {})
        spread = sum(v for k, v in steps.items() if k in ("scan", "histogram", "collect"))
        single = wall - spread
        scale = XLARGE / args.rows
        print(f"projected 12.8B rows (the subset written is 16 B x 12.8B = 205 GB): one machine ~{wall * scale / 3600:.1f} h; "
              f"N Ray nodes ~{spread * scale / 3600:.1f} h / N (the passes) + {single * scale / 3600:.1f} h on one node "
              f"(uniqueness check, cut, merge and write); peak memory per node bounded by --memory_limit "
              f"(measured {peak:.2f} GB at {args.rows:,} rows)")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
