"""``flyt sample``: turn per-uid scores into a DataComp subset (docs/algorithm.md, last section).

Flags, wiring and the summary; the samplers are in ``flyt.select`` (the exact keyed race for SCS/HCS,
top-k, threshold, the original batched approximation). A pool whose scores fit in ``--memory_limit`` is
sampled in memory; a larger one by passes over its score files (``flyt.jobs.sample_passes``), with the
same subset for the same seed: every random number depends on (seed, uid, draw index) only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import time
from pathlib import Path

import numpy as np

from flyt.atomic import atomic_file, atomic_path, sweep_temporaries
from flyt.data.score_table import read_scores, score_files
from flyt.data.subset import counts_table, save_subset
from flyt.errors import FlytError
from flyt.runner.engines import add_engine_arguments, make_executor
from flyt.select.keyed import sample_mask
from flyt.select.race import pool_sample, race_counts
from flyt.select.samplers import batched_counts, count_histogram, penalty_and_cap, plan, top_counts
from flyt.select.sharpness import tempered

METHODS = ("scs", "hcs", "topk", "threshold")
DEFAULT_PENALTY = 0.15
DEFAULT_FREQUENCY_LIMIT = 15
# method -> (flags it needs, flags it also accepts); --seed is accepted by every method
METHOD_FLAGS = {
    "scs": ({"total_size", "seed"}, {"repetition_penalty", "sampling_batch_size", "temperature", "unique_fraction"}),
    "hcs": ({"total_size", "seed"}, {"frequency_limit", "sampling_batch_size", "temperature", "unique_fraction"}),
    "topk": (set(), {"total_size", "fraction"}),
    "threshold": ({"threshold"}, set()),
}
_METHOD_FLAG_NAMES = sorted(set().union(*(needed | accepted for needed, accepted in METHOD_FLAGS.values())))
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30, "TIB": 2**40}
DEFAULT_MEMORY = "4GB"
_IN_MEMORY_BYTES = (200, 32)  # peak bytes per pool row and per draw of the in-memory path (measured: ~150, 24)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scores", required=True, help="parquet file or folder of parquet files with uid and score")
    parser.add_argument("--method", required=True, help="scs (soft cap), hcs (hard cap), topk or threshold")
    parser.add_argument("--total_size", type=int, help="draws in the subset, repeats counted (scs, hcs; or topk)")
    parser.add_argument(
        "--repetition_penalty", type=float, help=f"scs: logit drop per draw of an example (default {DEFAULT_PENALTY})"
    )
    parser.add_argument(
        "--frequency_limit", type=int, help=f"hcs: most draws of one example (default {DEFAULT_FREQUENCY_LIMIT})"
    )
    parser.add_argument("--fraction", type=float, help="topk: keep this fraction of the pool, in (0, 1]")
    parser.add_argument("--threshold", type=float, help="threshold: keep every uid with score >= this")
    parser.add_argument("--seed", type=int, help="random seed (scs, hcs)")
    parser.add_argument("--output", required=True, help="DataComp subset file to write (.npy of u8,u8 uids)")
    parser.add_argument("--counts_output", help="also write a parquet of uid, count (drawn uids only)")
    parser.add_argument(
        "--sampling_batch_size",
        type=int,
        help="scs/hcs: use the original batched approximation, drawing this many distinct examples per batch",
    )
    parser.add_argument(
        "--temperature", type=float, help="scs/hcs: divide the scores (logits) by this; below 1 is sharper (default 1)"
    )
    parser.add_argument(
        "--unique_fraction",
        type=float,
        help="scs/hcs: use the temperature at which this share of the pool is expected among the drawn, in (0, 1]",
    )
    parser.add_argument("--score_column", default="score", help="column holding the scores (logits) (default score)")
    parser.add_argument("--plot", help="PNG of pool vs. selected score distributions (default <output stem>.png)")
    parser.add_argument(
        "--memory_limit",
        default=DEFAULT_MEMORY,
        help="memory to stay within, e.g. 4GB or 512MB; a larger pool is sampled out of core, by passes over "
        "its score files, with the same subset (default 4GB)",
    )
    parser.add_argument("--workers", type=int, default=2, help="out of core: files processed at once (default 2)")
    add_engine_arguments(parser)


def run(args: argparse.Namespace) -> int:
    params = _check_flags(args)
    memory = parse_size(args.memory_limit)
    started = time.perf_counter()
    files, rows = score_files(args.scores, args.score_column)
    pool_rows, draws = sum(rows), params.get("total_size") or 0
    output = Path(args.output)
    plot = Path(args.plot) if args.plot else output.with_suffix(".png")
    written = [output, Path(f"{output}.summary.json"), plot] + ([Path(args.counts_output)] if args.counts_output else [])
    sweep_temporaries(written)  # what a run killed while writing them left: nothing else removes it
    if pool_rows * _IN_MEMORY_BYTES[0] + draws * _IN_MEMORY_BYTES[1] <= memory:
        figures, sampled = _in_memory(args, params, output)
        path = "in memory"
    else:
        if params.get("sampling_batch_size") is not None:
            raise FlytError(
                f"--sampling_batch_size: the batched approximation needs the whole pool in memory ({pool_rows:,} "
                f"rows do not fit in --memory_limit {args.memory_limit}); use the exact sampler (drop the flag)"
            )
        figures, sampled = _out_of_core(args, params, files, rows, memory, output)
        path = f"out of core, {len(files)} files"
    n, temperature = figures.pop("pool_size"), figures.pop("temperature")
    summary = {
        "scores": str(args.scores),
        "score_column": args.score_column,
        "pool_size": n,
        "method": args.method,
        "params": params,
        "seed": args.seed,
        **figures,
        "temperature": temperature,
        "unique_fraction": {"target": params.get("unique_fraction"), "realised": figures["unique"] / n},
        "output": str(output),
        "counts_output": args.counts_output,
        "plot": str(plot),
        "path": path,
        "seconds": round(time.perf_counter() - started, 3),
    }
    with atomic_path(f"{output}.summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    plot_selection(plot, *sampled, _describe(args.method, params, args.seed))
    print(f"pool: {n:,} uids from {args.scores} ({path})")
    print(
        f"{_describe(args.method, params, args.seed)}: {summary['total_drawn']:,} drawn, "
        f"{summary['unique']:,} unique, max repeat {summary['max_count']}"
    )
    if temperature is not None:
        target = params.get("unique_fraction")
        print(
            f"temperature {temperature:.4g}" + (f" (found for unique fraction {target})" if target else "")
            + f": unique fraction {summary['unique_fraction']['realised']:.4f} of the pool"
        )
    print("examples drawn k times: " + "  ".join(f"{k}: {v:,}" for k, v in summary["count_histogram"].items()))
    written = [str(output), args.counts_output, f"{output}.summary.json", str(plot)]
    print("wrote " + ", ".join(name for name in written if name))
    return 0


def parse_size(text: str) -> int:
    """``4GB``, ``512MB``, ``2GiB``, ``1e9`` -> bytes; at least 1MB."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]i?b|b)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise FlytError(f"--memory_limit {text!r}: expected a size such as 4GB, 512MB or 2GiB")
    size = int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])
    if size < 10**6:
        raise FlytError(f"--memory_limit {text}: at least 1MB is needed")
    return size


def _in_memory(args, params: dict, output: Path) -> tuple[dict, tuple[np.ndarray, np.ndarray]]:
    uids, scores = read_scores(args.scores, args.score_column)
    n = scores.size
    total, temperature = plan(args.method, params, n, pool_sample(uids, scores), float(scores.max()))
    if args.method == "threshold":
        counts = (scores >= params["threshold"]).astype(np.int64)
    elif args.method == "topk":
        counts = top_counts(scores, total)
    else:
        penalty, cap = penalty_and_cap(args.method, params)
        batch = params.get("sampling_batch_size")
        if batch is not None:
            logits = tempered(scores, temperature)
            counts = batched_counts(logits, total, np.random.default_rng(args.seed), batch, penalty, cap)
        else:
            counts = race_counts(scores, total, uids, args.seed, penalty, cap, temperature)
    drawn = counts > 0
    save_subset(output, uids[drawn], counts[drawn])
    if args.counts_output:
        _write_counts(args.counts_output, uids[drawn], counts[drawn])
    figures = {"pool_size": int(n), "temperature": temperature, "total_drawn": int(counts.sum()),
               "unique": int(np.count_nonzero(drawn)), "max_count": int(counts.max()),
               "count_histogram": count_histogram(counts)}
    mask = sample_mask(uids, n)
    return figures, (scores[mask], counts[mask])


def _out_of_core(args, params, files, rows, memory, output) -> tuple[dict, tuple[np.ndarray, np.ndarray]]:
    from flyt.jobs.sample_passes import OutOfCore

    workers = max(1, args.workers)
    passes = OutOfCore(args.scores, files, rows, args, params, make_executor(args, workers), memory)
    outcome = passes.select()
    figures = passes.write(outcome, output, args.counts_output)
    sampled = passes.sampled(outcome)
    passes.clean()
    return {"pool_size": outcome["pool_size"], "temperature": outcome["temperature"], **figures}, sampled


def _check_flags(args: argparse.Namespace) -> dict:
    """Validate the flags before touching any file; returns the method's parameters, defaults filled in."""
    if args.method not in METHODS:
        raise FlytError(f"--method {args.method!r} is not one of {', '.join(METHODS)}")
    needed, accepted = METHOD_FLAGS[args.method]
    given = {name for name in _METHOD_FLAG_NAMES if getattr(args, name) is not None}
    unused, missing = sorted(given - needed - accepted - {"seed"}), sorted(needed - given)
    if unused:
        raise FlytError(f"--{unused[0]} does not apply to --method {args.method}")
    if missing:
        raise FlytError(f"--method {args.method} needs --{missing[0]}")
    if args.method == "topk" and len(given & {"fraction", "total_size"}) != 1:
        raise FlytError("--method topk needs exactly one of --fraction and --total_size")
    if args.total_size is not None and args.total_size < 1:
        raise FlytError(f"--total_size must be a positive integer, got {args.total_size}")
    if args.seed is not None and args.seed < 0:
        raise FlytError(f"--seed must be a non-negative integer, got {args.seed}")
    if args.fraction is not None and not 0 < args.fraction <= 1:
        raise FlytError(f"--fraction must be in (0, 1], got {args.fraction}")
    if args.threshold is not None and not math.isfinite(args.threshold):
        raise FlytError(f"--threshold must be a finite number, got {args.threshold}")
    if {"temperature", "unique_fraction"} <= given:
        raise FlytError("--temperature and --unique_fraction exclude each other; give one")
    if args.temperature is not None and not (math.isfinite(args.temperature) and args.temperature > 0):
        raise FlytError(f"--temperature must be a positive number, got {args.temperature}")
    if args.unique_fraction is not None and not 0 < args.unique_fraction <= 1:
        raise FlytError(f"--unique_fraction must be in (0, 1], got {args.unique_fraction}")
    if args.sampling_batch_size is not None and args.sampling_batch_size < 1:
        raise FlytError(f"--sampling_batch_size must be a positive integer, got {args.sampling_batch_size}")
    if args.plot and not args.plot.lower().endswith(".png"):
        raise FlytError(f"--plot {args.plot}: the plot is a PNG; give a name ending in .png")
    if args.output and os.path.isdir(args.output):
        raise FlytError(f"--output {args.output} is a folder; expected a file name such as subset.npy")
    params = {name: getattr(args, name) for name in sorted(given - {"seed"})}
    if args.method == "scs":
        params.setdefault("repetition_penalty", DEFAULT_PENALTY)
        if not (math.isfinite(params["repetition_penalty"]) and params["repetition_penalty"] >= 0):
            raise FlytError(f"--repetition_penalty must be >= 0, got {params['repetition_penalty']}")
    if args.method == "hcs":
        params.setdefault("frequency_limit", DEFAULT_FREQUENCY_LIMIT)
        if params["frequency_limit"] < 1:
            raise FlytError(f"--frequency_limit must be a positive integer, got {params['frequency_limit']}")
    return params


def _write_counts(path: str, uids: np.ndarray, counts: np.ndarray) -> None:
    import pyarrow.parquet as pq

    with atomic_file(path) as f:
        pq.write_table(counts_table(uids, counts), f)


def _describe(method: str, params: dict, seed: int | None) -> str:
    details = [f"{name} {value}" for name, value in params.items()] + ([f"seed {seed}"] if seed is not None else [])
    return f"{method} ({', '.join(details)})" if details else method


def plot_selection(path: str | os.PathLike, scores: np.ndarray, counts: np.ndarray, title: str) -> None:
    """A PNG: the score distribution of the pool vs. the selection (weighted by counts), and the mean count
    per score percentile: what to look at when choosing the penalty or cap.

    ``scores`` and ``counts`` are the uid-keyed pool sample's (a random sample, at most ~2^18 rows), so the
    plot costs the same for 10^10 rows as for 10^4.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    span = (scores.min(), scores.max()) if scores.max() > scores.min() else (scores.min() - 0.5, scores.max() + 0.5)
    for weights, label in ((None, "pool"), (counts, "selection (with repeats)")):
        if weights is None or weights.sum() > 0:
            density, edges = np.histogram(scores, bins=100, range=span, weights=weights, density=True)
            left.stairs(density, edges, label=label)
    left.set(xlabel="score", ylabel="density")
    left.legend()
    percentile = np.minimum(np.argsort(np.argsort(scores, kind="stable")) * 100 // scores.size, 99)
    with np.errstate(invalid="ignore"):  # a tiny pool leaves some percentiles empty: gaps in the curve
        mean_count = np.bincount(percentile, weights=counts, minlength=100) / np.bincount(percentile, minlength=100)
    right.plot(np.arange(100), mean_count, marker=".")
    right.set(xlabel="score percentile in the pool", ylabel="mean draws per example")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
