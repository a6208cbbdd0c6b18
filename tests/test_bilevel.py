"""The bilevel step against an independent computation: theta' by plain autograd, the downstream losses
written out, and the hypergradients against Richardson-extrapolated central differences, in float64.

Deliberate mutations of ``flyt/method/bilevel.py`` these tests were seen to catch are listed in each test.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from flyt.method.bilevel import LOGIT_SCALE_BOUNDS, BilevelConfig, DownstreamBatch, flyt_step, downstream_losses, weighted_update
from flyt.method.losses import clip_loss, weighted_clip_loss, zero_shot_loss
from flyt.models.networks import MixingModel, ScoringModel
from flyt.method.optim import AdamWState, adamw_update

from conftest import random_tokens

LR = 1e-2  # large enough that the hypergradients stand well above finite-difference noise
TASK_WEIGHTS = (3.0, 1.0)  # unequal: the weighted mean over tasks is tested, not a plain mean
FD_RTOL = 1e-7
SHRINK = 0.01
# (step, Richardson levels): the truncation error stays below ~1e-8, at logit scale ln 100 too
FD_STEP = {"flyt": (2e-2, 1), "mflyt": (2e-3, 2)}


def _setup(tiny_clip, mode: str, with_dls: bool, seed: int = 0, loss: str = "zeroshot",
           logit_scale: float | None = None):
    """A float64 reference at theta with a used AdamW state, an upstream batch, two downstream tasks of
    unequal weights (class prompts, or distinct captions for ``loss="clip"``) and a scorer.

    ``logit_scale`` starts the reference's logit scale there; at a clamp bound the first moment is set
    so that AdamW pushes it outside, where the clamp must hold it."""
    model, _, _, tok = tiny_clip
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the scorer's initial weights
    ref = copy.deepcopy(model).double()
    params = {k: v.detach().clone() for k, v in ref.named_parameters()}
    state = AdamWState(5, {k: 1e-3 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in params.items()},
                       {k: 1e-4 * torch.rand(v.shape, generator=g, dtype=v.dtype) + 1e-6 for k, v in params.items()})
    if logit_scale is not None:
        lo, hi = LOGIT_SCALE_BOUNDS
        params["logit_scale"] = torch.tensor(logit_scale, dtype=torch.float64)
        push = {lo: 1.0, hi: -1.0}.get(logit_scale, 0.0)  # AdamW steps against the first moment's sign
        state.exp_avg["logit_scale"] = state.exp_avg["logit_scale"] + push
    n, n_down, n_cls = 6, 5, 4
    up = {"image": torch.randn(n, 3, 32, 32, generator=g, dtype=torch.float64),
          "text": random_tokens(tok, n, g),
          "scores": torch.randn(n, 3, generator=g, dtype=torch.float64)}
    tasks = [DownstreamBatch("a", torch.randn(n_down, 3, 32, 32, generator=g, dtype=torch.float64),
                             labels=torch.randint(n_cls, (n_down,), generator=g),
                             prompts=random_tokens(tok, n_cls, g), weight=TASK_WEIGHTS[0]),
             DownstreamBatch("b", torch.randn(3, 3, 32, 32, generator=g, dtype=torch.float64),
                             labels=torch.randint(2, (3,), generator=g), prompts=random_tokens(tok, 2, g),
                             weight=TASK_WEIGHTS[1])]
    if loss == "clip":
        tasks = [DownstreamBatch(t.name, t.images, texts=random_tokens(tok, t.images.shape[0], g), weight=t.weight)
                 for t in tasks]
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
    new["logit_scale"] = new["logit_scale"].clamp(*LOGIT_SCALE_BOUNDS)
    return new


def _task_losses(ref, new, tasks, dls, loss: str) -> list[torch.Tensor]:
    """Each task's downstream loss at ``new``; the logits' multiplier is exp(dls), or 1 without dls."""
    s = dls.exp() if dls is not None else torch.ones((), dtype=torch.float64)
    out = []
    for t in tasks:
        if loss == "clip":
            i, c, _ = torch.func.functional_call(ref, new, (t.images, t.texts))
            out.append(clip_loss(i, c, s))
        else:
            i, c, _ = torch.func.functional_call(ref, new, (t.images, t.prompts))
            out.append(zero_shot_loss(i, c, t.labels, s))
    return out


def _downstream_loss_direct(ref, params, state, scorer, up, tasks, dls, loss="zeroshot"):
    """L_down(theta'(phi)): the task-weighted mean of the task losses."""
    losses = _task_losses(ref, _theta_prime(ref, params, state, scorer, up), tasks, dls, loss)
    return sum(t.weight * v for t, v in zip(tasks, losses)) / sum(t.weight for t in tasks)


def _fd(fn, tensors, direction, h: float, levels: int):
    """Derivative of fn() along ``direction`` (perturbing ``tensors`` in place): central differences at
    h, h/2, ..., h/2^levels, Richardson-extrapolated (error O(h^(2 levels + 2))). Also returns the
    extrapolation's rounding noise floor, taking an error of 5e-16 |f| (about two ulps) in each value."""
    def at(step):
        with torch.no_grad():
            for t, d in zip(tensors, direction):
                t.add_(step * d)
        try:
            return float(fn().detach())
        finally:
            with torch.no_grad():
                for t, d in zip(tensors, direction):
                    t.sub_(step * d)

    steps = [h / 2 ** k for k in range(levels + 1)]
    table = [(at(s) - at(-s)) / (2 * s) for s in steps]
    noise = [h / s for s in steps]  # each central difference's noise, in units of error / h
    for j in range(1, levels + 1):
        table = [(4 ** j * table[k + 1] - table[k]) / (4 ** j - 1) for k in range(len(table) - 1)]
        noise = [(4 ** j * noise[k + 1] + noise[k]) / (4 ** j - 1) for k in range(len(noise) - 1)]
    return table[0], noise[0] * 5e-16 * abs(at(0.0)) / h


def _assert_fd(got: float, expected: float, floor: float) -> None:
    assert abs(expected) >= 2 * floor / FD_RTOL, (expected, floor)  # noise at most half the tolerance
    assert abs(got - expected) <= FD_RTOL * abs(expected), (got, expected, (got - expected) / expected)


def _direction(scorer, up, trainable, seed: int, h: float = 1e-4):
    """A random direction in the scorer's trainable parameters, scaled so that the scores move by at most
    ~1 per unit step. FLYT's GLU head is strongly curved along a random direction (its gates multiply),
    so there every tensor but the output projection, in which the scores are linear, is shrunk by SHRINK:
    the FD then stays accurate to ~1e-8 while every tensor still contributes."""
    names = {id(p): n for n, p in scorer.named_parameters()}
    head = getattr(scorer, "glu_model", None)
    output = f"glu_model.layers.{len(head.layers) - 1}.w2." if head is not None else ""
    g = torch.Generator().manual_seed(seed)
    direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) * (1.0 if names[id(p)].startswith(output) else SHRINK)
                 for p in trainable]
    with torch.no_grad():
        before = scorer(up)
        for p, d in zip(trainable, direction):
            p.add_(h * d)
        after = scorer(up)
        for p, d in zip(trainable, direction):
            p.sub_(h * d)
    speed = float((after - before).abs().max()) / h
    return [d / speed for d in direction]


def _check_step(tiny_clip, mode: str, loss: str, with_dls: bool, logit_scale: float | None = None):
    """One flyt_step against the independent computation: theta' (the step taken, per tensor), each
    task's reported loss, d L_down / d phi along a scaled random direction, and d L_down / d dls."""
    ref, params, state, scorer, up, tasks, dls = _setup(tiny_clip, mode, with_dls, loss=loss, logit_scale=logit_scale)
    result = flyt_step(ref, params, state, LR, scorer, up, tasks, dls, BilevelConfig(downstream_loss=loss))
    assert result.finite
    trainable = [p for p in scorer.parameters() if p.requires_grad]
    new = {k: v.detach() for k, v in _theta_prime(ref, params, state, scorer, up).items()}
    with torch.no_grad():
        for k in params:
            step, want = result.params[k] - params[k], new[k] - params[k]
            assert float((step - want).abs().max()) <= 1e-9 * float(want.abs().max()), k
        for t, direct in zip(tasks, _task_losses(ref, new, tasks, dls, loss)):
            assert result.metrics[f"downstream_loss/{t.name}"] == pytest.approx(float(direct), rel=1e-12, abs=0)

    def value():
        return _downstream_loss_direct(ref, params, state, scorer, up, tasks, dls, loss)

    direction = _direction(scorer, up, trainable, seed=1)
    expected, floor = _fd(value, trainable, direction, *FD_STEP[mode])
    _assert_fd(sum(float((p.grad * d).sum()) for p, d in zip(trainable, direction)), expected, floor)
    if with_dls:
        expected, floor = _fd(value, [dls], [torch.ones((), dtype=torch.float64)], *FD_STEP["mflyt"])
        _assert_fd(float(dls.grad), expected, floor)
    return result, params


@pytest.mark.parametrize("mode", ["flyt", "mflyt"])
@pytest.mark.parametrize("with_dls", [True, False])
def test_hypergradient_matches_finite_differences(tiny_clip, mode, with_dls):
    """Zero-shot downstream loss, unequal task weights.

    Mutations caught: each task's share 1/len(tasks) instead of weight/total ([False-mflyt]); dropping
    the ``u_img * g_img[local]`` term of h ([False-mflyt]); the temperature dls instead of exp(dls)
    ([True-mflyt], reported losses)."""
    _check_step(tiny_clip, mode, "zeroshot", with_dls)


def test_downstream_clip_loss_hypergradient_matches_finite_differences(tiny_clip):
    """CLIP downstream loss with a learned temperature.

    Mutation caught: dropping the ``u_txt * g_txt[local]`` term of h."""
    _check_step(tiny_clip, "mflyt", "clip", with_dls=True)


@pytest.mark.parametrize("mode,logit_scale", [("mflyt", LOGIT_SCALE_BOUNDS[0]), ("mflyt", 3.0),
                                              ("mflyt", LOGIT_SCALE_BOUNDS[1]), ("flyt", 3.0)])
def test_reference_logit_scale_path_without_downstream_temperature(tiny_clip, mode, logit_scale):
    """CLIP downstream loss without --downstream_logit_scale: the logits' multiplier is exactly 1 (as in
    the original), so the reference's logit scale reaches the downstream loss through nothing; it only
    moves with theta' (AdamW on g's logit-scale entry, then the clamp). At a bound the update pushes it
    out and the clamp holds it; inside it moves freely.

    Mutations caught: the multiplier exp(logit_scale(theta')) instead of 1 ([mflyt-3.0], reported
    losses); deleting the logit-scale term added to g ([mflyt-3.0], theta'); deleting the clamp
    ([mflyt-2.0] and [mflyt-ln 100], theta'). The clamp mask on the logit scale's slope and its term in h
    are gone: they multiplied dL_down/dtheta'_logit_scale, which is now 0."""
    result, params = _check_step(tiny_clip, mode, "clip", with_dls=False, logit_scale=logit_scale)
    moved = float(result.params["logit_scale"])
    if logit_scale in LOGIT_SCALE_BOUNDS:
        assert moved == logit_scale
    else:
        assert abs(moved - logit_scale) > 1e-5


@pytest.mark.parametrize("loss", ["zeroshot", "clip"])
def test_accumulation_chunks_change_nothing(tiny_clip, loss):
    def run(accum_freq):
        ref, params, state, scorer, up, tasks, dls = _setup(tiny_clip, "flyt", True, loss=loss)
        result = flyt_step(ref, params, state, LR, scorer, up, tasks, dls,
                           BilevelConfig(downstream_loss=loss, accum_freq=accum_freq))
        return result, [p.grad.clone() for p in scorer.parameters() if p.requires_grad], dls.grad.clone()

    (one, g1, d1), (three, g3, d3) = run(1), run(3)
    for a, b in zip(g1, g3):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-14)
    assert torch.allclose(d1, d3)
    for k in one.params:
        assert torch.allclose(one.params[k], three.params[k], rtol=1e-12, atol=1e-14)


def test_reference_stays_unless_updated_but_optimizer_state_advances(tiny_clip):
    ref, params, state, scorer, up, tasks, dls = _setup(tiny_clip, "mflyt", False)
    kept = flyt_step(ref, params, state, LR, scorer, up, tasks, dls, BilevelConfig(update_reference=False))
    moved = flyt_step(ref, params, state, LR, scorer, up, tasks, dls, BilevelConfig(update_reference=True))
    assert all(torch.equal(kept.params[k], params[k]) for k in params)
    assert not torch.equal(moved.params["visual.conv1.weight"], params["visual.conv1.weight"])
    assert kept.opt_state.step == moved.opt_state.step == state.step + 1
    assert 2.0 <= float(moved.params["logit_scale"]) <= math.log(100)


@pytest.mark.parametrize("accum_freq", [1, 3])
def test_validation_step_and_losses_are_the_direct_ones(tiny_clip, accum_freq):
    """``weighted_update`` (held-out validation's first-order step) and ``downstream_losses`` against
    theta' and the task losses written the obvious way, in float64. Mutations caught: the step's
    logit-scale clamp skipped (theta' leaves the bounds at ln 100); the vjp giving every chunk the
    first chunk's cotangents (accum_freq 3 only)."""
    ref, params, state, scorer, up, tasks, dls = _setup(tiny_clip, "mflyt", True, logit_scale=math.log(100))
    cfg = BilevelConfig(accum_freq=accum_freq)
    with torch.no_grad():
        log_w = torch.log_softmax(scorer(up), 0)
    got = weighted_update(ref, params, state, LR, up, log_w, cfg)
    want = _theta_prime(ref, params, state, scorer, up)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-12, atol=1e-15)
    losses = downstream_losses(ref, want, tasks, dls.detach(), cfg)
    direct = _task_losses(ref, want, tasks, dls.detach(), "zeroshot")
    assert list(losses) == [f"downstream_loss/{t.name}" for t in tasks]
    for value, expected in zip(losses.values(), direct):
        assert abs(value - float(expected)) <= 1e-12 * abs(float(expected))
