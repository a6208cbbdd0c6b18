"""Cost of one FLYT step against one plain CLIP training step on the same model and batch.

Plain step: forward + ClipLoss + backward + torch.optim.AdamW. FLYT step: ``flyt_step`` in FLYT mode
(scoring model = frozen CLIP base of the same architecture + 1-layer GLU head), one zero-shot task.
Each variant runs in its own process so its peak memory can be read (CPU: peak RSS above the
process's state after setup; CUDA: torch.cuda.max_memory_allocated). Prints medians and ratios.

    python benchmarks/step_cost.py                         # flyt-tiny and flyt-small, batch 128/64
    python benchmarks/step_cost.py --models flyt-tiny --repeats 3
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import time


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _measure(kind: str, model_name: str, up: int, down: int, classes: int, repeats: int, device: str,
             precision: str, queue) -> None:
    import torch
    import torch.nn.functional as F
    from open_clip.loss import ClipLoss

    from flyt.method.bilevel import BilevelConfig, DownstreamBatch, flyt_step
    from flyt.models.networks import ScoringModel, create_clip
    from flyt.method.optim import AdamWState
    from flyt.precision import autocast

    torch.manual_seed(0)
    dev = torch.device(device)
    model, _, _, tok = create_clip(model_name, device=dev)
    size = model.visual.image_size
    images = torch.randn(up, 3, *size, device=dev)
    texts = tok([f"a photo of thing number {i}" for i in range(up)]).to(dev)
    if kind == "plain":
        loss_fn = ClipLoss()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)

        def step():
            with autocast(precision, dev):
                img, txt, scale = model(images, texts)
                loss = loss_fn(img.float(), txt.float(), scale.float())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        scorer = ScoringModel(create_clip(model_name, device=dev)[0], 1, 1.0).to(dev)
        params = {k: v.detach() for k, v in model.named_parameters()}
        state = AdamWState.zeros_like(params)
        task = DownstreamBatch("bench", torch.randn(down, 3, *size, device=dev),
                               labels=torch.randint(classes, (down,), device=dev),
                               prompts=tok([f"a photo of class {c}" for c in range(classes)]).to(dev))
        dls = torch.nn.Parameter(torch.tensor(2.65926, device=dev))
        cfg = BilevelConfig(precision=precision)
        batch = {"image": images, "text": texts}

        def step():
            nonlocal params, state
            result = flyt_step(model, params, state, 1e-4, scorer, batch, [task], dls, cfg)
            params, state = result.params, result.opt_state
            for p in scorer.parameters():
                p.grad = None
            dls.grad = None

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up (allocations, kernels)
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _rss_mib()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else _rss_mib()
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    queue.put({"median_s": statistics.median(times), "peak_mib": peak, "base_mib": base, "params_m": params_m})


def run_variant(*args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["flyt-tiny", "flyt-small"])
    parser.add_argument("--upstream_batch", type=int, default=128)
    parser.add_argument("--downstream_batch", type=int, default=64)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    args = parser.parse_args()
    print(f"device={args.device} precision={args.precision} upstream={args.upstream_batch} "
          f"downstream={args.downstream_batch} classes={args.classes} repeats={args.repeats}")
    print(f"{'model':<12}{'params':>8}{'plain s':>10}{'flyt s':>10}{'time x':>8}"
          f"{'plain MiB':>11}{'flyt MiB':>10}{'mem x':>7}")
    for name in args.models:
        common = (name, args.upstream_batch, args.downstream_batch, args.classes, args.repeats, args.device, args.precision)
        plain, flyt = run_variant("plain", *common), run_variant("flyt", *common)
        print(f"{name:<12}{plain['params_m']:>7.1f}M{plain['median_s']:>10.3f}{flyt['median_s']:>10.3f}"
              f"{flyt['median_s'] / plain['median_s']:>8.2f}{plain['peak_mib']:>11.0f}{flyt['peak_mib']:>10.0f}"
              f"{flyt['peak_mib'] / plain['peak_mib']:>7.2f}")


if __name__ == "__main__":
    main()
