"""The bilevel step's hypergradients against central finite differences, in float64."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from flyt.bilevel import BilevelConfig, DownstreamBatch, flyt_step
from flyt.losses import clip_loss, weighted_clip_loss, zero_shot_loss
from flyt.models import MixingModel, ScoringModel
from flyt.optim import AdamWState, adamw_update

from conftest import random_tokens

LR = 1e-3


def _setup(tiny_clip, mode: str, with_dls: bool, seed: int = 0):
    model, _, _, tok = tiny_clip
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the scorer's initial weights
    ref = copy.deepcopy(model).double()
    params = {k: v.detach().clone() for k, v in ref.named_parameters()}
    state = AdamWState(5, {k: 1e-3 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in params.items()},
                       {k: 1e-4 * torch.rand(v.shape, generator=g, dtype=v.dtype) + 1e-6 for k, v in params.items()})
    n, n_down, n_cls = 6, 5, 4
    up = {"image": torch.randn(n, 3, 32, 32, generator=g, dtype=torch.float64),
          "text": random_tokens(tok, n, g),
          "scores": torch.randn(n, 3, generator=g, dtype=torch.float64)}
    tasks = [DownstreamBatch("a", torch.randn(n_down, 3, 32, 32, generator=g, dtype=torch.float64),
                             labels=torch.randint(n_cls, (n_down,), generator=g),
                             prompts=random_tokens(tok, n_cls, g)),
             DownstreamBatch("b", torch.randn(3, 3, 32, 32, generator=g, dtype=torch.float64),
                             labels=torch.randint(2, (3,), generator=g), prompts=random_tokens(tok, 2, g))]
    if mode == "flyt":
        scorer = ScoringModel(copy.deepcopy(model), 2, 0.5).double()
    else:
        scorer = MixingModel(3, "random").double()
    dls = torch.tensor(math.log(10.0), dtype=torch.float64, requires_grad=True) if with_dls else None
    return ref, params, state, scorer, up, tasks, dls


def _theta_prime(ref, params, state, scorer, up):
    """theta'(phi) written the obvious way: autograd for g at weights softmax(q_phi), then AdamW."""
    p = {k: v.detach().requires_grad_() for k, v in params.items()}
    w = torch.log_softmax(scorer(up), 0)
    img, txt, scale = torch.func.functional_call(ref, p, (up["image"], up["text"]))
    grads = torch.autograd.grad(weighted_clip_loss(img, txt, scale, w.detach()), list(p.values()), allow_unused=True)
    grads = {k: (gr if gr is not None else torch.zeros_like(v)) for (k, v), gr in zip(p.items(), grads)}
    new, _, _ = adamw_update(params, grads, state, LR)
    new["logit_scale"] = new["logit_scale"].clamp(2.0, math.log(100))
    return new


def _downstream_loss_direct(ref, params, state, scorer, up, tasks, dls):
    """L_down(theta'(phi)) with the zero-shot task losses."""
    new = _theta_prime(ref, params, state, scorer, up)
    total = 0.0
    for t in tasks:
        i, c, _ = torch.func.functional_call(ref, new, (t.images, t.prompts))
        s = dls.exp() if dls is not None else torch.ones((), dtype=torch.float64)
        total = total + zero_shot_loss(i, c, t.labels, s)
    return total / len(tasks)


def _fd_directional(fn, tensors, direction, eps=1e-5):
    """Central difference of fn() along ``direction``, perturbing ``tensors`` in place."""
    def shift(step):
        with torch.no_grad():
            for t, d in zip(tensors, direction):
                t.add_(step * d)

    shift(eps)
    plus = float(fn())
    shift(-2 * eps)
    minus = float(fn())
    shift(eps)
    return (plus - minus) / (2 * eps)


@pytest.mark.parametrize("mode", ["flyt", "mflyt"])
@pytest.mark.parametrize("with_dls", [True, False])
def test_hypergradient_matches_finite_differences(tiny_clip, mode, with_dls):
    ref, params, state, scorer, up, tasks, dls = _setup(tiny_clip, mode, with_dls)
    flyt_step(ref, params, state, LR, scorer, up, tasks, dls, BilevelConfig())
    trainable = [p for p in scorer.parameters() if p.requires_grad]
    analytic = [p.grad.clone() for p in trainable]

    def value():
        return _downstream_loss_direct(ref, params, state, scorer, up, tasks, dls)

    g = torch.Generator().manual_seed(1)
    for _ in range(2):  # random directions through every trainable parameter at once
        direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in trainable]
        expected = _fd_directional(value, trainable, direction)
        got = sum(float((a * d).sum()) for a, d in zip(analytic, direction))
        assert abs(got - expected) <= 1e-4 * abs(expected), (got, expected)
    if with_dls:
        expected = _fd_directional(value, [dls], [torch.ones((), dtype=torch.float64)])
        assert abs(float(dls.grad) - expected) <= 1e-4 * abs(expected)


def _step_outputs(tiny_clip, cfg, mode="flyt"):
    ref, params, state, scorer, up, tasks, dls = _setup(tiny_clip, mode, True)
    if cfg.downstream_loss == "clip":
        g = torch.Generator().manual_seed(3)
        tasks = [DownstreamBatch("c", t.images, texts=random_tokens(tiny_clip[3], t.images.shape[0], g)) for t in tasks]
    result = flyt_step(ref, params, state, LR, scorer, up, tasks, dls, cfg)
    grads = [p.grad.clone() for p in scorer.parameters() if p.requires_grad]
    return result, grads, dls.grad.clone(), (ref, params, state, scorer, up, tasks, dls)


@pytest.mark.parametrize("loss", ["zeroshot", "clip"])
def test_accumulation_chunks_change_nothing(tiny_clip, loss):
    one, g1, d1, _ = _step_outputs(tiny_clip, BilevelConfig(downstream_loss=loss))
    three, g3, d3, _ = _step_outputs(tiny_clip, BilevelConfig(downstream_loss=loss, accum_freq=3))
    for a, b in zip(g1, g3):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-14)
    assert torch.allclose(d1, d3)
    for k in one.params:
        assert torch.allclose(one.params[k], three.params[k], rtol=1e-12, atol=1e-14)


def test_downstream_clip_loss_hypergradient_matches_finite_differences(tiny_clip):
    _, grads, _, (ref, params, state, scorer, up, tasks, dls) = _step_outputs(
        tiny_clip, BilevelConfig(downstream_loss="clip"), mode="mflyt")

    def value():
        new = _theta_prime(ref, params, state, scorer, up)
        losses = []
        for t in tasks:
            i, c, _ = torch.func.functional_call(ref, new, (t.images, t.texts))
            losses.append(clip_loss(i, c, dls.exp()))
        return sum(losses) / len(losses)

    trainable = [p for p in scorer.parameters() if p.requires_grad]
    direction = [torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(5)) for p in trainable]
    expected = _fd_directional(value, trainable, direction)
    got = sum(float((a * d).sum()) for a, d in zip(grads, direction))
    assert abs(got - expected) <= 1e-4 * abs(expected), (got, expected)


def test_reference_stays_unless_updated_but_optimizer_state_advances(tiny_clip):
    ref, params, state, scorer, up, tasks, dls = _setup(tiny_clip, "mflyt", False)
    kept = flyt_step(ref, params, state, LR, scorer, up, tasks, dls, BilevelConfig(update_reference=False))
    moved = flyt_step(ref, params, state, LR, scorer, up, tasks, dls, BilevelConfig(update_reference=True))
    assert all(torch.equal(kept.params[k], params[k]) for k in params)
    assert not torch.equal(moved.params["visual.conv1.weight"], params["visual.conv1.weight"])
    assert kept.opt_state.step == moved.opt_state.step == state.step + 1
    assert 2.0 <= float(moved.params["logit_scale"]) <= math.log(100)
