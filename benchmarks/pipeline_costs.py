"""Per-sample time and peak memory of every pipeline stage as flyt runs it, projected to DataComp sizes.

    python benchmarks/pipeline_costs.py                        # ~10 min on 2 cores
    python benchmarks/pipeline_costs.py --images 500 --rows 200000 --vit_images 0   # quick, flyt-tiny only

Each stage is the real command (``python -m flyt.cli ...``) in its own process, so its wall time and peak
RSS are those a user sees: ``flyt features`` (one teacher, clip_score + neg_clip_loss), ``flyt train``
(FLYT and M-FLYT), ``flyt score`` (M-FLYT from parquet, FLYT from images), ``flyt sample`` (SCS and top-k,
in memory) and ``flyt reshard``, on generated data (``flyt.demo.toydata``, and benchmarks/scoring.py's
parquet pool) with ``flyt-tiny``; the image stages again with ``ViT-B-32`` (random weights, no download)
on ``--vit_images`` images of ``--vit_image_size`` px for a CPU per-image cost of a real architecture.
"work" is the command's own timer where it has one (no start-up; train: its logged samples/s after two
steps), else the wall time, start-up included (sample, reshard: an upper bound).

The projection multiplies a stage's per-sample cost by the samples it handles at DataComp medium
(128M pool) and xlarge (12.8B), divided over N machines like this one; GPU throughput is not measured here:
the formula printed under the table is the one to fill in with a GPU's samples/s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

SIZES = {"medium": 128_000_000, "xlarge": 12_800_000_000}
# flyt train's work does not grow with the pool: the paper's recipe, 5000 steps of 4096 upstream samples
TRAIN_SAMPLES = 5000 * 4096


def run_stage(argv: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB, the largest process of the command's tree) of ``python -m flyt.cli
    ARGV``; fails loudly. The peak comes from GNU time: a child forked from this process would start with
    this process's own high-water mark, which grows with the generated data."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        started = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rss.name, sys.executable, "-m", "flyt.cli", *argv],
                              env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            raise SystemExit(f"flyt {' '.join(argv)} exited with {proc.returncode}:\n{proc.stdout[-2000:]}")
        return wall, int(rss.read().split()[-1]) / 1024


def _train_rate(run_dir: Path) -> float:
    """Steady upstream samples/s of a ``flyt train`` run: median of its logged steps after the first two."""
    rates = sorted(json.loads(line)["samples_per_s"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                   if "samples_per_s" in line)[2:] or [float("nan")]
    return rates[len(rates) // 2]


class Table:
    """The measured rows, printed as they come (a slow stage shows what was done before it)."""

    def __init__(self):
        self.rows = []
        self.bytes_per_sample = float("nan")  # of the resharded pool, for the reshard projection's caveat

    def add(self, stage: str, what: str, samples: int, wall: float, rss: float, work: float | None = None,
            projected_on: str = "pool") -> None:
        work = wall if work is None else work
        self.rows.append(dict(stage=stage, what=what, samples=samples, wall=wall, work=work, rss=rss,
                              per_sample=work / samples, on=projected_on))
        print(f"  {stage:<26}{what:<48}{samples:>10,}{wall:>8.1f}{work:>8.1f}{1e3 * work / samples:>11.4f}{rss:>8.0f}",
              flush=True)


def _vit_scorer(path: Path) -> None:
    """A FLYT checkpoint in the original's layout on a random ViT-B-32 (``flyt score --model ViT-B-32``)."""
    import torch

    from flyt.models.networks import ScoringModel, create_clip

    torch.manual_seed(0)
    torch.save({"state_dict": ScoringModel(create_clip("ViT-B-32")[0], 1, 1.0).state_dict()}, path)


def measure(args, root: Path) -> Table:
    import numpy as np
    import torch

    from flyt.demo import toydata
    from scoring import write_score_pool

    table = Table()
    print(f"  {'stage':<26}{'what':<48}{'samples':>10}{'wall s':>8}{'work s':>8}{'ms/sample':>11}{'RSS MiB':>8}")
    pool, task = root / "pool", root / "tasks" / "digits"
    frame = toydata.write_pool(pool, args.images, n_shards=args.shards, seed=0, image_size=args.image_size)
    toydata.write_task(root / "tasks", layout="simple")
    n_pool = args.images
    fields = ["f0", "f1", "f2"]
    scores = root / "scores"
    toydata.write_score_parquets(frame, scores, columns=fields)

    out = root / "features"
    wall, rss = run_stage(["features", "--upstream_data_dir", str(pool), "--output", str(out), "--teacher", "flyt-tiny",
                           "--scores", "clip_score", "neg_clip_loss", "--workers", "1", "--device", "cpu"])
    summary = json.loads((out / "_summary.json").read_text())
    table.add("features", "flyt-tiny, clip_score + neg_clip_loss", summary["samples"], wall, rss, summary["seconds"])

    base = ["train", "--upstream_data_dir", str(pool), "--downstream_task_names", str(task), "--model", "flyt-tiny",
            "--upstream_batch_size", str(args.batch), "--downstream_batch_size", str(args.batch // 2),
            "--n_iterations", str(args.steps), "--warmup", "1", "--workers", "1", "--log_every_n_steps", "1",
            "--output_dir", str(root / "runs")]
    for mode, extra in (("flyt", ["--cos_sim_init"]), ("mflyt", ["--parquet_dir", str(scores), "--parquet_fields", *fields])):
        wall, rss = run_stage([*base, "--exp_name", mode, *extra])
        rate = _train_rate(root / "runs" / mode)
        samples = args.steps * args.batch
        table.add(f"train ({'FLYT' if mode == 'flyt' else 'M-FLYT'})", f"flyt-tiny, batch {args.batch}/{args.batch // 2}",
                  samples, wall, rss, samples / rate, projected_on="train")

    ckpt = root / "runs" / "flyt" / "checkpoints" / "scoring_epoch_latest.pt"
    wall, rss = run_stage(["score", "--checkpoint", str(ckpt), "--upstream_data_dir", str(pool), "--output",
                           str(root / "flyt_scores"), "--workers", "1", "--device", "cpu"])
    summary = json.loads((root / "flyt_scores" / "_summary.json").read_text())
    table.add("score (FLYT)", "flyt-tiny, from images", n_pool, wall, rss, summary["scoring_seconds"])

    big = root / "big"
    big_fields = [f"score_{i}" for i in range(args.fields)]
    write_score_pool(big, args.rows, args.row_shards, big_fields)
    mixer = root / "mixer.pt"
    torch.manual_seed(0)
    torch.save({"layers.0.weight": torch.randn(1, args.fields), "layers.0.bias": torch.randn(1)}, mixer)
    wall, rss = run_stage(["score", "--checkpoint", str(mixer), "--upstream_data_dir", str(big / "pool"),
                           "--parquet_dir", str(big / "scores_shuffled"), "--parquet_fields", *big_fields,
                           "--output", str(root / "mflyt_scores")])
    summary = json.loads((root / "mflyt_scores" / "_summary.json").read_text())
    table.add("score (M-FLYT)", f"{args.fields} inputs, parquet join (shuffled rows)", args.rows, wall, rss,
              summary["scoring_seconds"])

    for method, extra in (("scs", ["--total_size", str(args.rows), "--repetition_penalty", "0.15", "--seed", "0"]),
                          ("topk", ["--fraction", "0.3"])):
        subset = root / f"{method}.npy"
        wall, rss = run_stage(["sample", "--scores", str(root / "mflyt_scores"), "--method", method, *extra,
                               "--output", str(subset), "--counts_output", str(root / f"{method}_counts.parquet")])
        table.add(f"sample ({method}, in memory)", "whole command: read, sample, npy, counts, plot", args.rows, wall, rss)

    subset = root / "pool_subset.npy"
    run_stage(["sample", "--scores", str(root / "flyt_scores"), "--method", "scs", "--total_size", str(n_pool),
               "--repetition_penalty", "0.15", "--seed", "0", "--output", str(subset)])
    pool_bytes = sum(p.stat().st_size for p in pool.glob("*.tar"))
    wall, rss = run_stage(["reshard", "--upstream_data_dir", str(pool), "--subset", str(subset), "--output",
                           str(root / "resharded"), "--shard_size", "500", "--workers", "2"])
    rows = len(np.load(subset))
    table.add("reshard", f"{pool_bytes / n_pool / 1024:.1f} KiB/sample, {pool_bytes / wall / 2**20:.1f} MiB/s read",
              rows, wall, rss)
    table.bytes_per_sample = pool_bytes / n_pool

    if args.vit_images:
        vpool = root / "vit_pool"
        toydata.write_pool(vpool, args.vit_images, n_shards=2, seed=1, image_size=args.vit_image_size)
        out = root / "vit_features"
        wall, rss = run_stage(["features", "--upstream_data_dir", str(vpool), "--output", str(out), "--teacher",
                               "ViT-B-32", "--scores", "clip_score", "neg_clip_loss", "--workers", "1",
                               "--batch_size", "64", "--device", "cpu"])
        summary = json.loads((out / "_summary.json").read_text())
        table.add("features", f"ViT-B-32, {args.vit_image_size}px jpgs", summary["samples"], wall, rss, summary["seconds"])
        _vit_scorer(root / "vit_flyt.pt")
        wall, rss = run_stage(["score", "--checkpoint", str(root / "vit_flyt.pt"), "--model", "ViT-B-32",
                               "--upstream_data_dir", str(vpool), "--output", str(root / "vit_scores"),
                               "--workers", "1", "--batch_size", "64", "--device", "cpu"])
        summary = json.loads((root / "vit_scores" / "_summary.json").read_text())
        table.add("score (FLYT)", f"ViT-B-32, {args.vit_image_size}px jpgs", args.vit_images, wall, rss,
                  summary["scoring_seconds"])
    if args.vit_step:
        from step_cost import run_variant

        up = args.vit_step
        started = time.perf_counter()
        step = run_variant("flyt", "ViT-B-32", up, up // 2, 10, 2, "cpu", "fp32")
        table.add("train (FLYT)", f"ViT-B-32, one step, batch {up}/{up // 2} (step_cost.py)", up,
                  time.perf_counter() - started, step["peak_mib"], step["median_s"], projected_on="train")
    return table


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:,.1f} h" if seconds >= 360 else f"{seconds:,.0f} s"


def project(table: Table, nodes: int) -> None:
    print(f"\nProjected on machines like this one (2 CPU cores; per-sample work above x samples; {nodes} nodes = /{nodes}):")
    print(f"  {'stage':<26}{'what':<48}" + "".join(f"{f'{k}, 1 node':>17}{f'{k}, {nodes} nodes':>17}" for k in SIZES))
    for row in table.rows:
        cells = ""
        for size in SIZES.values():
            n = TRAIN_SAMPLES if row["on"] == "train" else size
            cells += f"{_hours(row['per_sample'] * n):>17}{_hours(row['per_sample'] * n / nodes):>17}"
        print(f"  {row['stage']:<26}{row['what'][:47]:<48}{cells}")
    print(f"""
Assumptions: train handles {TRAIN_SAMPLES:,} upstream samples (5000 steps of 4096) at any pool size; every other
stage handles the whole pool once; stages over shards split perfectly across nodes (no shared-file-system limit);
reshard here reads {table.bytes_per_sample / 1024:.1f} KiB per sample, a DataComp sample ~35 KB (medium: 4.5 TB of tars
for 128M): scale its time by the bytes. Memory: every stage but in-memory sampling holds one shard or batch at a time, so its
peak RSS does not grow with the pool; in-memory sampling grows with the rows (see the sample row's RSS / rows).
GPU: not measured here. time = samples / (r x GPUs per node x nodes), r = one GPU's samples/s for the stage
(e.g. features/score: images/s of the teacher's forward with enough --workers to keep it fed; train: upstream
batch / step seconds).""")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="toydata pool for the flyt-tiny image stages")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--rows", type=int, default=2_000_000, help="M-FLYT score pool and sampling rows")
    parser.add_argument("--row_shards", type=int, default=10)
    parser.add_argument("--fields", type=int, default=6, help="M-FLYT input scores")
    parser.add_argument("--batch", type=int, default=64, help="flyt train upstream batch (downstream: half)")
    parser.add_argument("--steps", type=int, default=20, help="flyt train steps per mode")
    parser.add_argument("--vit_images", type=int, default=300, help="ViT-B-32 features and score images (0: skip)")
    parser.add_argument("--vit_image_size", type=int, default=256)
    parser.add_argument("--vit_step", type=int, default=16,
                        help="ViT-B-32 FLYT step's upstream batch (0: skip; 32 took 434 s of a 15-min run under load)")
    parser.add_argument("--nodes", type=int, default=32, help="N of the projection's N-node column")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="flyt-bench-pipeline-"))
    try:
        table = measure(args, root)
        project(table, args.nodes)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
