"""``flyt demo``: the whole experiment on real images that scikit-learn ships, on one CPU, offline.

A DataComp-like pool of handwritten digits with captions, a known share of it corrupted (wrong or
unrelated captions, noise images, near-duplicates); a downstream training task and a held-out eval
task. Every step is a command a user can paste, recorded in the report: the public subcommands, and
``python -m flyt.demo.steps`` for the demo's own data and score files. Pool and task -> pretrain the base
CLIP -> M-FLYT input scores -> train FLYT and M-FLYT -> score -> SCS / top-k subsets at equal distinct
counts -> one CLIP per subset and seed on equal compute -> zero-shot eval -> report, paired by seed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

from flyt.demo.steps import CLIP_SCORE, CORRUPTION, INPUT_SCORES, TASK, TEACHER

STEPS = "flyt.demo.steps"  # first word of a demo-only step: run as `python -m flyt.demo.steps ...`
KEEP = 0.4  # share of the usable pool each filtered subset holds as distinct examples


@dataclass(frozen=True)
class Plan:
    """Sizes of one demo run. The base needs ~350 steps of batch 128 to leave the tiny CLIP's initial
    plateau on this pool. The yardstick CLIPs are short, so a cleaner subset shows as a faster start; at
    equal samples seen, batch 64 takes twice the updates of batch 128 and leaves the plateau on clean pairs
    where batch 128 often does not (the probe in the README's demo section), for about 1.2 times the time
    per CLIP (side by side on 2 cores: 80 steps of batch 64 in 66 s, 40 of batch 128 in 54 s). The quick
    run keeps batch 128: its one seed gives no verdict, and it must stay fast. Every subset's CLIP trains
    once per seed (the same seeds for all): 5 seeds give paired t intervals of about 1.2 standard
    deviations of the per-seed differences."""

    pool: int
    shards: int
    pretrain_steps: int
    flyt_steps: int
    clip_steps: int
    seeds: int
    batch: int = 128  # base CLIP and FLYT training
    clip_batch: int = 64  # the yardstick CLIPs


PLANS = {"full": Plan(3000, 6, 500, 100, 200, 5), "quick": Plan(1200, 3, 150, 20, 40, 1, clip_batch=128)}


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
        self.commands.append(shell_line(argv))
        return argv

    def __call__(self, *argv) -> None:
        from flyt.errors import FlytError

        argv = self._record(argv)
        if _main(argv) != 0:
            raise FlytError(f"demo step failed: {shell_line(argv)}")

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
                    raise FlytError(f"demo step failed: {shell_line(failed)} (log: {logs / futures[future]}.log)")


def shell_line(argv: list[str]) -> str:
    """The line a user pastes for a step: a ``flyt`` subcommand, or a demo-only step of ``flyt.demo.steps``."""
    return f"python -m {STEPS} {shlex.join(argv[1:])}" if argv[0] == STEPS else f"flyt {shlex.join(argv)}"


def _main(argv: list[str]) -> int:
    if argv[0] == STEPS:
        from flyt.demo.steps import main

        return main(argv[1:])
    from flyt.cli import main

    return main(argv)


def _start_lane(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _run_lane(steps: list[list[str]], log: str) -> list[str] | None:
    """Run commands in order with their output in ``log``; returns the first failing one, if any."""
    import contextlib

    with open(log, "w") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        for argv in steps:
            print("$ " + shell_line(argv), flush=True)
            if _main(argv) != 0:
                return argv
    return None


def scoring_checkpoint(run_dir: Path) -> Path:
    """The scoring model of the best validation gain (``--keep_best``) if one was kept, else the last."""
    best = run_dir / "checkpoints" / "scoring_best.pt"
    return best if best.is_file() else run_dir / "checkpoints" / "scoring_epoch_latest.pt"


def m_flyt_inputs(step: Pipeline, data: Path, base: Path, model: str) -> list[str]:
    """M-FLYT's input columns in ``data/scores`` (one of them ``CLIP_SCORE``); returns their names. ``flyt
    features`` computes them (the base's CLIP score and negCLIPLoss, NormSim-inf to the task's training
    images, caption words) into ``data/features``; the demo's ``standardise`` step puts them on one scale."""
    import pyarrow.parquet as pq

    step("features", "--upstream_data_dir", data / "pool", "--output", data / "features",
         "--teacher", f"{TEACHER}={model}:{base}", "--scores", *INPUT_SCORES, "--target_tasks", data / "tasks" / TASK,
         "--neg_clip_batch_size", 128, "--batch_size", 128, "--workers", 0)
    step(STEPS, "standardise", "--features", data / "features", "--output", data / "scores")
    names = pq.read_schema(next((data / "scores").glob("*_scores.parquet"))).names
    return [n for n in names if n not in ("key", "uid")]


def run(args: argparse.Namespace) -> int:
    import pandas as pd

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
    step(STEPS, "data", "--output", data, "--pool_size", plan.pool, "--shards", plan.shards, "--seed", seed)
    truth = pd.read_parquet(data / "truth.parquet")

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
    fields = m_flyt_inputs(step, data, base, model)

    # 3. train M-FLYT and FLYT against the digits task's training split (side by side)
    common = ["--upstream_data_dir", data / "pool", "--downstream_task_names", data / "tasks" / TASK, "--model", model,
              "--reference_pretrained", base, "--update_reference_model", "--downstream_logit_scale", "2.65926",
              "--upstream_batch_size", 128, "--downstream_batch_size", 64, "--n_iterations", plan.flyt_steps,
              "--warmup", 5, "--reference_learning_rate", "1e-4", "--workers", 0, "--seed", seed,
              "--output_dir", runs, "--log_every_n_steps", 10,
              # held out: a fifth of the task's training split, two batches every 10 steps (~10% more time)
              "--val_every", 10, "--val_batches", 2, "--val_fraction", 0.2, "--keep_best"]
    # FLYT: flyt train's default scoring rate, 1e-3 * sqrt(128 / 4096). M-FLYT's mixer is 5 numbers (4 weights
    # and a bias) on standardised inputs, starting at 0; AdamW moves each by at most ~lr per step, so for
    # weights of order 1 (a score spread SCS can act on) within ~100 steps a user passes lr ~ 1e-2.
    step.parallel({
        "train_mflyt": [["train", *common, "--exp_name", "mflyt", "--parquet_dir", data / "scores",
                         "--parquet_fields", *fields, "--scoring_learning_rate", "1e-2"]],
        "train_flyt": [["train", *common, "--exp_name", "flyt", "--scoring_pretrained", base, "--cos_sim_init"]]},
        "training M-FLYT and FLYT")

    # 4. score the pool with both, from the best validation step's checkpoint when there is one; the score
    # files of the two reference filters that read the ground truth (random, oracle)
    step.parallel({f"score_{name}": [["score", "--checkpoint", scoring_checkpoint(runs / name),
                                      "--upstream_data_dir", data / "pool", "--output", data / f"{name}_scores.parquet",
                                      "--workers", 0, *(["--parquet_dir", data / "scores"] if name == "mflyt" else [])]]
                   for name in ("mflyt", "flyt")}, "scoring the pool")
    for kind in ("random", "oracle"):
        step(STEPS, "scores", "--truth", data / "truth.parquet", "--kind", kind, "--seed", seed,
             "--output", data / f"{kind}_scores.parquet")

    # 5. subsets: SCS and top-k on the learned scores, top-k on the base's CLIP score (a column of M-FLYT's
    # inputs), random, the whole pool, and the ceiling: what a filter that knew the truth would keep. Equal
    # numbers of distinct examples: top-k keeps a share KEEP of the usable pool; SCS draws as many as the pool
    # holds (DataComp's convention, with repeats) at the temperature that leaves ~KEEP of it distinct
    usable = truth[truth.kind != "broken"]
    topk = ["--method", "topk", "--fraction", KEEP]
    scs = ["--method", "scs", "--total_size", len(usable), "--unique_fraction", KEEP]
    clip_score = ["--scores", data / "scores", "--score_column", CLIP_SCORE]
    methods = {  # label -> (subset name, score flags, sampling flags)
        "no filter": ("no_filter", clip_score, ["--method", "topk", "--fraction", 1.0]),
        "random": ("random", ["--scores", data / "random_scores.parquet"], topk),
        "CLIP-score top-k": ("clip_topk", clip_score, topk),
        "FLYT + SCS": ("flyt_scs", ["--scores", data / "flyt_scores.parquet"], scs),
        "M-FLYT + SCS": ("mflyt_scs", ["--scores", data / "mflyt_scores.parquet"], scs),
        "M-FLYT + top-k": ("mflyt_topk", ["--scores", data / "mflyt_scores.parquet"], topk),
        "oracle: clean first": ("oracle", ["--scores", data / "oracle_scores.parquet"], topk),
    }
    subsets = data / "subsets"
    for name, scores, flags in methods.values():
        step("sample", *scores, *flags, "--seed", seed, "--output", subsets / f"{name}.npy")

    # 6. per seed, one CLIP per subset on the same budget (steps x batch: samples seen, as in DataComp), all
    # started from the same seed so that each seed is a paired comparison; zero-shot eval on the held-out split
    runs_of = [(label, s, name, f"clip_{name}_seed{s}") for s in range(plan.seeds)
               for label, (name, _, _) in methods.items()]
    step.parallel({exp: [
        ["train-clip", "--upstream_data_dir", data / "pool", "--subset", subsets / f"{name}.npy",
         "--model", model, "--output_dir", runs, "--exp_name", exp, "--steps", plan.clip_steps, "--batch_size",
         plan.clip_batch, "--lr", "3e-3", "--warmup", 20, "--seed", seed + s, "--workers", 0],
        ["eval", "--model", model, "--pretrained", runs / exp / "checkpoints" / "epoch_latest.pt",
         "--datacomp_eval_dir", data / "tasks", "--downstream_task_names", "digits", "--output",
         runs / exp / "eval.jsonl", "--workers", 0]]
        for _, s, name, exp in runs_of}, f"training and evaluating {len(runs_of)} CLIPs")
    results = [{"method": label, "subset": name, "seed": s, "run": exp,
                "acc1": json.loads((runs / exp / "eval.jsonl").read_text().splitlines()[0])["metrics"]["acc1"]}
               for label, s, name, exp in runs_of]

    report = write_report(root, plan, truth, results, step.commands, fields, time.time() - start)
    print(f"flyt demo: done in {time.time() - start:.0f} s; report: {report}")
    return 0
