"""``flyt features``: M-FLYT's input scores for any pool, in one pass over its images (docs/input_scores.md).

Writes ``DIR/<shard>_scores.parquet`` (key, uid, one column per score and teacher), the layout that
``flyt train --parquet_dir`` and ``flyt score`` read, on the per-shard runner: restartable per shard,
split by ``--shard_index/--num_shards`` and torchrun ranks, or spread over Ray with ``--engine ray``.
Every input is checked before a model loads. The work itself is ``flyt.jobs.features``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flyt.errors import FlytError
from flyt.jobs.features import CHEAP, FLYT, PER_TEACHER


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from flyt.config import add_job_split_arguments
    from flyt.runner.engines import add_engine_arguments

    parser.add_argument("--upstream_data_dir", required=True,
                        help="pool: a folder of .tar shards (recursive), one .tar, or several joined by '::'")
    parser.add_argument("--output", required=True, help="folder for one <shard>_scores.parquet per pool shard")
    parser.add_argument("--teacher", action="append", default=[], metavar="[ALIAS=]MODEL[:PRETRAINED]",
                        help="a CLIP teacher (repeatable): OpenCLIP name, PRETRAINED an OpenCLIP tag or a local "
                             "checkpoint; its columns are <NAME>_<ALIAS> (<NAME> for one teacher without alias)")
    parser.add_argument("--scores", nargs="+", required=True, metavar="NAME",
                        help=f"per teacher: {', '.join(PER_TEACHER)}; {FLYT} (--flyt_checkpoint); "
                             f"{', '.join(CHEAP)}; meta:<column> (a numeric column of the pool's metadata parquet)")
    parser.add_argument("--target_tasks", nargs="+", default=[], metavar="T",
                        help="NormSim's target: tasks (names or task folders, as in flyt train) whose training "
                             "images are the target set")
    parser.add_argument("--downstream_data_dir", default=None, help="root of the target tasks' training shards")
    parser.add_argument("--datacomp_eval_dir", default=None, help="root of DataComp eval folders (for task names)")
    parser.add_argument("--flyt_checkpoint", default=None, help="a FLYT scoring checkpoint for the 'flyt' column")
    parser.add_argument("--flyt_model", default=None,
                        help="OpenCLIP name of the FLYT checkpoint's base (only for the original's .pt files)")
    cached = parser.add_mutually_exclusive_group()
    cached.add_argument("--save_embeddings", action="store_true",
                        help="also write each teacher's float16 embeddings per shard to DIR/embeddings/")
    cached.add_argument("--from_embeddings", default=None, metavar="DIR",
                        help="compute the scores from a --save_embeddings cache instead of the images")
    parser.add_argument("--seed", type=int, default=0, help="seed of negCLIPLoss's random batches")
    parser.add_argument("--neg_clip_batch_size", type=int, default=1024, help="negCLIPLoss: samples per random batch")
    parser.add_argument("--neg_clip_batches", type=int, default=10,
                        help="negCLIPLoss: random batch assignments averaged per sample")
    parser.add_argument("--batch_size", type=int, default=256, help="samples per forward pass")
    parser.add_argument("--workers", type=int, default=4, help="data-loader processes (each decodes whole shards)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--precision", default=None, help="fp32, amp, amp_bf16, bf16 (default: amp on CUDA, else fp32)")
    add_job_split_arguments(parser)
    add_engine_arguments(parser)


def _check_flags(args) -> None:
    for flag in ("batch_size", "neg_clip_batch_size", "neg_clip_batches"):
        if getattr(args, flag) < 1:
            raise FlytError(f"--{flag} must be >= 1 (got {getattr(args, flag)})")
    if args.workers < 0:
        raise FlytError(f"--workers must be >= 0 (got {args.workers})")


def _targets(args, columns) -> list[str]:
    """The target tasks' training shards, resolved exactly as flyt train resolves its tasks."""
    from flyt.data.shards import list_shards
    from flyt.data.tasks import resolve_task

    wanted = any(c.score.startswith("normsim") for c in columns)
    if not wanted:
        if args.target_tasks:
            raise FlytError("--target_tasks is NormSim's target: add normsim_inf or normsim_2 to --scores")
        return []
    tokens = [t for token in args.target_tasks for t in token.split("::") if t]
    if not tokens:
        raise FlytError("--scores normsim_* needs --target_tasks (their training images are the target set)")
    shards = []
    for token in tokens:
        task = resolve_task(token, args.downstream_data_dir, args.datacomp_eval_dir)
        if task.train_dir is None:
            raise FlytError(f"--target_tasks {token}: no training images (give --downstream_data_dir)")
        shards += list_shards(task.train_dir, f"--target_tasks {token}: training images")
    return shards


def _check_pool(shards, columns) -> None:
    """An empty pool, and meta: columns that are missing or not numbers, before anything heavy."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from flyt.data.pool import shard_ids

    if not any(len(shard_ids(s)[0]) for s in shards):
        raise FlytError(f"--upstream_data_dir: the pool's {len(shards)} shard(s) hold no samples with a uid")
    sources = [c.source for c in columns if c.score == "meta"]
    for shard in shards if sources else []:
        if not shard.metadata.exists():
            raise FlytError(f"--scores meta:{sources[0]}: shard {shard.path} has no metadata parquet {shard.metadata.name}")
        schema = pq.read_schema(shard.metadata)
        for name in sources:
            if name not in schema.names:
                raise FlytError(f"--scores meta:{name}: {shard.metadata} has no column {name!r}")
            kind = schema.field(name).type
            if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)):
                raise FlytError(f"--scores meta:{name}: {shard.metadata} stores it as {kind}, not numbers")


def _cache_labels(args, teachers) -> dict:
    """--from_embeddings: each teacher's label in the cache, matched by its model and weights."""
    from flyt.data import embeddings as cache

    root = cache.find_root(args.from_embeddings)
    index = cache.read_index(root)
    labels = {}
    for t in teachers:
        want = t.definition()
        match = [label for label, d in index.items() if {k: d.get(k) for k in want} == want]
        if not match:
            held = ", ".join(f"{d.get('model')}:{d.get('pretrained')}" for d in index.values())
            raise FlytError(f"--from_embeddings {root}: no embeddings of teacher {t.model}:{t.pretrained} "
                            f"(the cache holds {held})")
        labels[t.label] = match[0]
    return root, labels


def build_settings(args):
    """Every check of the inputs, then the job's settings (no model is loaded here)."""
    from flyt.data.pool import pool_shards
    from flyt.jobs.features import Settings, check_teacher, parse_teacher, plan_columns, readable_checkpoint
    from flyt.precision import resolve_precision

    _check_flags(args)
    teachers = [parse_teacher(t) for t in args.teacher]
    columns = plan_columns(args.scores, teachers)
    needs_teacher = any(c.teacher for c in columns)
    if teachers and not needs_teacher:
        raise FlytError(f"--teacher is for {', '.join(PER_TEACHER)}: none of them is in --scores")
    flyt = any(c.score == FLYT for c in columns)
    if flyt != bool(args.flyt_checkpoint):
        raise FlytError("--scores flyt and --flyt_checkpoint go together")
    if flyt and args.from_embeddings:
        raise FlytError("--scores flyt needs the images: it cannot be computed --from_embeddings")
    shards = pool_shards(args.upstream_data_dir)
    _check_pool(shards, columns)
    targets = _targets(args, columns)
    for teacher in teachers:
        check_teacher(teacher)
    if flyt:
        readable_checkpoint(args.flyt_checkpoint, "--flyt_checkpoint")
    root, labels = _cache_labels(args, teachers) if args.from_embeddings else (None, {})
    settings = Settings(shards, Path(args.output), columns, teachers, targets, args.neg_clip_batch_size,
                        args.neg_clip_batches, args.seed, args.flyt_checkpoint, args.flyt_model, args.save_embeddings,
                        root, labels, args.batch_size, args.workers, args.device, resolve_precision(args.precision))
    return settings


def run(args: argparse.Namespace) -> int:
    from flyt.atomic import atomic_path
    from flyt.jobs.features import FeaturesJob, claim_columns
    from flyt.runner.engines import make_executor
    from flyt.atomic import sweep_temporaries
    from flyt.jobs.repeats import clean_repeats, pending_repeats
    from flyt.runner.job import job_split, missing_units, run_job

    part, parts = job_split(args.shard_index, args.num_shards)
    s = build_settings(args)
    if s.output.exists() and not s.output.is_dir():
        raise FlytError(f"--output {s.output} is a file: give a folder")
    s.output.mkdir(parents=True, exist_ok=True)
    claim_columns(s.output, s.definitions())
    job = FeaturesJob(s)
    executor = make_executor(args, 1)
    s.repeats = pending_repeats(job, s.shards, part, parts, s.output, executor)
    report = run_job(job, executor, part, parts)
    if not missing_units(job):
        clean_repeats(s.output)
    totals = report.totals()
    samples = totals.get("samples", 0)
    summary = {"pool": args.upstream_data_dir, "output": str(s.output), "columns": [c.name for c in s.columns],
               "job": part, "jobs": parts, "shards": report.units_total, "shards_done": len(report.done),
               "shards_already_done": report.already_done, "shards_failed": len(report.failed), "failed": report.failed,
               "samples": samples, "read": totals.get("read", 0), "skipped": totals.get("skipped", {}),
               "seconds": round(report.seconds, 3),
               "samples_per_s": round(samples / report.seconds, 1) if report.seconds > 0 else None,
               "per_shard": report.done}
    name = "_summary.json" if parts == 1 else f"_summary.{part:0{len(str(parts - 1))}d}-of-{parts}.json"
    sweep_temporaries([s.output / name])  # a kill in its last write left its temporary (a summary per part)
    with atomic_path(s.output / name) as tmp:
        tmp.write_text(json.dumps(summary, indent=1) + "\n")
    skipped = ", ".join(f"{k} {v}" for k, v in summary["skipped"].items()) or "none"
    print(f"flyt features: {summary['shards_done']} shard(s) done, {summary['shards_already_done']} already done, "
          f"{summary['shards_failed']} failed (of {summary['shards']}); {samples} samples in {report.seconds:.1f} s "
          f"({summary['samples_per_s'] or '-'} samples/s); skipped: {skipped}")
    for unit, message in report.failed.items():
        print(f"flyt features: FAILED shard {unit}: {message}", file=sys.stderr)
    print(f"flyt features: summary in {s.output / name}")
    return 1 if report.failed else 0
