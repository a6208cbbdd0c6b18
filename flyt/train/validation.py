"""Held-out validation of the filter: does the learned weighting beat uniform weights downstream?

From the current reference state, one reference step on an upstream batch with the scorer's softmax
weights and one with uniform weights (same batch, same AdamW state, same lr); the gain is the downstream
loss after the uniform step minus that after the learned one, on task samples training never sees. First
order only (plain gradients, no derivative through the step): it costs two reference backward passes
and four forwards of the validation batches, on validation steps alone.
"""

from __future__ import annotations

import dataclasses
import math
import tarfile
from pathlib import Path
from typing import Sequence

import torch
from torch.func import functional_call

from flyt.method.bilevel import LOGIT_SCALE_BOUNDS, DownstreamBatch
from flyt.data.shards import list_shards
from flyt.streams.train import StreamConfig, TrainStream, held_out
from flyt.data.tasks import Task
from flyt.errors import FlytError
from flyt.method.losses import clip_loss, weighted_clip_loss, zero_shot_loss
from flyt.method.optim import AdamWConfig, AdamWState, Tensors, adamw_update


def _embed(reference, params: Tensors, **inputs) -> list[torch.Tensor]:
    out = functional_call(reference, params, (), inputs)
    return [o.float() for o in out[:2] if o is not None]


def stepped(reference, params: Tensors, opt_state: AdamWState, lr: float, upstream: dict, log_w: torch.Tensor,
            chunks: int = 1, adamw: AdamWConfig = AdamWConfig()) -> Tensors:
    """theta' = AdamW(theta, grad L_w(theta; w)) with the logit-scale clamp of the FLYT step.

    The gradient goes through the embeddings: the loss's gradient in them over the whole batch first,
    then one backward through the model per chunk (``chunks`` = --accum_freq bounds the memory)."""
    with torch.no_grad():
        pieces = [(x, t) for x, t in zip(torch.tensor_split(upstream["image"], chunks),
                                         torch.tensor_split(upstream["text"], chunks))]
        img, txt = (torch.cat(e) for e in zip(*[_embed(reference, params, image=x, text=t) for x, t in pieces]))
    img, txt = img.requires_grad_(), txt.requires_grad_()
    log_tau = params["logit_scale"].detach().float().requires_grad_()
    with torch.enable_grad():
        loss = weighted_clip_loss(img, txt, log_tau.exp(), log_w)
        g_img, g_txt, g_tau = torch.autograd.grad(loss, (img, txt, log_tau))
    grads = {k: torch.zeros_like(v) for k, v in params.items()}
    lo = 0
    for x, t in pieces:
        leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
        sl = slice(lo, lo + x.shape[0])
        lo += x.shape[0]
        with torch.enable_grad():
            e_img, e_txt = _embed(reference, leaves, image=x, text=t)
            inner = (e_img * g_img[sl]).sum() + (e_txt * g_txt[sl]).sum()
            for k, g in zip(leaves, torch.autograd.grad(inner, list(leaves.values()), allow_unused=True)):
                if g is not None:
                    grads[k] += g
    grads["logit_scale"] = grads["logit_scale"] + g_tau.to(grads["logit_scale"].dtype)
    with torch.no_grad():
        new = adamw_update(params, grads, opt_state, lr, adamw)[0]
        new["logit_scale"] = new["logit_scale"].clamp(*LOGIT_SCALE_BOUNDS)
    return new


@torch.no_grad()
def downstream_loss(reference, params: Tensors, batches: Sequence[Sequence[DownstreamBatch]],
                    dls: torch.Tensor | None, kind: str) -> float:
    """Mean over batches of the task-weighted downstream loss, as the FLYT step measures it."""
    total = 0.0
    for tasks in batches:
        weight = sum(t.weight for t in tasks)
        for t in tasks:
            # the step's multiplier: the learned downstream temperature, else exactly 1 (as the original)
            scale = dls.float().exp() if dls is not None else torch.ones((), device=t.images.device)
            if kind == "zeroshot":
                (img,), (cls,) = _embed(reference, params, image=t.images), _embed(reference, params, text=t.prompts)
                loss = zero_shot_loss(img, cls, t.labels, scale)
            else:
                img, txt = _embed(reference, params, image=t.images, text=t.texts)
                loss = clip_loss(img, txt, scale)
            total += float(loss) * t.weight / weight
    return total / len(batches)


def weighting_gain(reference, params: Tensors, opt_state: AdamWState, lr: float, upstream: dict,
                   scores: torch.Tensor, batches, dls: torch.Tensor | None, kind: str, chunks: int = 1,
                   adamw: AdamWConfig = AdamWConfig()) -> dict:
    """Downstream loss after a uniform step minus that after the ``softmax(scores)`` step (> 0: the filter helps)."""
    log_w = torch.log_softmax(scores.detach().float(), dim=0)
    uniform = torch.full_like(log_w, -math.log(log_w.numel()))
    learned_loss, uniform_loss = (
        downstream_loss(reference, stepped(reference, params, opt_state, lr, upstream, w, chunks, adamw), batches, dls,
                        kind)
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
