"""Where flyt follows the original FLYT code: OpenCLIP's precision names with the original's default."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flyt import toydata
from flyt.cli import main as cli
from flyt.errors import FlytError
from flyt.precision import parse_precision, resolve_precision


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fidelity")
    toydata.write_pool(root / "pool", 48, n_shards=1, seed=0)
    toydata.write_task(root / "tasks", layout="simple")
    return root


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
