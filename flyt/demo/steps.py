"""The demo's own steps as commands a user can paste: ``python -m flyt.demo.steps {data,standardise,scores} ...``.

Everything else ``flyt demo`` runs is a public ``flyt`` subcommand; these three make the rest of its
pipeline reproducible from a shell too: the digit pool with its ground truth and the task
(``data``), M-FLYT's inputs standardised from ``flyt features``' columns (``standardise``) and the score
files of the two reference filters that need the ground truth (``scores``: random and the oracle).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

CORRUPTION = {"wrong_caption": 0.25, "unrelated_caption": 0.15, "noise_image": 0.1, "near_duplicate": 0.1}
TASK = "wds_digits_test"  # clip_benchmark's folder name for a task called "digits"
TEACHER = "base"  # flyt features' alias of the base CLIP: its columns are <score>_base
INPUT_SCORES = ("clip_score", "neg_clip_loss", "normsim_inf", "caption_words")  # flyt features --scores
CLIP_SCORE = f"clip_score_{TEACHER}"  # the input column holding the base's CLIP score: the CLIP-score top-k baseline
KINDS = ("random", "oracle")  # reference score files of `scores`


def write_data(output: Path, pool_size: int, shards: int, seed: int, broken: int) -> None:
    """``output/pool`` (WebDataset shards), ``output/tasks/<TASK>`` and ``output/truth.parquet``."""
    from flyt.atomic import atomic_path
    from flyt.demo import toydata
    from flyt.errors import FlytError

    if pool_size < 1 or not 1 <= shards <= pool_size or broken < 0 or seed < 0:
        raise FlytError(f"--pool_size must be >= 1, --shards in [1, pool_size], --broken and --seed >= 0 "
                        f"(got {pool_size}, {shards}, {broken}, {seed})")
    truth = toydata.write_pool(output / "pool", pool_size, shards, seed, corruption=CORRUPTION, n_broken=broken)
    toydata.write_task(output / "tasks", name=TASK, seed=seed, layout="simple")
    with atomic_path(output / "truth.parquet") as tmp:
        truth.to_parquet(tmp)
    print(f"wrote {output / 'pool'} ({len(truth)} samples in {shards} shards, {int(truth.clean.sum())} clean, "
          f"{broken} undecodable), {output / 'tasks' / TASK} and {output / 'truth.parquet'}")


def standardise(features: Path, output: Path) -> list[str]:
    """Each score column of a ``flyt features`` folder standardised over the pool (zero mean, unit variance),
    one ``<shard>_scores.parquet`` per input file: M-FLYT's mixer takes its inputs as they are and starts at
    0, so without this the widest-ranged column dominates the first steps and weight decay acts unevenly."""
    from flyt.errors import FlytError

    files = sorted(features.glob("*_scores.parquet")) if features.is_dir() else []
    if not files:
        raise FlytError(f"--features {features}: expected a folder of <shard>_scores.parquet (flyt features --output)")

    import pandas as pd

    from flyt.atomic import atomic_path

    frames = {path.name: pd.read_parquet(path) for path in files}
    pool = pd.concat(frames.values())
    fields = [c for c in pool.columns if c not in ("key", "uid")]
    mean, std = pool[fields].astype("float64").mean(), pool[fields].astype("float64").std()
    flat = [f for f in fields if not std[f] > 0]
    if flat:
        raise FlytError(f"--features {features}: column(s) {', '.join(flat)} take one value over the pool: nothing to standardise")
    output.mkdir(parents=True, exist_ok=True)
    for name, frame in frames.items():
        frame[fields] = (frame[fields].astype("float64") - mean) / std
        with atomic_path(output / name) as tmp:
            frame.to_parquet(tmp)
    print(f"wrote {len(frames)} score files to {output}: {len(pool)} samples, columns {', '.join(fields)} standardised "
          f"(means {', '.join(f'{mean[f]:.3g}' for f in fields)}; stds {', '.join(f'{std[f]:.3g}' for f in fields)})")
    return fields


def write_reference_scores(truth_path: Path, kind: str, seed: int, output: Path) -> None:
    """Scores of every usable (decodable) sample: uniform noise (``random``), or clean pairs first with
    ties broken at random (``oracle``, the ceiling of a filter that knew the truth)."""
    import numpy as np
    import pandas as pd

    from flyt.atomic import atomic_path
    from flyt.errors import FlytError

    try:
        truth = pd.read_parquet(truth_path, columns=["uid", "kind", "clean"])
    except (OSError, ValueError, KeyError) as exc:
        raise FlytError(f"--truth {truth_path}: expected the parquet `data` writes (uid, kind, clean): {exc}") from None
    usable = truth[truth.kind != "broken"]
    noise = np.random.default_rng([seed, KINDS.index(kind)]).random(len(usable))  # one stream per kind
    score = noise if kind == "random" else usable.clean.to_numpy(dtype=np.float64) + noise / 2
    with atomic_path(output) as tmp:
        usable[["uid"]].assign(score=score).to_parquet(tmp)
    print(f"wrote {output}: {kind} scores of {len(usable)} usable samples")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flyt.demo.steps", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="step", required=True, metavar="STEP")
    data = sub.add_parser("data", help="the digit pool, its ground truth and the digits task")
    data.add_argument("--output", type=Path, required=True, help="folder for pool/, tasks/ and truth.parquet")
    data.add_argument("--pool_size", type=int, required=True, help="decodable samples in the pool")
    data.add_argument("--shards", type=int, required=True, help="WebDataset shards of the pool")
    data.add_argument("--broken", type=int, default=5, help="undecodable samples on top (default 5)")
    data.add_argument("--seed", type=int, default=0, help="seed of the pool and the task (default 0)")
    inputs = sub.add_parser("standardise", help="M-FLYT's inputs: a flyt features folder's columns standardised over the pool")
    inputs.add_argument("--features", type=Path, required=True, help="a flyt features --output folder")
    inputs.add_argument("--output", type=Path, required=True, help="folder for the standardised <shard>_scores.parquet")
    scores = sub.add_parser("scores", help="score file of a reference filter that reads the ground truth")
    scores.add_argument("--truth", type=Path, required=True, help="truth.parquet written by `data`")
    scores.add_argument("--kind", choices=KINDS, required=True, help="random, or clean pairs first")
    scores.add_argument("--seed", type=int, default=0, help="seed of the random scores and tie-breaks (default 0)")
    scores.add_argument("--output", type=Path, required=True, help="parquet of uid, score")
    return parser


def main(argv: list[str] | None = None) -> int:
    from flyt.errors import FlytError

    args = build_parser().parse_args(argv)
    try:
        if args.step == "data":
            write_data(args.output, args.pool_size, args.shards, args.seed, args.broken)
        elif args.step == "standardise":
            standardise(args.features, args.output)
        else:
            write_reference_scores(args.truth, args.kind, args.seed, args.output)
    except FlytError as exc:
        print(f"python -m flyt.demo.steps {args.step}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
