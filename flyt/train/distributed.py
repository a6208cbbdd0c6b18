"""Several processes (``torchrun``): process-group setup and the collectives the bilevel step needs.

Every loss on the global batch is computed identically on all ranks from gathered embeddings, so most
communication happens outside autograd (plain ``all_gather``/``all_reduce`` of tensors that carry no
graph). The one gather inside autograd -- scores, whose softmax is global -- is an ``autograd.Function``
whose backward is a reduce-scatter written as another ``autograd.Function``, so that it stays correct
under nested differentiation and inside ``torch.func`` transforms (``setup_context``).
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def world_from_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as torchrun sets them; (0, 1, 0) otherwise."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))


def init_process_group(device_type: str) -> None:
    """gloo on CPU, NCCL on GPU; a generous timeout so a dead rank ends the job instead of hanging it."""
    if not dist.is_initialized():
        minutes = float(os.environ.get("FLYT_DIST_TIMEOUT_MIN", 30))
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=minutes))


class DistComm:
    """The ``flyt.method.comm.LocalComm`` interface over a torch.distributed process group."""

    def __init__(self, group=None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def sizes(self, n_local: int, device) -> list[int]:
        counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(self.world_size)]
        dist.all_gather(counts, torch.tensor([n_local], device=device), group=self.group)
        return [int(c) for c in counts]

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        return _all_gather_uneven(t.detach(), self.sizes(t.shape[0], t.device), self.group)

    def gather_autograd(self, t: torch.Tensor) -> torch.Tensor:
        return _Gather.apply(t, self.sizes(t.shape[0], t.device), self.group)

    def all_reduce_sum(self, tensors: list[torch.Tensor]) -> None:
        """One collective per dtype over a flattened copy: hundreds of small all-reduces cost more."""
        for dtype in {t.dtype for t in tensors}:
            group = [t for t in tensors if t.dtype == dtype]
            flat = torch.cat([t.reshape(-1) for t in group])
            dist.all_reduce(flat, group=self.group)
            for t, part in zip(group, flat.split([t.numel() for t in group])):
                t.copy_(part.view_as(t))

    def local_slice(self, n_local: int) -> slice:
        sizes = self.sizes(n_local, "cuda" if dist.get_backend(self.group) == "nccl" else "cpu")
        start = sum(sizes[: self.rank])
        return slice(start, start + n_local)


def _all_gather_uneven(t: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """Concatenation over ranks of tensors whose first dimensions differ (padded to the largest)."""
    largest = max(sizes)
    padded = t.new_zeros((largest, *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def _reduce_scatter_uneven(t: torch.Tensor, sizes: list[int], rank: int, group) -> torch.Tensor:
    """This rank's slice of the sum over ranks of ``t`` (the global-length tensor each rank holds)."""
    total = t.detach().clone().contiguous()
    dist.all_reduce(total, group=group)
    start = sum(sizes[:rank])
    return total[start : start + sizes[rank]]


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(t, sizes, group):
        return _all_gather_uneven(t.detach(), sizes, group)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, ctx.sizes, ctx.group = inputs

    @staticmethod
    def backward(ctx, grad):
        return _ReduceScatter.apply(grad, ctx.sizes, ctx.group), None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(t, sizes, group):
        return _reduce_scatter_uneven(t, sizes, dist.get_rank(group), group)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, ctx.sizes, ctx.group = inputs

    @staticmethod
    def backward(ctx, grad):
        return _Gather.apply(grad, ctx.sizes, ctx.group), None, None
