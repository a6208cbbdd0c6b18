"""Label-free diagnostics of a scoring model while it trains.

A run has no labels to say whether its filter is getting better, but three numbers show how it moves:
the spread of a batch's scores (all equal = no filter), the effective sample size of the softmax
weights (a few samples taking all the weight = a collapsed filter), and the rank correlation of the
current scores with the scorer's initial scores on a fixed probe set (a good start, e.g.
``--cos_sim_init``'s, being scrambled shows up here first).
"""

from __future__ import annotations

import torch


def score_spread(scores: torch.Tensor) -> float:
    """Population standard deviation of one (global) batch's scores."""
    return float(scores.double().std(correction=0))


def ess_share(scores: torch.Tensor) -> float:
    """Effective sample size of the batch's softmax weights, 1 / sum w^2, as a share of the batch (1 = uniform)."""
    w = torch.softmax(scores.double(), dim=0)
    return float(1.0 / (w * w).sum() / scores.numel())


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1, ties sharing their mean rank."""
    x = x.double()
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(x.numel(), dtype=x.dtype, device=x.device)
    values, inverse = torch.unique(x, return_inverse=True)
    total = torch.zeros_like(values).index_add_(0, inverse, ranks)
    count = torch.zeros_like(values).index_add_(0, inverse, torch.ones_like(ranks))
    return (total / count)[inverse]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two score vectors (nan when either is constant)."""
    ra, rb = _ranks(a.flatten()), _ranks(b.flatten())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.norm() * rb.norm()).item()
    return float((ra @ rb) / denom) if denom > 0 else float("nan")


class Probe:
    """A fixed set of upstream samples scored at the start; ``drift`` compares later scores with those.

    The initial scores are all a checkpoint needs to keep: the samples themselves are the stream's
    first upstream batch, which the seed reproduces."""

    def __init__(self, batch: dict, initial: torch.Tensor | None = None):
        self.batch, self.initial = batch, initial

    @torch.no_grad()
    def scores(self, score_fn, chunk: int = 256) -> torch.Tensor:
        """``score_fn`` (a cpu sub-batch -> scores) over the probe, in chunks to bound memory."""
        n = len(self.batch["uid"])
        return torch.cat([score_fn({k: v[lo:lo + chunk] for k, v in self.batch.items()}).float()
                          for lo in range(0, n, chunk)])

    def drift(self, current: torch.Tensor) -> float:
        """Spearman correlation of ``current`` with the initial scores (which the first call sets)."""
        if self.initial is None:
            self.initial = current.clone()
        return spearman(current, self.initial)


def batch_diagnostics(scores: torch.Tensor) -> dict[str, float]:
    """The step's spread and effective sample size, under the names the metrics log uses."""
    return {"diag/score_std": score_spread(scores), "diag/ess_share": ess_share(scores)}
