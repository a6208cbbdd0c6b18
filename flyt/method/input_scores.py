"""M-FLYT's standard input scores computed from a teacher CLIP's embeddings (docs/input_scores.md).

Pure maths on tensors, no files: ``flyt.jobs.features`` feeds it the embeddings of one pool shard, from
images or from the embedding cache, so both paths give the same numbers. Embeddings need not be unit
length: every function normalises its inputs in float32 first.
"""

from __future__ import annotations

import math

import numpy as np
import torch

_CHUNK = 1 << 24  # similarity entries held at once (64 MiB of float32)


def unit(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def clip_score(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """s_ii: the cosine of each sample's image and caption embeddings."""
    return (unit(image) * unit(text)).sum(-1)


def batch_assignment(n: int, batch_size: int, num_batches: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``num_batches`` rounds of random batches over ``n`` samples; each round is a (batches, m) index array.

    A round permutes the samples and cuts the permutation into batches of exactly m = min(batch_size, n);
    the last batch is filled up from the round's start, and a sample is scored in its first batch of the
    round only (flattened positions ``< n``), so every sample is scored once per round.
    """
    if n == 0:
        return [np.zeros((0, 0), np.int64) for _ in range(num_batches)]
    m = min(batch_size, n)
    count = -(-n // m)
    return [np.resize(rng.permutation(n), count * m).reshape(count, m) for _ in range(num_batches)]


def neg_clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: float, batch_size: int,
                  rounds: list[np.ndarray]) -> torch.Tensor:
    """negCLIPLoss (Wang et al. 2024) averaged over the rounds of ``batch_assignment``:

    s_ii - (1/2tau) [log(B mean_{j in b} e^{tau s_ij}) + log(B mean_{j in b} e^{tau s_ji})], tau = ``logit_scale``.

    With batches of the full size B (= ``batch_size``) the bracket is the paper's two logsumexps; a
    smaller batch (a shard holding fewer than B samples) estimates them through its mean, so its samples
    are not favoured by the smaller sums.
    """
    image, text = unit(image), unit(text)
    n = len(image)
    total = torch.zeros(n, dtype=torch.float32, device=image.device)
    for batches in rounds:  # all batches of a round at once: (batches, m, m) similarities
        if not batches.size:
            continue
        idx = torch.as_tensor(batches, device=image.device)
        sims = image[idx] @ text[idx].transpose(1, 2)
        logits = logit_scale * sims
        offset = 2 * math.log(batch_size / batches.shape[1])
        norm = (torch.logsumexp(logits, 2) + torch.logsumexp(logits, 1) + offset) / (2 * logit_scale)
        own = torch.arange(batches.size, device=image.device).reshape(batches.shape) < n  # first batch of each sample
        total.index_add_(0, idx[own], (sims.diagonal(dim1=1, dim2=2) - norm)[own])
    return total / max(len(rounds), 1)


def normsim(image: torch.Tensor, target: torch.Tensor, p: float) -> torch.Tensor:
    """NormSim_p: (sum_t (x_t . x_i)^p)^(1/p) over the target images t; p = inf gives max_t x_t . x_i."""
    image, target = unit(image), unit(target)
    rows = max(1, _CHUNK // max(len(target), 1))
    out = []
    for start in range(0, len(image), rows):
        sims = image[start:start + rows] @ target.T
        if math.isinf(p):
            out.append(sims.max(1).values)
        else:
            out.append(sims.pow(p).sum(1).pow(1 / p))
    return torch.cat(out) if out else torch.zeros(0, device=image.device)
