"""Watching a run: label-free diagnostics, which head parameters train, the batch-tied default scoring lr."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import scipy.stats
import torch

from flyt.train import diagnostics

from flyt.demo import toydata
from flyt.cli import main as cli


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("watch")
    toydata.write_pool(root / "pool", 96, n_shards=2, seed=1)
    toydata.write_task(root / "tasks", layout="simple", n_train=40)
    return root


def _args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["--upstream_data_dir", str(root / "pool"), "--downstream_task_names", str(root / "tasks" / "digits"),
            "--model", "flyt-tiny", "--upstream_batch_size", "16", "--downstream_batch_size", "8", "--workers", "0",
            "--warmup", "1", "--output_dir", str(out), "--exp_name", "run", "--log_every_n_steps", "1",
            "--update_reference_model", "--cos_sim_init", *extra]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]


def test_diagnostics_equal_direct_computations():
    """Mutations caught: std with Bessel's correction; ESS as 1/sum(w) or not divided by n; Spearman on the raw
    values (Pearson) or with ties ranked by position."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(64, generator=g, dtype=torch.float64) * 3
    w = torch.softmax(s, 0).numpy()
    assert diagnostics.score_spread(s) == pytest.approx(s.numpy().std(), rel=1e-12)
    assert diagnostics.ess_share(s) == pytest.approx(1 / (w ** 2).sum() / 64, rel=1e-12)
    assert diagnostics.ess_share(torch.zeros(10)) == pytest.approx(1.0)
    t = s ** 3 + torch.randn(64, generator=g, dtype=torch.float64) * 20  # monotone-ish, not linear
    assert diagnostics.spearman(t, s) == pytest.approx(scipy.stats.spearmanr(t, s).statistic, rel=1e-12)
    ties = torch.tensor([1.0, 1.0, 2.0, 3.0, 3.0, 3.0, 0.5])
    other = torch.tensor([0.1, 0.7, 0.2, 0.9, 0.3, 0.4, 0.0])
    assert diagnostics.spearman(ties, other) == pytest.approx(scipy.stats.spearmanr(ties, other).statistic, rel=1e-12)
    assert diagnostics.spearman(-s, s) == pytest.approx(-1.0)


def test_a_run_logs_diagnostics_of_its_batches_and_probe(pool, tmp_path):
    """The logged numbers are those of the step's batch under the scorer before its update, and the probe
    starts at correlation 1 with itself and drifts as W1/W3 move. Mutations caught: diagnostics computed
    after the scoring update (step 1's spearman -0.14, not 1); the probe's initial scores re-set at every
    log step (spearman stays 1)."""
    assert cli(["train", *_args(pool, tmp_path, "--n_iterations", "3", "--scoring_learning_rate", "3e-2")]) == 0
    lines = _metrics(tmp_path)
    assert [m["step"] for m in lines] == [1, 2, 3]
    assert all({"diag/score_std", "diag/ess_share", "diag/probe_spearman"} <= m.keys() for m in lines)
    assert lines[0]["diag/probe_spearman"] == pytest.approx(1.0)  # step 1 scores the probe with the start
    assert lines[-1]["diag/probe_spearman"] < 0.999  # a large lr on all head weights moves the ranking
    assert all(0 < m["diag/ess_share"] <= 1 and m["diag/score_std"] > 0 for m in lines)
    # the first batch is the probe's batch: its spread/ESS under the starting scorer, recomputed directly
    trainer = _trainer(pool, tmp_path / "again")
    probe = trainer._probe_batch()
    start = trainer._scores(probe)
    assert lines[0]["diag/score_std"] == pytest.approx(diagnostics.score_spread(start), rel=1e-6)
    assert lines[0]["diag/ess_share"] == pytest.approx(diagnostics.ess_share(start), rel=1e-6)


def _trainer(root: Path, out: Path, *extra: str):
    """A Trainer from a ``flyt train`` command line, parsed by the real parser."""
    from flyt.cli import build_parser
    from flyt.config import TrainConfig, config_from_args
    from flyt.train.loop import Trainer

    argv = ["train", *_args(root, out, "--n_iterations", "2", *extra)]
    return Trainer(config_from_args(TrainConfig, build_parser(argv).parse_args(argv)))


@pytest.mark.parametrize("which", ["output", "all"])
def test_scoring_trainable_output_freezes_w1_w3_bit_identically(pool, tmp_path, which):
    """Mutations caught: W3 (or W1) left trainable under ``output``; ``output`` freezing W2 too (W2 unchanged);
    ``all`` freezing anything (W1 unchanged)."""
    trainer = _trainer(pool, tmp_path, "--scoring_trainable", which, "--scoring_learning_rate", "1e-2")
    before = {k: v.clone() for k, v in trainer.scorer.state_dict().items()}
    trainer.fit()
    after = trainer.scorer.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    head = {f"glu_model.layers.0.{w}.{p}" for w in ("w1", "w2", "w3") for p in ("weight", "bias")}
    assert not moved - head  # the CLIP base never trains here
    frozen = {"glu_model.layers.0.w1.weight", "glu_model.layers.0.w3.weight"}
    assert moved == (head - frozen if which == "output" else head)


def test_default_scoring_lr_follows_the_batch_for_flyt_train_only(pool, tmp_path, capsys):
    """``flyt train`` without --scoring_learning_rate: 1e-3 * sqrt(16 / 4096), said in the log;
    ``python -m flyt.train_flyt``: the original's 1e-3; a given flag wins in both. Mutations caught: the
    module entry point taking the scaled default; its 1e-3 put after the user's flags."""
    from flyt.train_flyt import main

    assert cli(["train", *_args(pool, tmp_path / "new", "--n_iterations", "1")]) == 0
    assert "--scoring_learning_rate 6.25e-05 (default: 1e-3 * sqrt(16 / 4096)" in "".join(capsys.readouterr())
    assert main(_args(pool, tmp_path / "orig", "--n_iterations", "1")) == 0
    assert main(_args(pool, tmp_path / "given", "--n_iterations", "1", "--scoring_learning_rate", "2e-3")) == 0
    lr = {name: json.loads((tmp_path / name / "run" / "config.json").read_text())["scoring_learning_rate"]
          for name in ("new", "orig", "given")}
    assert lr == {"new": pytest.approx(6.25e-5), "orig": 1e-3, "given": 2e-3}


def test_scoring_trainable_output_needs_a_flyt_head(pool, tmp_path, capsys):
    assert cli(["train", *_args(pool, tmp_path, "--n_iterations", "1", "--scoring_trainable", "output",
                                "--train_full_scoring")]) == 2
    assert "--scoring_trainable output applies to a FLYT head alone" in capsys.readouterr().err
