"""What the bilevel step needs from the other processes, and the single-process version of it.

The step is written against this small interface so that one process and ``torchrun`` share every line
of mathematics (docs/algorithm.md, "Several processes"): embeddings and weights are gathered to the
global batch, losses on the global batch are computed identically on every rank, and parameter
gradients are summed.
"""

from __future__ import annotations

import torch


class LocalComm:
    """One process: the local batch is the global batch."""

    rank = 0
    world_size = 1

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``t`` along dim 0 (sizes may differ); no autograd."""
        return t

    def gather_autograd(self, t: torch.Tensor) -> torch.Tensor:
        """``gather`` whose backward sums every rank's gradient for this rank's slice."""
        return t

    def all_reduce_sum(self, tensors: list[torch.Tensor]) -> None:
        """Sum each tensor over ranks, in place."""

    def local_slice(self, n_local: int) -> slice:
        """This rank's rows in a gathered tensor."""
        return slice(0, n_local)
