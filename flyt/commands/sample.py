"""``flyt sample``: turn per-uid scores into a DataComp subset (docs/algorithm.md, last section).

Soft Cap Sampling (SCS) and Hard Cap Sampling (HCS) are sampled exactly with an exponential race: each
example's draws are arrivals of its own clock, whose next arrival comes after Exp(1) / rate, where the
rate is exp(logit - penalty * draws_so_far) for SCS and exp(logit) for HCS (no arrivals after the cap).
By memorylessness, the order of all arrivals is the order of the one-draw-at-a-time process, so the
subset is the ``total_size`` earliest arrivals. ``--sampling_batch_size`` instead reproduces the
original code's batched approximation. The pool is put in uid order first, so the result depends on
the scores and the seed only, not on how the rows are split or ordered across files.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from flyt.atomic import atomic_path
from flyt.errors import FlytError
from flyt.select.sharpness import tempered, temperature_for_unique_fraction
from flyt.data.subset import array_to_uids, save_subset, sort_order, uids_to_array

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
_BLOCK = 1 << 16  # once few examples are still racing, draw up to this many arrivals per round at once
_FLUID_SAMPLE = 1 << 16  # logits used to guess the race's cut-off time
_MAX_LOG_TIME = 700.0  # arrival times are kept below exp(700) time units, where float64 ends
_PLOT_SAMPLE = 1 << 20  # examples behind the mean-count-per-percentile curve
HISTOGRAM_BINS = ((1, 1), (2, 2), (3, 4), (5, 8), (9, 16), (17, None))


# ---------------------------------------------------------------------------------------------- samplers


def race_counts(
    logits: np.ndarray,
    total: int,
    rng: np.random.Generator,
    penalty: float = 0.0,
    cap: float = math.inf,
    temperature: float = 1.0,
) -> np.ndarray:
    """Draw counts of the exact sequential sampler: SCS is (penalty, cap=inf), HCS is (penalty=0, cap),
    with the logits divided by ``temperature`` (below 1: sharper, repeats go to the top scores).

    Example i's j-th arrival (j = 0, 1, ...) follows its previous one after Exp(1) / exp(logit_i - penalty*j),
    and it has no arrivals past ``cap``. The clocks run up to a cut-off time (first guessed from the mean
    behaviour, raised while too few arrivals came before it); the ``total`` earliest arrivals are the draws.
    """
    if total > logits.size * cap:
        raise FlytError(f"cannot draw {total} from {logits.size} examples capped at {cap} draws each")
    logits = tempered(logits, temperature)
    # the top logit always joins the sample: an outlier missed by the guess would race far ahead of it
    sample = np.append(logits[:: max(1, logits.size // _FLUID_SAMPLE)], logits.max())
    log_cut = _fluid_log_time(sample, total * sample.size / logits.size, penalty, cap)
    race = _Race(logits, rng, penalty, cap, log_unit=log_cut)
    step = 0.0
    while race.run_until(math.exp(min(log_cut - race.log_unit, _MAX_LOG_TIME))) < total:
        if log_cut - race.log_unit >= _MAX_LOG_TIME:
            raise FlytError(
                f"scores span {logits.max() - logits.min():.0f}: too wide to sample {total} draws as a softmax "
                "in float64; the scores are logits, rescale them"
            )
        step = max(2 * step, 2 * (total - race.recorded) / total + 1e-3)  # doubling: few passes even if far off
        log_cut += step
    return race.earliest_counts(total)


class _Race:
    """Every example's arrival clock, run forward lazily up to a cut-off that may be raised.

    Times are in units of exp(log_unit), chosen near the expected cut-off so nothing that matters
    overflows or underflows. Each round draws the next arrival(s) of every example still before the
    cut-off, so the work is about one draw per recorded arrival plus one per example; once few examples
    remain, each round draws a block of arrivals per example to keep the rounds few.
    """

    def __init__(self, logits, rng, penalty, cap, log_unit):
        self.logits, self.rng, self.penalty, self.cap, self.log_unit = logits, rng, penalty, cap, log_unit
        self.count = np.zeros(logits.size, dtype=np.int64)  # arrivals recorded per example
        with np.errstate(over="ignore"):
            self.pending = rng.standard_exponential(logits.size) * np.exp(-logits - log_unit)  # next arrival
        self.times: list[np.ndarray] = []  # recorded arrival times ...
        self.owners: list[np.ndarray] = []  # ... and the example each belongs to
        self.recorded = 0

    def run_until(self, cut: float) -> int:
        """Record every arrival at or before ``cut``; return how many are recorded in all."""
        active = np.flatnonzero(self.pending <= cut)
        last = self.pending[active]
        self._record(last, active)
        k = self.count[active] + 1  # index of each active example's next arrival
        log_gap = self.penalty * k - self.logits[active] - self.log_unit  # log mean of its next gap
        while active.size:
            width = max(1, _BLOCK // active.size)
            ahead = np.arange(width)[:, None]  # (width, 1): arrivals drawn ahead this round
            with np.errstate(over="ignore"):  # an overflow is an arrival beyond any cut-off
                gaps = self.rng.standard_exponential((width, active.size)) * np.exp(log_gap + self.penalty * ahead)
                times = last + np.cumsum(gaps, axis=0)
            if self.cap < math.inf:
                times[k + ahead >= self.cap] = math.inf
            before = times <= cut
            n_before = np.count_nonzero(before, axis=0)
            self._record(times[before], np.broadcast_to(active, times.shape)[before])
            done = n_before < width
            exits = active[done]
            self.pending[exits] = times[n_before[done], np.flatnonzero(done)]
            self.count[exits] = k[done] + n_before[done]
            stay = ~done
            active, last, k = active[stay], times[-1, stay], k[stay] + width
            log_gap = log_gap[stay] + self.penalty * width
        return self.recorded

    def _record(self, times: np.ndarray, owners: np.ndarray) -> None:
        self.times.append(times)
        self.owners.append(owners)
        self.recorded += times.size

    def earliest_counts(self, total: int) -> np.ndarray:
        """Per-example counts among the ``total`` earliest recorded arrivals (exact ties cut by position).

        Ends the race: its clocks and the recorded chunks are released before the large copies.
        """
        self.pending = self.count = None
        times = np.concatenate(self.times)
        self.times.clear()
        owners = np.concatenate(self.owners)
        self.owners.clear()
        if times.size > total:
            cut = np.partition(times, total - 1)[total - 1]
            keep = times < cut
            keep[np.flatnonzero(times == cut)[: total - np.count_nonzero(keep)]] = True
            owners = owners[keep]
        return np.bincount(owners, minlength=self.logits.size)


def _fluid_log_time(logits: np.ndarray, target: float, penalty: float, cap: float) -> float:
    """Log time at which the race's mean-rate approximation has ``target`` arrivals: a first cut-off guess.

    An example with rate exp(logit - penalty*count) has about log(1 + penalty*exp(logit)*t) / penalty
    arrivals by time t (exp(logit)*t without penalty), at most ``cap``.
    """
    target = min(target, 0.999 * logits.size * cap)  # at full capacity the guess would be infinite

    def arrivals(log_t: float) -> float:
        x = logits + log_t
        with np.errstate(over="ignore"):
            mean = np.logaddexp(0.0, x + math.log(penalty)) / penalty if penalty > 0 else np.exp(x)
        return float(np.minimum(mean, cap).sum())

    lo = math.log(target / logits.size) - float(logits.max()) - 50.0
    hi = lo + 60.0
    while arrivals(hi) < target:
        lo, hi = hi, hi + 60.0
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if arrivals(mid) < target else (lo, mid)
    return hi


def batched_counts(
    logits: np.ndarray, total: int, rng: np.random.Generator, batch: int, penalty: float = 0.0, cap: float = math.inf
) -> np.ndarray:
    """The original code's approximation: each batch draws ``batch`` distinct examples from the softmax of
    the current logits (Gumbel top-k), then lowers the drawn logits by ``penalty`` / removes capped ones."""
    current = logits.astype(np.float64, copy=True)
    counts = np.zeros(logits.size, dtype=np.int64)
    available, drawn = logits.size, 0
    while drawn < total:
        size = min(batch, total - drawn, available)
        keys = current - np.log(rng.standard_exponential(current.size))
        top = np.argpartition(keys, keys.size - size)[keys.size - size :]
        counts[top] += 1
        current[top] -= penalty
        full = top[counts[top] >= cap]
        current[full] = -np.inf
        available -= full.size
        drawn += size
    return counts


def top_counts(scores: np.ndarray, k: int) -> np.ndarray:
    """0/1 counts keeping the ``k`` best scores; ties at the boundary go to the smaller uid (pool order)."""
    counts = np.zeros(scores.size, dtype=np.int64)
    counts[np.argsort(-scores, kind="stable")[:k]] = 1
    return counts


# ---------------------------------------------------------------------------------------------- command


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


def run(args: argparse.Namespace) -> int:
    params = _check_flags(args)
    started = time.perf_counter()
    uids, scores = read_scores(args.scores, args.score_column)
    read_s = time.perf_counter() - started
    counts, temperature = _select(args.method, params, scores, args.seed)
    select_s = time.perf_counter() - started - read_s

    output = Path(args.output)
    plot = Path(args.plot) if args.plot else output.with_suffix(".png")
    drawn = counts > 0
    save_subset(output, uids[drawn], counts[drawn])
    if args.counts_output:
        _write_counts(args.counts_output, uids[drawn], counts[drawn])
    summary = {
        "scores": str(args.scores),
        "score_column": args.score_column,
        "pool_size": int(scores.size),
        "method": args.method,
        "params": params,
        "seed": args.seed,
        "total_drawn": int(counts.sum()),
        "unique": int(np.count_nonzero(drawn)),
        "max_count": int(counts.max()),
        "temperature": temperature,
        "unique_fraction": {"target": params.get("unique_fraction"), "realised": np.count_nonzero(drawn) / scores.size},
        "count_histogram": count_histogram(counts),
        "output": str(output),
        "counts_output": args.counts_output,
        "plot": str(plot),
        "seconds": {"read": round(read_s, 3), "select": round(select_s, 3)},
    }
    with atomic_path(f"{output}.summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    plot_selection(plot, scores, counts, _describe(args.method, params, args.seed))
    print(f"pool: {scores.size:,} uids from {args.scores}")
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


def read_scores(path: str, column: str) -> tuple[np.ndarray, np.ndarray]:
    """Pool uids (``u8,u8``, sorted) and float64 scores, read from a parquet file or folder.

    Refuses what would silently distort a subset: missing columns, malformed or repeated uids,
    non-finite scores, an empty pool.
    """
    if os.path.isdir(path):
        files = sorted(str(file) for file in Path(path).rglob("*.parquet")  # hidden files/folders: partial work
                       if not any(part.startswith(".") for part in file.relative_to(path).parts))
        if not files:
            raise FlytError(f"--scores {path}: no .parquet files in this folder")
    elif os.path.exists(path):
        files = path
    else:
        raise FlytError(f"--scores {path}: no such file or folder")
    try:
        dataset = ds.dataset(files, format="parquet")
        missing = [name for name in ("uid", column) if name not in dataset.schema.names]
        if missing:
            raise FlytError(
                f"--scores {path}: no column {', '.join(map(repr, missing))} (columns: "
                f"{', '.join(dataset.schema.names) or 'none'}); expected uid and the score column (--score_column)"
            )
        table = dataset.to_table(columns=["uid", column])
    except pa.ArrowException as exc:
        raise FlytError(f"--scores {path}: cannot read as parquet ({exc})") from None
    if table.num_rows == 0:
        raise FlytError(f"--scores {path}: no rows; the pool is empty")
    score_type = table.schema.field(column).type
    if not (pa.types.is_floating(score_type) or pa.types.is_integer(score_type)):
        raise FlytError(f"--scores {path}: column {column!r} has type {score_type}; expected numbers")
    try:
        uids = uids_to_array(table.column("uid"))
    except FlytError as exc:
        raise FlytError(f"--scores {path}: {exc}") from None
    scores = table.column(column).cast(pa.float64()).to_numpy()
    del table
    order = sort_order(uids)
    uids, scores = uids[order], scores[order]
    repeated = np.flatnonzero(uids[1:] == uids[:-1])
    if repeated.size:
        example = array_to_uids(uids[repeated[:1]])[0].as_py()
        raise FlytError(f"--scores {path}: uid {example} appears more than once ({repeated.size} repeated rows)")
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:
        example = array_to_uids(uids[bad[:1]])[0].as_py()
        raise FlytError(
            f"--scores {path}: {bad.size} scores in {column!r} are NaN, infinite or missing, e.g. uid {example}"
        )
    return uids, scores


def _select(method: str, params: dict, scores: np.ndarray, seed: int | None) -> tuple[np.ndarray, float | None]:
    """Per-example draw counts for the chosen method, after the checks that need the pool size, and the
    temperature used (None for topk and threshold)."""
    n = scores.size
    total = params.get("total_size")
    if method == "threshold":
        counts = (scores >= params["threshold"]).astype(np.int64)
        if not counts.any():
            raise FlytError(f"--threshold {params['threshold']} keeps nothing: the highest score is {scores.max()}")
        return counts, None
    if method == "topk":
        k = total if total is not None else round(params["fraction"] * n)
        if not 1 <= k <= n:
            raise FlytError(f"--method topk would keep {k} uids; expected 1 to the pool size, {n}")
        return top_counts(scores, k), None
    penalty, cap = (params["repetition_penalty"], math.inf) if method == "scs" else (0.0, params["frequency_limit"])
    if total > n * cap:
        raise FlytError(
            f"--total_size {total} is more than the pool ({n}) x --frequency_limit ({cap}) = {n * cap}: "
            "hard cap sampling cannot draw that many"
        )
    temperature = params.get("temperature", 1.0)
    if "unique_fraction" in params:
        try:
            temperature = temperature_for_unique_fraction(scores, total, params["unique_fraction"], penalty, cap)
        except FlytError as exc:
            raise FlytError(f"--unique_fraction: {exc}") from None
    rng = np.random.default_rng(seed)
    batch = params.get("sampling_batch_size")
    if batch is not None:
        return batched_counts(tempered(scores, temperature), total, rng, batch, penalty, cap), temperature
    return race_counts(scores, total, rng, penalty, cap, temperature), temperature


def _write_counts(path: str, uids: np.ndarray, counts: np.ndarray) -> None:
    table = pa.table({"uid": array_to_uids(uids), "count": pa.array(counts, type=pa.int64())})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def count_histogram(counts: np.ndarray) -> dict[str, int]:
    """How many examples were drawn 1, 2, 3-4, 5-8, 9-16 and 17+ times."""
    out = {}
    for lo, hi in HISTOGRAM_BINS:
        label = str(lo) if lo == hi else (f"{lo}+" if hi is None else f"{lo}-{hi}")
        out[label] = int(np.count_nonzero((counts >= lo) & (counts <= (hi or np.iinfo(np.int64).max))))
    return out


def _describe(method: str, params: dict, seed: int | None) -> str:
    details = [f"{name} {value}" for name, value in params.items()] + ([f"seed {seed}"] if seed is not None else [])
    return f"{method} ({', '.join(details)})" if details else method


def plot_selection(path: str | os.PathLike, scores: np.ndarray, counts: np.ndarray, title: str) -> None:
    """Score distribution of the pool vs. the selection (weighted by counts), and mean count per score
    percentile: what to look at when choosing the penalty or cap.

    Percentiles come from an evenly spaced sample of at most ``_PLOT_SAMPLE`` examples; the pool is in uid
    order, which is unrelated to the scores, so this is a random sample and keeps large pools fast.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    span = (scores.min(), scores.max()) if scores.max() > scores.min() else (scores.min() - 0.5, scores.max() + 0.5)
    for weights, label in ((None, "pool"), (counts, "selection (with repeats)")):
        density, edges = np.histogram(scores, bins=100, range=span, weights=weights, density=True)
        left.stairs(density, edges, label=label)
    left.set_xlabel("score")
    left.set_ylabel("density")
    left.legend()
    step = max(1, scores.size // _PLOT_SAMPLE)
    some_scores, some_counts = scores[::step], counts[::step]
    percentile = np.minimum(np.argsort(np.argsort(some_scores, kind="stable")) * 100 // some_scores.size, 99)
    with np.errstate(invalid="ignore"):  # a tiny pool leaves some percentiles empty: gaps in the curve
        mean_count = np.bincount(percentile, weights=some_counts, minlength=100) / np.bincount(
            percentile, minlength=100
        )
    right.plot(np.arange(100), mean_count, marker=".")
    right.set_xlabel("score percentile in the pool")
    right.set_ylabel("mean draws per example")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
