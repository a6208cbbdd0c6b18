"""``flyt score``: run a trained scoring model over a whole pool, one score per uid (docs/formats.md).

Every sample of the pool is read exactly once (no resampling). A uid held several times (the repeats
of a resharded subset) is written once, by the first shard in sorted order that holds it; the other
copies count as skipped ``repeated_uid``, so ``flyt sample`` takes the output as it is.

The output is a folder with one parquet
file per pool shard (columns ``uid``, ``score`` float32, ``key``), named after the shard, so the scores
of a huge pool stay shardable; ``--output x.parquet`` merges them into one file at the end (the parts
live in the hidden folder ``.x.parquet.parts`` beside it).

Two paths:

* **M-FLYT** (a mixing model over input scores) needs no images. Per pool shard the sample ids come from
  the metadata parquet beside the ``.tar`` (``uid``, ``key``; rows whose ``status`` is not ``success`` are
  not in the shard) or, without one, from the tar's ``.json`` members (their ``key``, which resharders
  keep while they rename the members); their input scores are joined from
  ``PARQUET_DIR/<key[:8]>_scores.parquet`` (on ``key``, or ``uid`` if the file has no key) or, when no such
  files exist, from an index of every parquet file of ``PARQUET_DIR`` built once. The mixer is one
  float64 matrix-vector product computed with numpy from the checkpoint's weight and bias.
* **FLYT** (CLIP base + GLU head) decodes images: a DataLoader whose workers each read whole shards,
  apply the model's validation transform and tokenizer, and send batches that never cross a shard
  boundary; the last batch of a shard is flagged so its file is written as soon as it is complete.

Restartable and parallel, on the per-shard runner (``flyt.runner``): a shard whose output exists is
skipped, outputs are written atomically, and jobs split the sorted shard list without overlap (shard j
belongs to job j % N; ``--shard_index I --num_shards N``, or the RANK/WORLD_SIZE of torchrun, or both:
job I*WORLD_SIZE + RANK of N*WORLD_SIZE). ``--engine ray`` scores the shards on Ray actors that keep the
model loaded (a GPU each where the cluster has GPUs). A shard that cannot be read is reported by name,
the others are finished, and the exit code is 1. Once every shard of the pool has its file, the folder
is checked to hold exactly one file per pool shard.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from flyt.data.pool import pool_shards
from flyt.data.score_files import Output, merge, read_stats
from flyt.errors import FlytError, remote_hint
from flyt.jobs.repeats import clean_repeats, pending_repeats
from flyt.jobs.score import ScoreJob
from flyt.runner.engines import add_engine_arguments, make_executor
from flyt.atomic import sweep_temporaries
from flyt.runner.job import Report, job_split, run_job, share


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from flyt.config import add_job_split_arguments

    parser.add_argument("--checkpoint", required=True,
                        help="scoring checkpoint (scoring_epoch_<n>.pt of flyt train, or the original's released .pt)")
    parser.add_argument("--upstream_data_dir", required=True,
                        help="pool: a folder of .tar shards (recursive), one .tar, or several joined by '::'")
    parser.add_argument("--output", required=True,
                        help="folder for one <shard>.parquet per pool shard, or a file x.parquet to merge them into")
    parser.add_argument("--parquet_dir", default=None,
                        help="M-FLYT: folder of <shard>_scores.parquet input scores (or any parquet files with key/uid); "
                             "several joined by '::' (e.g. the released scores and flyt features output)")
    parser.add_argument("--parquet_fields", nargs="+", default=None,
                        help="M-FLYT: the score columns, in the mixer's order (needed for the original's .pt files)")
    parser.add_argument("--model", default=None,
                        help="FLYT: OpenCLIP name of the scoring base (needed for the original's .pt files)")
    parser.add_argument("--batch_size", type=int, default=256, help="FLYT: samples per forward pass")
    parser.add_argument("--workers", type=int, default=4,
                        help="FLYT: data-loader processes (each reads whole shards; on Ray, per actor, which asks "
                             "for as many CPUs); M-FLYT: threads, one shard each (on Ray: one CPU per actor)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--precision", default=None,
                        help="fp32; amp / amp_bf16 (= amp_bfloat16): autocast (fp16 needs CUDA); bf16: bf16 weights "
                             "(default: amp on CUDA, else fp32)")
    add_job_split_arguments(parser)
    add_engine_arguments(parser)


def _check_flags(args) -> None:
    if args.batch_size < 1:
        raise FlytError(f"--batch_size must be >= 1 (got {args.batch_size})")
    if args.workers < 0:
        raise FlytError(f"--workers must be >= 0 (got {args.workers})")
    if not Path(args.checkpoint).is_file():
        raise FlytError(f"--checkpoint {args.checkpoint} does not exist{remote_hint(args.checkpoint)}")


def _summarise(report: Report, job: ScoreJob, mine, args, part: int, parts: int, seconds: float) -> dict:
    totals = report.totals()
    timings = totals.get("timings", {})
    paths = {shard.name: str(shard.path) for shard in job.shards}
    per_shard = {name: {k: stats[k] for k in ("shard", "scored", "skipped")}
                 for name, stats in sorted(report.done.items()) if stats}
    scored_all, skipped_all = 0, {}
    for shard in mine:
        stats = per_shard.get(shard.name) or read_stats(job.output.part(shard)) or {}
        scored_all += stats.get("scored", 0)
        for cause, n in stats.get("skipped", {}).items():
            skipped_all[cause] = skipped_all.get(cause, 0) + n
    scored, busy = totals.get("scored", 0), report.seconds
    return {
        "mode": job.mode, "engine": args.engine, "checkpoint": str(args.checkpoint), "pool": str(args.upstream_data_dir),
        "output": str(job.output.path), "job": part, "jobs": parts,
        "shards": report.units_total, "shards_done": len(report.done),
        "shards_skipped_existing": report.already_done, "shards_failed": len(report.failed),
        "failed": {paths[name]: message for name, message in sorted(report.failed.items())},
        "samples_scored": scored, "skipped": totals.get("skipped", {}),
        "seconds": round(seconds, 3), "scoring_seconds": round(busy, 3),
        "samples_per_s": round(scored / busy, 1) if busy > 0 and report.done else None,
        "timings": {k: round(v, 4) for k, v in timings.items()},
        "per_shard": per_shard,
        "all_outputs": {"samples_scored": scored_all, "skipped": dict(sorted(skipped_all.items()))},
    }


def _print_summary(summary: dict, output: Output) -> None:
    skipped = ", ".join(f"{k} {v}" for k, v in summary["skipped"].items()) or "none"
    rate = summary["samples_per_s"]
    print(f"flyt score: {summary['shards_done']} shard(s) scored, {summary['shards_skipped_existing']} already done, "
          f"{summary['shards_failed']} failed (of {summary['shards']}); {summary['samples_scored']} samples scored "
          f"in {summary['scoring_seconds']:.1f} s ({rate if rate is not None else '-'} samples/s; {summary['seconds']:.1f} s "
          f"in all); skipped: {skipped}")
    for shard, message in summary["failed"].items():
        print(f"flyt score: FAILED shard {shard}: {message}")
    print(f"flyt score: summary in {output.summary}")


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    _check_flags(args)
    part, parts = job_split(args.shard_index, args.num_shards)
    output = Output(args.output, part, parts)
    shards = pool_shards(args.upstream_data_dir)
    for shard in shards:
        if output.part(shard).resolve() == shard.metadata.resolve():
            raise FlytError(f"--output {output.path} would overwrite the pool's metadata {shard.metadata}: "
                            "write the scores to another folder")
    job = ScoreJob(shards, output, args.checkpoint, args.model, args.parquet_fields, args.parquet_dir,
                   args.batch_size, args.workers, args.device, args.precision)
    on_ray = args.engine == "ray"
    executor = make_executor(args, 1) if on_ray else None  # connects: a dead address fails before the model loads
    mode = job.check(here=not on_ray)  # a bad checkpoint or flag fails here, before anything is written
    if not on_ray:  # M-FLYT: --workers threads, a shard each; FLYT: one pipeline, its loader has --workers processes
        executor = make_executor(args, args.workers if mode == "mflyt" else 1)
    if on_ray and mode == "flyt":
        wants_gpu = args.device.startswith("cuda") if args.device else executor.cluster_resources().get("GPU", 0) > 0
        job.num_gpus = 1 if wants_gpu else 0
    job.title = f"flyt score ({mode})"
    mine = share(shards, part, parts)  # the shards run_job gives this part
    output.parts.mkdir(parents=True, exist_ok=True)
    job.repeats = pending_repeats(job, shards, part, parts, output.parts, executor)
    report = run_job(job, executor, part, parts)
    for name, stats in report.done.items():  # a shard finished just before its Ray worker was lost
        if not stats:
            report.done[name] = read_stats(output.parts / f"{name}.parquet") or {}
    summary = _summarise(report, job, mine, args, part, parts, time.perf_counter() - started)
    missing = [s for s in shards if not output.part(s).exists()]
    summary["coverage"] = _coverage(shards, output, missing)
    if not missing:
        clean_repeats(output.parts)
    if output.merged:
        if missing:
            summary["merged"] = None
            print(f"flyt score: {len(missing)} shard(s) of the pool have no scores yet "
                  f"(e.g. {missing[0].path}): {output.path} is written once all are done")
        else:
            if parts == 1:  # a merge killed earlier left its temporary file (with peers, it may be theirs)
                sweep_temporaries([output.path])
            summary["merged"] = {"path": str(output.path), "rows": merge([output.part(s) for s in shards], output.path)}
            print(f"flyt score: merged {summary['merged']['rows']} scores into {output.path}")
    from flyt.atomic import atomic_path

    sweep_temporaries([output.summary])  # a kill in its last write left its temporary (a summary per part)
    with atomic_path(output.summary) as tmp:
        tmp.write_text(json.dumps(summary, indent=1) + "\n")
    _print_summary(summary, output)
    return 1 if report.failed else 0


def _coverage(shards, output: Output, missing: list) -> dict:
    """Once every shard has its file: exactly one file per pool shard, and none from anything else."""
    coverage = {"pool_shards": len(shards), "with_scores": len(shards) - len(missing), "complete": not missing}
    if not missing:
        extra = sorted({p.name for p in output.parts.glob("*.parquet")} - {output.part(s).name for s in shards})
        coverage["extra_files"] = extra
        if extra:
            print(f"flyt score: warning: {output.parts} also holds {len(extra)} file(s) of no shard of this pool "
                  f"(e.g. {extra[0]}); a folder of scores should hold one pool's", file=sys.stderr)
        else:
            print(f"flyt score: every shard of the pool is scored exactly once ({len(shards)} shards)")
    return coverage
