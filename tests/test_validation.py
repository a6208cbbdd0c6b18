"""Held-out validation of the filter: the gain of the learned weighting over uniform, --keep_best, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from flyt.demo import toydata
from flyt.method.bilevel import DownstreamBatch
from flyt.cli import build_parser
from flyt.cli import main as cli
from flyt.method.bilevel import BilevelConfig
from flyt.train.validation import weighting_gain


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("val")
    truth = toydata.write_pool(root / "pool", 96, n_shards=2, seed=2, corruption={"wrong_caption": 0.5})
    toydata.write_task(root / "tasks", layout="simple", n_train=40)
    return root, dict(zip(truth.uid, truth.clean))


def _args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--upstream_data_dir", str(root / "pool"),
            "--downstream_task_names", str(root / "tasks" / "digits"),
            "--model", "flyt-tiny", "--upstream_batch_size", "32", "--downstream_batch_size", "8", "--workers", "0",
            "--warmup", "1", "--output_dir", str(out), "--exp_name", "run", "--log_every_n_steps", "1",
            "--update_reference_model", *extra]


def test_gain_is_positive_for_down_weighting_wrong_captions_and_zero_for_uniform(pool, tmp_path):
    """Held out: the batch's clean pairs (CLIP loss). From AdamW's first step (a sign step) the step on the
    clean pairs alone is the steepest descent of that loss, so to first order (small lr) it beats the
    uniform step and the step that trusts the wrong captions. Mutations caught: the gain's sign flipped
    (learned - uniform); both steps taken with the learned weights (gain 0); raw scores used as log-weights
    (no softmax).
    """
    from flyt.config import TrainConfig, config_from_args
    from flyt.streams.train import TrainStream
    from flyt.train.loop import Trainer

    root, clean = pool
    argv = _args(root, tmp_path, "--n_iterations", "1")
    t = Trainer(config_from_args(TrainConfig, build_parser(argv).parse_args(argv)))
    bundle = next(iter(TrainStream(t.stream_cfg, 0, t.preprocess, t.tokenizer)))
    up = t._to_device(bundle)[0]
    c = torch.tensor([bool(clean[u]) for u in up["uid"]])
    assert 8 <= int(c.sum()) <= 24
    held_out = [[DownstreamBatch("clean", up["image"][c], texts=up["text"][c])]]

    def gain(scores: torch.Tensor) -> float:
        # the downstream temperature of the README's flags (14.3): at the multiplier 1 that the step uses without
        # one, the held-out CLIP loss is nearly flat and every gain sits at rounding level
        dls = torch.tensor(2.65926)
        return weighting_gain(t.reference, t.params, t.opt_state, 1e-5, up, scores, held_out, dls,
                              BilevelConfig(downstream_loss="clip"))["val/gain"]

    oracle, anti = gain(torch.where(c, 0.0, -30.0)), gain(torch.where(c, -30.0, 0.0))
    assert oracle > 1e-4 and oracle > anti
    assert gain(torch.full((len(c),), 7.0)) == 0.0  # equal scores are uniform weights: the very same step


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]


def test_keep_best_keeps_the_scorer_of_the_best_gain(pool, tmp_path, capsys, monkeypatch):
    """The gains are given (0.1, 0.3, 0.2: the best is not the last), the bookkeeping is real. Mutations
    caught: scoring_best.pt written at every validation (it held step 3); the best kept as the lowest gain
    (step 1)."""
    import flyt.train.loop

    gains = iter([0.1, 0.3, 0.2])
    monkeypatch.setattr(flyt.train.loop, "weighting_gain", lambda *a, **k: {"val/gain": next(gains)})
    root, _ = pool
    assert cli(_args(root, tmp_path, "--n_iterations", "3", "--num_checkpoints", "3", "--val_every", "1",
                     "--val_fraction", "0.3", "--keep_best", "--cos_sim_init", "--scoring_learning_rate", "3e-2")) == 0
    summary = json.loads(capsys.readouterr().out.split("flyt train: done ")[-1])
    assert [(m["step"], m["val/gain"]) for m in _metrics(tmp_path) if "val/gain" in m] == [(1, 0.1), (2, 0.3), (3, 0.2)]
    assert summary["val_best"] == {"best_gain": 0.3, "best_step": 2}
    ckpt = tmp_path / "run" / "checkpoints"
    kept = torch.load(ckpt / "scoring_best.pt", weights_only=True)
    assert kept["flyt"]["step"] == 2 and kept["flyt"]["validation"]["best_step"] == 2
    for step, same in ((2, True), (3, False)):
        other = torch.load(ckpt / f"scoring_epoch_{step}.pt", weights_only=True)["state_dict"]
        assert all(torch.equal(v, other[k]) for k, v in kept["state_dict"].items()) == same


def test_a_task_val_folder_is_its_held_out_data(pool, tmp_path):
    root, _ = pool
    task = tmp_path / "digits"
    shutil.copytree(root / "tasks" / "digits", task)
    shutil.copytree(task / "train", task / "val")
    argv = _args(root, tmp_path, "--n_iterations", "1", "--val_every", "1")
    argv[argv.index("--downstream_task_names") + 1] = str(task)
    assert cli(argv) == 0
    assert "val/gain" in _metrics(tmp_path)[-1]


def _error(capsys, argv) -> str:
    assert cli(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("flyt train: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_bad_validation_flags_fail_in_one_line_before_work(pool, tmp_path, capsys):
    root, _ = pool
    base = _args(root, tmp_path, "--n_iterations", "1")
    assert "no training sample" in _error(capsys, base + ["--val_every", "1", "--val_fraction", "0.9999999"])
    assert "no validation sample" in _error(capsys, base + ["--val_every", "1", "--val_fraction", "1e-9"])
    msg = _error(capsys, base + ["--val_every", "1"])
    assert "--val_every needs held-out task data" in msg and "digits" in msg
    assert "give --val_every N too" in _error(capsys, base + ["--keep_best"])
    assert "--val_fraction in [0, 1)" in _error(capsys, base + ["--val_every", "1", "--val_fraction", "1"])
    assert not (tmp_path / "run").exists()  # nothing was started


def test_resume_keeps_probe_and_best_gain(pool, tmp_path, monkeypatch):
    """A run killed after its first checkpoint and resumed logs the same diagnostics and gains and keeps the
    same best as an uninterrupted one. Mutations caught: the probe's initial scores not restored (re-scored
    by the resumed scorer: spearman 1 at step 3); the best-gain state not restored (step 4's lower gain
    overwrites scoring_best.pt)."""
    import flyt.train.loop

    root, _ = pool
    argv = _args(root, tmp_path / "full", "--n_iterations", "4", "--num_checkpoints", "2", "--val_every", "2",
                 "--val_fraction", "0.3", "--keep_best", "--cos_sim_init", "--scoring_learning_rate", "3e-2")
    gains = iter([0.5, 0.1, 0.5, 0.1])  # steps 2 and 4 of each run: the best is step 2, before the kill
    monkeypatch.setattr(flyt.train.loop, "weighting_gain", lambda *a, **k: {"val/gain": next(gains)})
    assert cli(argv) == 0
    part = [a.replace(str(tmp_path / "full"), str(tmp_path / "part")) for a in argv]
    original = flyt.train.loop.Trainer.save

    def save_then_die(self):
        original(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(flyt.train.loop.Trainer, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        cli(part)
    monkeypatch.setattr(flyt.train.loop.Trainer, "save", original)
    assert cli(part + ["--resume", "latest"]) == 0
    runs = {}
    for name in ("full", "part"):
        lines = _metrics(tmp_path / name)
        runs[name] = [{k: v for k, v in m.items() if k != "samples_per_s"} for m in lines]
    assert runs["full"] == runs["part"]
    assert [m["diag/probe_spearman"] for m in runs["full"] if "diag/probe_spearman" in m][2] < 0.999
    best = {n: torch.load(tmp_path / n / "run" / "checkpoints" / "scoring_best.pt", weights_only=True) for n in runs}
    assert best["full"]["flyt"]["step"] == best["part"]["flyt"]["step"] == 2
    assert all(torch.equal(v, best["part"]["state_dict"][k]) for k, v in best["full"]["state_dict"].items())


def test_validation_refuses_several_processes(pool):
    """Mutation caught: the world-size check removed (it would validate on one rank's share of the batch)."""
    from flyt.data.shards import parse_sources
    from flyt.streams.train import StreamConfig
    from flyt.data.tasks import parse_task_names
    from flyt.errors import FlytError
    from flyt.train.validation import Validation

    root, _ = pool
    tasks = parse_task_names(str(root / "tasks" / "digits"), None, None)
    cfg = StreamConfig(parse_sources(str(root / "pool"), None), tasks, 16, 8, val_fraction=0.3)
    with pytest.raises(FlytError, match="--val_every runs on one process only"):
        Validation.create(cfg, 1, 1, 0.3, world_size=2)
    assert Validation.create(cfg, 1, 1, 0.3, world_size=1).stream_cfg.split == "val"
