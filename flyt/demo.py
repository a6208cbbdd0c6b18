"""``flyt demo``: the whole experiment on real images that scikit-learn ships, on one CPU, offline.

A DataComp-like pool of handwritten digits with captions, a known share of it corrupted (wrong or
unrelated captions, noise images, near-duplicates); a downstream training task and a held-out eval
task. The pipeline runs through the same subcommands a user would call (each step's command line is
recorded in the report): pretrain the base CLIP -> M-FLYT input scores -> train FLYT and M-FLYT -> score
-> SCS / top-k subsets -> train CLIPs on equal budgets -> zero-shot eval -> report.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

CORRUPTION = {"wrong_caption": 0.25, "unrelated_caption": 0.15, "noise_image": 0.1, "near_duplicate": 0.1}


@dataclass(frozen=True)
class Plan:
    pool: int
    shards: int
    pretrain_steps: int
    flyt_steps: int
    clip_steps: int
    seeds: int
    batch: int = 64


PLANS = {"full": Plan(3000, 6, 400, 150, 300, 3), "quick": Plan(1200, 3, 150, 40, 80, 1)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output_dir", required=True, help="where data, runs and the report go")
    parser.add_argument("--quick", action="store_true", help="a smaller run (under 3 minutes)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and of every step")


class Pipeline:
    """Runs subcommands in-process, recording each command line for the report."""

    def __init__(self, root: Path):
        self.root, self.commands = root, []

    def __call__(self, *argv) -> None:
        from flyt.cli import main
        from flyt.errors import FlytError

        argv = [str(a) for a in argv]
        self.commands.append("flyt " + shlex.join(argv))
        if main(argv) != 0:
            raise FlytError(f"demo step failed: flyt {shlex.join(argv)}")


def _pool_statistics(pool_dir: Path, out_dir: Path, base_ckpt: Path, model: str) -> None:
    """M-FLYT input scores: the base CLIP's image-text cosine similarity and two cheap statistics."""
    import numpy as np
    import pandas as pd
    import torch
    import webdataset as wds
    from collections import Counter

    from flyt.atomic import atomic_path
    from flyt.data.samples import decode_pair
    from flyt.data.shards import list_shards
    from flyt.models import create_clip

    clip, _, preprocess, tokenizer = create_clip(model, str(base_ckpt))
    clip.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    for shard in list_shards(pool_dir, "pool"):
        rows, skipped = [], Counter()
        for raw in wds.tarfile_samples([{"url": shard}]):
            sample = decode_pair(raw, skipped)
            if sample is not None:
                pixels = np.asarray(sample["image"], dtype=np.float32)
                rows.append((sample["key"], sample["uid"], sample["image"], sample["text"], float(pixels.std()),
                             float(len(sample["text"]))))
        with torch.no_grad():
            img = clip.encode_image(torch.stack([preprocess(r[2]) for r in rows]), normalize=True)
            txt = clip.encode_text(tokenizer([r[3] for r in rows]), normalize=True)
        frame = pd.DataFrame({"key": [r[0] for r in rows], "uid": [r[1] for r in rows],
                              "clip_score": (img * txt).sum(-1).numpy().astype("float64"),
                              "image_std": [r[4] / 64.0 for r in rows], "caption_length": [r[5] / 20.0 for r in rows]})
        with atomic_path(out_dir / f"{Path(shard).stem}_scores.parquet") as tmp:
            frame.to_parquet(tmp)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import pandas as pd

    from flyt import toydata
    from flyt.demo_report import write_report

    plan = PLANS["quick" if args.quick else "full"]
    root = Path(args.output_dir)
    data, runs = root / "data", root / "runs"
    start = time.time()
    step = Pipeline(root)
    model, seed = "flyt-tiny", args.seed

    print(f"flyt demo: building a pool of {plan.pool} digit image-caption pairs ({1 - sum(CORRUPTION.values()):.0%} clean)")
    truth = toydata.write_pool(data / "pool", plan.pool, plan.shards, seed, corruption=CORRUPTION, n_broken=5)
    task = toydata.write_task(data / "tasks", name="digits", seed=seed, layout="simple")
    truth.to_parquet(data / "truth.parquet")

    # 1. the base CLIP, pretrained on the raw pool: reference and scoring base of FLYT
    step("train-clip", "--upstream_data_dir", data / "pool", "--model", model, "--output_dir", runs, "--exp_name", "base",
         "--steps", plan.pretrain_steps, "--batch_size", plan.batch, "--lr", "2e-3", "--warmup", 20, "--seed", seed,
         "--workers", 1)
    base = runs / "base" / "checkpoints" / "epoch_latest.pt"

    # 2. M-FLYT input scores, from the base and from the raw data
    _pool_statistics(data / "pool", data / "scores", base, model)
    fields = ["clip_score", "image_std", "caption_length"]

    # 3. train M-FLYT and FLYT against the digits task's training split
    common = ["--upstream_data_dir", data / "pool", "--downstream_task_names", task.eval_dir, "--model", model,
              "--reference_pretrained", base, "--update_reference_model", "--downstream_logit_scale", "2.65926",
              "--upstream_batch_size", 128, "--downstream_batch_size", 64, "--n_iterations", plan.flyt_steps,
              "--warmup", 5, "--reference_learning_rate", "1e-4", "--workers", 1, "--seed", seed,
              "--output_dir", runs, "--log_every_n_steps", 10]
    step("train", *common, "--exp_name", "mflyt", "--parquet_dir", data / "scores", "--parquet_fields", *fields,
         "--scoring_learning_rate", "1e-2")
    step("train", *common, "--exp_name", "flyt", "--scoring_pretrained", base, "--cos_sim_init",
         "--scoring_learning_rate", "1e-3")

    # 4. score the pool with both
    for name in ("mflyt", "flyt"):
        extra = ["--parquet_dir", data / "scores"] if name == "mflyt" else []
        step("score", "--checkpoint", runs / name / "checkpoints" / "scoring_epoch_latest.pt",
             "--upstream_data_dir", data / "pool", *extra, "--output", data / f"{name}_scores.parquet", "--workers", 0)

    # 5. subsets of equal size: SCS on FLYT / M-FLYT, top-k on the CLIP score, random, and no filter
    usable = truth[truth.kind != "broken"]
    size = int(0.4 * len(usable))
    subsets = data / "subsets"
    clip_scores = pd.concat(pd.read_parquet(p) for p in sorted((data / "scores").glob("*.parquet")))
    clip_scores[["uid", "clip_score"]].rename(columns={"clip_score": "score"}).to_parquet(data / "clip_scores.parquet")
    step("sample", "--scores", data / "clip_scores.parquet", "--method", "topk", "--total_size", size, "--seed", seed,
         "--output", subsets / "clip_topk.npy")
    for name in ("mflyt", "flyt"):
        step("sample", "--scores", data / f"{name}_scores.parquet", "--method", "scs", "--total_size", size,
             "--repetition_penalty", "0.15", "--seed", seed, "--output", subsets / f"{name}_scs.npy",
             "--counts_output", subsets / f"{name}_scs_counts.parquet")
    random_scores = clip_scores[["uid"]].assign(score=np.random.default_rng(seed).random(len(clip_scores)))
    random_scores.to_parquet(data / "random_scores.parquet")
    step("sample", "--scores", data / "random_scores.parquet", "--method", "topk", "--total_size", size,
         "--seed", seed, "--output", subsets / "random.npy")
    step("sample", "--scores", data / "clip_scores.parquet", "--method", "topk", "--fraction", 1.0, "--seed", seed,
         "--output", subsets / "no_filter.npy")
    methods = {"no filter": "no_filter", "random": "random", "CLIP-score top-k": "clip_topk",
               "FLYT + SCS": "flyt_scs", "M-FLYT + SCS": "mflyt_scs"}

    # 6. train a CLIP per subset and seed on the same budget, evaluate zero-shot on the held-out split
    results = []
    for label, name in methods.items():
        for s in range(plan.seeds):
            exp = f"clip_{name}_seed{s}"
            step("train-clip", "--upstream_data_dir", data / "pool", "--subset", subsets / f"{name}.npy", "--model",
                 model, "--output_dir", runs, "--exp_name", exp, "--steps", plan.clip_steps, "--batch_size",
                 plan.batch, "--lr", "2e-3", "--warmup", 20, "--seed", seed + s, "--workers", 1)
            out = runs / exp / "eval.jsonl"
            step("eval", "--model", model, "--checkpoint", runs / exp / "checkpoints" / "epoch_latest.pt",
                 "--eval_dir", data / "tasks", "--tasks", task.eval_dir, "--output", out, "--workers", 0)
            acc = json.loads(out.read_text().splitlines()[0])["metrics"]["acc1"]
            results.append({"method": label, "seed": s, "acc1": acc})

    report = write_report(root, plan, truth, results, step.commands, fields, time.time() - start)
    print(f"flyt demo: done in {time.time() - start:.0f} s; report: {report}")
    return 0
