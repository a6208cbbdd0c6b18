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

Restartable and parallel: a shard whose output exists is skipped, outputs are written atomically, and
jobs split the sorted shard list without overlap (shard j belongs to job j % N; ``--shard_index I
--num_shards N``, or the RANK/WORLD_SIZE of torchrun, or both: job I*WORLD_SIZE + RANK of N*WORLD_SIZE).
A shard that cannot be read is reported by name, the others are finished, and the exit code is 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

from flyt.errors import FlytError
from flyt.jobs.score_flyt import score_flyt
from flyt.jobs.score_mflyt import MixerScores, score_mflyt
from flyt.data.score_files import Output, Report, merge, read_stats, remove_stale_temporaries
from flyt.data.pool import Shard, pool_shards, repeats_of_earlier_shards


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from flyt.config import add_job_split_arguments

    parser.add_argument("--checkpoint", required=True,
                        help="scoring checkpoint (scoring_epoch_<n>.pt of flyt train, or the original's released .pt)")
    parser.add_argument("--upstream_data_dir", required=True,
                        help="pool: a folder of .tar shards (recursive), one .tar, or several joined by '::'")
    parser.add_argument("--output", required=True,
                        help="folder for one <shard>.parquet per pool shard, or a file x.parquet to merge them into")
    parser.add_argument("--parquet_dir", default=None,
                        help="M-FLYT: folder of <shard>_scores.parquet input scores (or any parquet files with key/uid)")
    parser.add_argument("--parquet_fields", nargs="+", default=None,
                        help="M-FLYT: the score columns, in the mixer's order (needed for the original's .pt files)")
    parser.add_argument("--model", default=None,
                        help="FLYT: OpenCLIP name of the scoring base (needed for the original's .pt files)")
    parser.add_argument("--batch_size", type=int, default=256, help="FLYT: samples per forward pass")
    parser.add_argument("--workers", type=int, default=4,
                        help="FLYT: data-loader processes (each reads whole shards); M-FLYT: threads, one shard each")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--precision", default=None,
                        help="fp32; amp / amp_bf16 (= amp_bfloat16): autocast (fp16 needs CUDA); bf16: bf16 weights "
                             "(default: amp on CUDA, else fp32)")
    add_job_split_arguments(parser)


def job_split(shard_index: int | None, num_shards: int | None, env=os.environ) -> tuple[int, int]:
    """(this job, number of jobs) from the flags and torchrun's RANK/WORLD_SIZE."""
    if (shard_index is None) != (num_shards is None):
        raise FlytError("--shard_index and --num_shards go together")
    index, count = (0, 1) if num_shards is None else (shard_index, num_shards)
    if count < 1 or not 0 <= index < count:
        raise FlytError(f"--shard_index must be in [0, --num_shards) and --num_shards >= 1 (got {index}, {count})")
    try:
        rank, world = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
    except ValueError:
        raise FlytError(f"RANK/WORLD_SIZE must be integers (got {env.get('RANK')!r}, {env.get('WORLD_SIZE')!r})") from None
    if world < 1 or not 0 <= rank < world:
        raise FlytError(f"RANK {rank} is not in [0, WORLD_SIZE {world})")
    return index * world + rank, count * world


def _check_flags(args) -> None:
    if args.batch_size < 1:
        raise FlytError(f"--batch_size must be >= 1 (got {args.batch_size})")
    if args.workers < 0:
        raise FlytError(f"--workers must be >= 0 (got {args.workers})")
    if not Path(args.checkpoint).is_file():
        raise FlytError(f"--checkpoint {args.checkpoint} does not exist")


def _load(args, device):
    from flyt.models.checkpoint import load_scorer

    model, spec = load_scorer(args.checkpoint, args.model, args.parquet_fields, device=device,
                              precision="bf16" if args.precision == "bf16" else "fp32")
    if spec.mode == "mflyt":
        if not args.parquet_dir:
            raise FlytError(f"{args.checkpoint} is an M-FLYT mixer over {', '.join(spec.parquet_fields)}: "
                            "give --parquet_dir with those input scores")
        given = list(args.parquet_fields or [])
        if given and set(given) != set(spec.parquet_fields):  # the same names in another order change nothing
            if len(given) != len(spec.parquet_fields):
                raise FlytError(f"--parquet_fields names {len(given)} columns but the mixer mixes "
                                f"{len(spec.parquet_fields)} ({', '.join(spec.parquet_fields)})")
            print(f"flyt score: the mixer's inputs {', '.join(spec.parquet_fields)} are read from the columns "
                  f"{', '.join(given)} (--parquet_fields, in the mixer's order)", file=sys.stderr)
            spec.parquet_fields = given
    else:
        if args.parquet_dir or args.parquet_fields:
            raise FlytError(f"{args.checkpoint} is a FLYT image-text scorer: --parquet_dir/--parquet_fields are for M-FLYT")
        if args.model and spec.model != args.model:
            raise FlytError(f"{args.checkpoint} holds a scorer on {spec.model}, not --model {args.model}")
    return model, spec


def _summarise(report: Report, output: Output, mine: list[Shard], spec, args, job: int, jobs: int, seconds: float) -> dict:
    totals = Counter()
    all_skipped = Counter()
    for shard in mine:
        stats = report.done.get(shard.name)
        if stats is None and output.part(shard).exists():
            stats = read_stats(output.part(shard))
        if stats:
            totals["scored"] += stats.get("scored", 0)
            all_skipped.update(stats.get("skipped", {}))
    return {
        "mode": spec.mode, "checkpoint": str(args.checkpoint), "pool": str(args.upstream_data_dir),
        "output": str(output.path), "job": job, "jobs": jobs,
        "shards": report.shards_total, "shards_done": len(report.done),
        "shards_skipped_existing": report.shards_skipped_existing, "shards_failed": len(report.failed),
        "failed": report.failed, "samples_scored": report.scored, "skipped": dict(sorted(report.skipped.items())),
        "seconds": round(seconds, 3), "scoring_seconds": round(report.timings["scoring_s"], 3),
        "samples_per_s": round(report.scored / report.timings["scoring_s"], 1) if report.timings["scoring_s"] > 0 else None,
        "timings": {k: round(v, 4) for k, v in sorted(report.timings.items())},
        "per_shard": report.done,
        "all_outputs": {"samples_scored": totals["scored"], "skipped": dict(sorted(all_skipped.items()))},
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
    from flyt import progress

    started = time.perf_counter()
    _check_flags(args)
    job, jobs = job_split(args.shard_index, args.num_shards)
    output = Output(args.output, job, jobs)
    shards = pool_shards(args.upstream_data_dir)
    for shard in shards:
        if output.part(shard).resolve() == shard.metadata.resolve():
            raise FlytError(f"--output {output.path} would overwrite the pool's metadata {shard.metadata}: "
                            "write the scores to another folder")
    mine = [s for j, s in enumerate(shards) if j % jobs == job]
    from flyt.precision import resolve_device, resolve_precision

    args.precision = resolve_precision(args.precision)
    device = resolve_device(args.device, args.precision)
    model, spec = _load(args, device)
    mixer = None
    if spec.mode == "mflyt":
        layer = model.layers[0]
        weight = layer.weight.detach().double().cpu().numpy().reshape(-1)
        bias = float(layer.bias.detach().double().cpu().reshape(-1)[0])
        mixer = MixerScores(args.parquet_dir, spec.parquet_fields, weight, bias)

    report = Report(shards_total=len(mine))
    pending = [s for s in mine if not output.part(s).exists()]
    report.shards_skipped_existing = len(mine) - len(pending)
    output.parts.mkdir(parents=True, exist_ok=True)
    for shard in pending:
        remove_stale_temporaries(output.part(shard))
    total = _expected_samples(pending)
    taken = repeats_of_earlier_shards(shards[: shards.index(pending[-1]) + 1]) if pending else {}
    scoring_started = time.perf_counter()
    with progress.bar(total=total, desc=f"flyt score ({spec.mode})", unit="sample", unit_scale=True, mininterval=1.0,
                      file=sys.stderr) as bar:
        if mixer is not None:
            score_mflyt(pending, output, mixer, report, bar, args.workers, taken)
        else:
            score_flyt(pending, output, model, spec, args, device, report, bar, taken)
    report.timings["scoring_s"] = time.perf_counter() - scoring_started
    summary = _summarise(report, output, mine, spec, args, job, jobs, time.perf_counter() - started)
    if output.merged:
        missing = [s for s in shards if not output.part(s).exists()]
        if missing:
            summary["merged"] = None
            print(f"flyt score: {len(missing)} shard(s) of the pool have no scores yet "
                  f"(e.g. {missing[0].path}): {output.path} is written once all are done")
        else:
            if jobs == 1:  # a merge killed earlier left its temporary file (with peers, it may be theirs)
                remove_stale_temporaries(output.path)
            summary["merged"] = {"path": str(output.path), "rows": merge([output.part(s) for s in shards], output.path)}
            print(f"flyt score: merged {summary['merged']['rows']} scores into {output.path}")
    from flyt.atomic import atomic_path

    with atomic_path(output.summary) as tmp:
        tmp.write_text(json.dumps(summary, indent=1) + "\n")
    _print_summary(summary, output)
    return 1 if report.failed else 0


def _expected_samples(shards: list[Shard]) -> int | None:
    """Rows of the pending shards' metadata parquets (for the progress bar), None if any is missing."""
    import pyarrow.parquet as pq

    total = 0
    for shard in shards:
        try:
            total += pq.read_metadata(shard.metadata).num_rows
        except Exception:
            return None
    return total
