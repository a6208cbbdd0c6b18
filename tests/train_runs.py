"""Tiny ``flyt train`` runs in subprocesses for the crash and pre-emption tests: the shared data and command
line, starting a run in its own process group, waiting for a logged step, and comparing two runs bit for bit.

Every run of a mode uses one command line and one output folder (both are part of the saved config), one
run after the other; a test moves its finished run away (or starts from an empty folder).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from flyt.demo import toydata

STEPS, EPOCHS = 6, 2  # three steps per epoch: a stop after step 4 or 5 is in mid-epoch
TIMEOUT_S = 300
# one thread per run: a tiny model gains nothing from two, and on a busy machine OpenMP spinning tripled the CPU time
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def write_data(root: Path) -> Path:
    pool = toydata.write_pool(root / "pool", 120, n_shards=2, seed=0, n_broken=8)
    toydata.write_score_parquets(pool, root / "scores")
    toydata.write_task(root / "tasks", layout="simple")
    return root


def train_args(data: Path, out: Path, mode: str) -> list[str]:
    """The flags of every run (the config is in the checkpoints), resuming if it can."""
    extra = (["--cos_sim_init"] if mode == "flyt" else
             ["--parquet_dir", str(data / "scores"), "--parquet_fields", "informative", "noise_a", "noise_b"])
    return ["--upstream_data_dir", str(data / "pool"), "--downstream_task_names", str(data / "tasks" / "digits"),
            "--model", "flyt-tiny", "--upstream_batch_size", "16", "--downstream_batch_size", "8", "--workers", "1",
            "--shuffle_buffer", "16", "--warmup", "1", "--n_iterations", str(STEPS), "--num_checkpoints", str(EPOCHS),
            "--log_every_n_steps", "1", "--downstream_logit_scale", "2.65926", "--update_reference_model",
            "--output_dir", str(out), "--exp_name", "run", "--resume", "latest", *extra]


# flyt refuses --precision amp without CUDA (fp16 autocast is for GPUs); these runs lift that check alone, so
# that the loop's fp16 autocast and dynamic loss scale run here as on a GPU
AMP_ON_CPU = ("import sys, flyt.train.loop as loop; check = loop.resolve_device; "
              "loop.resolve_device = lambda name, precision: check(name, 'fp32' if precision == 'amp' else precision); "
              "from flyt.train_flyt import main; sys.exit(main())")


def command(data: Path, out: Path, mode: str, precision: str | None = None) -> list[str]:
    """The run (with ``precision``: under that ``--precision``, amp included)."""
    if precision is None:
        return [sys.executable, "-m", "flyt.train_flyt", *train_args(data, out, mode)]
    return [sys.executable, "-c", AMP_ON_CPU, *train_args(data, out, mode), "--precision", precision]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=TIMEOUT_S)


def uninterrupted(data: Path, out: Path, mode: str, keep: Path, precision: str | None = None) -> Path:
    """The run folder of an uninterrupted run, moved to ``keep`` (once: later calls find it there)."""
    if not keep.exists():
        shutil.rmtree(out / "run", ignore_errors=True)
        done = run(command(data, out, mode, precision))
        assert done.returncode == 0, done.stderr[-2000:]
        (out / "run").rename(keep)
    return keep


def free_port() -> int:
    """A free TCP port for torchrun's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def logged_steps(metrics: Path) -> list[int]:
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    return [json.loads(line)["step"] for line in lines if line.endswith("}")]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    """A run in its own process group (a scheduler signals the whole job), its output to ``log``."""
    with log.open("w") as output:
        return subprocess.Popen(cmd, stdout=output, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)


def wait_for(proc: subprocess.Popen, ready, what: str, log: Path) -> None:
    """Poll (every 10 ms) until ``ready()``; fail if the run ends first or after TIMEOUT_S."""
    deadline = time.monotonic() + TIMEOUT_S
    while not ready():
        assert proc.poll() is None, f"the run ended before {what}: {log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, f"no {what} after {TIMEOUT_S} s"
        time.sleep(0.01)


def assert_bitwise_equal(a, b, where: str = "") -> None:
    """Recursively through dicts, lists and tuples: same keys, types, shapes, dtypes and bytes."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(map(str, a.keys() ^ b.keys()))} differ"
        for key in a:
            assert_bitwise_equal(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise_equal(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), f"{where}: {a.dtype} {list(a.shape)} vs {b.dtype} {list(b.shape)}"
        as_bytes = lambda t: t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        assert torch.equal(as_bytes(a), as_bytes(b)), f"{where}: tensor values differ"
    elif isinstance(a, float):
        assert a.hex() == b.hex(), f"{where}: {a!r} vs {b!r}"
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        del row["samples_per_s"]  # timing
    return rows


def assert_same_run(expected: Path, run_dir: Path) -> None:
    """The same checkpoint files (no temporary or pre-emption file left), equal in every key, and the
    same metrics lines, each step once."""
    names = sorted(p.name for p in (expected / "checkpoints").iterdir())
    assert names == sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert len(names) == 2 * (EPOCHS + 1)
    for name in names:
        load = lambda folder: torch.load(folder / "checkpoints" / name, weights_only=True)
        assert_bitwise_equal(load(expected), load(run_dir), name)
    rows = metrics(run_dir)
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    assert rows == metrics(expected)
