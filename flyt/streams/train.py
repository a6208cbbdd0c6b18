"""The training stream: each item is one whole FLYT step's data for this rank.

Shards are drawn with replacement (resampled) from a random generator seeded by (seed, epoch, rank,
worker), samples pass through a shuffle buffer, and a worker assembles complete steps (upstream batch,
each task's batch with one random template per class). Everything is a function of those four numbers,
so a run is reproducible and a resumed run continues with exactly the data of an uninterrupted one.
"""

from __future__ import annotations

import random
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import webdataset as wds

from flyt.data.samples import decode_labelled, decode_pair
from flyt.data.scores import ScoreLookup
from flyt.data.shards import Source, list_shards
from flyt.data.tasks import Task
from flyt.data.webdataset import DamagedShards, drain, tar_samples
from flyt.errors import FlytError
from flyt.streams.workers import current_worker, damage_forward


@dataclass
class StreamConfig:
    sources: list[Source]
    tasks: list[Task]
    upstream_batch: int  # per rank and step
    downstream_batch: int  # per rank, per task (zero-shot) or in all (CLIP loss)
    seed: int = 0
    downstream_clip: bool = False
    dataset_weighted: bool = False
    task_weights: list[float] | None = None
    shuffle_buffer: int = 1000
    scores: ScoreLookup | None = None
    rank: int = 0
    world_size: int = 1
    task_shards: list[list[str]] = field(default_factory=list)
    val_fraction: float = 0.0  # share of each task's samples held out for validation (by key)
    split: str = "train"  # task samples read: "train" (all but the held-out ones) or "val" (those alone)
    downstream_only: bool = False  # items carry no upstream batch (validation's task batches)

    def __post_init__(self):
        if not self.task_shards:
            self.task_shards = [list_shards(t.train_dir, f"training shards of task {t.name!r}") for t in self.tasks]


def class_slice(n_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """This rank's contiguous share of the class names (the first ranks take one more when uneven)."""
    base, extra = divmod(n_classes, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


def _resampled(shards: list[str], weights: list[float], rng: random.Random) -> Iterator[dict]:
    while True:
        yield {"url": rng.choices(shards, weights)[0]}


def _raw_samples(shards: list[str], weights: list[float], rng: random.Random, buffer: int,
                 skipped: Counter, forward: list | None = None) -> Iterator[dict]:
    """Samples of shards drawn with replacement; a damaged shard gives what precedes the damage (counted
    in ``skipped``, named through ``forward``: see :class:`DamagedShards`): one broken file of a huge pool
    must not end a run of hours."""
    damage = DamagedShards(skipped, len(set(shards)), forward)
    samples = tar_samples(_resampled(shards, weights, rng), on_damage=damage)
    return wds.shuffle(buffer, min(buffer, 100), rng=rng)(samples)


def held_out(key: str, fraction: float) -> bool:
    """Whether a task sample belongs to the validation split: by a hash of its key, so the split is the
    same whatever the seed, the shard order or the number of processes."""
    return zlib.crc32(key.encode("utf-8")) < fraction * 2 ** 32


class TrainStream(torch.utils.data.IterableDataset):
    def __init__(self, cfg: StreamConfig, epoch: int, preprocess: Callable, tokenizer: Callable):
        self.cfg, self.epoch, self.preprocess, self.tokenizer = cfg, epoch, preprocess, tokenizer

    def __iter__(self):
        worker = current_worker()[0]
        cfg = self.cfg
        seed = hash((cfg.seed, self.epoch, cfg.rank, worker)) & 0x7FFFFFFF
        rng = random.Random(seed)
        torch.manual_seed(seed)  # random crops of the train transform
        skipped, forward = Counter(), damage_forward()
        shards = [s for src in cfg.sources for s in src.shards]
        weights = [src.weight for src in cfg.sources for _ in src.shards]
        upstream = None if cfg.downstream_only else self._decoded(
            _raw_samples(shards, weights, rng, cfg.shuffle_buffer, skipped, forward),
            lambda raw: decode_pair(raw, skipped))
        if cfg.downstream_clip:
            down = [self._decoded(self._split(self._mixed_task_samples(rng, skipped, forward)),
                                  lambda raw: decode_labelled(raw, skipped, True))]
        else:
            down = [self._decoded(self._split(_raw_samples(s, [1.0] * len(s), rng, cfg.shuffle_buffer, skipped,
                                                           forward)),
                                  lambda raw: decode_labelled(raw, skipped)) for s in cfg.task_shards]
        while True:
            step = {"worker": worker}
            if upstream is not None:
                step["upstream"] = self._upstream_batch(upstream)
            if cfg.downstream_clip:
                batch = [next(down[0]) for _ in range(cfg.downstream_batch)]
                step["downstream"] = [{"name": "clip", "images": torch.stack([s["image"] for s in batch]),
                                       "texts": self.tokenizer([s["text"] for s in batch])}]
            else:
                step["downstream"] = [self._task_batch(task, stream, rng) for task, stream in zip(cfg.tasks, down)]
            step["skipped"], step["damaged"] = dict(skipped), drain(forward)
            yield step

    def _split(self, raw: Iterator[dict]) -> Iterator[dict]:
        """This stream's side of the held-out split of the task samples (all of them without one)."""
        fraction, want = self.cfg.val_fraction, self.cfg.split == "val"
        return raw if fraction <= 0 else (s for s in raw if held_out(s["__key__"], fraction) == want)

    def _decoded(self, raw: Iterator[dict], decode: Callable) -> Iterator[dict]:
        for sample in raw:
            out = decode(sample)
            if out is not None:
                out["image"] = self.preprocess(out["image"])
                yield out

    def _mixed_task_samples(self, rng: random.Random, skipped: Counter, forward: list | None) -> Iterator[dict]:
        """All tasks in one stream: shards equally likely, or tasks equally likely (``dataset_weighted``),
        scaled by the task weights."""
        cfg = self.cfg
        task_w = cfg.task_weights or [1.0] * len(cfg.tasks)
        shards, weights = [], []
        for shard_list, w in zip(cfg.task_shards, task_w):
            shards += shard_list
            weights += [w / len(shard_list) if cfg.dataset_weighted else w] * len(shard_list)
        return _raw_samples(shards, weights, rng, cfg.shuffle_buffer, skipped, forward)

    def _upstream_batch(self, stream: Iterator[dict]) -> dict:
        samples = [next(stream) for _ in range(self.cfg.upstream_batch)]
        batch = {"image": torch.stack([s["image"] for s in samples]),
                 "text": self.tokenizer([s["text"] for s in samples]),
                 "uid": [s["uid"] for s in samples], "key": [s["key"] for s in samples]}
        if self.cfg.scores is not None:
            batch["scores"] = torch.from_numpy(self.cfg.scores.rows(batch["key"], batch["uid"]))
        return batch

    def _task_batch(self, task: Task, stream: Iterator[dict], rng: random.Random) -> dict:
        cfg = self.cfg
        samples = [next(stream) for _ in range(cfg.downstream_batch)]
        labels = [s["label"] for s in samples]
        if max(labels) >= len(task.classnames) or min(labels) < 0:
            raise FlytError(f"task {task.name!r}: label {max(labels)} outside its {len(task.classnames)} class names")
        template_ids = [rng.randrange(len(task.templates)) for _ in task.classnames]
        lo, hi = class_slice(len(task.classnames), cfg.rank, cfg.world_size)
        prompts = task.prompts(template_ids)[lo:hi]
        return {"name": task.name, "images": torch.stack([s["image"] for s in samples]),
                "labels": torch.tensor(labels), "prompts": self.tokenizer(prompts) if prompts else None}
