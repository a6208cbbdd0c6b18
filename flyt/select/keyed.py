"""Randomness keyed by uid: an example's random numbers depend only on (seed, uid, draw index).

A counter-based generator (SplitMix64's output function, a well-known 64-bit mixer, applied to
``row key + (draw + 1) * golden gamma``; the row key mixes the uid's two 64-bit halves with the seed)
needs no state carried between rows, so the same example gets the same draws whichever file, worker
or node holds it, and a sampler run over the pool in pieces makes exactly the draws of one run over
the whole pool. The seed-free ``sample_mask`` picks a fixed, split-independent subset of uids.
"""

from __future__ import annotations

import numpy as np

SAMPLE_SIZE = 1 << 18  # expected rows behind the estimates made from a uid-keyed sample of the pool

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_SAMPLE_SALT = np.uint64(0x5EED5A3B1E5A3B1E)
_TO_UNIT = 2.0**-53


def mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on a uint64 array (wrapping arithmetic): a bijection that scrambles bits."""
    z = np.asarray(z, dtype=np.uint64)
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


def row_keys(uids: np.ndarray, seed: int) -> np.ndarray:
    """One uint64 per uid (``u8,u8`` array) and seed: the state behind all of that example's draws."""
    salt = mix64(np.array([seed], dtype=np.uint64) * _GAMMA + _GAMMA)
    return mix64(mix64(uids["f0"] ^ salt) ^ uids["f1"])


def exponentials(keys: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """Exp(1) variates, one per (row key, draw index) pair (broadcast), from 53 random bits each."""
    with np.errstate(over="ignore"):
        bits = mix64(keys + (np.asarray(draws, dtype=np.uint64) + np.uint64(1)) * _GAMMA)
    return -np.log(((bits >> np.uint64(11)).astype(np.float64) + 0.5) * _TO_UNIT)


def sample_mask(uids: np.ndarray, pool_size: int) -> np.ndarray:
    """Rows of the uid-keyed pool sample: each uid is in it with probability SAMPLE_SIZE / pool_size,
    decided by its own bits and nothing else (not the seed, not its file)."""
    rate = min(1.0, SAMPLE_SIZE / max(pool_size, 1))
    if rate >= 1.0:
        return np.ones(len(uids), dtype=bool)
    return mix64(mix64(uids["f0"] ^ _SAMPLE_SALT) ^ uids["f1"]) < np.uint64(int(rate * 2.0**64))
