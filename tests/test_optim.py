"""The differentiable AdamW against torch.optim.AdamW; the learning-rate schedule."""

from __future__ import annotations

import math

import torch

from flyt.method.optim import AdamWConfig, AdamWState, adamw_update, cosine_lr, decays


def test_adamw_matches_torch_over_several_steps(tiny_clip):
    model = tiny_clip[0]
    params = {k: v.detach().clone().double() for k, v in model.named_parameters()}
    torch_params = {k: v.clone().requires_grad_() for k, v in params.items()}
    cfg = AdamWConfig()
    groups = [
        {"params": [p for k, p in torch_params.items() if decays(k, p)], "weight_decay": cfg.weight_decay},
        {"params": [p for k, p in torch_params.items() if not decays(k, p)], "weight_decay": 0.0},
    ]
    assert groups[0]["params"] and groups[1]["params"]
    lr = 1e-2
    opt = torch.optim.AdamW(groups, lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    state = AdamWState.zeros_like(params)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        grads = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in params.items()}
        grads["visual.conv1.weight"][0] = 0.0  # a zero-gradient slice: zero second moment at step 1
        for k, p in torch_params.items():
            p.grad = grads[k].clone()
        opt.step()
        params, state, _ = adamw_update(params, grads, state, lr, cfg)
    for k in params:
        assert torch.allclose(params[k], torch_params[k].detach(), rtol=1e-10, atol=1e-12), k
    assert state.step == 4


def test_weight_decay_groups():
    assert decays("visual.conv1.weight", torch.zeros(2, 2))
    assert not decays("visual.ln_pre.weight", torch.zeros(2))
    assert not decays("transformer.resblocks.0.attn.in_proj_bias", torch.zeros(2))
    assert not decays("logit_scale", torch.zeros(()))


def test_update_is_differentiable_where_second_moment_is_zero():
    p = {"w": torch.zeros(3, 3, dtype=torch.float64)}
    grad = torch.tensor([[0.0, 1.0, -2.0]] * 3, dtype=torch.float64, requires_grad=True)
    new, _, _ = adamw_update(p, {"w": grad}, AdamWState.zeros_like(p), 0.1)
    (d,) = torch.autograd.grad(new["w"].sum(), grad)
    assert torch.isfinite(d).all()
    assert (new["w"][:, 0] == 0).all()


def test_cosine_schedule_with_warmup():
    assert math.isclose(cosine_lr(1.0, 10, 110, 0), 0.1)
    assert math.isclose(cosine_lr(1.0, 10, 110, 9), 1.0)
    assert math.isclose(cosine_lr(1.0, 10, 110, 10), 1.0)
    assert math.isclose(cosine_lr(1.0, 10, 110, 60), 0.5)
    assert cosine_lr(1.0, 10, 110, 110) < 1e-12


def test_closed_form_slope_equals_autograd_through_the_update():
    g = torch.Generator().manual_seed(0)
    shapes = {"w": (4, 3), "b": (3,), "logit_scale": ()}
    params = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}
    state = AdamWState(3, {k: 0.1 * torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()},
                       {k: 0.01 * torch.rand(s, generator=g, dtype=torch.float64) for k, s in shapes.items()})
    state.exp_avg_sq["w"][0, 0] = 0.0
    grads = {k: torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for k, s in shapes.items()}
    with torch.no_grad():
        grads["w"][0, 0] = 0.0  # zero second moment: derivative defined (zero)
    cot = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}
    new, _, slope = adamw_update(params, grads, state, 0.01)
    expected = torch.autograd.grad(list(new.values()), list(grads.values()), [cot[k] for k in new])
    for k, e in zip(new, expected):
        assert torch.allclose(slope[k] * cot[k], e, rtol=1e-12, atol=1e-15), k
    assert slope["w"][0, 0] == 0
