"""The ``flyt`` command: a table of subcommands, each a module imported only when it runs.

Every subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``. Keeping torch and
open_clip out of this file keeps ``flyt --help`` and the parquet-only commands fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("flyt.train_flyt", "train a FLYT scoring model or an M-FLYT mixing model"),
    "train-clip": ("flyt.commands.train_clip", "train a CLIP on a pool or a subset of it (the filter's yardstick)"),
    "features": ("flyt.commands.features", "compute M-FLYT's input scores (CLIP score, negCLIPLoss, NormSim, ...) for a pool"),
    "score": ("flyt.commands.score", "score every sample of a pool with a trained FLYT or M-FLYT model, one score per uid"),
    "sample": ("flyt.commands.sample", "turn per-uid scores into a DataComp subset (SCS, HCS, top-k, threshold)"),
    "reshard": ("flyt.commands.reshard", "write the samples a DataComp subset selects (repeats included) as new shards"),
    "demo": ("flyt.demo.pipeline", "the whole experiment on bundled real images: filtering vs no filtering"),
    "eval": ("flyt.commands.eval", "zero-shot classification of a CLIP on DataComp-format eval folders"),
}


DESCRIPTION = """\
flyt learns which image-text pairs of a CLIP pretraining pool to keep. FLYT trains a scoring model so
that a CLIP step on the score-weighted pool batch lowers the loss on downstream tasks' training data;
M-FLYT learns, the same way, a mix of per-sample scores you already have. The scores then become a
DataComp subset (Soft or Hard Cap Sampling, top-k, threshold) for training a CLIP.

pipeline: train -> score -> sample -> [reshard] -> train-clip on the subset -> eval

example (the whole pipeline on bundled images, a few minutes on a laptop CPU):
  flyt demo --output_dir flyt-demo --quick

The algorithm, the formats and the input scores are described in the repository's docs/ folder;
`flyt COMMAND --help` lists a command's flags and their defaults.
"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default, unless it is unset, a switch's False, or the help already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        unset = default is None or default is False or default is argparse.SUPPRESS or default == [] or action.required
        if unset or "(default" in text or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    from flyt import __version__

    parser = argparse.ArgumentParser(prog="flyt", description=DESCRIPTION, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"flyt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = None
    argv = sys.argv[1:] if argv is None else argv
    for token in argv:
        if not token.startswith("-"):
            chosen = token
            break
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        if name == chosen:  # only the command being run pays for its imports
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    from flyt.errors import FlytError, Preempted, stop_on_sigterm

    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    # SIGTERM (a scheduler's pre-emption) ends any command with one line and exit code 75, not a silent 143;
    # flyt train and the per-shard runner install their own handlers inside, which save or count their work
    try:
        with stop_on_sigterm("stopped by SIGTERM: every output written so far is complete; rerun the same command"):
            return int(module.run(args) or 0)
    except (FlytError, OSError, Preempted) as exc:
        from flyt.atomic import storage_error

        if isinstance(exc, OSError):  # a log or folder written in place rather than atomically
            exc = storage_error(exc)
        if exc is None:
            raise
        print(f"\nflyt {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return exc.exit_code


def _one_line(exc: Exception) -> str:
    """The message alone, also when a data-loader worker wrapped it in its traceback."""
    message = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    return message.removeprefix("flyt.errors.FlytError: ")


if __name__ == "__main__":
    sys.exit(main())
