"""Where flyt follows the original FLYT code: the downstream temperature's optimizer, AdamW's betas/eps by
model name, and OpenCLIP's precision names with the original's default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import flyt.train.loop as train_mod
from flyt.demo import toydata
from flyt.cli import main as cli
from flyt.config import TrainConfig
from flyt.errors import FlytError
from flyt.method.optim import AdamWConfig
from flyt.precision import parse_precision, resolve_precision


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fidelity")
    df = toydata.write_pool(root / "pool", 48, n_shards=1, seed=0)
    toydata.write_score_parquets(df, root / "scores")
    toydata.write_task(root / "tasks", layout="simple")
    return root


def _config(root: Path, out: Path, **kw) -> TrainConfig:
    return TrainConfig(upstream_data_dir=str(root / "pool"), downstream_task_names=str(root / "tasks" / "digits"),
                       parquet_dir=str(root / "scores"), parquet_fields=["informative", "noise_a"],
                       model="flyt-tiny", upstream_batch_size=16, downstream_batch_size=8, workers=0, warmup=2,
                       n_iterations=1, output_dir=str(out), exp_name="run", downstream_logit_scale=2.65926, **kw)


@pytest.mark.parametrize("where, lr", [("reference", 5e-5), ("scoring", 1e-3)])
def test_downstream_temperature_takes_one_adamw_step_of_the_chosen_optimizer(data, tmp_path, monkeypatch, capsys,
                                                                            where, lr):
    """One step moves the log temperature by a hand-computed AdamW step, no weight decay: at the reference's
    learning rate by default (the original), at the scoring one with ``scoring`` (flyt's old behaviour).
    Mutations caught: the default optimizer at the scoring lr (Δ 20x too big); torch's default weight decay
    0.01 left on it (Δ off by 1.3e-6); its lr not set from the reference schedule each step."""
    grads = []

    def recording_step(*args, **kwargs):
        result = original(*args, **kwargs)
        grads.append(float(args[7].grad))  # dls: what the optimizer is about to apply
        return result

    original = train_mod.flyt_step
    monkeypatch.setattr(train_mod, "flyt_step", recording_step)
    trainer = train_mod.Trainer(_config(data, tmp_path, downstream_logit_scale_optimizer=where,
                                        reference_learning_rate=5e-5, scoring_learning_rate=1e-3))
    start = float(trainer.dls.detach())
    trainer.fit()
    (g,) = grads
    # first AdamW step from zero moments: bias-corrected m = g, sqrt(v) = |g|; eps 1e-8 for flyt-tiny;
    # step 0 of a 2-step warmup runs at half the peak learning rate
    expected = start - lr / 2 * g / (abs(g) + 1e-8)
    assert abs(g) > 1e-6 and float(trainer.dls.detach()) == pytest.approx(expected, abs=3e-7)
    assert "precision: fp32 (default without CUDA)" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "config.json").read_text())["precision"] == "fp32"


def test_adamw_settings_follow_the_model_name_and_the_flags(data, tmp_path):
    """OpenCLIP's rule ("vit" in the name: 0.98 / 1e-6, else 0.999 / 1e-8) and the overrides reach every
    optimizer: the reference's differentiable AdamW, the scoring one, the temperature's and train-clip's.
    Mutations caught: a case-sensitive "vit" test; --beta2 not passed to the scoring optimizer."""
    assert AdamWConfig.for_model("ViT-B-32") == AdamWConfig(0.9, 0.98, 1e-6)
    assert AdamWConfig.for_model("hf-hub:timm/vit_base_patch16_clip_224") == AdamWConfig(0.9, 0.98, 1e-6)
    for name in ("flyt-tiny", "RN50", "convnext_base_w"):
        assert AdamWConfig.for_model(name) == AdamWConfig(0.9, 0.999, 1e-8), name
    assert AdamWConfig.for_model("ViT-B-32", eps=1e-8) == AdamWConfig(0.9, 0.98, 1e-8)
    with pytest.raises(FlytError, match="--beta1 and --beta2 must be in"):
        AdamWConfig.for_model("RN50", beta2=1.0)

    trainer = train_mod.Trainer(_config(data, tmp_path, beta1=0.8, beta2=0.95, eps=1e-7))
    assert trainer.bilevel.adamw == AdamWConfig(0.8, 0.95, 1e-7, 0.2)
    for opt in (trainer.scoring_opt, trainer.dls_opt):
        assert {(g["betas"], g["eps"]) for g in opt.param_groups} == {((0.8, 0.95), 1e-7)}

    pool = str(data / "pool")
    common = ["train-clip", "--upstream_data_dir", pool, "--model", "flyt-tiny", "--output_dir", str(tmp_path),
              "--steps", "1", "--batch_size", "8", "--workers", "0", "--warmup", "1"]
    for extra, betas, eps in (([], (0.9, 0.999), 1e-8), (["--beta2", "0.95", "--eps", "1e-7"], (0.9, 0.95), 1e-7)):
        assert cli(common + ["--exp_name", f"clip{len(extra)}", *extra]) == 0
        ckpt = torch.load(tmp_path / f"clip{len(extra)}" / "checkpoints" / "epoch_latest.pt", weights_only=True)
        assert {(tuple(g["betas"]), g["eps"]) for g in ckpt["optimizer"]["param_groups"]} == {(betas, eps)}


def test_every_openclip_precision_spelling_parses_or_says_what_to_use(data, tmp_path, capsys):
    """The original's names map onto flyt's modes; the unsupported ones fail naming a replacement, also as
    a command's one-line error. Mutations caught: dropping the amp_bfloat16 alias; argparse ``choices`` back
    on the flag (its error names no replacement)."""
    for name, mode in (("fp32", "fp32"), ("amp", "amp"), ("amp_bf16", "amp_bf16"), ("amp_bfloat16", "amp_bf16"),
                       ("bf16", "bf16")):
        assert parse_precision(name) == mode
    for name, hint in (("fp16", "use amp"), ("pure_fp16", "use amp or bf16"), ("pure_bf16", "use bf16")):
        with pytest.raises(FlytError, match=f"--precision {name} is not supported: .*{hint}"):
            parse_precision(name)
    with pytest.raises(FlytError, match="one of fp32, amp, amp_bf16, amp_bfloat16, not 'bf16'"):
        parse_precision("bf16", ("fp32", "amp", "amp_bf16"))  # flyt eval has no bf16 weights
    argv = ["train", "--upstream_data_dir", str(data / "pool"), "--downstream_task_names",
            str(data / "tasks" / "digits"), "--n_iterations", "1", "--output_dir", str(tmp_path)]
    for name, message in (("pure_bf16", "--precision pure_bf16 is not supported: "), ("fp64", "not 'fp64'")):
        assert cli(argv + ["--precision", name]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("flyt train: error: ") and message in err[0], err


def test_default_precision_is_amp_on_cuda_and_fp32_without(monkeypatch, capsys):
    """Without --precision: amp where CUDA is available (the original's default), else fp32, said once in
    the log (stdout); a given flag is kept and not announced. Mutation caught: defaulting to fp32 on CUDA."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_precision(None) == "amp"
    assert capsys.readouterr().out == "precision: amp (default on CUDA)\n"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_precision(None) == "fp32"
    assert capsys.readouterr().out == "precision: fp32 (default without CUDA)\n"
    assert resolve_precision("amp_bfloat16") == "amp_bf16" and capsys.readouterr().out == ""
