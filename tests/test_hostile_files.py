"""A checkpoint crafted to run code when unpickled is refused by every command that loads one.

The file's pickle calls ``exec`` on load; a command that unpickled it with ``weights_only=False`` would
create the marker file. Each command must exit 2 with one error line naming the file (no traceback), and the marker must not
exist. Mutations checked: ``checkpoint.load`` with ``weights_only=False`` (score and --resume create the
marker); ``create_clip`` not translating the refusal (eval, train-clip and the --*_pretrained flags print
torch's multi-line advice instead of the one line naming the file); ``features.readable_checkpoint`` not
asking ``checkpoint.refusal`` (its --teacher and --flyt_checkpoint lines say only "not a readable checkpoint").
"""

from __future__ import annotations

import builtins
from pathlib import Path

import pytest
import torch

from flyt import cli
from flyt.demo import toydata


class _Exec:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    toydata.write_pool(root / "pool", 24, n_shards=1, seed=0)
    toydata.write_task(root / "tasks", name="digits", layout="simple")
    marker = root / "PWNED"
    evil = root / "evil.pt"
    torch.save({"epoch": 1, "name": "x", "state_dict": _Exec(marker)}, evil)
    resume = root / "run" / "exp" / "checkpoints"
    resume.mkdir(parents=True)
    for name in ("scoring_epoch_latest.pt", "epoch_latest.pt"):
        torch.save({"epoch": 1, "state_dict": _Exec(marker)}, resume / name)
    return root


def _commands(root: Path) -> dict[str, list[str]]:
    pool, task, evil = str(root / "pool"), str(root / "tasks" / "digits"), str(root / "evil.pt")
    train = ["train", "--upstream_data_dir", pool, "--downstream_task_names", task, "--model", "flyt-tiny",
             "--upstream_batch_size", "8", "--downstream_batch_size", "4", "--n_iterations", "1", "--workers", "0"]
    return {
        "score --checkpoint": ["score", "--checkpoint", evil, "--upstream_data_dir", pool,
                               "--output", str(root / "out_score")],
        "eval --pretrained": ["eval", "--model", "flyt-tiny", "--pretrained", evil, "--downstream_task_names", task,
                              "--output", str(root / "eval.jsonl"), "--workers", "0"],
        "train-clip --pretrained": ["train-clip", "--upstream_data_dir", pool, "--model", "flyt-tiny",
                                    "--pretrained", evil, "--output_dir", str(root / "runs"), "--steps", "1",
                                    "--batch_size", "8", "--workers", "0"],
        "train --reference_pretrained": [*train, "--reference_pretrained", evil, "--output_dir", str(root / "r1")],
        "train --scoring_pretrained": [*train, "--scoring_pretrained", evil, "--output_dir", str(root / "r2")],
        "train --resume latest": [*train, "--output_dir", str(root / "run"), "--exp_name", "exp", "--resume", "latest"],
        "features --teacher": ["features", "--upstream_data_dir", pool, "--output", str(root / "out_f1"),
                               "--teacher", f"a=flyt-tiny:{evil}", "--scores", "clip_score"],
        "features --flyt_checkpoint": ["features", "--upstream_data_dir", pool, "--output", str(root / "out_f2"),
                                       "--flyt_checkpoint", evil, "--scores", "flyt"],
    }


@pytest.mark.parametrize("name", list(_commands(Path("."))))
def test_a_checkpoint_that_runs_code_is_refused(world, name, capsys):
    argv = _commands(world)[name]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and "refused: unpickling it would call exec" in errors[0], err
    assert ("evil.pt" in errors[0] or "scoring_epoch_latest.pt" in errors[0]) and "Traceback" not in err
    assert not (world / "PWNED").exists()


def test_a_shard_named_like_a_shell_command_is_read_as_a_file(tmp_path, monkeypatch):
    """webdataset's URL opener runs ``pipe:CMD`` names as shell commands; flyt opens shards itself, so a
    (relative) shard path that starts with ``pipe:`` is just a file. Mutation checked: ``tar_samples``
    handing the name to ``wds.tarfile_samples`` again (the command runs and creates the marker)."""
    import shutil

    from flyt.data.webdataset import tar_samples

    toydata.write_pool(tmp_path / "pool", 8, n_shards=1, seed=0)
    monkeypatch.chdir(tmp_path)
    [shard] = sorted((tmp_path / "pool").glob("*.tar"))
    name = f"pipe:touch PWNED; cat {shard.name}"
    shutil.copy(shard, tmp_path / name)
    shutil.copy(shard, tmp_path / shard.name)
    assert sum(1 for _ in tar_samples([name])) == 8
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("argv", [
    ["sample", "--scores", "s3://bucket/scores", "--method", "topk", "--fraction", "0.5", "--output", "OUT/x.npy"],
    ["score", "--checkpoint", "gs://bucket/scorer.pt", "--upstream_data_dir", "OUT", "--output", "OUT/s"],
    ["features", "--upstream_data_dir", "pipe:curl -s https://host/x.tar", "--output", "OUT/f", "--scores",
     "caption_words"],
    ["reshard", "--pool", "s3://bucket/pool", "--subset", "OUT/subset.npy", "--output", "OUT/r"],
])
def test_a_url_or_pipe_for_a_path_is_refused_with_how_to_give_it(tmp_path, argv, capsys):
    """Remote paths are not supported: a URL or ``pipe:`` where a path goes is never opened (no fsspec, no
    shell); the one line says to mount the bucket. Mutation caught: ``remote_hint`` returning "" (the line
    only says the path does not exist)."""
    assert cli.main([a.replace("OUT", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("does not exist" in err[0] or "no such file" in err[0]), err
    assert "mount the bucket" in err[0] and argv[2].split(" ")[0] in err[0], err
