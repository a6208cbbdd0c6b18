"""Conflicting or missing flags fail in one line with exit code 2, before any heavy work.

Every subcommand is covered. Each case runs in a fresh interpreter, which must exit 2 with exactly one ``error:`` line and without
having imported OpenCLIP (loading models is the heavy work that comes first in every command) or
written anything. Mutations checked: ``train_flyt.run`` building its config after importing the trainer
(the train cases import OpenCLIP first); the ``--cos_sim_init`` check moved back into ``Trainer``.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from flyt.demo import toydata

PROBE = """
import sys
from flyt import cli
try:
    code = cli.main(sys.argv[1:])
finally:  # argparse's own errors leave by SystemExit
    print("HEAVY" if "open_clip" in sys.modules else "LIGHT")
sys.exit(code)
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("flags")
    toydata.write_pool(root / "pool", 16, n_shards=1, seed=0)
    toydata.write_task(root / "tasks", name="digits", layout="simple")
    return root


TRAIN = ["train", "--upstream_data_dir", "{root}/pool", "--downstream_task_names", "{root}/tasks/digits",
         "--model", "flyt-tiny", "--output_dir", "{root}/out"]
CASES = {
    "train: no step count": (TRAIN, "give exactly one of --n_iterations and --reference_num_samples"),
    "train: zero steps": ([*TRAIN, "--n_iterations", "0"], "--n_iterations must be >= 1"),
    "train: both step counts": ([*TRAIN, "--n_iterations", "4", "--reference_num_samples", "64"], "exactly one"),
    "train: M-FLYT without fields": ([*TRAIN, "--n_iterations", "4", "--parquet_dir", "{root}"],
                                     "needs both --parquet_dir and --parquet_fields"),
    "train: cos_sim_init on M-FLYT": ([*TRAIN, "--n_iterations", "4", "--parquet_dir", "{root}", "--parquet_fields",
                                       "a", "--cos_sim_init"], "--cos_sim_init applies to a FLYT scoring model"),
    "train: keep_best without validation": ([*TRAIN, "--n_iterations", "4", "--keep_best"], "give --val_every N too"),
    "train: unknown precision": ([*TRAIN, "--n_iterations", "4", "--precision", "fp8"], "--precision"),
    "train: a missing flag": (["train", "--model", "flyt-tiny"], "the following arguments are required"),
    "train-clip: zero steps": (["train-clip", "--upstream_data_dir", "{root}/pool", "--model", "flyt-tiny",
                                "--steps", "0", "--output_dir", "{root}/out"], "--steps must be >= 1"),
    "score: no such checkpoint": (["score", "--checkpoint", "{root}/none.pt", "--upstream_data_dir", "{root}/pool",
                                   "--output", "{root}/out"], "--checkpoint {root}/none.pt does not exist"),
    "score: zero batch": (["score", "--checkpoint", "{root}/none.pt", "--upstream_data_dir", "{root}/pool",
                           "--output", "{root}/out", "--batch_size", "0"], "--batch_size must be >= 1"),
    "sample: scs without a seed": (["sample", "--scores", "{root}/s.parquet", "--method", "scs", "--total_size", "5",
                                    "--output", "{root}/out/s.npy"], "--method scs needs --seed"),
    "sample: topk with two sizes": (["sample", "--scores", "{root}/s.parquet", "--method", "topk", "--fraction", "0.5",
                                     "--total_size", "3", "--output", "{root}/out/s.npy"], "exactly one of --fraction"),
    "sample: temperature and unique fraction": (
        ["sample", "--scores", "{root}/s.parquet", "--method", "scs", "--total_size", "5", "--seed", "1",
         "--temperature", "1", "--unique_fraction", "0.5", "--output", "{root}/out/s.npy"], "exclude each other"),
    "sample: a memory limit that is no size": (
        ["sample", "--scores", "{root}/s.parquet", "--method", "scs", "--total_size", "5", "--seed", "1",
         "--memory_limit", "lots", "--output", "{root}/out/s.npy"], "--memory_limit 'lots': expected a size"),
    "reshard: zero shard size": (["reshard", "--upstream_data_dir", "{root}/pool", "--subset", "{root}/s.npy",
                                  "--output", "{root}/out", "--shard_size", "0"], "--shard_size and --workers must be positive"),
    "features: a model score without a teacher": (
        ["features", "--upstream_data_dir", "{root}/pool", "--output", "{root}/out", "--scores", "clip_score"],
        "--scores clip_score needs a --teacher"),
    "features: NormSim without targets": (
        ["features", "--upstream_data_dir", "{root}/pool", "--output", "{root}/out", "--teacher", "flyt-tiny",
         "--scores", "normsim_inf"], "needs --target_tasks"),
    "features: cache both ways": (
        ["features", "--upstream_data_dir", "{root}/pool", "--output", "{root}/out", "--teacher", "flyt-tiny",
         "--scores", "clip_score", "--save_embeddings", "--from_embeddings", "{root}"], "not allowed with argument"),
    "eval: zero batch": (["eval", "--model", "flyt-tiny", "--downstream_task_names", "{root}/tasks/digits",
                          "--output", "{root}/out/eval.jsonl", "--batch_size", "0"], "--batch_size must be >= 1"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_flags_fail_in_one_line_with_exit_2_before_heavy_work(world, case):
    argv, expected = CASES[case]
    argv, expected = [a.format(root=world) for a in argv], expected.format(root=world)
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120)
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert done.returncode == 2, done.stderr[-1500:]
    assert len(errors) == 1 and expected in errors[0], done.stderr[-1500:]
    assert done.stdout.strip().splitlines()[-1] == "LIGHT", f"{case}: OpenCLIP was loaded before the flags were checked"
    assert not (world / "out").exists()
