"""How sharply SCS and HCS follow the scores: a temperature dividing the logits, and the temperature at which
the subset is expected to hold a chosen share of distinct pool examples.

The expectation uses the race's Poissonised view: instead of stopping at exactly ``total`` draws, every
example's clock runs to one cut-off time t, chosen so that the expected number of draws is ``total``. With
x_i = exp(logit_i / T) * t, example i is drawn at least once with probability 1 - exp(-x_i) and is drawn
m(x_i) times on average, where m depends on the penalty or cap only; for large pools this is the exact
sampler's share up to sampling error. Everything here needs the logits only (a fixed-size sample of them),
never the race itself, so it also serves a sampler that runs over the pool in pieces.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from flyt.errors import FlytError

_SAMPLE = 1 << 18  # logits behind the estimate: its error is below 0.001 in share
_GRID_STEP = 0.01  # log-x spacing of the tabulated mean draws m(x)
_GRID = (-20.0, 30.0)  # table range in log x: below, m(x) = x; above, m grows like the fluid limit
_FLUID_PENALTY = 0.02  # below this SCS penalty the fluid limit log(1 + p x) / p is within 0.05% of m(x)
_NODES = np.polynomial.legendre.leggauss(64)
_SHARPEST_SPAN = 500.0  # logits / T span at most this (the race works in float64)
_FLATTEST_SPAN = 1e-6  # ... and at least this: uniform sampling, to float precision
_LOG_T_TOLERANCE = 1e-4  # the temperature search stops at this relative precision


def tempered(logits: np.ndarray, temperature: float) -> np.ndarray:
    """The logits divided by the temperature; the very same array at T = 1, so the sampler's draws are
    exactly those it makes without a temperature."""
    if not (math.isfinite(temperature) and temperature > 0):
        raise FlytError(f"the temperature must be a positive number, got {temperature}")
    return logits if temperature == 1 else logits / temperature


def expected_unique_fraction(
    logits: np.ndarray, total: int, temperature: float = 1.0, penalty: float = 0.0, cap: float = math.inf
) -> float:
    """Expected share of the pool drawn at least once when ``total`` draws are made at this temperature."""
    sample = _sample(logits)
    return _share(sample / temperature, total * sample.size / logits.size, penalty, cap)


def unique_fraction_range(
    logits: np.ndarray, total: int, penalty: float = 0.0, cap: float = math.inf, pool_size: int | None = None
) -> tuple[float, float]:
    """The shares reachable by a temperature: from the sharpest the race handles to uniform sampling.

    ``pool_size``: the logits are a sample of a pool this large (``total`` counts the pool's draws)."""
    sample = _sample(logits)
    target = total * sample.size / (pool_size or logits.size)
    span = float(sample.max() - sample.min())
    if span == 0:  # every temperature samples uniformly
        share = _share(sample, target, penalty, cap)
        return share, share
    return tuple(_share(sample * (bound / span), target, penalty, cap) for bound in (_SHARPEST_SPAN, _FLATTEST_SPAN))


def temperature_for_unique_fraction(
    logits: np.ndarray,
    total: int,
    fraction: float,
    penalty: float = 0.0,
    cap: float = math.inf,
    pool_size: int | None = None,
) -> float:
    """The temperature at which ``total`` draws are expected to hold ``fraction`` of the pool as distinct
    examples, solved on log T (the share grows with T); deterministic, from the logits alone (or from a
    sample of a pool of ``pool_size``)."""
    if not 0 < fraction <= 1:
        raise FlytError(f"the unique fraction must be in (0, 1], got {fraction}")
    pool_size = pool_size or logits.size
    low, high = unique_fraction_range(logits, total, penalty, cap, pool_size)
    if not low - 1e-9 <= fraction <= high + 1e-9:
        raise FlytError(
            f"a unique fraction of {fraction} is out of reach for {total} draws from these {pool_size} scores: "
            f"temperatures give {low:.4g} (the sharpest the sampler runs in float64) to {high:.4g} (uniform)"
        )
    if high - low < 1e-9:
        return 1.0
    sample = _sample(logits)
    target = total * sample.size / pool_size
    span = float(sample.max() - sample.min())
    # regula falsi on log T (Illinois variant: a bound kept twice has its excess halved), from the range ends
    ends = [[math.log(span / _SHARPEST_SPAN), low - fraction], [math.log(span / _FLATTEST_SPAN), high - fraction]]
    kept = None
    while ends[1][0] - ends[0][0] > _LOG_T_TOLERANCE:
        (a, fa), (b, fb) = ends
        log_t = b - fb * (b - a) / (fb - fa)
        excess = _share(sample / math.exp(log_t), target, penalty, cap) - fraction
        if abs(excess) < 1e-7:
            return math.exp(log_t)
        side = int(excess > 0)
        ends[side] = [log_t, excess]
        if kept == side:
            ends[1 - side][1] /= 2
        kept = side
    return math.exp(0.5 * (ends[0][0] + ends[1][0]))


def _sample(logits: np.ndarray) -> np.ndarray:
    """An evenly spaced sample: the pool is in uid order, unrelated to the scores, so it is a random one."""
    return np.asarray(logits[:: max(1, logits.size // _SAMPLE)], dtype=np.float64)


def _share(logits: np.ndarray, total: float, penalty: float, cap: float) -> float:
    """Mean of 1 - exp(-x_i) at the cut-off where the mean draws sum to ``total``."""
    if total >= logits.size * cap * (1 - 1e-12):
        return 1.0  # hard cap at full capacity: every example is drawn cap times
    log_t = _log_cutoff(logits, total, penalty, cap)
    return float(-np.expm1(-np.exp(logits + log_t)).mean())


def _log_cutoff(logits: np.ndarray, total: float, penalty: float, cap: float) -> float:
    """Solve sum m(exp(logit + s)) = total for s = log t: Newton steps on the log of the sum, kept inside
    a bracket that bisection narrows whenever a step would leave it."""
    lo = math.log(total) - float(np.logaddexp.reduce(logits))  # m(x) <= x, so the sum is at most total here
    hi = lo + 1.0
    while _mean_draws(logits + hi, penalty, cap)[0].sum() < total:
        lo, hi = hi, hi + 2 * (hi - lo)
    s = lo
    for _ in range(200):
        draws, slope = _mean_draws(logits + s, penalty, cap)
        excess = math.log(draws.sum()) - math.log(total)
        if excess < 0:
            lo = s
        else:
            hi = s
        step = -excess * draws.sum() / max(slope.sum(), 1e-300)
        if abs(step) < 1e-12:
            break
        s = s + step if lo < s + step < hi else 0.5 * (lo + hi)
        if hi - lo < 1e-12:
            break
    return s


def _mean_draws(log_x: np.ndarray, penalty: float, cap: float) -> tuple[np.ndarray, np.ndarray]:
    """m(x) and x * m'(x): mean draws of one example whose clock ran to x = rate * t, and their slope in log x."""
    with np.errstate(over="ignore"):
        x = np.exp(log_x)
    if cap == math.inf and penalty < _FLUID_PENALTY:
        if penalty == 0:
            return x, x
        return np.log1p(penalty * x) / penalty, x / (1 + penalty * x)
    grid, table, slope = _table(penalty, cap)
    position = np.clip((log_x - grid[0]) / _GRID_STEP, 0, grid.size - 1.001)  # linear interpolation
    index = position.astype(np.int64)
    weight = position - index
    draws = table[index] + weight * (table[index + 1] - table[index])
    slopes = slope[index] + weight * (slope[index + 1] - slope[index])
    below, above = log_x < grid[0], log_x > grid[-1]
    draws[below] = slopes[below] = x[below]
    if cap < math.inf:
        draws[above], slopes[above] = cap, 0.0
    else:
        top = math.exp(grid[-1])
        draws[above] = table[-1] + (np.log1p(penalty * x[above]) - math.log1p(penalty * top)) / penalty
        slopes[above] = 1 / penalty
    return draws, slopes


@functools.lru_cache(maxsize=8)
def _table(penalty: float, cap: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """m(x) on a log-x grid, and its slope in log x."""
    grid = np.arange(_GRID[0], _GRID[1] + _GRID_STEP / 2, _GRID_STEP)
    x = np.exp(grid)
    if cap < math.inf:
        # N ~ Poisson(x): E min(N, cap) = x P(N <= cap - 2) + cap P(N >= cap), slope x P(N <= cap - 1)
        table = x * _poisson_cdf(x, cap - 2) + cap * (1 - _poisson_cdf(x, cap - 1))
        return grid, table, x * _poisson_cdf(x, cap - 1)
    table = _scs_table(grid, penalty)
    return grid, table, np.gradient(table, _GRID_STEP)


def _scs_table(grid: np.ndarray, penalty: float) -> np.ndarray:
    """SCS mean draws by the renewal equation m(x) = 1 - e^-x + integral_0^x e^-u m((x - u) e^-p) du.

    After its first arrival (at u ~ Exp(1)), an example's clock restarts slowed by e^-p. The integral
    reads m only at least p below log x, so the grid is filled in blocks of width p, lowest first.
    """
    table = np.empty_like(grid)
    block = max(1, int(penalty / _GRID_STEP))
    nodes, weights = _NODES
    for start in range(0, grid.size, block):
        x = np.exp(grid[start : start + block])[:, None]
        reach = np.minimum(x, 60.0)  # e^-u is negligible beyond
        u = reach * (nodes + 1) / 2
        y = np.log(x - u) - penalty
        known = np.interp(y, grid[:start], table[:start]) if start else np.exp(y)
        known = np.where(y < grid[0], np.exp(y), known)
        integral = (reach / 2 * weights * np.exp(-u) * known).sum(axis=1)
        table[start : start + block] = -np.expm1(-x[:, 0]) + integral
    return table


def _poisson_cdf(x: np.ndarray, k_max: float) -> np.ndarray:
    """P(N <= k_max) for N ~ Poisson(x), summing the probabilities in log space where it is neither 0 nor 1
    to float precision (x within 12 standard deviations and 60 of k_max), so a large cap stays cheap."""
    if k_max < 0:
        return np.zeros_like(x)
    out = (x < k_max).astype(np.float64)
    near = np.abs(x - k_max) < 12 * math.sqrt(k_max + 1) + 60
    if near.any():
        x_near = x[near]
        first = max(0, int(x_near.min() - 12 * math.sqrt(x_near.max()) - 60))  # no mass below, to float precision
        log_x = np.log(x_near)
        term = -x_near + first * log_x - math.lgamma(first + 1)
        total = np.exp(term)
        for k in range(first + 1, int(k_max) + 1):
            term = term + log_x - math.log(k)
            total += np.exp(term)
        out[near] = np.minimum(total, 1.0)
    return out
