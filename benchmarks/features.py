"""How fast ``flyt features`` computes input scores, measured in one run.

    python benchmarks/features.py                          # 2000 toydata images, flyt-tiny teachers
    python benchmarks/features.py --images 500 --workers 0 # quick
    python benchmarks/features.py --model ViT-B-32 --images 20000 --image_size 256 --workers 8   # on a GPU

Prints images/s of the run (the summary's seconds: setup, decoding, forwards, scores and writes) for
(1) one teacher, (2) two teachers in one pass (goal: <= 1.6x the time of one), and (3) the same scores
from the embedding cache that run (1) saved (goal: >= 100x faster than from images), for
``--scores`` (default clip_score and neg_clip_loss). Teachers have random weights (no download).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flyt.cli import main as flyt_main  # noqa: E402


def _run(argv: list[str], out: Path) -> dict:
    if flyt_main(argv) != 0:
        raise SystemExit(f"flyt {' '.join(argv)} failed")
    return json.loads((out / "_summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--image_size", type=int, default=64, help="side of the generated jpgs")
    parser.add_argument("--model", default="flyt-tiny")
    parser.add_argument("--scores", nargs="+", default=["clip_score", "neg_clip_loss"])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (on a shared CPU, more spin)")
    parser.add_argument("--keep", default=None, help="work in this folder and keep it (default: a temporary one)")
    args = parser.parse_args()

    import torch

    from flyt.demo import toydata
    from flyt.models.networks import create_clip

    torch.set_num_threads(args.threads)
    root = Path(args.keep or tempfile.mkdtemp(prefix="flyt-bench-features-"))
    try:
        toydata.write_pool(root / "pool", args.images, n_shards=args.shards, seed=0, image_size=args.image_size)
        teachers = []
        for j in range(2):
            torch.manual_seed(j)
            torch.save({"state_dict": create_clip(args.model)[0].state_dict()}, root / f"t{j}.pt")
            teachers += ["--teacher", f"t{j}={args.model}:{root / f't{j}.pt'}"]
        common = ["features", "--upstream_data_dir", str(root / "pool"), "--scores", *args.scores,
                  "--workers", str(args.workers), "--batch_size", str(args.batch_size),
                  *(["--device", args.device] if args.device else [])]
        runs = {"one teacher": ([*teachers[:2], "--save_embeddings"], root / "one"),
                "two teachers, one pass": (teachers, root / "two"),
                "one teacher, from the cache": ([*teachers[:2], "--from_embeddings", str(root / "one")], root / "cache")}
        seconds = {}
        for name, (extra, out) in runs.items():
            summary = _run([*common, "--output", str(out), *extra], out)
            seconds[name] = summary["seconds"]
            print(f"{name}: {summary['samples']} samples in {summary['seconds']:.2f} s "
                  f"= {summary['samples'] / summary['seconds']:.0f} images/s", flush=True)
        print(f"two teachers / one: {seconds['two teachers, one pass'] / seconds['one teacher']:.2f}x (goal <= 1.6x); "
              f"images / cache: {seconds['one teacher'] / seconds['one teacher, from the cache']:.0f}x (goal >= 100x)")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
