"""``python -m flyt.train_flyt`` and ``flyt train``: the original FLYT command line (docs/formats.md)."""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from flyt.config import TrainConfig, add_dataclass_arguments

    add_dataclass_arguments(parser, TrainConfig)


def run(args: argparse.Namespace) -> int:
    """One process, or one rank of ``torchrun`` (gloo on CPU, NCCL on GPU): the same mathematics. SIGTERM:
    a checkpoint of the step in flight, then exit code 75 (``flyt.train.preemption``)."""
    from flyt.config import TrainConfig, config_from_args

    cfg = config_from_args(TrainConfig, args)  # every flag checked before torch and OpenCLIP load (seconds)
    import torch

    from flyt.train.distributed import DistComm, init_process_group, world_from_env
    from flyt.train.loop import Trainer
    from flyt.train.preemption import EXIT_CODE, Preempted

    rank, world_size, _ = world_from_env()
    try:
        if world_size == 1:
            summary = Trainer(cfg).fit(stop_on_sigterm=True)
        else:
            device_type = (cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")).split(":")[0]
            init_process_group(device_type)
            try:
                summary = Trainer(cfg, DistComm()).fit(stop_on_sigterm=True)
            finally:
                torch.distributed.destroy_process_group()
    except Preempted:  # the checkpoint is written and the log says how to resume
        return EXIT_CODE
    if rank == 0:
        print("flyt train: done " + json.dumps(summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    """The original's entry point keeps the original's defaults: its scoring lr goes first on the command
    line, so a user's own --scoring_learning_rate (parsed later) still wins."""
    from flyt.cli import main as cli_main
    from flyt.config import ORIGINAL_SCORING_LR

    argv = sys.argv[1:] if argv is None else argv
    return cli_main(["train", "--scoring_learning_rate", str(ORIGINAL_SCORING_LR), *argv])


if __name__ == "__main__":
    sys.exit(main())
