"""``flyt sample`` out of core, and the uid-keyed randomness that makes it give the in-memory subset.

The pool is split into files in several ways (shuffled, uneven, one empty file); the passes over the files
must write byte-identical subsets and counts to the in-memory path for the same seed. ``_IN_MEMORY_BYTES``
is raised in most tests so that tiny pools take the out-of-core path; one test reaches it through a small
``--memory_limit`` alone.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pandas as pd
import pytest
import scipy.stats
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flyt.commands.sample
import flyt.jobs.sample_passes
import flyt.select.keyed
from flyt.cli import main
from flyt.data.runs import merge_runs, write_run
from flyt.data.subset import UID_DTYPE
from flyt.select.keyed import exponentials, row_keys, sample_mask
from flyt.select.race import race_counts
from flyt.select.samplers import top_counts
from test_sample import POOL, REPEATS, TOTAL, PENALTY, max_z, sequential_reference

METHODS = {
    "scs": ["--method", "scs", "--total_size", 2500, "--seed", 3],
    "hcs": ["--method", "hcs", "--total_size", 2000, "--frequency_limit", 2, "--seed", 4],
    "scs at a unique fraction": ["--method", "scs", "--total_size", 1500, "--seed", 5, "--unique_fraction", 0.25],
    "topk": ["--method", "topk", "--fraction", 0.3],
    "threshold": ["--method", "threshold", "--threshold", 0.5],
}


def make_pool(n, seed=0, spread=1.0):
    rng = np.random.default_rng(seed)
    uids = [rng.bytes(16).hex() for _ in range(n)]
    scores = np.round(rng.normal(0.0, spread, n), 2)  # rounded: many exact ties for top-k and the threshold
    return pd.DataFrame({"uid": uids, "score": scores, "key": [f"{i:09d}" for i in range(n)]})


def write_split(frame, folder, cuts, seed):
    """The frame's rows shuffled and cut into files at these row counts (an empty file when two cuts meet)."""
    folder.mkdir(parents=True)
    rows = frame.sample(frac=1.0, random_state=seed)
    edges = [0, *cuts, len(rows)]
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        rows.iloc[lo:hi].to_parquet(folder / f"part-{i:03d}.parquet")
    return folder


def sample(scores, out, *flags):
    return main(["sample", "--scores", str(scores), "--output", str(out), "--counts_output", f"{out}.counts.parquet",
                 *map(str, flags)])


@pytest.fixture
def out_of_core(monkeypatch):
    monkeypatch.setattr(flyt.commands.sample, "_IN_MEMORY_BYTES", (10**12, 0))


def error_line(capsys):
    """The command's error: one line, after any progress lines, and no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("flyt sample: error: "), err
    return line


def outputs(out):
    summary = json.loads(out.with_name(out.name + ".summary.json").read_text())
    figures = {k: summary[k] for k in ("pool_size", "total_drawn", "unique", "max_count", "count_histogram")}
    return out.read_bytes(), pd.read_parquet(f"{out}.counts.parquet"), figures, summary["path"]


@pytest.mark.parametrize("method", METHODS)
def test_out_of_core_equals_in_memory_for_every_split(tmp_path, method, monkeypatch):
    """A pool sample of ~256 rows (not all 3000) and merge blocks of 7 rows, so both are really exercised.

    Mutations caught: ``Collect`` counting keys of the cut's bin as below it (``where <= target``);
    the scan sampling with each file's row count instead of the pool's (the temperature of the
    unique-fraction case moves); the merge's frontier taken as the largest last uid instead of the
    smallest (rows leave uid order)."""
    monkeypatch.setattr(flyt.select.keyed, "SAMPLE_SIZE", 256)
    monkeypatch.setattr(flyt.jobs.sample_passes.OutOfCore, "block_rows", lambda self, runs: 7)
    frame = make_pool(3000)
    frame.to_parquet(tmp_path / "whole.parquet")
    assert sample(tmp_path / "whole.parquet", tmp_path / "memory.npy", *METHODS[method]) == 0
    expected = outputs(tmp_path / "memory.npy")
    assert expected[3] == "in memory"
    monkeypatch.setattr(flyt.commands.sample, "_IN_MEMORY_BYTES", (10**12, 0))
    splits = {"one file": [], "three shuffled": [1000, 2000], "uneven with an empty file": [7, 7, 1500, 2990]}
    for i, (name, cuts) in enumerate(splits.items()):
        folder = write_split(frame, tmp_path / f"split{i}", cuts, seed=i)
        out = tmp_path / f"disk{i}.npy"
        assert sample(folder, out, *METHODS[method], "--memory_limit", "1MB") == 0, name
        got = outputs(out)
        assert got[3].startswith("out of core") and got[0] == expected[0], name
        pd.testing.assert_frame_equal(got[1], expected[1])
        assert got[2] == expected[2]
        assert not any(path.name.endswith(".work") for path in tmp_path.iterdir())  # work folder removed


def test_a_small_memory_limit_alone_takes_the_out_of_core_path(tmp_path):
    """Mutation caught: the path choice ignoring ``--memory_limit`` (always in memory)."""
    frame = make_pool(6000, seed=1)
    write_split(frame, tmp_path / "pool", [2000, 4000], seed=0)
    flags = ["--method", "scs", "--total_size", 6000, "--seed", 0]
    assert sample(tmp_path / "pool", tmp_path / "a.npy", *flags) == 0
    assert sample(tmp_path / "pool", tmp_path / "b.npy", *flags, "--memory_limit", "1MB", "--workers", 1) == 0
    first, second = outputs(tmp_path / "a.npy"), outputs(tmp_path / "b.npy")
    assert first[3] == "in memory" and second[3] == "out of core, 3 files" and first[0] == second[0]


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(5, 400),
    cuts=st.lists(st.floats(0, 1), max_size=4),
    method=st.sampled_from(["scs", "hcs", "topk"]),
    draws=st.floats(0.1, 3.0),
    seed=st.integers(0, 2**32),
    spread=st.sampled_from([0.01, 1.0, 8.0]),
)
def test_out_of_core_equals_in_memory_property(tmp_path_factory, n, cuts, method, draws, seed, spread):
    """Any pool, any split into files, SCS/HCS/top-k: the same subset both ways.

    Mutations caught: ``Collect`` counting keys of the cut's bin as below it; the tie winners one short
    (``[: total - below - 1]``: the subset announces a row it never writes)."""
    tmp = tmp_path_factory.mktemp("pool")
    frame = make_pool(n, seed=seed % 1000, spread=spread)
    frame.to_parquet(tmp / "whole.parquet")
    folder = write_split(frame, tmp / "split", sorted(int(c * n) for c in cuts), seed=seed % 7)
    total = max(1, min(int(draws * n), 2 * n if method == "hcs" else 10 * n))
    flags = {"scs": ["--total_size", total, "--seed", seed], "hcs": ["--total_size", total, "--seed", seed,
             "--frequency_limit", 2], "topk": ["--total_size", min(total, n)]}[method]
    assert sample(tmp / "whole.parquet", tmp / "a.npy", "--method", method, *flags) == 0
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(flyt.commands.sample, "_IN_MEMORY_BYTES", (10**12, 0))
        assert sample(folder, tmp / "b.npy", "--method", method, *flags) == 0
    assert (tmp / "a.npy").read_bytes() == (tmp / "b.npy").read_bytes()


@settings(max_examples=60, deadline=None)
@given(
    logits=st.lists(st.floats(-30, 30), min_size=1, max_size=60),
    draws=st.floats(0.05, 4.0),
    penalty=st.sampled_from([0.0, 0.15, 1.0]),
    cap=st.sampled_from([1, 2, 15, math.inf]),
    seed=st.integers(0, 2**40),
)
def test_race_count_invariants(logits, draws, penalty, cap, seed):
    """SCS/HCS: exactly ``total`` draws, none past the cap; top-k keeps k and every kept score is at
    least every dropped one.

    Mutations caught: the race's cap one arrival late (``index > cap``); ``top_counts`` keeping the
    lowest scores."""
    logits = np.array(logits)
    uids = np.zeros(logits.size, dtype=UID_DTYPE)
    uids["f1"] = np.arange(logits.size, dtype=np.uint64)
    total = max(1, int(draws * logits.size)) if cap == math.inf else max(1, min(int(draws * logits.size), logits.size * cap))
    counts = race_counts(logits, total, uids, seed, penalty if cap == math.inf else 0.0, cap)
    assert counts.sum() == total and counts.min() >= 0 and counts.max() <= cap
    k = min(total, logits.size)
    kept = top_counts(logits, k).astype(bool)
    assert kept.sum() == k and (kept.all() or logits[kept].min() >= logits[~kept].max())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(0, 60), min_size=1, max_size=6), block=st.integers(1, 9), high=st.integers(1, 40))
def test_merge_of_sorted_runs_is_the_sorted_union(tmp_path_factory, sizes, block, high):
    """Runs of random uids (few distinct high halves: many equal f0), any block size: the chunks, joined,
    are the sorted union with each row's run, and equal uids never straddle two chunks.

    Mutations caught: the frontier taken as the largest last uid (``max`` for ``min``); rows equal to the
    frontier taken too (``<=`` in ``_rows_below``: a uid repeated inside one run straddles two chunks)."""
    tmp, rng = tmp_path_factory.mktemp("runs"), np.random.default_rng(sum(sizes) + block)
    runs, union = [], []
    for i, size in enumerate(sizes):
        rows = np.zeros(size, dtype=UID_DTYPE)
        rows["f0"], rows["f1"] = rng.integers(0, high, size), rng.integers(0, 5, size)
        write_run(tmp / f"{i}.npy", rows)
        runs.append(tmp / f"{i}.npy")
        union.append(np.stack([rows["f0"], rows["f1"], np.full(size, i)], axis=1))
    chunks = list(merge_runs(runs, block))
    got = np.concatenate([np.stack([rows["f0"], rows["f1"], source], axis=1) for rows, source in chunks]
                         or [np.empty((0, 3), dtype=np.uint64)])
    expected = np.concatenate(union)
    assert np.array_equal(got[:, :2], expected[np.lexsort((expected[:, 1], expected[:, 0]))][:, :2])
    assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, expected.tolist()))
    ends = [tuple(rows[-1].tolist()) for rows, _ in chunks[:-1] if len(rows)]
    starts = [tuple(rows[0].tolist()) for rows, _ in chunks[1:] if len(rows)]
    assert all(end < start for end, start in zip(ends, starts))


# ------------------------------------------------------------------------------------ the keyed generator


def test_keyed_exponentials_are_uniform_and_independent():
    """Counting uids (neighbours differ in one bit), four draws each: the uniforms exp(-E) fill 64 equal
    bins as a uniform would (chi-square), and neither neighbouring uids nor consecutive draws nor two
    seeds are correlated.

    Mutations caught: ``row_keys`` ignoring ``f1`` (every counting uid gets the same draws); the uniform
    taken from ``bits >> 12`` (only [0, 0.5)); ``exponentials`` ignoring the draw index (``draws * 0``).
    """
    n = 1 << 15
    uids = np.zeros(n, dtype=UID_DTYPE)
    uids["f1"] = np.arange(n, dtype=np.uint64)
    keys = row_keys(uids, 0)
    e = exponentials(keys, np.arange(4)[:, None])  # (4, n)
    u = np.exp(-e)
    observed = np.histogram(u, bins=64, range=(0, 1))[0]
    assert scipy.stats.chisquare(observed).pvalue > 1e-4
    assert scipy.stats.kstest(e.ravel(), "expon").pvalue > 1e-4
    bound = 5 / math.sqrt(n)
    assert abs(np.corrcoef(u[0, 1:], u[0, :-1])[0, 1]) < bound  # neighbouring uids
    assert abs(np.corrcoef(u[0], u[1])[0, 1]) < bound  # consecutive draws of one uid
    assert abs(np.corrcoef(u[0], np.exp(-exponentials(row_keys(uids, 1), 0)))[0, 1]) < bound  # two seeds
    assert np.array_equal(e[:, 5:9], exponentials(row_keys(uids[5:9], 0), np.arange(4)[:, None]))  # split-free


def test_keyed_race_is_the_sequential_process_with_counting_seeds():
    """Seeds 0, 1, 2, ... and uids counting in their high half: the race's mean draws per score decile
    match the one-draw-at-a-time loop's, and so do their spreads (correlated examples would widen them;
    the variance ratio of 300 against 300 samples stays within 0.6-1.6 but for a 5.7-sigma event).

    Mutations caught: ``row_keys`` ignoring the seed; ``row_keys`` ignoring ``f0`` (every example the same
    stream: variance ratios 1.6-5.6). Ignoring the draw index is caught by the joint-distribution tests
    of test_sample.py, not by this one."""
    uids = np.zeros(POOL.size, dtype=UID_DTYPE)
    uids["f0"] = np.arange(POOL.size, dtype=np.uint64)
    reference = np.array([sequential_reference(POOL, TOTAL, np.random.default_rng(10_000 + s), penalty=PENALTY)
                          for s in range(REPEATS)]).reshape(REPEATS, 10, 5).sum(axis=2)
    keyed = np.array([race_counts(POOL, TOTAL, uids, s, PENALTY) for s in range(REPEATS)])
    keyed = keyed.reshape(REPEATS, 10, 5).sum(axis=2)
    assert max_z(keyed, reference) < 5
    ratio = keyed.var(axis=0, ddof=1) / reference.var(axis=0, ddof=1)
    assert 0.6 < ratio.min() and ratio.max() < 1.6, ratio


def test_pool_sample_depends_on_the_uid_alone():
    """Mutation caught: ``sample_mask`` comparing with the rate of the rows given instead of the pool's."""
    uids = np.zeros(1 << 20, dtype=UID_DTYPE)
    uids["f1"] = np.arange(uids.size, dtype=np.uint64)
    whole = sample_mask(uids, uids.size)
    assert abs(whole.sum() - (1 << 18)) < 5 * math.sqrt(1 << 18)
    assert np.array_equal(np.concatenate([sample_mask(uids[:1000], uids.size), sample_mask(uids[1000:], uids.size)]),
                          whole)


# ------------------------------------------------------------------------------------ bad input and restarts


def test_a_uid_in_two_files_is_refused_naming_both(tmp_path, capsys, out_of_core):
    """Mutation caught: the scan's uniqueness check skipped (``unique.ok`` taken as present)."""
    frame = make_pool(500)
    folder = write_split(frame, tmp_path / "pool", [200], seed=0)
    extra = pd.read_parquet(folder / "part-000.parquet").iloc[[17]]
    pd.concat([pd.read_parquet(folder / "part-001.parquet"), extra]).to_parquet(folder / "part-001.parquet")
    assert sample(folder, tmp_path / "out" / "s.npy", *METHODS["scs"]) == 2
    err = error_line(capsys)
    assert re.search(r"uid [0-9a-f]{32} appears more than once.* in both \S+part-000\.parquet and \S+part-001\.parquet",
                     err), err
    assert not (tmp_path / "out" / "s.npy").exists()


@pytest.mark.parametrize("memory", ["1MB", "4GB"])
def test_bad_score_files_are_refused_in_one_line(tmp_path, capsys, monkeypatch, memory):
    """Both paths: a folder mixing uid- and key-joined files, a uid twice in one file, a NaN score.

    Mutation caught: ``score_files`` without the mixing check (the error names a missing uid column)."""
    monkeypatch.setattr(flyt.commands.sample, "_IN_MEMORY_BYTES", (10**12 if memory == "1MB" else 1, 0))
    frame = make_pool(300)
    cases = {
        "mixed": (lambda f: f.drop(columns="uid"), r"mixes uid-joined files \(\S+a\.parquet\) and key-joined files"),
        "twice": (lambda f: pd.concat([f, f.iloc[[3]]]), r"appears more than once.*, twice in \S+b\.parquet"),
        "nan": (lambda f: f.assign(score=f.score.where(f.index != 9)), r"\S+b\.parquet: 1 scores are NaN"),
    }
    for name, (edit, message) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        frame.iloc[:150].to_parquet(folder / "a.parquet")
        edit(frame.iloc[150:].reset_index(drop=True)).to_parquet(folder / "b.parquet")
        assert sample(folder, tmp_path / "out" / "s.npy", *METHODS["hcs"], "--memory_limit", memory) == 2
        err = error_line(capsys)
        assert re.search(message, err), (name, err)
        assert not (tmp_path / "out" / "s.npy").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--memory_limit", "lots"], "--memory_limit 'lots': expected a size such as 4GB"),
        (["--memory_limit", "10KB"], "at least 1MB"),
        (["--sampling_batch_size", 10, "--memory_limit", "1MB"], "needs the whole pool in memory"),
    ],
)
def test_bad_memory_flags(tmp_path, capsys, flags, message):
    """Mutation caught: ``parse_size`` without its 1MB floor."""
    make_pool(6000).to_parquet(tmp_path / "p.parquet")
    assert sample(tmp_path / "p.parquet", tmp_path / "out" / "s.npy", *METHODS["scs"], *flags) == 2
    assert message in error_line(capsys)


def test_a_killed_run_continues_and_ends_with_the_same_subset(tmp_path, monkeypatch, out_of_core):
    """A pass failing on one file stops the command and keeps the work done; the rerun redoes only what is
    missing and writes the subset of an uninterrupted run.

    Mutation caught: the work folder wiped at every start (the rerun scans every file again)."""
    frame = make_pool(2000)
    folder = write_split(frame, tmp_path / "pool", [500, 1000, 1500], seed=0)
    assert sample(folder, tmp_path / "clean.npy", *METHODS["scs"]) == 0
    original = flyt.jobs.sample_passes.Collect.run

    def failing(self, unit, state):
        if unit.name == "000002":
            raise OSError("disk went away")
        return original(self, unit, state)

    monkeypatch.setattr(flyt.jobs.sample_passes.Collect, "run", failing)
    assert sample(folder, tmp_path / "s.npy", *METHODS["scs"]) == 2
    work = tmp_path / ".s.npy.work"
    assert len(list((work / "scan").glob("*.stats.npy"))) == 4 and not (tmp_path / "s.npy").exists()
    monkeypatch.setattr(flyt.jobs.sample_passes.Collect, "run", original)
    scans = []
    monkeypatch.setattr(flyt.jobs.sample_passes.Scan, "run", lambda self, unit, state: scans.append(unit))
    assert sample(folder, tmp_path / "s.npy", *METHODS["scs"]) == 0
    assert scans == [] and (tmp_path / "s.npy").read_bytes() == (tmp_path / "clean.npy").read_bytes()
    assert not work.exists()



def test_out_of_core_on_a_local_ray_equals_in_memory(tmp_path, monkeypatch):
    """``--engine ray`` (the command starts a local Ray): the per-file passes run as Ray tasks and the
    subset, counts and figures are the in-memory path's. Mutation caught: ``RayExecutor`` sending each
    actor its batch without the first unit (that file's pass never runs). (Dropping a unit's *result*
    goes unseen: the passes read each other's outputs from disk, not the returned statistics.)"""
    frame = make_pool(3000)
    frame.to_parquet(tmp_path / "whole.parquet")
    flags = METHODS["scs at a unique fraction"]
    assert sample(tmp_path / "whole.parquet", tmp_path / "memory.npy", *flags) == 0
    expected = outputs(tmp_path / "memory.npy")
    assert expected[3] == "in memory"
    monkeypatch.setattr(flyt.commands.sample, "_IN_MEMORY_BYTES", (10**12, 0))
    folder = write_split(frame, tmp_path / "split", [700, 1500, 2200], seed=1)
    assert sample(folder, tmp_path / "ray.npy", *flags, "--memory_limit", "1MB", "--engine", "ray") == 0
    got = outputs(tmp_path / "ray.npy")
    assert got[3].startswith("out of core") and got[0] == expected[0] and got[2] == expected[2]
    pd.testing.assert_frame_equal(got[1], expected[1])
