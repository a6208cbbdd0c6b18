"""Pre-emption as Slurm and Kubernetes do it: SIGTERM to the whole job in mid-epoch, then ``--resume latest``.

The stopped run must exit with ``EXIT_CODE`` after writing ``preempted.pt`` of the step it stopped at; the
resumed run replays the epoch's stream to that step and must equal an uninterrupted run bit for bit in every
key of every checkpoint file, with the same metrics lines.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch

from flyt.train.preemption import EXIT_CODE
from train_runs import assert_same_run, command, free_port, logged_steps, run, start, train_args, wait_for

SIGNAL_AFTER = 4  # the first step of epoch 2: the stop comes after step 4 or 5, both in mid-epoch
# the run, with the pre-emption checkpoint's write held open for a second (data written, not yet renamed),
# and SIGINT raising KeyboardInterrupt as in a terminal (a test runner started in the background ignores it)
SLOW_WRITE = ("import signal, sys, time, torch; signal.signal(signal.SIGINT, signal.default_int_handler); "
              "save = torch.save; torch.save = lambda obj, f, *a, **k: (save(obj, f, *a, **k), "
              "time.sleep(1 if 'preempted' in str(f) else 0))[0]; from flyt.train_flyt import main; sys.exit(main())")


def _sigterm_in_mid_epoch(out, cmd, log, during_write: bool = False) -> int:
    """Start the run, SIGTERM its process group once step SIGNAL_AFTER is logged (and, with
    ``during_write``, SIGTERM and SIGINT again while the checkpoint is being written); its exit code."""
    ckpt = out / "run" / "checkpoints"
    proc = start(cmd, log)
    try:
        wait_for(proc, lambda: SIGNAL_AFTER in logged_steps(out / "run" / "metrics.jsonl"),
                 f"step {SIGNAL_AFTER}", log)
        os.killpg(proc.pid, signal.SIGTERM)
        if during_write:
            wait_for(proc, lambda: any(ckpt.glob(".preempted.pt.*.tmp")), "pre-emption checkpoint write", log)
            os.killpg(proc.pid, signal.SIGTERM)
            os.killpg(proc.pid, signal.SIGINT)
        return proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _steps_logged_by(output: str) -> list[int]:
    return [int(line.split(":")[0].split()[1]) for line in output.splitlines() if re.match(r"step \d+: ", line)]


def _assert_stopped_in_mid_epoch(out, log) -> int:
    """The stopped run's files and log line; the step it stopped at."""
    ckpt = out / "run" / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["epoch_1.pt", "epoch_latest.pt", "preempted.pt",
                                                      "scoring_epoch_1.pt", "scoring_epoch_latest.pt"]
    saved = torch.load(ckpt / "preempted.pt", weights_only=True)
    step = saved["scoring"]["flyt"]["step"]
    assert step in (SIGNAL_AFTER, SIGNAL_AFTER + 1), step
    assert saved["scoring"]["epoch"] == saved["reference"]["epoch"] == 1
    assert logged_steps(out / "run" / "metrics.jsonl") == list(range(1, step + 1))  # it finished that step
    lines = [line for line in log.read_text().splitlines() if "rerun with --resume latest" in line]
    assert len(lines) == 1 and f"SIGTERM after step {step} of 6" in lines[0], log.read_text()[-2000:]
    return step


def _stop_then_resume(train_runs, mode: str, cmd: list[str], log: Path, during_write: bool = False,
                      precision: str | None = None) -> None:
    """SIGTERM in mid-epoch (exit code, files, log line), then the ordinary command resumes from the saved
    step and ends equal to the uninterrupted run."""
    data, out, uninterrupted = train_runs
    expected = uninterrupted(mode, precision)
    shutil.rmtree(out / "run", ignore_errors=True)
    assert _sigterm_in_mid_epoch(out, cmd, log, during_write) == EXIT_CODE, log.read_text()[-2000:]
    step = _assert_stopped_in_mid_epoch(out, log)
    done = run(command(data, out, mode, precision))
    assert done.returncode == 0, done.stderr[-2000:]
    assert _steps_logged_by(done.stdout) == list(range(step + 1, 7))  # from the saved step, not the epoch's start
    assert_same_run(expected, out / "run")
    shutil.rmtree(out / "run")


@pytest.mark.parametrize("mode", ["flyt", "mflyt"])
def test_sigterm_in_mid_epoch_saves_the_step_and_resume_equals_uninterrupted(train_runs, tmp_path, mode):
    """Mutations caught, each failing here: the DataLoader without its own generator (the saved ``flyt/rng``
    differs after resuming), no replay of the stream to the saved position (other samples: weights differ),
    the stop check skipped (the run ends with exit code 0), ``resume_point`` ignoring ``preempted.pt`` (the
    rerun starts at step 4 again), the pre-emption file not removed by the next epoch pair (an extra file),
    the workers not ignoring SIGTERM (the group's signal kills the loader: exit code 1)."""
    data, out, _ = train_runs
    _stop_then_resume(train_runs, mode, command(data, out, mode), tmp_path / "stopped.log")


def test_sigterm_and_sigint_during_the_checkpoint_write_change_nothing(train_runs, tmp_path):
    """Mutation caught: ``save_preempted`` outside ``StopSignal.deferred`` (SIGINT's KeyboardInterrupt
    aborts the write: no ``preempted.pt``, exit code 1)."""
    data, out, _ = train_runs
    cmd = [sys.executable, "-c", SLOW_WRITE, *train_args(data, out, "mflyt")]
    _stop_then_resume(train_runs, "mflyt", cmd, tmp_path / "stopped.log", during_write=True)


def _rank_pid(launcher: int, rank: int) -> int:
    """The pid of torchrun's child process of the given RANK."""
    for proc in Path("/proc").iterdir():
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == launcher and f"RANK={rank}".encode() in environ:
            return int(proc.name)
    raise AssertionError(f"no rank {rank} under torchrun {launcher}")


def test_torchrun_ranks_stop_at_the_same_step_when_one_gets_sigterm(train_runs, tmp_path):
    """Two ranks (gloo), SIGTERM to rank 1 alone: rank 0 stops at the same step, writes the checkpoint and
    names the other rank; torchrun resumes to the checkpoints of an uninterrupted two-rank run. Mutation
    caught: the stop flag not all-reduced (rank 1 stops, rank 0 goes on: the ranks' collectives no
    longer match and the job hangs until the test's 120 s timeout)."""
    data, out, _ = train_runs
    port = lambda: ["--master_port", str(free_port())]
    torchrun = lambda: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *port(),
                        "-m", "flyt.train_flyt", *train_args(data, out, "mflyt")]
    shutil.rmtree(out / "run", ignore_errors=True)
    done = run(torchrun())
    assert done.returncode == 0, done.stderr[-2000:]
    (out / "run").rename(tmp_path / "uninterrupted")
    log = tmp_path / "stopped.log"
    proc = start(torchrun(), log)
    try:
        wait_for(proc, lambda: SIGNAL_AFTER in logged_steps(out / "run" / "metrics.jsonl"), f"step {SIGNAL_AFTER}", log)
        os.kill(_rank_pid(proc.pid, 1), signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text()
    assert "exitcode  : 75" in text and "a stop signal on another rank" in text, text[-3000:]
    step = torch.load(out / "run" / "checkpoints" / "preempted.pt", weights_only=True)["scoring"]["flyt"]["step"]
    assert logged_steps(out / "run" / "metrics.jsonl") == list(range(1, step + 1))
    done = run(torchrun())
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_run(tmp_path / "uninterrupted", out / "run")
    shutil.rmtree(out / "run")


def test_resume_point_takes_the_newest_complete_checkpoint(tmp_path):
    """Which files ``--resume latest`` takes, on stub payloads. Mutations caught: no epoch check on the
    reference (a kill between ``save``'s renames pairs epoch 1's scorer with epoch 2's reference),
    ``preempted.pt`` preferred whenever present instead of the newer by step (a stale one wins)."""
    from flyt.errors import FlytError
    from flyt.models import checkpoint

    scoring = lambda epoch, step: {"epoch": epoch, "flyt": {"step": step}}
    for name, payload in (("scoring_epoch_latest.pt", scoring(1, 3)), ("epoch_latest.pt", {"epoch": 2}),
                          ("epoch_1.pt", {"epoch": 1}), ("preempted.pt", {"scoring": scoring(0, 2), "reference": {}})):
        torch.save(payload, tmp_path / name)
    path, found, reference = checkpoint.resume_point(tmp_path, "latest")
    assert (path.name, found["flyt"]["step"], reference) == ("scoring_epoch_latest.pt", 3, {"epoch": 1})
    torch.save({"scoring": scoring(1, 5), "reference": {"epoch": 1}}, tmp_path / "preempted.pt")
    path, found, reference = checkpoint.resume_point(tmp_path, "latest")
    assert (path.name, found["flyt"]["step"]) == ("preempted.pt", 5)
    assert checkpoint.resume_point(tmp_path, str(tmp_path / "preempted.pt"))[1:] == (scoring(1, 5), {"epoch": 1})
    (tmp_path / "epoch_1.pt").unlink()
    with pytest.raises(FlytError, match=r"scoring_epoch_latest.pt \(epoch 1\) has no reference checkpoint"):
        checkpoint.resume_point(tmp_path, "latest")


@pytest.mark.parametrize("precision", ["amp", pytest.param("bf16", marks=pytest.mark.slow)])
def test_sigterm_under_mixed_precision_resumes_exactly(train_runs, tmp_path, precision):
    """M-FLYT under fp16 autocast with the dynamic loss scale (amp, run on the CPU by ``train_runs.AMP_ON_CPU``),
    and in bf16 weights and optimizer states (slow, ~27 s here): stopped in mid-epoch, resumed, equal.

    amp's second step overflows fp16 at the initial scale 2**16 and is skipped, so the stop (after step 4
    or 5) comes with the scale halved and the growth tracker counting again: ``preempted.pt`` must carry
    that state and the resumed run continue from it. Mutations caught (amp): the scale not restored (the
    resumed run's step 6 overflows at 2**16 again and is skipped), the growth tracker (``good_steps``) or
    ``skipped_steps`` not restored (the final checkpoints differ there). Not exercised: ``skipped_in_a_row``
    (saved and restored too, but 0 at this stop)."""
    data, out, uninterrupted = train_runs
    final = torch.load(uninterrupted("mflyt", precision) / "checkpoints" / "scoring_epoch_latest.pt",
                       weights_only=True)["flyt"]
    expected = {"scale": 2.0 ** 15, "dynamic": True, "good_steps": 4} if precision == "amp" else \
        {"scale": 1.0, "dynamic": False, "good_steps": 0}  # bf16: no loss scaling
    assert {k: final["loss_scale"][k] for k in expected} == expected
    assert final["skipped_steps"] == (1 if precision == "amp" else 0)
    _stop_then_resume(train_runs, "mflyt", command(data, out, "mflyt", precision), tmp_path / "stopped.log",
                      precision=precision)
