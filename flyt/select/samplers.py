"""The other selections (top-k, threshold, the original batched SCS/HCS), the checks every method makes
once the pool size is known, and the count histogram of a subset. NumPy only, no files."""

from __future__ import annotations

import math

import numpy as np

from flyt.errors import FlytError
from flyt.select.race import check_capacity
from flyt.select.sharpness import temperature_for_unique_fraction

HISTOGRAM_BINS = ((1, 1), (2, 2), (3, 4), (5, 8), (9, 16), (17, None))


def penalty_and_cap(method: str, params: dict) -> tuple[float, float]:
    """SCS: (repetition penalty, no cap); HCS: (no penalty, frequency limit)."""
    return (params["repetition_penalty"], math.inf) if method == "scs" else (0.0, params["frequency_limit"])


def plan(method: str, params: dict, pool_size: int, sample: np.ndarray, top: float) -> tuple[int, float | None]:
    """(number to select, temperature) after the checks that need the pool: its size, the uid-keyed
    sample of its scores and its top score; the same for the in-memory and the out-of-core paths."""
    n, total = pool_size, params.get("total_size")
    if method == "threshold":
        if top < params["threshold"]:
            raise FlytError(f"--threshold {params['threshold']} keeps nothing: the highest score is {top}")
        return 0, None
    if method == "topk":
        k = total if total is not None else round(params["fraction"] * n)
        if not 1 <= k <= n:
            raise FlytError(f"--method topk would keep {k} uids; expected 1 to the pool size, {n}")
        return k, None
    penalty, cap = penalty_and_cap(method, params)
    if total > n * cap:
        raise FlytError(
            f"--total_size {total} is more than the pool ({n}) x --frequency_limit ({cap}) = {n * cap}: "
            "hard cap sampling cannot draw that many"
        )
    check_capacity(n, total, cap)
    temperature = params.get("temperature", 1.0)
    if "unique_fraction" in params:
        try:
            temperature = temperature_for_unique_fraction(
                sample, total, params["unique_fraction"], penalty, cap, pool_size=n
            )
        except FlytError as exc:
            raise FlytError(f"--unique_fraction: {exc}") from None
    return total, temperature


def top_counts(scores: np.ndarray, k: int) -> np.ndarray:
    """0/1 counts keeping the ``k`` best scores; ties at the boundary go to the smaller uid (pool order)."""
    counts = np.zeros(scores.size, dtype=np.int64)
    counts[np.argsort(-scores, kind="stable")[:k]] = 1
    return counts


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


def count_histogram(counts: np.ndarray) -> dict[str, int]:
    """How many examples were drawn 1, 2, 3-4, 5-8, 9-16 and 17+ times."""
    out = {}
    for lo, hi in HISTOGRAM_BINS:
        label = str(lo) if lo == hi else (f"{lo}+" if hi is None else f"{lo}-{hi}")
        out[label] = int(np.count_nonzero((counts >= lo) & (counts <= (hi or np.iinfo(np.int64).max))))
    return out
