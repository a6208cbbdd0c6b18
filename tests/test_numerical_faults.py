"""Non-finite steps are skipped and counted in every precision, and a run of them stops the run.

A scoring learning rate of 1e30 blows the M-FLYT mixer's weights up after its first step, so every later
step has a non-finite loss or gradient: each is skipped (the weights stay as they were), counted in the log
line and in ``metrics.jsonl``'s ``skipped_steps``, and after ``MAX_SKIPPED_IN_A_ROW`` of them the run
ends with one error line (exit 2) instead of spinning to ``--n_iterations``.
Mutations checked: never raising (the run finishes 12 steps, exit 0); not counting skipped steps in the
metrics (the ``skipped_steps`` column stays 0); resetting the count on a skipped step (never reaches 5);
the messages numbering steps from 0 while the metrics log numbers them from 1.
"""

from __future__ import annotations

import json

import pytest

from flyt import cli
from flyt.demo import toydata
from flyt.train.loop import MAX_SKIPPED_IN_A_ROW


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("nan")
    pool = toydata.write_pool(root / "pool", 96, n_shards=2, seed=0)
    toydata.write_score_parquets(pool, root / "scores")
    toydata.write_task(root / "tasks", name="digits", layout="simple")
    return root


def _blowing_up(data, out, *extra: str) -> list[str]:
    """A 12-step M-FLYT ``flyt train`` whose mixer blows up after its first step."""
    return ["train", "--upstream_data_dir", str(data / "pool"), "--downstream_task_names", str(data / "tasks" / "digits"),
            "--model", "flyt-tiny", "--upstream_batch_size", "16", "--downstream_batch_size", "8", "--n_iterations", "12",
            "--workers", "0", "--warmup", "1", "--parquet_dir", str(data / "scores"), "--parquet_fields", "informative",
            "noise_a", "noise_b", "--scoring_learning_rate", "1e30", "--output_dir", str(out), "--exp_name", "run", *extra]


@pytest.mark.parametrize("precision", ["fp32", "amp_bf16", "bf16"])
def test_non_finite_steps_are_skipped_counted_and_end_the_run(data, tmp_path, precision, capsys):
    code = cli.main(_blowing_up(data, tmp_path, "--precision", precision, "--log_every_n_steps", "1"))
    out, err = capsys.readouterr()
    limit = MAX_SKIPPED_IN_A_ROW[False]
    assert code == 2
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and f"all {limit} had a non-finite loss or gradient" in errors[0]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    skipped = [row["skipped_steps"] for row in rows]
    # the steps before the last one are logged (the last one raises): a count rising by one per step
    assert skipped[-(limit - 1):] == list(range(1, limit)) and set(skipped[:-(limit - 1)]) == {0}
    assert len(rows) < 12
    # the lines number steps as the metrics log does: the skipped ones, and the step that raised after them
    first, last = rows[-(limit - 1)]["step"], rows[-1]["step"] + 1
    assert f"steps {first}-{last}: all {limit}" in errors[0], errors[0]
    assert [int(line.split()[1].rstrip(":")) for line in out.splitlines() if "step skipped" in line] == \
        list(range(first, last + 1))


def test_a_run_resumed_in_a_streak_of_non_finite_steps_stops_where_the_whole_run_does(data, tmp_path, capsys):
    """The streak's length is saved with the step. The whole run stops after five non-finite steps in a row;
    its last checkpoint is epoch 2's (step 6, four of them in a row). Resumed from there, the same command
    must stop at the same step, with the same line. Mutation caught: ``maybe_resume`` not restoring
    ``skipped_in_a_row`` (the resumed run counts afresh: its line names steps four later)."""
    import torch

    argv = _blowing_up(data, tmp_path, "--num_checkpoints", "4", "--resume", "latest")

    def error_line() -> str:
        assert cli.main(argv) == 2
        [line] = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
        return line

    whole = error_line()
    saved = torch.load(tmp_path / "run" / "checkpoints" / "scoring_epoch_latest.pt", weights_only=True)["flyt"]
    assert (saved["step"], saved["skipped_in_a_row"], saved["skipped_steps"]) == (6, 4, 4)
    assert error_line() == whole  # the same command, resuming from that checkpoint
