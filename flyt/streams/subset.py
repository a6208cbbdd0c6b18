"""Passes over a pool filtered by a subset file, for plain CLIP training (``flyt train-clip``).

Unlike FLYT's resampled stream, every selected sample is seen exactly ``count`` times per pass, where
``count`` is how often its uid occurs in the subset (DataComp's convention: repeats are repeated
training examples). Shards are split over ranks and workers and reshuffled every pass; a shuffle
buffer mixes samples; everything is seeded by (seed, pass, rank, worker).
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Callable

import numpy as np
import torch
import webdataset as wds

from flyt.data.samples import decode_pair
from flyt.data.subset import UID_DTYPE, load_subset, sort_order, uids_to_array
from flyt.data.webdataset import DamagedShards, drain, tar_samples
from flyt.streams.workers import current_worker, damage_forward, worker_share


class SubsetCounts:
    """uid -> occurrences in a subset file (0 when absent), looked up by the uid's two 64-bit halves."""

    def __init__(self, path: str):
        rows = load_subset(path)
        self.keys, self.counts = np.unique(rows, return_counts=True)
        self.total = int(len(rows))

    def __call__(self, uid: str) -> int:
        key = uids_to_array([uid])[0]
        i = int(np.searchsorted(self.keys, np.array(key, dtype=UID_DTYPE)))
        return int(self.counts[i]) if i < len(self.keys) and self.keys[i] == key else 0


class SeenUids:
    """How often each uid was trained on: sorted ``u8,u8`` uids and their counts, no Python object per
    sample. Batches wait in a buffer that is merged in once it outgrows the merged part (amortised
    O(n log n) over a run, memory twice the distinct uids at most)."""

    def __init__(self):
        self.uids, self.counts = np.zeros(0, UID_DTYPE), np.zeros(0, np.int64)
        self._pending: list[np.ndarray] = []
        self._waiting = 0

    def add(self, uids: list[str]) -> None:
        self._pending.append(uids_to_array(uids))
        self._waiting += len(uids)
        if self._waiting >= max(1 << 16, len(self.uids)):
            self._merge()

    def _merge(self) -> None:
        rows = np.concatenate([self.uids, *self._pending])
        weights = np.concatenate([self.counts, np.ones(self._waiting, np.int64)])
        order = sort_order(rows)
        rows, weights = rows[order], weights[order]
        starts = np.flatnonzero(np.concatenate([[True], rows[1:] != rows[:-1]]))
        self.uids, self.counts = rows[starts], np.add.reduceat(weights, starts) if len(rows) else weights
        self._pending, self._waiting = [], 0

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(sorted distinct uids, how often each was seen)."""
        self._merge()
        return self.uids, self.counts


class SubsetStream(torch.utils.data.IterableDataset):
    """Batches of {image, text} over endless passes of (a subset of) a pool."""

    def __init__(self, shards: list[str], counts: SubsetCounts | None, batch_size: int, preprocess: Callable,
                 tokenizer: Callable, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle_buffer: int = 1000):
        self.shards, self.counts, self.batch_size = shards, counts, batch_size
        self.preprocess, self.tokenizer = preprocess, tokenizer
        self.seed, self.rank, self.world_size, self.shuffle_buffer = seed, rank, world_size, shuffle_buffer

    def _selected(self, epoch: int, skipped: Counter, forward: list | None):
        order = list(self.shards)
        random.Random(hash((self.seed, epoch))).shuffle(order)
        share = worker_share(order, self.rank, self.world_size)
        for raw in tar_samples(share, on_damage=DamagedShards(skipped, len(share), forward)):
            sample = decode_pair(raw, skipped)
            if sample is None:
                continue
            repeats = self.counts(sample["uid"]) if self.counts is not None else 1
            for _ in range(repeats):
                yield sample

    def __iter__(self):
        worker = current_worker()[0]
        seed = hash((self.seed, self.rank, worker)) & 0x7FFFFFFF
        rng = random.Random(seed)
        torch.manual_seed(seed)
        skipped, forward, epoch, batch = Counter(), damage_forward(), 0, []
        while True:
            seen = 0
            for sample in wds.shuffle(self.shuffle_buffer, min(self.shuffle_buffer, 100), rng=rng)(
                    self._selected(epoch, skipped, forward)):
                seen += 1
                batch.append(sample)
                if len(batch) == self.batch_size:
                    yield {"image": torch.stack([self.preprocess(s["image"]) for s in batch]),
                           "text": self.tokenizer([s["text"] for s in batch]),
                           "uid": [s["uid"] for s in batch], "skipped": dict(skipped), "damaged": drain(forward),
                           "worker": worker, "pass": epoch}
                    batch = []
            if seen == 0 and epoch > 0:
                return  # this worker has no selected samples at all
            epoch += 1
