"""Losses on embeddings (docs/algorithm.md, steps 2 and 5).

Everything here is a pure function of already-computed, L2-normalised embeddings, so the bilevel step can
take cheap second derivatives of the loss with respect to embeddings and weights without ever
differentiating twice through the model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def weighted_clip_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, log_w: torch.Tensor) -> torch.Tensor:
    """FLYT's weighted contrastive loss L_w = (L_I + L_T) / 2 over one (global) batch.

    With logits l_ij = scale * img_i . txt_j and weights w = exp(log_w) (a softmax, summing to 1):
    L_I = -sum_i w_i log(w_i e^{l_ii} / sum_j w_j e^{l_ij}), L_T the same on the transposed logits.
    The weights scale each example's loss and its weight as a negative. Computed in log space
    (log w + l, logsumexp) so tiny or huge weights never overflow. Uniform w gives the plain CLIP loss.
    """
    logits = scale * img @ txt.T
    w = log_w.exp()
    diag = logits.diagonal()
    lse_img = torch.logsumexp(log_w[None, :] + logits, dim=1)  # over texts j for image i
    lse_txt = torch.logsumexp(log_w[:, None] + logits, dim=0)  # over images j for text i
    loss_i = -(w * (log_w + diag - lse_img)).sum()
    loss_t = -(w * (log_w + diag - lse_txt)).sum()
    return (loss_i + loss_t) / 2


def clip_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The standard CLIP loss: the weighted loss at uniform weights."""
    n = img.shape[0]
    log_w = torch.full((n,), -math.log(n), dtype=img.dtype, device=img.device)
    return weighted_clip_loss(img, txt, scale, log_w)


def zero_shot_loss(img: torch.Tensor, classifier: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor,
                   normaliser: int | None = None) -> torch.Tensor:
    """Zero-shot cross-entropy: logits = scale * img . classifier^T against class ids.

    ``normaliser`` divides the summed loss (default: the batch size); a process holding part of a
    global batch passes the global size so that partial losses add up to the global mean.
    """
    logits = scale * img @ classifier.T
    total = F.cross_entropy(logits, labels, reduction="sum")
    return total / (normaliser if normaliser is not None else img.shape[0])
