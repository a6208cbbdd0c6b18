"""The ``--engine`` flags every per-shard command shares, and the executor they choose."""

from __future__ import annotations

import argparse
import os


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", choices=("local", "ray"), default="local",
                        help="local: this machine (--workers); ray: a Ray cluster (optional extra flyt[ray])")
    parser.add_argument("--ray_address", default=None,
                        help="--engine ray: the cluster's address (default: $RAY_ADDRESS, else a Ray started here)")


def make_executor(args: argparse.Namespace, workers: int, kind: str = "thread"):
    """The executor ``args`` asks for: ``InProcess(workers, kind)`` or a Ray executor."""
    if getattr(args, "engine", "local") == "ray":
        from flyt.runner.on_ray import RayExecutor

        return RayExecutor(address=args.ray_address or os.environ.get("RAY_ADDRESS"))
    from flyt.runner.local import InProcess

    return InProcess(workers, kind)
