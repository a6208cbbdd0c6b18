"""The weighted CLIP loss: equal to OpenCLIP's ClipLoss at uniform weights, to the formula elsewhere."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from flyt.method.losses import clip_loss, weighted_clip_loss, zero_shot_loss


def _features(n=7, d=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)
    txt = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)
    return img, txt, g


def test_uniform_weights_equal_openclip_clip_loss():
    img, txt, _ = _features()
    scale = torch.tensor(14.3, dtype=torch.float64)
    expected = ClipLoss()(img, txt, scale)
    log_w = torch.full((7,), -math.log(7), dtype=torch.float64)
    assert torch.allclose(weighted_clip_loss(img, txt, scale, log_w), expected, atol=1e-12)
    assert torch.allclose(clip_loss(img, txt, scale), expected, atol=1e-12)


def test_weighted_loss_matches_the_formula_with_raw_exponentials():
    img, txt, g = _features()
    scale = torch.tensor(3.0, dtype=torch.float64)
    w = torch.softmax(torch.randn(7, generator=g, dtype=torch.float64), 0)
    logits = scale * img @ txt.T
    e = torch.exp(logits)
    loss_i = -sum(w[i] * torch.log(w[i] * e[i, i] / (w * e[i, :]).sum()) for i in range(7))
    loss_t = -sum(w[i] * torch.log(w[i] * e[i, i] / (w * e[:, i]).sum()) for i in range(7))
    got = weighted_clip_loss(img, txt, scale, torch.log(w))
    assert torch.allclose(got, (loss_i + loss_t) / 2, atol=1e-12)
    assert not torch.allclose(got, clip_loss(img, txt, scale))  # the weights matter


def test_extreme_weights_and_logits_stay_finite():
    img, txt, _ = _features(dtype=torch.float32)
    log_w = torch.log_softmax(torch.tensor([80.0, -80, 0, 0, 0, 0, 0]), 0)
    loss = weighted_clip_loss(img, txt, torch.tensor(100.0), log_w)
    assert torch.isfinite(loss)


def test_zero_shot_loss_normaliser_splits_a_global_mean():
    img, cls, g = _features(n=6)
    labels = torch.randint(6, (6,), generator=g)
    scale = torch.tensor(10.0, dtype=torch.float64)
    whole = zero_shot_loss(img, cls, labels, scale)
    parts = zero_shot_loss(img[:2], cls, labels[:2], scale, 6) + zero_shot_loss(img[2:], cls, labels[2:], scale, 6)
    assert torch.allclose(whole, parts)
    assert torch.allclose(whole, F.cross_entropy(scale * img @ cls.T, labels))
