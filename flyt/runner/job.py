"""Restartable per-shard work, knowing nothing of CLIP: a job is a list of units and what each writes.

A unit (a pool shard to score, an output shard to write, a score file to scan) is *done* when all its
output files exist; every output is written atomically (``flyt.atomic``), so existing means complete
and a rerun after any kill redoes only what is missing. ``run_job`` does everything around the units
once, for every command: split them over jobs and ranks, skip the done ones, sweep the temporaries of
writes cut short, hand the rest to an executor (``flyt.runner.local`` in this process, or Ray), merge
the units' statistics and show progress. The executors only decide *where* a unit runs.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from flyt.atomic import sweep_temporaries
from flyt.errors import FlytError, Preempted, StorageError, stop_on_sigterm


@dataclass(frozen=True)
class Unit:
    name: str  # unique in its job and stable across runs: names outputs, messages and the split
    payload: Any = None  # what ``Job.run`` needs to find its input (a path, a range); picklable


class Job:
    """One kind of per-unit work. Subclasses define ``units``, ``outputs`` and ``run``.

    A job object is sent to worker processes and Ray actors, so it holds only plain, picklable
    settings; anything heavy (a model) is built by ``setup`` once per worker and passed to ``run``.
    """

    title = "flyt"  # the progress line's label
    unit_label = "shard"
    units_per_call = 1  # units a Ray actor gets at once: more for a job whose ``run_many`` pipelines them

    def units(self) -> list[Unit]:
        raise NotImplementedError

    def outputs(self, unit: Unit) -> list[Path]:
        """The files ``run`` writes for ``unit`` (each atomically); all present == done."""
        raise NotImplementedError

    def setup(self) -> Any:
        """Per-worker state (a loaded model); called once in each process or actor that runs units."""
        return None

    def run(self, unit: Unit, state: Any) -> dict:
        """Do the unit, write its outputs, return its statistics (``samples``, ``skipped``: cause -> n, ...)."""
        raise NotImplementedError

    def run_many(self, units: list[Unit], state: Any) -> Iterator[tuple[Unit, dict | BaseException]]:
        """Run several units in order; a job whose units share a pipeline (a data loader) overrides it."""
        for unit in units:
            try:
                yield unit, self.run(unit, state)
            except Exception as exc:  # one bad shard must not stop the others
                yield unit, exc

    def resources(self) -> dict:
        """What one worker needs on Ray (``num_cpus``, ``num_gpus``)."""
        return {"num_cpus": 1}

    def done(self, unit: Unit) -> bool:
        return all(path.exists() for path in self.outputs(unit))


@dataclass
class Report:
    """What ``run_job`` did: per-unit statistics, failures by unit, and the totals."""

    units_total: int = 0  # this job's share of the units
    already_done: int = 0
    done: dict[str, dict] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def totals(self) -> dict:
        """The units' statistics summed: numbers add, ``skipped``-like dicts add by key."""
        total: dict = {}
        for stats in self.done.values():
            for key, value in stats.items():
                if isinstance(value, dict):
                    total.setdefault(key, Counter()).update(value)
                elif isinstance(value, (int, float)) and not isinstance(value, bool):
                    total[key] = total.get(key, 0) + value
        return {k: dict(sorted(v.items())) if isinstance(v, Counter) else v for k, v in sorted(total.items())}


def job_split(shard_index: int | None, num_shards: int | None, env=os.environ) -> tuple[int, int]:
    """(this job, number of jobs) from ``--shard_index/--num_shards`` and torchrun's RANK/WORLD_SIZE:
    job I of N on rank R of W is part I*W + R of N*W."""
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


def share(units: list[Unit], part: int, parts: int) -> list[Unit]:
    """Part ``part`` of ``parts``: unit j of the sorted list belongs to part j % parts (no overlap)."""
    return [unit for j, unit in enumerate(units) if j % parts == part]


def run_job(job: Job, executor, part: int = 0, parts: int = 1, bar=None) -> Report:
    """Run this part's pending units of ``job`` on ``executor``; failures are recorded, not raised, except a
    unit's ``StorageError`` (a full disk, a read-only folder): every unit after it would fail the same way,
    so the job stops there (units in flight finish) and raises it, once, with the counts.

    ``bar`` (a ``flyt.progress.bar``) advances by one per unit; without it a bar counting units is shown.
    """
    from flyt import progress

    started = time.perf_counter()
    units = job.units()
    names = Counter(unit.name for unit in units)
    if names and max(names.values()) > 1:
        raise FlytError(f"{job.title}: two units are named {names.most_common(1)[0][0]!r}")
    mine = share(units, part, parts)
    pending = [unit for unit in mine if not job.done(unit)]
    report = Report(units_total=len(mine), already_done=len(mine) - len(pending))
    for unit in pending:
        sweep_temporaries(job.outputs(unit))
    own_bar = bar is None
    if own_bar:
        bar = progress.bar(total=len(mine), initial=report.already_done, desc=job.title, unit=job.unit_label)
    samples, full = 0, None
    results = executor.run(job, pending)
    try:
        with stop_on_sigterm("SIGTERM"):  # the message is replaced below, with the counts
            for unit, result in results:
                if isinstance(result, StorageError):
                    full = result
                    break
                if isinstance(result, BaseException):
                    report.failed[unit.name] = error_message(result)
                else:
                    report.done[unit.name] = result
                    samples += result.get("samples", 0)
                if own_bar:
                    if samples:
                        bar.set_postfix(samples_per_s=f"{samples / (time.perf_counter() - started):.4g}")
                    bar.update()
    except Preempted:
        raise Preempted(f"{job.title}: stopped by SIGTERM with {report.already_done + len(report.done)} of "
                        f"{len(mine)} {job.unit_label}s done (kept); rerun the same command to do the rest") from None
    finally:
        results.close()  # a stop cancels the queued units
        if own_bar:
            bar.close()
    if full is not None:
        raise StorageError(f"{job.title}: stopped with {report.already_done + len(report.done)} of {len(mine)} "
                           f"{job.unit_label}s done: {error_message(full)}") from None
    report.seconds = time.perf_counter() - started
    return report


def missing_units(job: Job, units: list[Unit] | None = None) -> list[Unit]:
    """The units (of the whole job, every part) whose outputs are not all there."""
    return [unit for unit in (job.units() if units is None else units) if not job.done(unit)]


def error_message(exc: BaseException) -> str:
    """One line for a unit's failure: the user-facing message of a FlytError, else type and text."""
    text = str(exc).strip().splitlines()
    line = text[-1] if text else ""
    return line if isinstance(exc, FlytError) else f"{type(exc).__name__}: {line}"
