"""How fast ``flyt sample`` turns scores into a subset, measured in one run.

    python benchmarks/sampling.py                      # 10M pool, 1M baseline: a few minutes
    python benchmarks/sampling.py --pool 1000000 --baseline_pool 100000 --skip_io   # quick

Prints: the exact SCS/HCS race on ``--pool`` scores (time, peak memory traced by tracemalloc), its linear
projection to DataComp medium (128M -> 128M), the original batched algorithm (batch = 0.1% of the pool,
softmax over the whole pool every batch) against the race on ``--baseline_pool`` rows, and beside it the
whole ``flyt sample`` command on a ``--baseline_pool``-row score file, end to end in a child process
(start-up, reading, SCS, the .npy, the counts parquet, the summary and the plot); then the time to read,
validate and write the files of ``--pool`` rows. Scores are standard normal logits times ``--score_std``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flyt.cli import main as flyt_main
from flyt.data.score_table import read_scores
from flyt.data.subset import UID_DTYPE, array_to_uids, save_subset
from flyt.select.race import race_counts
from flyt.select.samplers import batched_counts

MEDIUM = 128_000_000
GB = 1e9


def timed(fn, *args, **kwargs):
    """(result, seconds, peak bytes allocated during the call beyond what was live before it)."""
    tracemalloc.start()
    live = tracemalloc.get_traced_memory()[0]
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1] - live
    tracemalloc.stop()
    return result, seconds, peak


def random_uids(n: int, seed: int = 2) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pool = np.empty(n, dtype=UID_DTYPE)
    pool["f0"] = rng.integers(0, 2**63, n, dtype=np.uint64) * 2 + rng.integers(0, 2, n, dtype=np.uint64)
    pool["f1"] = rng.integers(0, 2**63, n, dtype=np.uint64)
    return pool


def race(args, n, penalty=None, cap=math.inf):
    logits = np.random.default_rng(1).normal(0.0, args.score_std, n)
    penalty = args.penalty if penalty is None else penalty
    return timed(race_counts, logits, n, random_uids(n), 0, penalty, cap)


def bench_race(args) -> None:
    n = args.pool
    counts, seconds, peak = race(args, n)
    print(
        f"SCS exact race, {n:,} -> {n:,} (penalty {args.penalty}): {seconds:.2f} s, peak {peak / GB:.2f} GB "
        f"(goal <= 5 s, <= 2 GB); {np.count_nonzero(counts):,} unique, max repeat {counts.max()}"
    )
    scale = MEDIUM / n
    print(
        f"  projected {MEDIUM // 10**6}M -> {MEDIUM // 10**6}M (work and memory linear in pool + total): "
        f"~{seconds * scale:.0f} s, ~{peak * scale / GB:.1f} GB"
    )
    counts, seconds, peak = race(args, n, penalty=0.0, cap=args.frequency_limit)
    print(
        f"HCS exact race, {n:,} -> {n:,} (frequency_limit {args.frequency_limit}): {seconds:.2f} s, "
        f"peak {peak / GB:.2f} GB; {np.count_nonzero(counts):,} unique"
    )


def bench_baseline(args) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = args.baseline_pool
    batch = max(1, round(n * args.batch_fraction))
    logits = np.random.default_rng(1).normal(0.0, args.score_std, n)
    cpu = time.process_time()
    _, batched_s, _ = timed(batched_counts, logits, n, np.random.default_rng(0), batch, args.penalty)
    batched_cpu = time.process_time() - cpu
    _, race_s, _ = timed(race_counts, logits, n, random_uids(n), 0, args.penalty)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        scores = Path(tmp) / "scores.parquet"
        pq.write_table(pa.table({"uid": array_to_uids(random_uids(n)), "score": logits}), scores)
        argv = [sys.executable, "-m", "flyt.cli", "sample", "--scores", str(scores), "--method", "scs", "--total_size",
                str(n), "--seed", "0", "--output", f"{tmp}/subset.npy", "--counts_output", f"{tmp}/counts.parquet"]
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        started = time.perf_counter()
        child = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL)
        _, status, usage = os.wait4(child.pid, 0)  # the child's own CPU time: fair beside a shared machine's load
        whole_s = time.perf_counter() - started
        assert os.waitstatus_to_exitcode(status) == 0
        whole_cpu = usage.ru_utime + usage.ru_stime
    print(
        f"original batched SCS, {n:,} -> {n:,}, batch {batch:,}: {batched_s:.2f} s (projected "
        f"{MEDIUM // 10**6}M -> {MEDIUM // 10**6}M, {round(1 / args.batch_fraction):,} batches over the whole pool: "
        f"~{batched_s * MEDIUM / n / 60:.0f} min); exact race on the same: {race_s:.3f} s "
        f"({batched_s / race_s:.0f}x); whole `flyt sample` on a {n:,}-row file, end to end in a child process "
        f"(start-up, read, SCS, .npy, counts parquet, summary, plot): {whole_s:.2f} s, "
        f"{batched_s / whole_s:.0f}x the original's algorithm alone (goal >= 30x); in CPU seconds "
        f"{whole_cpu:.2f} s against {batched_cpu:.2f} s: {batched_cpu / whole_cpu:.0f}x "
        f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)"
    )


def bench_io(args) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = args.pool
    rng = np.random.default_rng(2)
    pool = random_uids(n)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        scores_path, out = Path(tmp) / "scores.parquet", Path(tmp) / "subset.npy"
        table = pa.table({"uid": array_to_uids(pool), "score": rng.normal(0.0, args.score_std, n)})
        pq.write_table(table, scores_path)
        del table
        (uids, scores), read_s, read_peak = timed(read_scores, str(scores_path), "score")
        counts = race_counts(scores, n, uids, 0, args.penalty)
        drawn = counts > 0
        rows, save_s, _ = timed(save_subset, out, uids[drawn], counts[drawn])
        argv = [
            "sample",
            "--scores",
            str(scores_path),
            "--method",
            "scs",
            "--total_size",
            str(n),
            "--seed",
            "0",
            "--output",
            str(out),
            "--counts_output",
            str(Path(tmp) / "counts.parquet"),
        ]
        started = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            code = flyt_main(argv)
        cli_s = time.perf_counter() - started
        assert code == 0
        print(
            f"I/O, {n:,} rows ({scores_path.stat().st_size / GB:.2f} GB parquet): read + validate + sort "
            f"{read_s:.2f} s (peak {read_peak / GB:.2f} GB); save_subset of {rows:,} rows {save_s:.2f} s; "
            f"whole `flyt sample` (read, SCS, .npy, counts parquet, summary, plot) {cli_s:.2f} s"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", type=int, default=10_000_000, help="rows for the race and the I/O timings")
    parser.add_argument("--baseline_pool", type=int, default=1_000_000, help="rows for the batched comparison")
    parser.add_argument("--batch_fraction", type=float, default=0.001, help="batch size of the original, per pool")
    parser.add_argument("--penalty", type=float, default=0.15)
    parser.add_argument("--frequency_limit", type=int, default=15)
    parser.add_argument("--score_std", type=float, default=1.0, help="spread of the synthetic logits")
    parser.add_argument("--skip_io", action="store_true", help="skip the parquet/npy timings")
    parser.add_argument("--workdir", help="where to write the temporary files (default: system temp)")
    args = parser.parse_args()
    bench_race(args)
    bench_baseline(args)
    if not args.skip_io:
        bench_io(args)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux
    print(f"process peak RSS {rss:.2f} GB")


if __name__ == "__main__":
    main()
