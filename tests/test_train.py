"""``flyt train`` end to end on generated pools: checkpoints, resume, reproducibility, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flyt.demo import toydata
from flyt.models.checkpoint import load_scorer
from flyt.cli import main as cli


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("exp")
    df = toydata.write_pool(root / "pool", 240, n_shards=3, seed=0, n_broken=4)
    toydata.write_score_parquets(df, root / "scores")
    toydata.write_task(root / "tasks", layout="simple")
    toydata.write_task(root / "orig", layout="original")
    return root


def _args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--upstream_data_dir", str(root / "pool"), "--downstream_task_names", str(root / "tasks" / "digits"),
            "--model", "flyt-tiny", "--upstream_batch_size", "16", "--downstream_batch_size", "8", "--workers", "0",
            "--warmup", "1", "--output_dir", str(out), "--exp_name", "run", "--log_every_n_steps", "1",
            "--downstream_logit_scale", "2.65926", "--update_reference_model", *extra]


def _mflyt(root: Path) -> list[str]:
    return ["--parquet_dir", str(root / "scores"), "--parquet_fields", "informative", "noise_a", "noise_b"]


def _checkpoints(out: Path) -> dict[str, dict]:
    ckpt = out / "run" / "checkpoints"
    return {p.name: torch.load(p, weights_only=True) for p in sorted(ckpt.glob("*.pt"))}


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        for key in ("state_dict",):
            for k, v in a[name][key].items():
                assert torch.equal(v, b[name][key][k]), (name, k)
        assert a[name]["epoch"] == b[name]["epoch"]
        assert torch.equal(a[name]["downstream_logit_scale"], b[name]["downstream_logit_scale"]), name
        if "flyt" in a[name]:  # the temperature's own AdamW state (default --downstream_logit_scale_optimizer)
            for k in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(a[name]["flyt"]["dls_optimizer"]["state"][0][k],
                                   b[name]["flyt"]["dls_optimizer"]["state"][0][k]), (name, k)


@pytest.mark.parametrize("mode", ["flyt", "mflyt"])
def test_same_seed_same_checkpoints_and_rebuildable(pool, tmp_path, mode, caplog):
    extra = _mflyt(pool) if mode == "mflyt" else ["--cos_sim_init"]
    for out in ("a", "b"):
        assert cli(_args(pool, tmp_path / out, "--n_iterations", "3", *extra)) == 0
    a, b = _checkpoints(tmp_path / "a"), _checkpoints(tmp_path / "b")
    assert set(a) == {"epoch_1.pt", "epoch_latest.pt", "scoring_epoch_1.pt", "scoring_epoch_latest.pt"}
    _assert_same(a, b)
    caplog.clear()
    scorer, spec = load_scorer(tmp_path / "a" / "run" / "checkpoints" / "scoring_epoch_latest.pt")
    assert not [r for r in caplog.records if "initialized randomly" in r.getMessage()]  # its weights are loaded
    assert spec.mode == mode
    assert a["scoring_epoch_1.pt"]["flyt"]["step"] == 3
    if mode == "mflyt":
        assert spec.parquet_fields == ["informative", "noise_a", "noise_b"]
        assert set(a["scoring_epoch_1.pt"]["state_dict"]) == {"layers.0.weight", "layers.0.bias"}
    else:
        keys = a["scoring_epoch_1.pt"]["state_dict"]
        assert "glu_model.layers.0.w1.weight" in keys and "clip_model.logit_scale" in keys
    metrics = (tmp_path / "a" / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 3


def test_resume_after_kill_equals_uninterrupted(pool, tmp_path):
    full = _args(pool, tmp_path / "full", "--n_iterations", "4", "--num_checkpoints", "2", *_mflyt(pool))
    assert cli(full) == 0
    # "killed" after its first checkpoint: the same run stopped at epoch 1 of 2
    part = _args(pool, tmp_path / "part", "--n_iterations", "4", "--num_checkpoints", "2", *_mflyt(pool))
    import flyt.train.loop as train_mod

    original = train_mod.Trainer.save

    def save_then_die(self):
        original(self)
        raise KeyboardInterrupt

    train_mod.Trainer.save = save_then_die
    try:
        with pytest.raises(KeyboardInterrupt):
            cli(part)
    finally:
        train_mod.Trainer.save = original
    assert cli(part + ["--resume", "latest"]) == 0
    a, b = _checkpoints(tmp_path / "full"), _checkpoints(tmp_path / "part")
    _assert_same(a, b)
    assert b["scoring_epoch_latest.pt"]["flyt"]["step"] == 4
    assert len((tmp_path / "part" / "run" / "metrics.jsonl").read_text().splitlines()) == 4


def test_original_layout_and_module_entry_point(pool, tmp_path):
    from flyt.train_flyt import main

    args = _args(pool, tmp_path, "--n_iterations", "1", "--downstream_clip_loss")[1:]
    i = args.index("--downstream_task_names")
    args[i + 1] = "mnist"
    args += ["--downstream_data_dir", str(pool / "orig" / "downstream"), "--datacomp_eval_dir", str(pool / "orig" / "eval")]
    assert main(args) == 0
    assert (tmp_path / "run" / "checkpoints" / "scoring_epoch_latest.pt").exists()


def _error_of(capsys, argv) -> str:
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("flyt train: error: ")]
    assert len(lines) == 1, err  # the error is one line of its own (progress bars aside)
    return lines[0]


def test_bad_inputs_give_one_line_errors(pool, tmp_path, capsys):
    base = _args(pool, tmp_path, "--n_iterations", "1")
    # a sample with no M-FLYT score row (also from inside a data-loader worker)
    scores = tmp_path / "scores"
    scores.mkdir()
    import pandas as pd

    for f in (pool / "scores").glob("*.parquet"):
        pd.read_parquet(f).iloc[1:].to_parquet(scores / f.name)
    workers = base.index("--workers")
    for n in ("0", "1"):
        argv = base[:workers + 1] + [n] + base[workers + 2:]
        msg = _error_of(capsys, argv + ["--parquet_dir", str(scores), "--parquet_fields", "informative"])
        assert "no M-FLYT score row for key" in msg and "_scores.parquet" in msg
    msg = _error_of(capsys, base + ["--parquet_dir", str(pool / "scores"), "--parquet_fields", "nope"])
    assert "lacks --parquet_fields column(s) nope" in msg
    # an unknown task name
    i = base.index("--downstream_task_names")
    msg = _error_of(capsys, base[:i + 1] + ["imagenett"] + base[i + 2:])
    assert "unknown task 'imagenett'" in msg
    # a missing classnames file, a template without {c}
    task = tmp_path / "task"
    task.mkdir()
    (task / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\n")
    msg = _error_of(capsys, base[:i + 1] + [str(task)] + base[i + 2:])
    assert "missing classnames file" in msg and str(task / "classnames.txt") in msg
    (task / "classnames.txt").write_text("zero\none\n")
    (task / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na photo of a thing.\n")
    msg = _error_of(capsys, base[:i + 1] + [str(task)] + base[i + 2:])
    assert "has no {c} placeholder" in msg and "zeroshot_classification_templates.txt" in msg
    # flags
    assert "--n_iterations" in _error_of(capsys, base[:-2])
    pool_flag = base.index("--upstream_data_dir")
    msg = _error_of(capsys, base[:pool_flag + 1] + [str(tmp_path / "missing")] + base[pool_flag + 2:])
    assert "does not exist" in msg
    assert "--data_weights" in _error_of(capsys, base + ["--data_weights", "1::2"])
    assert "--model 'no-such-model'" in _error_of(capsys, base + ["--model", "no-such-model"])
