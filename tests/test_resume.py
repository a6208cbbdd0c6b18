"""A real crash: ``flyt train`` SIGKILLed in mid-epoch (data-loader worker and all), then ``--resume latest``.

The resumed run must equal an uninterrupted one bit for bit in every key of every checkpoint file (weights,
both optimizers' states, temperature, loss scale, RNG state, config) and log each step once.
"""

from __future__ import annotations

import os
import shutil
import signal

import pytest
import torch

from flyt.errors import FlytError
from flyt.train.loop import _complete_lines

from train_runs import assert_same_run, command, logged_steps, metrics, run, start, wait_for

KILL_AT = 4  # the first step of epoch 2 is logged: epoch 1's checkpoint exists, epoch 2's does not


@pytest.mark.parametrize("mode", ["flyt", "mflyt"])
def test_sigkill_in_mid_epoch_then_resume_equals_uninterrupted(train_runs, tmp_path, mode):
    """Mutations of ``Trainer.maybe_resume`` / ``MetricsLog`` caught, each failing here: not restoring the
    scoring optimizer, the reference's AdamW step count or the temperature; keeping the killed run's lines
    past its checkpoint (step 4 logged twice); ignoring ``--resume`` altogether (epoch 1's files rewritten);
    parsing the cut-short last line of ``metrics.jsonl`` (the resume fails on its JSON); counting skipped
    samples afresh in each epoch (the count drops at step 4), or not restoring the finished epochs' count.
    Not covered: the loss scale (static in fp32 on CPU), and not restoring the RNG state, which nothing
    draws from during training since the data loader has its own generator (verified: the test passes).
    """
    data, out, uninterrupted = train_runs
    expected = uninterrupted(mode)
    shutil.rmtree(out / "run", ignore_errors=True)
    proc = start(command(data, out, mode), tmp_path / "killed.log")
    try:  # SIGKILL the group as soon as step KILL_AT is logged
        wait_for(proc, lambda: KILL_AT in logged_steps(out / "run" / "metrics.jsonl"), f"step {KILL_AT}",
                 tmp_path / "killed.log")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    ckpt = out / "run" / "checkpoints"
    assert torch.load(ckpt / "scoring_epoch_latest.pt", weights_only=True)["epoch"] == 1, "not killed in epoch 2"
    assert logged_steps(out / "run" / "metrics.jsonl")[-1] >= KILL_AT  # steps that resuming must not repeat
    with (out / "run" / "metrics.jsonl").open("a") as log:  # and a line the kill cut short in mid-append
        log.write('{"step": 9, "loss')
    identity = lambda name: ((ckpt / name).stat().st_ino, (ckpt / name).stat().st_mtime_ns)
    epoch_1 = [identity(name) for name in ("epoch_1.pt", "scoring_epoch_1.pt")]
    done = run(command(data, out, mode))
    assert done.returncode == 0, done.stderr[-2000:]
    # it resumed rather than started over: epoch 1's files are the killed run's, never rewritten
    assert [identity(name) for name in ("epoch_1.pt", "scoring_epoch_1.pt")] == epoch_1
    assert_same_run(expected, out / "run")
    # the skipped-sample count covers the whole run: it goes on across the epoch boundary (step 3 | 4)
    counts = [row["skipped_samples"] for row in metrics(out / "run")]
    assert counts == sorted(counts) and counts[2] > 0, counts
    shutil.rmtree(out / "run")


def test_a_damaged_metrics_line_before_the_last_stops_the_resume_naming_the_file(tmp_path):
    """Only a kill's cut-short last line is dropped; a broken line inside the log is not a kill's doing.
    Mutation caught: checking only the last line (the damaged line is read as a record, or dropped)."""
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1}\n{"st\n{"step": 2}\n')
    with pytest.raises(FlytError, match=r"metrics.jsonl: line 2 is not a metrics record"):
        _complete_lines(log)
    log.write_text('{"step": 1}\n{"step": 2}\n{"st')
    assert _complete_lines(log) == ['{"step": 1}', '{"step": 2}']
