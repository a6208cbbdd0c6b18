"""Two processes (gloo) do exactly the mathematics of one process on the same global batch."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flyt.method.bilevel import BilevelConfig, DownstreamBatch, flyt_step
from flyt.method.comm import LocalComm
from flyt.streams.train import class_slice

from test_bilevel import LR, _setup
from train_runs import free_port as _free_port


# (scorer, downstream loss, downstream temperature, accum_freq): all run in one launch of two processes
CASES = [("flyt", "zeroshot", True, 1), ("mflyt", "zeroshot", False, 2), ("mflyt", "clip", False, 1),
         ("mflyt", "clip", True, 2)]
RTOL = 1e-10


def _half(t: torch.Tensor, rank: int) -> torch.Tensor:
    lo, hi = class_slice(t.shape[0], rank, 2)
    return t[lo:hi]


def _run(case, comm, rank: int | None, tiny_clip):
    """One flyt_step on the global batch (rank None) or on this rank's half of every batch and its share
    of the class names: (the reference's step theta' - theta, scoring gradients, dls gradient)."""
    mode, loss, with_dls, accum_freq = case
    ref, params, state, scorer, up, tasks, dls = _setup(tiny_clip, mode, with_dls, loss=loss)
    if rank is not None:
        up = {k: _half(v, rank) for k, v in up.items()}
        tasks = [DownstreamBatch(t.name, _half(t.images, rank),
                                 labels=_half(t.labels, rank) if t.labels is not None else None,
                                 prompts=_half(t.prompts, rank) if t.prompts is not None else None,
                                 texts=_half(t.texts, rank) if t.texts is not None else None,
                                 weight=t.weight) for t in tasks]
    cfg = BilevelConfig(downstream_loss=loss, accum_freq=accum_freq)
    result = flyt_step(ref, params, state, LR, scorer, up, tasks, dls, cfg, comm)
    assert result.finite
    step = {k: result.params[k] - params[k] for k in params}
    grads = {n: p.grad.clone() for n, p in scorer.named_parameters() if p.requires_grad}
    return step, grads, ({"dls": dls.grad.clone()} if dls is not None else {})


def _through_gather(comm, rows: slice):
    """F(y) = (a . y) logsumexp(y) on y = gather(x), each rank holding its rows' share of a . y; returns
    dF/dx and d/dx <dF/dx, r> (a gradient of a gradient through the gather) for this rank's rows."""
    g = torch.Generator().manual_seed(7)
    x, a, r = (torch.randn(5, 3, generator=g, dtype=torch.float64)[rows] for _ in range(3))
    x.requires_grad_()
    y = comm.gather_autograd(x)
    f = (a * y[comm.local_slice(x.shape[0])]).sum() * torch.logsumexp(y.flatten(), 0)
    (dx,) = torch.autograd.grad(f, x, create_graph=True)
    (ddx,) = torch.autograd.grad((dx * r).sum(), x)
    return {"dF/dx": dx.detach(), "d<dF/dx, r>/dx": ddx}


def _compare(name: str, got: dict, want: dict, rows: slice | None = None) -> list[str]:
    """Per-tensor relative error max|got - want| <= RTOL max|want|. A tensor zero up to rounding (below
    1e-9 of its group's largest: the output bias, as softmax ignores a shift of every score) must stay
    that small; an all-zero group is an error (it would hide a doubled or missing sum)."""
    want = {k: (b[rows] if rows is not None else b) for k, b in want.items()}
    largest = max(float(b.abs().max()) for b in want.values())
    out = [] if largest > 0 else [f"{name}: all zero"]
    for k, b in want.items():
        err, size = float((got[k] - b).abs().max()), float(b.abs().max())
        if not err <= (RTOL * size if size > 1e-9 * largest else 1e-9 * largest):
            out.append(f"{name} {k}: max |difference| {err:g}, max |single process| {size:g}")
    return out


def _worker(rank: int, port: int, errors) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        from flyt.train.distributed import DistComm
        from flyt.models.networks import create_clip

        torch.manual_seed(0)
        tiny = create_clip("flyt-tiny")
        problems = []
        for case in CASES:
            multi, single = _run(case, DistComm(), rank, tiny), _run(case, LocalComm(), None, tiny)
            for part, got, want in zip(("theta' - theta", "grad", "grad"), multi, single):
                problems += _compare(f"{case} {part}", got, want) if want else []
        rows = slice(*class_slice(5, rank, 2))
        problems += _compare("gather", _through_gather(DistComm(), rows), _through_gather(LocalComm(), slice(None)), rows)
        for message in problems:
            errors.put(f"rank {rank}: {message}")
    except Exception as exc:  # reported to the test, which fails with it
        errors.put(f"rank {rank}: {type(exc).__name__}: {exc}")
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_on_the_global_batch():
    """Every case of CASES and a second derivative through the gather, to 1e-10 per tensor in float64.

    Mutations of flyt/ caught: bilevel's scoring gradients all-reduced twice (relative error 1 in every
    tensor); bilevel's all-reduce of g dropped (the ranks diverge and one never finishes: the 300 s join
    fails); distributed ``_Gather.backward`` as a plain reduce-scatter instead of ``_ReduceScatter``
    (the gather check: the gradient of the gradient cannot be taken)."""
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, errors)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    messages = []
    while not errors.empty():
        messages.append(errors.get())
    assert not messages, messages


def _torchrun(args: list[str], timeout: int = 420):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "flyt.train_flyt", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    from flyt.demo import toydata

    root = tmp_path_factory.mktemp("dist")
    truth = toydata.write_pool(root / "pool", 160, n_shards=2, seed=0)
    toydata.write_score_parquets(truth, root / "scores")
    toydata.write_task(root / "tasks", name="digits", layout="simple")
    return root


def _train_args(root, out, *extra):
    return ["--upstream_data_dir", str(root / "pool"), "--downstream_task_names", str(root / "tasks" / "digits"),
            "--model", "flyt-tiny", "--upstream_batch_size", "16", "--downstream_batch_size", "8", "--workers", "0",
            "--warmup", "1", "--output_dir", str(out), "--exp_name", "run", "--log_every_n_steps", "1",
            "--parquet_dir", str(root / "scores"), "--parquet_fields", "informative", "noise_a", *extra]


def test_torchrun_trains_writes_one_set_of_checkpoints_and_resumes(pool, tmp_path):
    first = _torchrun(_train_args(pool, tmp_path, "--n_iterations", "4", "--num_checkpoints", "2"))
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["epoch_1.pt", "epoch_2.pt", "epoch_latest.pt", "scoring_epoch_1.pt",
                                                       "scoring_epoch_2.pt", "scoring_epoch_latest.pt"]
    assert first.stdout.count("flyt train: done") == 1  # rank 0 alone reports
    saved = torch.load(ckpt / "scoring_epoch_latest.pt", weights_only=True)
    assert saved["flyt"]["step"] == 4
    more = _torchrun(_train_args(pool, tmp_path, "--n_iterations", "6", "--num_checkpoints", "3", "--resume", "latest"))
    assert more.returncode == 0, more.stderr[-3000:]
    assert torch.load(ckpt / "scoring_epoch_latest.pt", weights_only=True)["flyt"]["step"] == 6
    from flyt.cli import main as cli  # and once more on one process: resumable with another world size

    assert cli(["train", *_train_args(pool, tmp_path, "--n_iterations", "8", "--num_checkpoints", "4",
                                      "--resume", "latest")]) == 0
    assert torch.load(ckpt / "scoring_epoch_latest.pt", weights_only=True)["flyt"]["step"] == 8


def test_a_failing_rank_ends_the_job_with_its_error(pool, tmp_path):
    """A pool whose only shard is no tar: training skips damaged shards, but with none readable it stops."""
    broken = tmp_path / "pool"
    broken.mkdir()
    (broken / "00000001.tar").write_bytes(b"this is not a tar file" * 100)
    args = _train_args(pool, tmp_path, "--n_iterations", "50")
    args[args.index("--upstream_data_dir") + 1] = str(broken)
    result = _torchrun(args, timeout=300)
    assert result.returncode != 0
    assert "cannot read" in result.stderr and "00000001.tar" in result.stderr
