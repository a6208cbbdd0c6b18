"""A differentiable AdamW and the learning-rate schedule (docs/algorithm.md, step 4).

The reference model's update theta' = AdamW(theta, g) must be a differentiable function of the gradient g
so that the downstream loss at theta' can be carried back to g. ``adamw_update`` is that function: pure,
on dicts of tensors, with the same arithmetic as ``torch.optim.AdamW``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from flyt.errors import FlytError

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class AdamWConfig:
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    weight_decay: float = 0.2

    @classmethod
    def for_model(cls, model: str, beta1: float | None = None, beta2: float | None = None,
                  eps: float | None = None, weight_decay: float = 0.2) -> "AdamWConfig":
        """OpenCLIP's training defaults by model name, as the original uses them: beta2 0.98 and eps 1e-6
        when the name contains "vit" (any case), else 0.999 and 1e-8; the --beta1/--beta2/--eps flags override."""
        vit = "vit" in model.lower()
        cfg = cls(0.9 if beta1 is None else beta1, (0.98 if vit else 0.999) if beta2 is None else beta2,
                  (1e-6 if vit else 1e-8) if eps is None else eps, weight_decay)
        if not (0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1 and cfg.eps >= 0):
            raise FlytError(f"--beta1 and --beta2 must be in [0, 1) and --eps >= 0 "
                            f"(got {cfg.beta1}, {cfg.beta2}, {cfg.eps})")
        return cfg

    @property
    def betas(self) -> tuple[float, float]:
        return self.beta1, self.beta2


@dataclass
class AdamWState:
    """Moments and step count; they advance every FLYT step."""

    step: int = 0
    exp_avg: Tensors = field(default_factory=dict)
    exp_avg_sq: Tensors = field(default_factory=dict)

    @classmethod
    def zeros_like(cls, params: Tensors) -> "AdamWState":
        return cls(0, {k: torch.zeros_like(v) for k, v in params.items()},
                   {k: torch.zeros_like(v) for k, v in params.items()})

    def state_dict(self) -> dict:
        return {"step": self.step, "exp_avg": dict(self.exp_avg), "exp_avg_sq": dict(self.exp_avg_sq)}

    @classmethod
    def from_state_dict(cls, sd: dict) -> "AdamWState":
        return cls(int(sd["step"]), dict(sd["exp_avg"]), dict(sd["exp_avg_sq"]))


def decays(name: str, param: torch.Tensor) -> bool:
    """Weight decay only on >=2-D weights: never on biases, norms, gains or logit scales."""
    return param.ndim >= 2 and "logit_scale" not in name


def adamw_update(params: Tensors, grads: Tensors, state: AdamWState, lr: float,
                 cfg: AdamWConfig = AdamWConfig()) -> tuple[Tensors, AdamWState, Tensors]:
    """One AdamW step: (theta', new state, d theta'/d g).

    Bias-corrected moments, decoupled weight decay on the parameters ``decays`` selects. The update is
    applied only where the new second moment is non-zero, so that d(theta')/dg is defined everywhere
    (there the update and its derivative are zero). The map is elementwise, so its Jacobian in g is the
    returned diagonal ``slope``: with r = sqrt(s / bc2) and D = r + eps,
    d theta'/d g = -lr/bc1 * ((1 - b1) - m g (1 - b2) / (bc2 r D)) / D.
    Written out-of-place, theta' is also differentiable by autograd (the tests check ``slope`` that way).
    """
    step = state.step + 1
    bc1 = 1 - cfg.beta1 ** step
    bc2 = 1 - cfg.beta2 ** step
    new_params, new_m, new_v, slope = {}, {}, {}, {}
    for name, p in params.items():
        g = grads[name]
        m = torch.lerp(state.exp_avg[name], g, 1 - cfg.beta1)
        v = torch.addcmul(state.exp_avg_sq[name] * cfg.beta2, g, g, value=1 - cfg.beta2)
        nonzero = v > 0
        r = torch.sqrt(torch.where(nonzero, v, torch.ones_like(v)) / bc2)
        d = r + cfg.eps
        update = torch.where(nonzero, m / d, torch.zeros_like(m))
        decay = 1 - lr * cfg.weight_decay if decays(name, p) else 1.0
        new_params[name] = torch.add(p * decay if decay != 1.0 else p, update, alpha=-lr / bc1)
        new_m[name], new_v[name] = m, v
        with torch.no_grad():
            inner = (m * g).mul_((1 - cfg.beta2) / bc2).div_(r * d).neg_().add_(1 - cfg.beta1).div_(d)
            slope[name] = inner.mul_(nonzero).mul_(-lr / bc1)
    return new_params, AdamWState(step, new_m, new_v), slope


def cosine_lr(base_lr: float, warmup: int, total_steps: int, step: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to zero at ``total_steps``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    span = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    return 0.5 * (1 + math.cos(math.pi * progress)) * base_lr
