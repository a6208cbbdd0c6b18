"""The demo's own steps as commands a user can paste: ``python -m flyt.demo.steps {data,inputs,scores} ...``.

Everything else ``flyt demo`` runs is a public ``flyt`` subcommand; these three make the rest of its
pipeline reproducible from a shell too: the digit pool with its ground truth and the task
(``data``), M-FLYT's input columns (``inputs``) and the score files of the two reference filters that
need the ground truth (``scores``: random and the oracle).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

CORRUPTION = {"wrong_caption": 0.25, "unrelated_caption": 0.15, "noise_image": 0.1, "near_duplicate": 0.1}
TASK = "wds_digits_test"  # clip_benchmark's folder name for a task called "digits"
INPUT_FIELDS = ("clip_score", "image_std", "caption_length")
CLIP_SCORE = "clip_score"  # the input column holding the base's CLIP score: the CLIP-score top-k baseline
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


def _pool_statistics(pool_dir: Path, out_dir: Path, base_ckpt: Path, model: str) -> list[str]:
    """M-FLYT input scores: the base CLIP's image-text cosine similarity and two cheap statistics.

    Each column is standardised over the pool (zero mean, unit variance), as one would prepare scores of
    different ranges for a linear mixer; otherwise the widest-ranged column dominates the initial mix.
    """
    from flyt.data.shards import list_shards
    from flyt.errors import FlytError

    shards = list_shards(pool_dir, "--upstream_data_dir")  # both checks before torch loads
    if not base_ckpt.is_file():
        raise FlytError(f"--base {base_ckpt}: no such checkpoint file")

    import numpy as np
    import pandas as pd
    import torch
    import webdataset as wds
    from collections import Counter

    from flyt.atomic import atomic_path
    from flyt.data.samples import decode_pair
    from flyt.models.networks import create_clip
    clip, _, preprocess, tokenizer = create_clip(model, str(base_ckpt))
    clip.eval()
    frames, skipped = {}, Counter()
    for shard in shards:
        rows = [s for s in (decode_pair(raw, skipped) for raw in wds.tarfile_samples([{"url": shard}])) if s is not None]
        if not rows:
            continue
        with torch.no_grad():
            img = clip.encode_image(torch.stack([preprocess(r["image"]) for r in rows]), normalize=True)
            txt = clip.encode_text(tokenizer([r["text"] for r in rows]), normalize=True)
        frames[Path(shard).stem] = pd.DataFrame({
            "key": [r["key"] for r in rows], "uid": [r["uid"] for r in rows],
            "clip_score": (img * txt).sum(-1).numpy().astype("float64"),
            "image_std": [float(np.asarray(r["image"], dtype=np.float64).std()) for r in rows],
            "caption_length": [float(len(r["text"])) for r in rows]})
    if not frames:
        raise FlytError(f"--upstream_data_dir {pool_dir}: no decodable sample")
    fields = list(INPUT_FIELDS)
    pool = pd.concat(frames.values())
    mean, std = pool[fields].mean(), pool[fields].std()
    for stem, frame in frames.items():
        frame[fields] = (frame[fields] - mean) / std
        with atomic_path(out_dir / f"{stem}_scores.parquet") as tmp:
            frame.to_parquet(tmp)
    print(f"wrote {len(frames)} score files to {out_dir}: {len(pool)} samples, columns {', '.join(fields)} "
          f"(standardised); skipped {sum(skipped.values())} undecodable {dict(skipped)}")
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
    inputs = sub.add_parser("inputs", help="M-FLYT's input columns: the base CLIP's score, image std, caption length")
    inputs.add_argument("--upstream_data_dir", type=Path, required=True, help="the pool's shards")
    inputs.add_argument("--base", type=Path, required=True, help="checkpoint of the base CLIP (flyt train-clip)")
    inputs.add_argument("--model", default="flyt-tiny", help="the base's architecture (default flyt-tiny)")
    inputs.add_argument("--output", type=Path, required=True, help="folder for <shard>_scores.parquet")
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
        elif args.step == "inputs":
            _pool_statistics(args.upstream_data_dir, args.output, args.base, args.model)
        else:
            write_reference_scores(args.truth, args.kind, args.seed, args.output)
    except FlytError as exc:
        print(f"python -m flyt.demo.steps {args.step}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
