"""Soft and Hard Cap Sampling, exact: an exponential race whose clocks are keyed by uid.

Each example's draws are arrivals of its own clock: its j-th arrival (j = 0, 1, ...) follows the previous
one after Exp(1) / exp(logit - penalty * j) for SCS, Exp(1) / exp(logit) for HCS with no arrival from
index ``cap`` on. By memorylessness the order of all arrivals is the order of the one-draw-at-a-time
process, so the subset is the ``total`` earliest arrivals (exact ties go to the smaller uid).

Every arrival time is a function of (seed, uid, logit, j) and of one pool-wide time unit only: the
Exp(1) variates come from ``flyt.select.keyed``, each time is a left-to-right sum of its gaps whatever
the rounds, and the unit is derived from the uid-keyed pool sample. Running the race over the whole pool
or over its files one by one (``flyt.jobs.sample_passes``) therefore gives the very same times.
"""

from __future__ import annotations

import math

import numpy as np

from flyt.errors import FlytError
from flyt.select.keyed import exponentials, row_keys, sample_mask
from flyt.select.sharpness import tempered

_BLOCK = 1 << 16  # once few examples are still racing, draw up to this many arrivals per round at once
_GUESS_SAMPLE = 1 << 16  # logits behind the time unit's guess
MAX_LOG_TIME = 700.0  # arrival times are kept below exp(700) time units, where float64 ends


def pool_sample(uids: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """The logits of the uid-keyed pool sample plus the top logit, sorted: what every estimate reads."""
    return estimate_sample(logits[sample_mask(uids, logits.size)], float(logits.max()))


def estimate_sample(sampled: np.ndarray, top: float) -> np.ndarray:
    """Sorted sampled logits with the top one added (an outlier missed by the sample would race ahead)."""
    return np.sort(np.append(np.asarray(sampled, dtype=np.float64), top))


def log_unit(sample: np.ndarray, pool_size: int, total: float, penalty: float, cap: float) -> float:
    """The race's time unit: the log time at which its mean-rate approximation has ``total`` arrivals.

    An example with rate exp(logit - penalty*count) has about log(1 + penalty*exp(logit)*t) / penalty
    arrivals by time t (exp(logit)*t without penalty), at most ``cap``.
    """
    step = max(1, sample.size // _GUESS_SAMPLE)  # the sorted sample, thinned evenly, keeping its top
    sample = np.append(sample[:-1:step], sample[-1])
    target = min(total * sample.size / pool_size, 0.999 * sample.size * cap)  # full capacity: infinite time

    def arrivals(log_t: float) -> float:
        x = sample + log_t
        with np.errstate(over="ignore"):
            mean = np.logaddexp(0.0, x + math.log(penalty)) / penalty if penalty > 0 else np.exp(x)
        return float(np.minimum(mean, cap).sum())

    lo = math.log(target / sample.size) - float(sample.max()) - 50.0
    hi = lo + 60.0
    while arrivals(hi) < target:
        lo, hi = hi, hi + 60.0
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if arrivals(mid) < target else (lo, mid)
    return hi


class Race:
    """Every example's arrival clock, run forward lazily up to a cut-off that may be raised.

    Times are in units of exp(unit), chosen near the expected cut-off so nothing that matters overflows
    or underflows. Each round draws the next arrival(s) of every example still before the cut-off, so
    the work is about one draw per arrival plus one per example; once few examples remain, each round
    draws a block of arrivals per example to keep the rounds few. Arrivals go to ``sink(times, owners)``.
    """

    def __init__(self, logits, keys, penalty, cap, unit):
        self.keys, self.penalty, self.cap = keys, penalty, cap
        self.offset = logits + unit  # the gap before arrival j has log mean penalty * j - offset
        self.count = np.zeros(logits.size, dtype=np.int64)  # index of each example's pending arrival
        with np.errstate(over="ignore"):
            self.pending = exponentials(keys, self.count) * np.exp(-self.offset)
        self.arrivals = 0

    def run_until(self, cut: float, sink) -> int:
        """Pass every arrival at or before ``cut`` not passed yet to ``sink``; return how many were in all."""
        active = np.flatnonzero(self.pending <= cut)
        last = self.pending[active]
        self._emit(sink, last, active)
        k = self.count[active] + 1  # index of each active example's next arrival
        while active.size:
            width = max(1, _BLOCK // active.size)
            index = k + np.arange(width)[:, None]  # (width, active): arrival indices drawn this round
            with np.errstate(over="ignore"):  # an overflow is an arrival beyond any cut-off
                gaps = exponentials(self.keys[active], index) * np.exp(self.penalty * index - self.offset[active])
                times = np.cumsum(np.concatenate([last[None], gaps]), axis=0)[1:]  # left to right, as one sum
            if self.cap < math.inf:
                times[index >= self.cap] = math.inf
            before = times <= cut
            n_before = np.count_nonzero(before, axis=0)
            self._emit(sink, times[before], np.broadcast_to(active, times.shape)[before])
            done = n_before < width
            exits = active[done]
            self.pending[exits] = times[n_before[done], np.flatnonzero(done)]
            self.count[exits] = k[done] + n_before[done]
            stay = ~done
            active, last, k = active[stay], times[-1, stay], k[stay] + width
        return self.arrivals

    def _emit(self, sink, times: np.ndarray, owners: np.ndarray) -> None:
        if times.size:
            sink(times, owners)
            self.arrivals += times.size


class Recorder:
    """A sink keeping every arrival: the in-memory race."""

    def __init__(self):
        self.times: list[np.ndarray] = []
        self.owners: list[np.ndarray] = []

    def __call__(self, times, owners):
        self.times.append(times)
        self.owners.append(owners)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        times, owners = np.concatenate(self.times or [np.empty(0)]), np.concatenate(self.owners or [np.empty(0, int)])
        self.times.clear()
        self.owners.clear()
        return times, owners


def race_counts(
    logits: np.ndarray,
    total: int,
    uids: np.ndarray,
    seed: int,
    penalty: float = 0.0,
    cap: float = math.inf,
    temperature: float = 1.0,
) -> np.ndarray:
    """Draw counts of the exact sequential sampler for the pool ``uids`` (``u8,u8``) with these logits:
    SCS is (penalty, cap=inf), HCS is (penalty=0, cap), the logits divided by ``temperature``.

    The clocks run up to a cut-off time (first the time unit, raised while too few arrivals came before
    it); the ``total`` earliest arrivals are the draws.
    """
    check_capacity(logits.size, total, cap)
    logits = tempered(logits, temperature)
    unit = log_unit(pool_sample(uids, logits), logits.size, total, penalty, cap)
    race, recorder = Race(logits, row_keys(uids, seed), penalty, cap, unit), Recorder()
    log_cut, step = unit, 0.0
    while race.run_until(math.exp(min(log_cut - unit, MAX_LOG_TIME)), recorder) < total:
        check_span(log_cut - unit, logits)
        step = max(2 * step, 2 * (total - race.arrivals) / total + 1e-3)  # doubling: few passes even if far off
        log_cut += step
    del race
    times, owners = recorder.arrays()
    return smallest_counts(times, owners, uids, total)


def check_capacity(pool_size: int, total: int, cap: float) -> None:
    if total > pool_size * cap:
        raise FlytError(f"cannot draw {total} from {pool_size} examples capped at {cap} draws each")


def check_span(log_cut: float, logits: np.ndarray) -> None:
    """Refuse a race whose cut-off would leave float64 (``logits``: any that show the span, e.g. a sample)."""
    if log_cut >= MAX_LOG_TIME:
        raise FlytError(
            f"scores span {logits.max() - logits.min():.0f}: too wide to sample as a softmax "
            "in float64; the scores are logits, rescale them"
        )


def smallest_counts(keys: np.ndarray, owners: np.ndarray, uids: np.ndarray, total: int) -> np.ndarray:
    """Per-example counts among the ``total`` smallest keys (arrival times, or minus scores for top-k),
    exact ties going to the smaller uid, as in the out-of-core selection."""
    if keys.size > total:
        cut = np.partition(keys, total - 1)[total - 1]
        keep = keys < cut
        tied = np.flatnonzero(keys == cut)
        need = total - np.count_nonzero(keep)
        if tied.size > need:
            tie_uids = uids[owners[tied]]
            tied = tied[np.lexsort((tie_uids["f1"], tie_uids["f0"]))]
        keep[tied[:need]] = True
        owners = owners[keep]
    return np.bincount(owners, minlength=uids.size)
