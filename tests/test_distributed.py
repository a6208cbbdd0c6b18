"""Two processes (gloo) do exactly the mathematics of one process on the same global batch."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flyt.bilevel import BilevelConfig, DownstreamBatch, flyt_step
from flyt.comm import LocalComm
from flyt.data.stream import class_slice

from test_bilevel import LR, _setup


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _half(t: torch.Tensor, rank: int) -> torch.Tensor:
    lo, hi = class_slice(t.shape[0], rank, 2)
    return t[lo:hi]


def _run(mode: str, loss: str, comm, rank: int | None, tiny_clip):
    ref, params, state, scorer, up, tasks, dls = _setup(tiny_clip, mode, True)
    if loss == "clip":
        tasks = [DownstreamBatch(t.name, t.images, texts=t.prompts[:1].expand(t.images.shape[0], -1)) for t in tasks]
    if rank is not None:  # this rank's half of every batch and its share of the class names
        up = {k: _half(v, rank) for k, v in up.items()}
        tasks = [DownstreamBatch(t.name, _half(t.images, rank),
                                 labels=_half(t.labels, rank) if t.labels is not None else None,
                                 prompts=_half(t.prompts, rank) if t.prompts is not None else None,
                                 texts=_half(t.texts, rank) if t.texts is not None else None) for t in tasks]
    result = flyt_step(ref, params, state, LR, scorer, up, tasks, dls, BilevelConfig(downstream_loss=loss), comm)
    grads = [p.grad.clone() for p in scorer.parameters() if p.requires_grad]
    return result, grads, dls.grad.clone()


def _worker(rank: int, port: int, mode: str, loss: str, errors) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        from flyt.distributed import DistComm
        from flyt.models import create_clip

        torch.manual_seed(0)
        tiny = create_clip("flyt-tiny")
        multi, grads, dls_grad = _run(mode, loss, DistComm(), rank, tiny)
        single, grads1, dls_grad1 = _run(mode, loss, LocalComm(), None, tiny)
        worst = max([float((a - b).abs().max()) for a, b in zip(grads, grads1)]
                    + [float((multi.params[k] - single.params[k]).abs().max()) for k in single.params]
                    + [float((dls_grad - dls_grad1).abs())])
        scale = max(float(g.abs().max()) for g in grads1)
        if not worst <= 1e-5 or scale == 0:
            errors.put(f"rank {rank}: max difference {worst:g} (gradient scale {scale:g})")
    except Exception as exc:  # reported to the test, which fails with it
        errors.put(f"rank {rank}: {type(exc).__name__}: {exc}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode,loss", [("flyt", "zeroshot"), ("mflyt", "zeroshot"), ("mflyt", "clip")])
def test_two_processes_equal_one_on_the_global_batch(mode, loss):
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, mode, loss, errors)) for r in range(2)]
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
    from flyt import toydata

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
    broken = tmp_path / "pool"
    broken.mkdir()
    (broken / "00000000.tar").write_bytes((pool / "pool" / "00000000.tar").read_bytes())
    (broken / "00000001.tar").write_bytes(b"this is not a tar file" * 100)
    args = _train_args(pool, tmp_path, "--n_iterations", "50")
    args[args.index("--upstream_data_dir") + 1] = str(broken)
    result = _torchrun(args, timeout=300)
    assert result.returncode != 0
    assert "cannot read" in result.stderr and "00000001.tar" in result.stderr
