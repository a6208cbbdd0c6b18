"""``python -m flyt.train_flyt`` and ``flyt train``: the original FLYT command line (DESIGN.md §7)."""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from flyt.config import TrainConfig, add_dataclass_arguments

    add_dataclass_arguments(parser, TrainConfig)


def run(args: argparse.Namespace) -> int:
    from flyt.config import TrainConfig, config_from_args
    from flyt.train import Trainer

    cfg = config_from_args(TrainConfig, args)
    summary = Trainer(cfg).fit()
    print("flyt train: done " + json.dumps(summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    from flyt.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
