"""FLYT and M-FLYT learn the right thing on a generated pool where half the captions are wrong.

The reference CLIP is first pretrained on the pool's clean pairs (``flyt train-clip`` with a subset),
as a real run starts from a pretrained model; then M-FLYT mixes one informative input score with two
noise columns, and FLYT trains a randomly initialised GLU head on a frozen base.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from flyt.demo import toydata
from flyt.cli import main as cli
from flyt.demo.report import _auc
from flyt.data.subset import save_subset


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("learning")
    truth = toydata.write_pool(root / "pool", 1000, n_shards=4, seed=0, corruption={"wrong_caption": 0.5})
    toydata.write_score_parquets(truth, root / "scores", seed=0)
    task = toydata.write_task(root / "tasks", name="digits", layout="simple")
    save_subset(root / "clean.npy", truth.uid[truth.clean].tolist())
    assert cli(["train-clip", "--upstream_data_dir", str(root / "pool"), "--subset", str(root / "clean.npy"),
                "--model", "flyt-tiny", "--output_dir", str(root / "runs"), "--exp_name", "base", "--steps", "250",
                "--batch_size", "64", "--lr", "2e-3", "--warmup", "20", "--workers", "1", "--seed", "0"]) == 0
    common = ["train", "--upstream_data_dir", str(root / "pool"), "--downstream_task_names", str(task.eval_dir),
              "--model", "flyt-tiny", "--reference_pretrained", str(root / "runs/base/checkpoints/epoch_latest.pt"),
              "--update_reference_model", "--downstream_logit_scale", "2.65926", "--upstream_batch_size", "128",
              "--downstream_batch_size", "64", "--warmup", "5", "--reference_learning_rate", "1e-4",
              "--workers", "1", "--output_dir", str(root / "runs"), "--log_every_n_steps", "25"]
    return root, truth, common


def test_mflyt_puts_a_clearly_positive_weight_on_the_informative_score(experiment):
    root, _, common = experiment
    assert cli([*common, "--exp_name", "mflyt", "--n_iterations", "150", "--parquet_dir", str(root / "scores"),
                "--parquet_fields", "informative", "noise_a", "noise_b", "--scoring_learning_rate", "1e-2"]) == 0
    ckpt = torch.load(root / "runs/mflyt/checkpoints/scoring_epoch_latest.pt", weights_only=True)
    informative, *noise = ckpt["state_dict"]["layers.0.weight"].flatten().tolist()
    print(f"M-FLYT weights: informative {informative:+.4f}, noise {noise[0]:+.4f} {noise[1]:+.4f}")
    assert informative > 0.1
    assert informative > 2 * max(abs(w) for w in noise)


def _flyt_auc(root, truth, common, name: str, *extra: str) -> float:
    base = str(root / "runs/base/checkpoints/epoch_latest.pt")
    assert cli([*common, "--exp_name", name, "--scoring_pretrained", base, *extra]) == 0
    assert cli(["score", "--checkpoint", str(root / f"runs/{name}/checkpoints/scoring_epoch_latest.pt"),
                "--upstream_data_dir", str(root / "pool"), "--output", str(root / f"{name}.parquet"),
                "--workers", "0"]) == 0
    scores = pd.read_parquet(root / f"{name}.parquet").merge(truth[["uid", "clean"]], on="uid")
    assert len(scores) == len(truth)
    return _auc(scores.score.to_numpy(), scores.clean.to_numpy())


def test_flyt_scores_rank_clean_pairs_above_corrupted(experiment):
    """A randomly initialised GLU head (no --cos_sim_init) learns to rank clean pairs first."""
    root, truth, common = experiment
    before = _flyt_auc(root, truth, common, "flyt_init", "--n_iterations", "1", "--scoring_learning_rate", "0")
    after = _flyt_auc(root, truth, common, "flyt", "--n_iterations", "100", "--scoring_learning_rate", "1e-3")
    print(f"FLYT AUC clean vs corrupted: {before:.3f} at initialisation, {after:.3f} after 100 steps")
    assert after > 0.6
    assert after > before + 0.08
