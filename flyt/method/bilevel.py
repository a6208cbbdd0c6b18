"""One FLYT training step, step by step as docs/algorithm.md numbers them.

    1. scores s = q_phi(batch), weights w = softmax(s) over the global batch
    2. weighted CLIP loss L_w(theta; w) on the reference model's embeddings
    3. g = grad_theta L_w
    4. theta' = AdamW(theta, g), with its (diagonal) derivative in g
    5. downstream loss L_down(theta') (zero-shot cross-entropy per task, or the CLIP loss)
    6. v = dL_down/dg, carried back through the AdamW map
    7. dL_down/dw = d/dw <J_e v, dL_w/de (e, w)>: one Jacobian-vector product u = J_e v through the model,
       then a second derivative of the cheap loss-on-embeddings only
    8. grad_phi = backprop of step 7 through softmax and q_phi
    9. theta <- theta' when the reference model is updated

The model is only ever differentiated once (backward for g and dL_down/dtheta', forward-mode for u).
With ``accum_freq`` > 1 the batches are processed in chunks (embeddings first, then one vjp/jvp per chunk),
which changes memory, not the mathematics.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from flyt.method.comm import LocalComm
from flyt.method.losses import clip_loss, weighted_clip_loss, zero_shot_loss
from flyt.precision import autocast
from flyt.method.optim import AdamWConfig, AdamWState, Tensors, adamw_update

LOGIT_SCALE_BOUNDS = (2.0, math.log(100))


@dataclass(frozen=True)
class BilevelConfig:
    adamw: AdamWConfig = AdamWConfig()
    downstream_loss: str = "zeroshot"  # or "clip"
    update_reference: bool = True
    accum_freq: int = 1
    logit_scale_bounds: tuple[float, float] = LOGIT_SCALE_BOUNDS
    precision: str = "fp32"  # see flyt.precision
    loss_scale: float = 1.0  # fp16: cotangents are multiplied by this and gradients divided by it
    log_pre_update: bool = False  # also report the downstream losses at theta (costs a forward)


@dataclass
class DownstreamBatch:
    """One task's slice of the step. Zero-shot: images, labels and this rank's class prompts (one
    tokenized prompt per class, template drawn per step). CLIP loss: images and their captions."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor | None = None
    prompts: torch.Tensor | None = None
    texts: torch.Tensor | None = None
    weight: float = 1.0  # share in the weighted mean over tasks


@dataclass
class StepResult:
    params: Tensors
    opt_state: AdamWState
    finite: bool
    metrics: dict[str, float] = field(default_factory=dict)
    scores: torch.Tensor | None = None  # the global batch's scores (detached): the caller's diagnostics


def _wide(t: torch.Tensor) -> torch.Tensor:
    """Losses run in at least float32 whatever the model's precision (float64 stays float64)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _embedder(model: nn.Module, precision: str, forward_mode: bool = False):
    """f(params, image=, text=) -> tuple of normalised (at least float32) embeddings via OpenCLIP's forward.

    In low precision, forward-mode AD runs in float32 (TF32 matmuls on CUDA): on an H200, dual tensors
    under autocast or with bf16 weights failed inside OpenCLIP's attention ("expected scalar type Float
    but found Half/BFloat16").
    """
    wide = forward_mode and precision != "fp32"

    def embed(params: Tensors, image: torch.Tensor | None = None, text: torch.Tensor | None = None):
        if wide:
            params = {k: _wide(v) for k, v in params.items()}
            image = _wide(image) if image is not None else None
            context = contextlib.nullcontext()
        else:
            context = autocast(precision, next(iter(params.values())).device)
        with context:
            out = functional_call(model, params, (), {"image": image, "text": text})
        return tuple(_wide(o) for o in out[:2] if o is not None)

    return embed


class _Encoded:
    """Embeddings of several input pieces (kwargs of ``embed``) at one parameter point, with vjp and jvp
    back to the parameters.

    Unchunked, the forward graph is kept for the vjp (one forward + one backward, like a plain step);
    chunked, the forward runs without a graph and each piece is recomputed for its vjp.
    """

    def __init__(self, embeds: tuple, pieces: Sequence[dict], params: Tensors, keep_graph: bool):
        (self.embed, self.jvp_embed), self.pieces = embeds, pieces
        self.params, self.keep_graph = params, keep_graph
        if keep_graph:
            self.leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
            with torch.enable_grad():
                self.outputs = [self.embed(self.leaves, **piece) for piece in pieces]
            self.values = [tuple(o.detach() for o in out) for out in self.outputs]
        else:
            with torch.no_grad():
                self.values = [self.embed(params, **piece) for piece in pieces]

    def cat(self, i: int) -> torch.Tensor:
        """The i-th output of every piece, concatenated over pieces."""
        return torch.cat([v[i] for v in self.values])

    def vjp(self, cotangents: list[tuple], scale: float = 1.0) -> Tensors:
        """Sum over pieces of J^T cotangent (cotangents multiplied by ``scale``, the result divided)."""
        names = list(self.params)
        total: Tensors = {}
        for i, piece in enumerate(self.pieces):
            if self.keep_graph:
                outputs, leaves = self.outputs[i], self.leaves
            else:
                leaves = {k: v.detach().requires_grad_() for k, v in self.params.items()}
                with torch.enable_grad():
                    outputs = self.embed(leaves, **piece)
            cot = [c * scale for c in cotangents[i]] if scale != 1.0 else list(cotangents[i])
            grads = torch.autograd.grad(outputs, [leaves[k] for k in names], cot, allow_unused=True)
            for k, g in zip(names, grads):
                if g is not None:
                    total[k] = total[k].add_(g) if k in total else g
        for k, p in self.params.items():
            if k not in total:
                total[k] = torch.zeros_like(p)
            elif scale != 1.0:
                total[k].div_(scale)
        return total

    def jvp(self, tangents: Tensors, tf32: bool = False) -> list[tuple]:
        """J v for every piece, by forward-mode AD (math attention: no fused kernel has a forward AD rule).

        Runs in float32 (``_embedder``); ``tf32`` lets CUDA matmuls use TF32 meanwhile (low precision runs).
        """
        tangent = {k: _wide(tangents[k]) for k in self.params}
        params = {k: _wide(p) for k, p in self.params.items()}
        with sdpa_kernel(SDPBackend.MATH), _mha_fastpath(False), _tf32(tf32):
            return [jvp(lambda p: self.jvp_embed(p, **piece), (params,), (tangent,))[1] for piece in self.pieces]


@contextlib.contextmanager
def _tf32(enabled: bool):
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = previous or enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


@contextlib.contextmanager
def _mha_fastpath(enabled: bool):
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


def _chunks(t: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
    return torch.tensor_split(t, min(n, t.shape[0])) if n > 1 else (t,)


def _split_like(t: torch.Tensor, values: list[tuple], i: int) -> list[torch.Tensor]:
    return list(torch.split(t, [v[i].shape[0] for v in values]))


def _upstream(embeds, params: Tensors, batch: dict, cfg: BilevelConfig) -> _Encoded:
    pieces = [{"image": x, "text": t}
              for x, t in zip(_chunks(batch["image"], cfg.accum_freq), _chunks(batch["text"], cfg.accum_freq))]
    return _Encoded(embeds, pieces, params, keep_graph=cfg.accum_freq == 1)


def _temperature(dls: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """The downstream logits' multiplier: exp(downstream logit scale), or exactly 1 without one (as the
    original does for both losses), so the reference's own logit scale never enters the downstream loss."""
    return dls.exp() if dls is not None else torch.ones((), dtype=like.dtype, device=like.device)


def _zeroshot_task(encode, task: DownstreamBatch, dls: torch.Tensor | None, cfg: BilevelConfig, comm):
    """Zero-shot cross-entropy on the global task batch against the gathered class prompts.

    Returns (loss, gathered leaves, cotangents): ``cotangents(*leaf_grads)`` maps the leaves' gradients to
    this rank's per-piece cotangents for ``encode``'s vjp."""
    pieces = [{"image": x} for x in _chunks(task.images, cfg.accum_freq)]
    has_classes = task.prompts is not None and task.prompts.shape[0] > 0  # a rank may hold none
    enc = encode(pieces + ([{"text": task.prompts}] if has_classes else []))
    image_values = enc.values[:len(pieces)]
    img_local = torch.cat([v[0] for v in image_values])
    cls_local = enc.values[-1][0] if has_classes else img_local.new_zeros((0, img_local.shape[1]))
    img, classifier = comm.gather(img_local).requires_grad_(), comm.gather(cls_local).requires_grad_()
    loss = zero_shot_loss(img, classifier, comm.gather(task.labels), _temperature(dls, img))

    def cotangents(g_img, g_cls):
        cot = [(c,) for c in _split_like(g_img[comm.local_slice(img_local.shape[0])], image_values, 0)]
        return cot + ([(g_cls[comm.local_slice(cls_local.shape[0])],)] if has_classes else [])

    return loss, enc, [img, classifier], cotangents


def _clip_task(encode, task: DownstreamBatch, dls: torch.Tensor | None, cfg: BilevelConfig, comm):
    """The CLIP loss on the global batch of the task's image-caption pairs; returns as ``_zeroshot_task``."""
    enc = encode([{"image": x, "text": t}
                  for x, t in zip(_chunks(task.images, cfg.accum_freq), _chunks(task.texts, cfg.accum_freq))])
    img, txt = comm.gather(enc.cat(0)).requires_grad_(), comm.gather(enc.cat(1)).requires_grad_()
    loss = clip_loss(img, txt, _temperature(dls, img))

    def cotangents(g_img, g_txt):
        sl = comm.local_slice(task.images.shape[0])
        return list(zip(_split_like(g_img[sl], enc.values, 0), _split_like(g_txt[sl], enc.values, 1)))

    return loss, enc, [img, txt], cotangents


_DOWNSTREAM_TASKS = {"zeroshot": _zeroshot_task, "clip": _clip_task}


def _downstream_grad(embeds, params: Tensors, dls: torch.Tensor | None, tasks: Sequence[DownstreamBatch],
                     cfg: BilevelConfig, comm, want_grad: bool = True) -> tuple[Tensors, torch.Tensor | None, dict[str, float]]:
    """Weighted mean downstream loss over tasks at ``params`` and (unless ``want_grad`` is False) its
    gradient w.r.t. params (summed over ranks) and w.r.t. the downstream logit scale."""
    task_loss = _DOWNSTREAM_TASKS[cfg.downstream_loss]
    keep_graph = want_grad and cfg.accum_freq == 1

    def encode(pieces):
        return _Encoded(embeds, pieces, params, keep_graph)

    total_weight = sum(t.weight for t in tasks)
    dls_leaf = dls.detach().requires_grad_() if dls is not None else None
    dls_grad = torch.zeros_like(dls) if dls is not None else None
    grads: Tensors = {}
    losses = {}
    for task in tasks:
        with torch.enable_grad():
            loss, enc, leaves, cotangents = task_loss(encode, task, dls_leaf, cfg, comm)
        losses[f"downstream_loss/{task.name}"] = float(loss.detach())
        if not want_grad:
            continue
        share = task.weight / total_weight
        all_grads = torch.autograd.grad(loss, leaves + ([dls_leaf] if dls_leaf is not None else []))
        for k, g in enc.vjp(cotangents(*all_grads[:len(leaves)]), cfg.loss_scale).items():
            g = g.mul_(share) if share != 1.0 else g
            grads[k] = grads[k].add_(g) if k in grads else g
        if dls_leaf is not None:
            dls_grad += all_grads[-1] * share
    if want_grad:
        comm.all_reduce_sum(list(grads.values()))
    return grads, dls_grad, losses


@dataclass
class _Inner:
    """Steps 2-4: the weighted loss, this rank's dL_w/de, g, and theta' with AdamW's state and slope."""

    loss_w: torch.Tensor
    g_img: torch.Tensor
    g_txt: torch.Tensor
    grad: Tensors
    params: Tensors
    opt_state: AdamWState
    slope: Tensors


def _reference_step(up: _Encoded, params: Tensors, opt_state: AdamWState, lr: float, log_w: torch.Tensor,
                    cfg: BilevelConfig, comm, create_graph: bool) -> _Inner:
    """Steps 2-4 from the upstream embeddings: L_w on the gathered batch, dL_w/de (differentiable in w
    with ``create_graph``, for step 7), g = dL_w/dtheta summed over ranks, theta' = AdamW(theta, g) with
    the logit-scale clamp, and d theta'/dg, a diagonal (the map is elementwise)."""
    local = comm.local_slice(sum(v[0].shape[0] for v in up.values))  # this rank's rows of the global batch
    img = comm.gather(up.cat(0)).requires_grad_()
    txt = comm.gather(up.cat(1)).requires_grad_()
    log_tau = _wide(params["logit_scale"].detach()).requires_grad_()
    with torch.enable_grad():
        loss_w = weighted_clip_loss(img, txt, log_tau.exp(), log_w)
        g_img, g_txt, g_tau = torch.autograd.grad(loss_w, (img, txt, log_tau), create_graph=create_graph)
    g_img, g_txt = g_img[local], g_txt[local]
    cot = list(zip(_split_like(g_img.detach(), up.values, 0), _split_like(g_txt.detach(), up.values, 1)))
    grad = up.vjp(cot, cfg.loss_scale)
    comm.all_reduce_sum(list(grad.values()))
    grad["logit_scale"] = grad["logit_scale"] + g_tau.detach().to(grad["logit_scale"].dtype)
    lo, hi = cfg.logit_scale_bounds
    with torch.no_grad():
        new_params, new_state, slope = adamw_update(params, grad, opt_state, lr, cfg.adamw)
        new_params["logit_scale"] = new_params["logit_scale"].clamp(lo, hi)
    return _Inner(loss_w, g_img, g_txt, grad, new_params, new_state, slope)


def weighted_update(reference: nn.Module, params: Tensors, opt_state: AdamWState, lr: float, upstream: dict,
                    log_w: torch.Tensor, cfg: BilevelConfig = BilevelConfig()) -> Tensors:
    """theta' = AdamW(theta, grad L_w(theta; w)) for given weights, as steps 2-4 compute it but with no
    graph kept in w: the reference step that held-out validation takes with learned and uniform weights."""
    up = _upstream((_embedder(reference, cfg.precision), None), params, upstream, cfg)
    return _reference_step(up, params, opt_state, lr, log_w, cfg, LocalComm(), create_graph=False).params


def downstream_losses(reference: nn.Module, params: Tensors, tasks: Sequence[DownstreamBatch],
                      dls: torch.Tensor | None, cfg: BilevelConfig = BilevelConfig()) -> dict[str, float]:
    """Step 5's loss per task (``downstream_loss/<task>``) at ``params``, without gradients."""
    return _downstream_grad((_embedder(reference, cfg.precision), None), params, dls, tasks, cfg, LocalComm(),
                            want_grad=False)[2]


def flyt_step(reference: nn.Module, params: Tensors, opt_state: AdamWState, lr: float, scorer: nn.Module,
              upstream: dict, tasks: Sequence[DownstreamBatch], dls: torch.Tensor | None = None,
              cfg: BilevelConfig = BilevelConfig(), comm=LocalComm()) -> StepResult:
    """One bilevel step. Accumulates dL_down/dphi into the scorer's ``.grad`` (summed over ranks) and
    dL_down/d(downstream_logit_scale) into ``dls.grad``; returns the reference's next parameters/state."""
    embeds = (_embedder(reference, cfg.precision), _embedder(reference, cfg.precision, forward_mode=True))

    # 1. scores and weights over the global batch
    with autocast(cfg.precision, upstream["image"].device):
        scores = _wide(scorer(upstream))
    global_scores = comm.gather_autograd(scores)
    log_w = torch.log_softmax(global_scores, dim=0)

    # 2-4. upstream embeddings, dL_w/de (kept differentiable in w for step 7), g, theta' = AdamW(theta, g)
    up = _upstream(embeds, params, upstream, cfg)
    inner = _reference_step(up, params, opt_state, lr, log_w, cfg, comm, create_graph=True)

    # 5. downstream loss at theta' and its gradient
    down_grad, dls_grad, metrics = _downstream_grad(embeds, inner.params, dls, tasks, cfg, comm)
    if cfg.log_pre_update:
        before = _downstream_grad(embeds, params, dls, tasks, cfg, comm, want_grad=False)[2]
        metrics.update({k.replace("downstream_loss", "pre_update_loss"): v for k, v in before.items()})

    # 6. v = dL_down/dg through the AdamW map. The downstream temperature is exp(dls) or 1, never the
    # reference's logit scale, so v["logit_scale"] = 0: the clamp's slope and the logit scale's part of
    # <v, grad L_w> drop out (g's logit-scale entry still moves theta', step 4)
    v = {k: inner.slope[k].mul_(down_grad[k]) for k in inner.slope}

    # 7. u = J_e v (forward mode), then h = <u, dL_w/de>, whose gradient in w is dL_down/dw
    u = up.jvp(v, tf32=cfg.precision != "fp32")
    u_img, u_txt = torch.cat([x[0] for x in u]), torch.cat([x[1] for x in u])
    bad = torch.tensor([0.0 if all(torch.isfinite(t).all() for t in (u_img, u_txt)) else 1.0], device=u_img.device)
    comm.all_reduce_sum([bad])  # every rank skips together (g and dL_down/dtheta' are already summed)
    finite = bool(bad == 0) and all(torch.isfinite(t).all() for t in (*down_grad.values(), *inner.grad.values()))
    with torch.enable_grad():
        h = (u_img * inner.g_img).sum() + (u_txt * inner.g_txt).sum()
        # 8. grad_phi through softmax and q_phi
        trainable = [p for p in scorer.parameters() if p.requires_grad]
        if finite:
            phi_grads = torch.autograd.grad(h, trainable, allow_unused=True)
            phi_grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(phi_grads, trainable)]
            comm.all_reduce_sum(phi_grads)
            finite = all(torch.isfinite(g).all() for g in phi_grads)
    if finite:
        for p, g in zip(trainable, phi_grads):
            p.grad = g if p.grad is None else p.grad + g
        if dls is not None:
            dls.grad = dls_grad if dls.grad is None else dls.grad + dls_grad

    # 9. the reference moves to theta' only when asked; the optimizer state always advances
    next_params = inner.params if cfg.update_reference else params
    metrics.update({"weighted_loss": float(inner.loss_w.detach()),
                    "logit_scale": float(inner.params["logit_scale"].exp())})
    if not finite:
        return StepResult(params, opt_state, False, metrics, global_scores.detach())
    return StepResult(next_params, inner.opt_state, True, metrics, global_scores.detach())
