"""One FLYT step in every precision on one device, compared with fp32 on the same batch.

Prints, per precision, whether the step was finite, the cosine similarity of the scoring-model
gradient and of the reference update with fp32's, and the step time. Meant for a GPU:

    python benchmarks/precision_check.py --device cuda --model flyt-small
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from flyt.method.bilevel import BilevelConfig, DownstreamBatch, flyt_step
from flyt.models.networks import ScoringModel, create_clip
from flyt.method.optim import AdamWState


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="flyt-small")
    parser.add_argument("--upstream_batch", type=int, default=256)
    parser.add_argument("--downstream_batch", type=int, default=128)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "amp", "amp_bf16", "bf16"])
    args = parser.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    base, _, _, tok = create_clip(args.model, device=dev)
    scorer0 = ScoringModel(create_clip(args.model, device=dev)[0], 1, 1.0).to(dev)
    size = base.visual.image_size
    g = torch.Generator(device="cpu").manual_seed(0)
    images = torch.randn(args.upstream_batch, 3, *size, generator=g).to(dev)
    texts = tok([f"a photo of item {i}" for i in range(args.upstream_batch)]).to(dev)
    task_images = torch.randn(args.downstream_batch, 3, *size, generator=g).to(dev)
    labels = torch.randint(10, (args.downstream_batch,), generator=g).to(dev)
    prompts = tok([f"a photo of class {c}" for c in range(10)]).to(dev)
    results = {}
    for precision in args.precisions:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        ref = copy.deepcopy(base).to(dtype)
        scorer = copy.deepcopy(scorer0).to(dtype)
        params = {k: v.detach() for k, v in ref.named_parameters()}
        state = AdamWState.zeros_like(params)
        state.step = 10
        state.exp_avg_sq = {k: torch.full_like(v, 1e-6) for k, v in params.items()}
        dls = torch.nn.Parameter(torch.tensor(2.65926, device=dev))
        cfg = BilevelConfig(precision=precision, loss_scale=2.0 ** 12 if precision == "amp" else 1.0)
        batch = {"image": images.to(dtype), "text": texts}
        task = DownstreamBatch("t", task_images.to(dtype), labels=labels, prompts=prompts)
        try:
            for _ in range(2):  # the second call is timed
                for p in scorer.parameters():
                    p.grad = None
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                result = flyt_step(ref, params, state, 1e-4, scorer, batch, [task], dls, cfg)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - t0
        except Exception as exc:  # report and go on with the other precisions
            print(f"{precision}: failed: {type(exc).__name__}: {str(exc).splitlines()[0]}")
            continue
        grad = torch.cat([p.grad.float().flatten() for p in scorer.parameters() if p.grad is not None])
        update = torch.cat([(result.params[k].float() - params[k].float()).flatten() for k in params])
        results[precision] = (result.finite, grad, update, seconds)
    fp32 = results.get("fp32")
    print(f"{'precision':<10}{'finite':>8}{'cos(grad_phi)':>15}{'cos(update)':>13}{'step s':>9}")
    for name, (finite, grad, update, seconds) in results.items():
        cg = float(torch.nn.functional.cosine_similarity(grad, fp32[1], dim=0)) if fp32 else float("nan")
        cu = float(torch.nn.functional.cosine_similarity(update, fp32[2], dim=0)) if fp32 else float("nan")
        print(f"{name:<10}{str(finite):>8}{cg:>15.4f}{cu:>13.4f}{seconds:>9.3f}")


if __name__ == "__main__":
    main()
