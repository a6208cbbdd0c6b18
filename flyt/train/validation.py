"""Held-out validation of the filter: does the learned weighting beat uniform weights downstream?

From the current reference state, one reference step on an upstream batch with the scorer's softmax
weights and one with uniform weights (same batch, same AdamW state, same lr); the gain is the downstream
loss after the uniform step minus that after the learned one, on task samples training never sees. The
steps and losses are the FLYT step's own (``flyt.method.bilevel``), first order only (no derivative
through the step): two reference backward passes and four forwards of the validation batches, on
validation steps alone.
"""

from __future__ import annotations

import dataclasses
import math
import tarfile
from pathlib import Path
from typing import Sequence

import torch

from flyt.method.bilevel import BilevelConfig, DownstreamBatch, downstream_losses, weighted_update
from flyt.data.shards import list_shards
from flyt.streams.train import StreamConfig, TrainStream, held_out
from flyt.data.tasks import Task
from flyt.errors import FlytError
from flyt.method.optim import AdamWState, Tensors


def downstream_loss(reference, params: Tensors, batches: Sequence[Sequence[DownstreamBatch]],
                    dls: torch.Tensor | None, cfg: BilevelConfig) -> float:
    """Mean over batches of the task-weighted downstream loss, as the FLYT step measures it (step 5)."""
    total = 0.0
    for tasks in batches:
        losses = downstream_losses(reference, params, tasks, dls, cfg)
        total += sum(losses[f"downstream_loss/{t.name}"] * t.weight for t in tasks) / sum(t.weight for t in tasks)
    return total / len(batches)


def weighting_gain(reference, params: Tensors, opt_state: AdamWState, lr: float, upstream: dict,
                   scores: torch.Tensor, batches, dls: torch.Tensor | None, cfg: BilevelConfig = BilevelConfig()) -> dict:
    """Downstream loss after a uniform step minus that after the ``softmax(scores)`` step (> 0: the filter helps)."""
    log_w = torch.log_softmax(scores.detach().float(), dim=0)
    uniform = torch.full_like(log_w, -math.log(log_w.numel()))
    learned_loss, uniform_loss = (
        downstream_loss(reference, weighted_update(reference, params, opt_state, lr, upstream, w, cfg), batches, dls, cfg)
        for w in (log_w, uniform))
    return {"val/gain": uniform_loss - learned_loss, "val/loss_learned": learned_loss, "val/loss_uniform": uniform_loss}


# ---- held-out task data ---------------------------------------------------------------------------------

def _keys(shard: str):
    with tarfile.open(shard) as tar:
        for member in tar:
            if member.isfile():
                folder, _, base = member.name.rpartition("/")
                yield (folder + "/" if folder else "") + base.split(".", 1)[0]


def check_split(task: Task, shards: list[str], fraction: float) -> None:
    """Fail unless --val_fraction leaves the task both training and validation samples (stops at the first of each)."""
    seen = set()
    for shard in shards:
        for key in _keys(shard):
            seen.add(held_out(key, fraction))
            if len(seen) == 2:
                return
    side = "validation" if True not in seen else "training"
    raise FlytError(f"--val_fraction {fraction:g} leaves task {task.name!r} no {side} sample "
                    f"(the split is by a hash of the sample keys in {task.train_dir})")


def val_folder(task: Task) -> Path | None:
    """A task's own validation shards: ``val/`` beside its ``train/`` folder."""
    if task.train_dir is None or task.train_dir.name != "train":
        return None
    folder = task.train_dir.parent / "val"
    return folder if folder.is_dir() else None


@dataclasses.dataclass
class Validation:
    """Where the held-out batches come from, how often they are used, and the best gain so far."""

    stream_cfg: StreamConfig  # downstream_only, reading the held-out samples
    every: int
    n_batches: int
    best_gain: float = -math.inf
    best_step: int | None = None

    @classmethod
    def create(cls, train_cfg: StreamConfig, every: int, n_batches: int, fraction: float, world_size: int):
        """Checks before any work; ``train_cfg`` is the training stream's (its split already excludes val)."""
        if world_size > 1:
            raise FlytError("--val_every runs on one process only: drop it under torchrun, or validate a "
                            "checkpoint's run on one process")
        if fraction > 0:
            for task, shards in zip(train_cfg.tasks, train_cfg.task_shards):
                check_split(task, shards, fraction)
            return cls(dataclasses.replace(train_cfg, split="val", downstream_only=True), every, n_batches)
        folders = [val_folder(t) for t in train_cfg.tasks]
        missing = [t.name for t, f in zip(train_cfg.tasks, folders) if f is None]
        if missing:
            raise FlytError(f"--val_every needs held-out task data: --val_fraction F, or a val/ folder beside "
                            f"train/ in every task folder (none for {', '.join(missing)})")
        shards = [list_shards(f, f"validation shards of task {t.name!r}") for t, f in zip(train_cfg.tasks, folders)]
        return cls(dataclasses.replace(train_cfg, task_shards=shards, downstream_only=True), every, n_batches)

    def due(self, step: int, last: int) -> bool:
        return step % self.every == 0 or step == last

    def batches(self, preprocess, tokenizer) -> list[dict]:
        """The same ``n_batches`` task batches every time (the stream restarts from its seed)."""
        with torch.random.fork_rng(devices=[]):  # the stream seeds torch for its crops: keep the run's RNG
            stream = iter(TrainStream(self.stream_cfg, 0, preprocess, tokenizer))
            return [next(stream) for _ in range(self.n_batches)]

    def record(self, gain: float, step: int) -> bool:
        """Whether this gain is the best so far (then remembered)."""
        if gain > self.best_gain:
            self.best_gain, self.best_step = gain, step
            return True
        return False

    def state(self) -> dict:
        return {"best_gain": self.best_gain, "best_step": self.best_step}

    def load_state(self, state: dict | None) -> None:
        if state:
            self.best_gain, self.best_step = state["best_gain"], state["best_step"]
