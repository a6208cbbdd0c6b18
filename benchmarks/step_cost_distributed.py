"""FLYT step time under several processes (gloo on CPU, NCCL on GPU) and the share spent in collectives.

Each rank gets the global batch divided by the world size; the collectives of ``flyt.train.distributed.DistComm``
are timed by wrapping them. Compare with ``step_cost.py`` at the same global batch on one process.

    python benchmarks/step_cost_distributed.py --nproc 2 --model flyt-tiny
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, args, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.nproc))
    dist.init_process_group("gloo", rank=rank, world_size=args.nproc)
    from flyt.method.bilevel import BilevelConfig, DownstreamBatch, flyt_step
    from flyt.streams.train import class_slice
    from flyt.train.distributed import DistComm
    from flyt.models.networks import ScoringModel, create_clip
    from flyt.method.optim import AdamWState

    comm, spent = DistComm(), [0.0]
    for name in ("gather", "gather_autograd", "all_reduce_sum", "local_slice"):
        original = getattr(comm, name)

        def timed(*a, _f=original, **k):
            t0 = time.perf_counter()
            out = _f(*a, **k)
            spent[0] += time.perf_counter() - t0
            return out

        setattr(comm, name, timed)
    torch.manual_seed(0)
    model, _, _, tok = create_clip(args.model)
    scorer = ScoringModel(create_clip(args.model)[0], 1, 1.0)
    size = model.visual.image_size
    up, down = args.upstream_batch // args.nproc, args.downstream_batch // args.nproc
    batch = {"image": torch.randn(up, 3, *size), "text": tok([f"a photo of item {i}" for i in range(up)])}
    lo, hi = class_slice(args.classes, rank, args.nproc)
    task = DownstreamBatch("t", torch.randn(down, 3, *size), labels=torch.randint(args.classes, (down,)),
                           prompts=tok([f"a photo of class {c}" for c in range(lo, hi)]))
    params = {k: v.detach() for k, v in model.named_parameters()}
    state = AdamWState.zeros_like(params)
    dls = torch.nn.Parameter(torch.tensor(2.65926))
    times, comm_times = [], []
    for i in range(args.repeats + 1):
        spent[0] = 0.0
        dist.barrier()
        t0 = time.perf_counter()
        result = flyt_step(model, params, state, 1e-4, scorer, batch, [task], dls, BilevelConfig(), comm)
        params, state = result.params, result.opt_state
        if i:  # the first step warms up
            times.append(time.perf_counter() - t0)
            comm_times.append(spent[0])
    if rank == 0:
        queue.put((statistics.median(times), statistics.median(comm_times)))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--model", default="flyt-tiny")
    parser.add_argument("--upstream_batch", type=int, default=128)
    parser.add_argument("--downstream_batch", type=int, default=64)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_worker, args=(args, port, queue), nprocs=args.nproc, start_method="spawn")
    step, collectives = queue.get()
    print(f"{args.model}: {args.nproc} processes, global batch {args.upstream_batch}/{args.downstream_batch}: "
          f"median step {step:.3f} s, of which collectives {collectives:.3f} s ({collectives / step:.0%})")


if __name__ == "__main__":
    main()
