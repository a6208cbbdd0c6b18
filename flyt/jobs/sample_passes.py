"""``flyt sample`` over a folder of score files with bounded memory: three passes over the files.

Every method selects the ``total`` smallest *keys* (ties to the smaller uid): arrival times of the keyed
race for SCS/HCS, minus the score for top-k; a threshold keeps every key up to minus the threshold.
1. scan: row counts, score range, the uid-keyed sample (temperature, race time unit), a sorted uid
   run per file (their merge refuses a uid held twice, naming both files);
2. histogram: each file's keys, binned (summed over files, the bin holding the ``total``-th key is known);
3. collect: per file, the counts of keys below that bin (a sorted run of drawn uids) and the keys inside
   it, few, from which the exact cut and its tie winners are found in memory.
The drawn runs are then merged into the sorted subset, the counts parquet and the summary's figures.
Each pass is a ``flyt.runner`` job (a unit per file, outputs written atomically in the work folder, so a
killed run continues where it stopped); the keys depend on (seed, uid, score) only, so the subset is
the in-memory path's for the same seed.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np

from flyt.atomic import atomic_path
from flyt.data.runs import merge_runs, run_length, save_array, write_run
from flyt.data.score_table import read_batches, repeated_uid
from flyt.data.subset import UID_DTYPE as UID
from flyt.data.subset import SubsetWriter, counts_table
from flyt.errors import FlytError
from flyt.runner.job import Job, Unit, run_job
from flyt.select import race
from flyt.select.keyed import row_keys, sample_mask
from flyt.select.samplers import count_histogram, penalty_and_cap, plan
from flyt.select.sharpness import tempered

BINS = 1 << 14
DRAWN = np.dtype([("f0", "<u8"), ("f1", "<u8"), ("count", "<i8")])
IN_BIN = np.dtype([("key", "<f8"), ("f0", "<u8"), ("f1", "<u8")])
SAMPLED = np.dtype([("f0", "<u8"), ("f1", "<u8"), ("score", "<f8"), ("count", "<i8")])
_MARGIN = 1.25  # the histogram's range holds this many times the expected draws
_MERGE_BYTES = 400  # peak bytes per row of a merge round (its copies, sort keys, uid strings, encoders)
_WRITE_ROWS = 1 << 20  # uids written to the subset and counts file per slice


class _Pass(Job):
    """A pass over the score files: one unit per file, outputs under ``work/<step>/``."""

    step = ""

    def __init__(self, files: list[str], work: Path, spec: dict):
        self.files, self.work, self.spec = files, Path(work), spec
        self.title = f"flyt sample: {self.step}"
        self.unit_label = "file"

    def units(self) -> list[Unit]:
        return [Unit(f"{i:06d}", file) for i, file in enumerate(self.files)]

    def outputs(self, unit: Unit) -> list[Path]:
        return [self.work / self.step / f"{unit.name}.{suffix}.npy" for suffix in self.suffixes]

    def batches(self, unit: Unit):
        return read_batches(unit.payload, self.spec["column"], self.spec["batch_rows"])


class Scan(_Pass):
    step, suffixes = "scan", ("uids", "stats")

    def run(self, unit, state) -> dict:
        rows, parts, sampled, top, bottom = 0, [], [], -math.inf, math.inf
        for uids, scores in self.batches(unit):
            rows += len(uids)
            parts.append(uids)
            sampled.append(scores[sample_mask(uids, self.spec["pool_size"])])
            if len(scores):
                top, bottom = max(top, float(scores.max())), min(bottom, float(scores.min()))
        uids_out, stats_out = self.outputs(unit)
        write_run(uids_out, np.concatenate(parts) if parts else np.empty(0, UID))
        stats = np.concatenate([[rows, top, bottom], *sampled])
        save_array(stats_out, stats)
        return {"samples": rows}


class Histogram(_Pass):
    step, suffixes = "histogram", ("bins",)

    def run(self, unit, state) -> dict:
        counts = np.zeros(BINS, dtype=np.int64)

        def sink(keys, owners):
            counts[:] += np.bincount(bin_of(self.spec, keys), minlength=BINS)

        rows = 0
        for uids, scores in self.batches(unit):
            rows += len(uids)
            keys_upto(self.spec, uids, scores, self.spec["hi"], sink)
        save_array(self.outputs(unit)[0], counts)
        return {"samples": rows, "keys": int(counts.sum())}


class Collect(_Pass):
    """Counts below the cut's bin (all counts for a threshold), the keys inside it, and the pool sample's
    counts (for the plot)."""

    step, suffixes = "collect", ("drawn", "bin", "sampled")

    def run(self, unit, state) -> dict:
        spec, drawn, in_bin, sampled = self.spec, [], [], []
        target = spec.get("bin")
        limit = spec["limit"] if target is None else min(spec["hi"], spec["lo"] + (target + 2) / spec["scale"])
        for uids, scores in self.batches(unit):
            below = np.zeros(len(uids), dtype=np.int64)

            def sink(keys, owners):
                if target is None:
                    below[:] += np.bincount(owners, minlength=below.size)
                    return
                where = bin_of(spec, keys)
                below[:] += np.bincount(owners[where < target], minlength=below.size)
                inside = where == target
                in_bin.append(_rows(IN_BIN, uids[owners[inside]], key=keys[inside]))

            keys_upto(spec, uids, scores, limit, sink)
            chosen = below > 0
            drawn.append(_rows(DRAWN, uids[chosen], count=below[chosen]))
            mask = sample_mask(uids, spec["pool_size"])
            sampled.append(_rows(SAMPLED, uids[mask], score=scores[mask], count=below[mask]))
        drawn_out, bin_out, sampled_out = self.outputs(unit)
        drawn = np.concatenate(drawn or [np.empty(0, DRAWN)])
        write_run(drawn_out, drawn)
        save_array(bin_out, np.concatenate(in_bin or [np.empty(0, IN_BIN)]))
        save_array(sampled_out, np.concatenate(sampled or [np.empty(0, SAMPLED)]))
        return {"samples": int(sum(len(part) for part in sampled)), "drawn": int(drawn["count"].sum())}


def keys_upto(spec: dict, uids: np.ndarray, scores: np.ndarray, limit: float, sink) -> None:
    """Pass every key of these rows at or below ``limit`` to ``sink(keys, row indices)``."""
    if spec["method"] in ("scs", "hcs"):
        logits = tempered(scores, spec["temperature"])
        runner = race.Race(logits, row_keys(uids, spec["seed"]), spec["penalty"], spec["cap"], spec["unit"])
        runner.run_until(limit, sink)
    else:
        keys = -scores
        chosen = np.flatnonzero(keys <= limit)
        if chosen.size:
            sink(keys[chosen], chosen)


def bin_of(spec: dict, keys: np.ndarray) -> np.ndarray:
    return np.clip(((keys - spec["lo"]) * spec["scale"]).astype(np.int64), 0, BINS - 1)


def _rows(dtype: np.dtype, uids: np.ndarray, **fields) -> np.ndarray:
    out = np.empty(len(uids), dtype=dtype)
    out["f0"], out["f1"] = uids["f0"], uids["f1"]
    for name, values in fields.items():
        out[name] = values
    return out


class OutOfCore:
    """The passes, their order and the in-memory steps between them, for one ``flyt sample`` run."""

    def __init__(self, path: str, files: list[str], rows: list[int], args, params: dict, executor, memory: int):
        self.path, self.files, self.executor, self.memory = path, files, executor, memory
        self.method, self.params, self.seed = args.method, params, args.seed
        output = Path(args.output)
        self.work = output.parent / f".{output.name}.work"
        workers = getattr(executor, "workers", 1)
        self.spec = {"column": args.score_column, "method": args.method, "pool_size": int(sum(rows)),
                     "batch_rows": int(max(1 << 12, min(1 << 20, memory // (600 * workers))))}
        identity = {"files": files, "rows": rows, "spec": self.spec, "params": params, "seed": args.seed}
        self.seconds: dict[str, float] = {}  # per pass and step, for the summary
        stamp = self.work / "run.json"
        if self.work.exists() and (not stamp.exists() or json.loads(stamp.read_text()) != identity):
            shutil.rmtree(self.work)  # work of another run (other files, flags or seed)
        with atomic_path(stamp) as tmp:
            tmp.write_text(json.dumps(identity))

    def _run(self, job: _Pass) -> dict:
        report = run_job(job, self.executor)
        self.seconds[job.step] = round(self.seconds.get(job.step, 0.0) + report.seconds, 3)
        if report.failed:
            name, message = next(iter(sorted(report.failed.items())))
            raise FlytError(message if message.startswith("--scores") else f"--scores {self.files[int(name)]}: {message}")
        return report.totals()

    def _load(self, step: str, suffix: str) -> list[np.ndarray]:
        return [np.load(self.work / step / f"{i:06d}.{suffix}.npy") for i in range(len(self.files))]

    def select(self) -> dict:
        """Run the passes; return what the summary, the writers and the plot need."""
        self._run(Scan(self.files, self.work, self.spec))
        stats = self._load("scan", "stats")
        n = int(sum(s[0] for s in stats))
        top, bottom = max(s[1] for s in stats if s[0]), min(s[2] for s in stats if s[0])
        sample = race.estimate_sample(np.concatenate([s[3:] for s in stats]), top)
        self._check_unique()
        total, temperature = self._plan(n, sample, top, bottom)
        if self.method == "threshold":
            spec = {**self.spec, "limit": -self.params["threshold"]}
        else:
            spec = self._histogram_pass(total, sample)
        self._run(Collect(self.files, self.work / _tag(spec), spec))
        winners = self._winners(spec, total)
        return {"pool_size": n, "temperature": temperature, "total": total, "work": self.work / _tag(spec),
                "winners": winners}

    def _check_unique(self) -> None:
        done = self.work / "unique.ok"
        if done.exists():
            return
        started = time.perf_counter()
        runs = [self.work / "scan" / f"{i:06d}.uids.npy" for i in range(len(self.files))]
        for rows, source in merge_runs(runs, self.block_rows(len(runs))):
            same = np.flatnonzero(rows[1:] == rows[:-1])
            if same.size:
                first, second = sorted(source[same[0] : same[0] + 2])
                raise repeated_uid(self.path, rows[same[0]], None, self.files[first], self.files[second])
        done.write_text("")
        self.seconds["unique check"] = round(time.perf_counter() - started, 3)

    def block_rows(self, runs: int) -> int:
        """Rows read per run and round of a merge: a round's copies, sort and writes stay within the limit."""
        return int(max(1 << 10, min(1 << 20, self.memory // (_MERGE_BYTES * max(runs, 1)))))

    def _plan(self, n: int, sample: np.ndarray, top: float, bottom: float) -> tuple[int, float | None]:
        """The number of keys to keep and the temperature, with the checks that need the pool size."""
        total, temperature = plan(self.method, self.params, n, sample, top)
        self.spec.update(temperature=temperature, seed=self.seed)
        if self.method in ("scs", "hcs"):
            penalty, cap = penalty_and_cap(self.method, self.params)
            self.spec.update(penalty=penalty, cap=cap)
        else:
            lo, hi = -top, -bottom
            self.spec.update(lo=lo, hi=hi if hi > lo else lo + 1.0)
        return total, temperature

    def _histogram_pass(self, total: int, sample: np.ndarray) -> dict:
        spec = dict(self.spec)
        n = spec["pool_size"]
        if self.method in ("scs", "hcs"):
            logits = tempered(sample, spec["temperature"])
            unit = race.log_unit(logits, n, total, spec["penalty"], spec["cap"])
            log_hi = race.log_unit(logits, n, _MARGIN * total, spec["penalty"], spec["cap"])
            spec.update(unit=unit, lo=0.0)
        step = 0.0
        while True:
            if self.method in ("scs", "hcs"):
                race.check_span(log_hi - unit, logits)
                spec["hi"] = math.exp(min(log_hi - unit, race.MAX_LOG_TIME))
            spec["scale"] = BINS / (spec["hi"] - spec["lo"])
            self._run(Histogram(self.files, self.work / _tag(spec), spec))
            counts = np.sum(self._load(_tag(spec) + "/histogram", "bins"), axis=0)
            if counts.sum() >= total or self.method == "topk":
                break
            step = max(2 * step, 0.5)  # the guess was short: a wider range, read once more
            log_hi += step
        cumulative = np.cumsum(counts)
        target = int(np.searchsorted(cumulative, total))
        spec.update(bin=target, below=int(cumulative[target - 1]) if target else 0)
        return spec

    def _winners(self, spec: dict, total: int) -> np.ndarray:
        """The keys inside the cut's bin that complete the ``total``: one run of (uid, count)."""
        path = self.work / _tag(spec) / "winners.npy"
        if spec.get("bin") is None:
            winners = np.empty(0, DRAWN)
        else:
            inside = np.concatenate(self._load(_tag(spec) + "/collect", "bin"))
            chosen = inside[np.lexsort((inside["f1"], inside["f0"], inside["key"]))][: total - spec["below"]]
            uniq, counts = np.unique(_rows(UID, chosen), return_counts=True)
            winners = _rows(DRAWN, uniq, count=counts)
        write_run(path, winners)
        return winners

    def drawn_runs(self, outcome: dict) -> list[Path]:
        work = outcome["work"]
        return [work / "collect" / f"{i:06d}.drawn.npy" for i in range(len(self.files))] + [work / "winners.npy"]

    def sampled(self, outcome: dict) -> tuple[np.ndarray, np.ndarray]:
        """Scores and final counts of the pool sample's rows (the plot's input)."""
        rows = np.concatenate(self._load(str(outcome["work"].relative_to(self.work)) + "/collect", "sampled"))
        winners = outcome["winners"]
        if len(winners):
            names = _names(winners)
            order = np.argsort(names)
            names, extra = names[order], winners["count"][order]
            mine = _names(rows)
            where = np.minimum(np.searchsorted(names, mine), len(names) - 1)
            rows["count"] += np.where(names[where] == mine, extra[where], 0)
        return rows["score"], rows["count"]

    def write(self, outcome: dict, output: Path, counts_output: str | None) -> dict:
        """Merge the drawn runs into the subset (and the counts parquet); return the counts' figures."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        started = time.perf_counter()
        runs = self.drawn_runs(outcome)
        rows = outcome["total"] if self.method != "threshold" else sum(run_length(path) for path in runs)
        figures = {"total_drawn": 0, "unique": 0, "max_count": 0, "count_histogram": Counter()}
        with contextlib.ExitStack() as stack:
            subset = stack.enter_context(SubsetWriter(output, rows))
            table = None
            if counts_output:
                schema = pa.schema([("uid", pa.large_string()), ("count", pa.int64())])
                table = stack.enter_context(pq.ParquetWriter(stack.enter_context(atomic_path(counts_output)), schema))
            for chunk, _ in merge_runs(runs, self.block_rows(len(runs))):
                if not len(chunk):
                    continue
                f0, f1 = chunk["f0"], chunk["f1"]
                starts = np.flatnonzero(np.r_[True, (f0[1:] != f0[:-1]) | (f1[1:] != f1[:-1])])
                uids, counts = chunk[starts], np.add.reduceat(chunk["count"], starts)
                del chunk, starts
                for lo in range(0, len(uids), _WRITE_ROWS):  # the strings of the counts file, a slice at a time
                    part_uids, part_counts = uids[lo : lo + _WRITE_ROWS], counts[lo : lo + _WRITE_ROWS]
                    subset.write(part_uids, part_counts)
                    if table is not None:
                        table.write_table(counts_table(_rows(UID, part_uids), part_counts).cast(schema))
                figures["total_drawn"] += int(counts.sum())
                figures["unique"] += len(counts)
                figures["max_count"] = max(figures["max_count"], int(counts.max()))
                figures["count_histogram"].update(count_histogram(counts))
        figures["count_histogram"] = {label: figures["count_histogram"][label] for label in count_histogram(np.ones(0))}
        self.seconds["merge and write"] = round(time.perf_counter() - started, 3)
        figures["seconds_by_step"] = dict(self.seconds)
        return figures

    def clean(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)


def _tag(spec: dict) -> str:
    """A folder name for passes that depend on the cut-off's range, so a wider retry never reuses them."""
    if "limit" in spec:
        return f"limit-{spec['limit']!r}"
    return f"range-{spec['lo']!r}-{spec['hi']!r}"


def _names(rows: np.ndarray) -> np.ndarray:
    """The uids of ``rows`` as 16-byte strings: equal exactly when the uids are (for sorted lookups)."""
    return _rows(UID, rows).view("S16")
