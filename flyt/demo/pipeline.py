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
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

CORRUPTION = {"wrong_caption": 0.25, "unrelated_caption": 0.15, "noise_image": 0.1, "near_duplicate": 0.1}
KEEP = 0.4  # share of the usable pool each filtered subset holds as distinct examples


@dataclass(frozen=True)
class Plan:
    """Sizes of one demo run. The base needs ~350 steps of batch 128 to leave the tiny CLIP's initial
    plateau on this pool; the yardstick CLIPs are short, so a cleaner subset shows as a faster start."""

    pool: int
    shards: int
    pretrain_steps: int
    flyt_steps: int
    clip_steps: int
    seeds: int
    oracle_seeds: int
    batch: int = 128


PLANS = {"full": Plan(3000, 6, 500, 100, 100, 3, 1), "quick": Plan(1200, 3, 150, 20, 40, 1, 1)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output_dir", required=True, help="where data, runs and the report go")
    parser.add_argument("--quick", action="store_true", help="a smaller run (under 3 minutes)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and of every step")
    parser.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)),
                        help="independent steps run side by side, each on cpu_count/jobs threads (default: cores, at most 4)")


class Pipeline:
    """Runs subcommands, recording each command line for the report.

    ``__call__`` runs one step in this process. ``parallel`` runs independent steps in ``jobs`` spawned
    lanes, each pinned to its share of the cores (``cpu_count // jobs`` threads; one each on 2 cores): two
    one-thread trainings of a tiny model finish far sooner than the same two one after the other on all
    cores, and unpinned lanes' threads contend. A lane's console output goes to a log
    file per step, and a failed step names its log.
    """

    def __init__(self, root: Path, jobs: int):
        self.root, self.jobs, self.commands = root, jobs, []

    def _record(self, argv) -> list[str]:
        argv = [str(a) for a in argv]
        self.commands.append("flyt " + shlex.join(argv))
        return argv

    def __call__(self, *argv) -> None:
        from flyt.cli import main
        from flyt.errors import FlytError

        argv = self._record(argv)
        if main(argv) != 0:
            raise FlytError(f"demo step failed: flyt {shlex.join(argv)}")

    def parallel(self, tasks: dict[str, list[list]], desc: str) -> None:
        """Run each named task (a list of commands, in order) in a lane; the tasks are independent."""
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        from flyt import progress
        from flyt.errors import FlytError

        logs = self.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        tasks = {name: [self._record(argv) for argv in steps] for name, steps in tasks.items()}
        threads = max(1, (os.cpu_count() or 1) // self.jobs)
        with ProcessPoolExecutor(min(self.jobs, len(tasks)), multiprocessing.get_context("spawn"),
                                 initializer=_start_lane, initargs=(threads,)) as pool:
            futures = {pool.submit(_run_lane, steps, str(logs / f"{name}.log")): name for name, steps in tasks.items()}
            for future in progress.bar(as_completed(futures), total=len(futures), desc=f"flyt demo: {desc}", unit="run"):
                failed = future.result()
                if failed is not None:
                    raise FlytError(f"demo step failed: flyt {shlex.join(failed)} (log: {logs / futures[future]}.log)")


def _start_lane(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _run_lane(steps: list[list[str]], log: str) -> list[str] | None:
    """Run commands in order with their output in ``log``; returns the first failing one, if any."""
    import contextlib

    from flyt.cli import main

    with open(log, "w") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        for argv in steps:
            print("$ flyt " + shlex.join(argv), flush=True)
            if main(argv) != 0:
                return argv
    return None


def scoring_checkpoint(run_dir: Path) -> Path:
    """The scoring model of the best validation gain (``--keep_best``) if one was kept, else the last."""
    best = run_dir / "checkpoints" / "scoring_best.pt"
    return best if best.is_file() else run_dir / "checkpoints" / "scoring_epoch_latest.pt"


def _pool_statistics(pool_dir: Path, out_dir: Path, base_ckpt: Path, model: str) -> list[str]:
    """M-FLYT input scores: the base CLIP's image-text cosine similarity and two cheap statistics.

    Each column is standardised over the pool (zero mean, unit variance), as one would prepare scores of
    different ranges for a linear mixer; otherwise the widest-ranged column dominates the initial mix.
    """
    import numpy as np
    import pandas as pd
    import torch
    from collections import Counter

    from flyt.atomic import atomic_path
    from flyt.data.samples import decode_pair
    from flyt.data.shards import list_shards
    from flyt.data.webdataset import tar_samples
    from flyt.models.networks import create_clip

    clip, _, preprocess, tokenizer = create_clip(model, str(base_ckpt))
    clip.eval()
    frames = {}
    for shard in list_shards(pool_dir, "pool"):
        rows, skipped = [], Counter()
        for raw in tar_samples([shard]):
            sample = decode_pair(raw, skipped)
            if sample is not None:
                rows.append(sample)
        with torch.no_grad():
            img = clip.encode_image(torch.stack([preprocess(r["image"]) for r in rows]), normalize=True)
            txt = clip.encode_text(tokenizer([r["text"] for r in rows]), normalize=True)
        frames[Path(shard).stem] = pd.DataFrame({
            "key": [r["key"] for r in rows], "uid": [r["uid"] for r in rows],
            "clip_score": (img * txt).sum(-1).numpy().astype("float64"),
            "image_std": [float(np.asarray(r["image"], dtype=np.float64).std()) for r in rows],
            "caption_length": [float(len(r["text"])) for r in rows]})
    fields = ["clip_score", "image_std", "caption_length"]
    pool = pd.concat(frames.values())
    mean, std = pool[fields].mean(), pool[fields].std()
    out_dir.mkdir(parents=True, exist_ok=True)
    for stem, frame in frames.items():
        frame[fields] = (frame[fields] - mean) / std
        with atomic_path(out_dir / f"{stem}_scores.parquet") as tmp:
            frame.to_parquet(tmp)
    return fields


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import pandas as pd

    from flyt.demo import toydata
    from flyt.demo.report import write_report
    from flyt.errors import FlytError

    if args.jobs < 1 or args.seed < 0:  # before any work: both are only used minutes in
        raise FlytError(f"--jobs must be >= 1 and --seed >= 0 (got {args.jobs}, {args.seed})")
    plan = PLANS["quick" if args.quick else "full"]
    root = Path(args.output_dir)
    data, runs = root / "data", root / "runs"
    start = time.time()
    step = Pipeline(root, args.jobs)
    model, seed = "flyt-tiny", args.seed

    print(f"flyt demo: building a pool of {plan.pool} digit image-caption pairs ({1 - sum(CORRUPTION.values()):.0%} clean)")
    truth = toydata.write_pool(data / "pool", plan.pool, plan.shards, seed, corruption=CORRUPTION, n_broken=5)
    task = toydata.write_task(data / "tasks", name="wds_digits_test", seed=seed, layout="simple")  # clip_benchmark's name
    truth.to_parquet(data / "truth.parquet")

    # 1. the base CLIP, pretrained on the raw pool: reference and scoring base of FLYT. One process decodes
    # while this one computes on the remaining cores (on 2 cores, 2 compute threads and a decoder contend).
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
    step("train-clip", "--upstream_data_dir", data / "pool", "--model", model, "--output_dir", runs, "--exp_name", "base",
         "--steps", plan.pretrain_steps, "--batch_size", plan.batch, "--lr", "2e-3", "--warmup", 20, "--seed", seed,
         "--workers", 1)
    torch.set_num_threads(threads)
    base = runs / "base" / "checkpoints" / "epoch_latest.pt"

    # 2. M-FLYT input scores, from the base and from the raw data
    fields = _pool_statistics(data / "pool", data / "scores", base, model)

    # 3. train M-FLYT and FLYT against the digits task's training split (side by side)
    common = ["--upstream_data_dir", data / "pool", "--downstream_task_names", task.eval_dir, "--model", model,
              "--reference_pretrained", base, "--update_reference_model", "--downstream_logit_scale", "2.65926",
              "--upstream_batch_size", 128, "--downstream_batch_size", 64, "--n_iterations", plan.flyt_steps,
              "--warmup", 5, "--reference_learning_rate", "1e-4", "--workers", 0, "--seed", seed,
              "--output_dir", runs, "--log_every_n_steps", 10,
              # held out: a fifth of the task's training split, two batches every 10 steps (~10% more time)
              "--val_every", 10, "--val_batches", 2, "--val_fraction", 0.2, "--keep_best"]
    # FLYT: flyt train's default scoring rate, 1e-3 * sqrt(128 / 4096). M-FLYT's mixer is 4 numbers (3 weights
    # and a bias) on standardised inputs, starting at 0; AdamW moves each by at most ~lr per step, so for
    # weights of order 1 (a score spread SCS can act on) within ~100 steps a user passes lr ~ 1e-2.
    step.parallel({
        "train_mflyt": [["train", *common, "--exp_name", "mflyt", "--parquet_dir", data / "scores",
                         "--parquet_fields", *fields, "--scoring_learning_rate", "1e-2"]],
        "train_flyt": [["train", *common, "--exp_name", "flyt", "--scoring_pretrained", base, "--cos_sim_init"]]},
        "training M-FLYT and FLYT")

    # 4. score the pool with both, from the best validation step's checkpoint when there is one
    step.parallel({f"score_{name}": [["score", "--checkpoint", scoring_checkpoint(runs / name),
                                      "--upstream_data_dir", data / "pool", "--output", data / f"{name}_scores.parquet",
                                      "--workers", 0, *(["--parquet_dir", data / "scores"] if name == "mflyt" else [])]]
                   for name in ("mflyt", "flyt")}, "scoring the pool")

    # 5. subsets of equal numbers of distinct examples: SCS and top-k on the learned scores, top-k on the base's
    # CLIP score, random, the whole pool, and the ceiling: what a filter that knew the truth would keep (clean first)
    usable = truth[truth.kind != "broken"]
    rng = np.random.default_rng(seed)
    inputs = pd.concat(pd.read_parquet(p) for p in sorted((data / "scores").glob("*.parquet")))
    inputs[["uid", "clip_score"]].rename(columns={"clip_score": "score"}).to_parquet(data / "clip_scores.parquet")
    usable[["uid"]].assign(score=rng.random(len(usable))).to_parquet(data / "random_scores.parquet")
    usable[["uid"]].assign(score=usable.clean.to_numpy() + rng.random(len(usable)) / 2).to_parquet(
        data / "oracle_scores.parquet")
    # equal numbers of distinct examples: top-k keeps a share KEEP of the usable pool; SCS draws as many as
    # the pool holds (DataComp's convention, with repeats) at the temperature that leaves ~KEEP of it distinct
    topk = ["--method", "topk", "--fraction", KEEP]
    scs = ["--method", "scs", "--total_size", len(usable), "--unique_fraction", KEEP]
    methods = {  # label -> (subset name, score file, sampling flags)
        "no filter": ("no_filter", "clip", ["--method", "topk", "--fraction", 1.0]),
        "random": ("random", "random", topk),
        "CLIP-score top-k": ("clip_topk", "clip", topk),
        "FLYT + SCS": ("flyt_scs", "flyt", scs),
        "M-FLYT + SCS": ("mflyt_scs", "mflyt", scs),
        "M-FLYT + top-k": ("mflyt_topk", "mflyt", topk),
        "oracle: clean first": ("oracle", "oracle", topk),
    }
    subsets = data / "subsets"
    for name, scores, flags in methods.values():
        step("sample", "--scores", data / f"{scores}_scores.parquet", *flags, "--seed", seed,
             "--output", subsets / f"{name}.npy")

    # 6. train a CLIP per subset and seed on the same budget, evaluate zero-shot on the held-out split
    runs_of = [(label, s, name, f"clip_{name}_seed{s}") for label, (name, _, _) in methods.items()
               for s in range(plan.oracle_seeds if name == "oracle" else plan.seeds)]
    step.parallel({exp: [
        ["train-clip", "--upstream_data_dir", data / "pool", "--subset", subsets / f"{name}.npy",
         "--model", model, "--output_dir", runs, "--exp_name", exp, "--steps", plan.clip_steps, "--batch_size",
         plan.batch, "--lr", "3e-3", "--warmup", 20, "--seed", seed + s, "--workers", 0],
        ["eval", "--model", model, "--pretrained", runs / exp / "checkpoints" / "epoch_latest.pt",
         "--datacomp_eval_dir", data / "tasks", "--downstream_task_names", "digits", "--output",
         runs / exp / "eval.jsonl", "--workers", 0]]
        for _, s, name, exp in runs_of}, f"training and evaluating {len(runs_of)} CLIPs")
    results = [{"method": label, "seed": s,
                "acc1": json.loads((runs / exp / "eval.jsonl").read_text().splitlines()[0])["metrics"]["acc1"]}
               for label, s, _, exp in runs_of]

    report = write_report(root, plan, truth, results, step.commands, fields, time.time() - start)
    print(f"flyt demo: done in {time.time() - start:.0f} s; report: {report}")
    return 0
