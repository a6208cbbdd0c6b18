"""Kill -9 anywhere: every long command SIGKILLed (its whole process group) at random moments, then rerun.

For each command: one uninterrupted run (the reference, timed), then ``KILLS`` runs (more for the cheap
ones), each SIGKILLed after a seeded random delay over the reference's working time (after its start-up),
the first of them the moment it is in mid-work; then one rerun to completion. The final outputs must
equal the reference's, with no temporary, work folder or half-written file left, and every uid once.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from flyt.demo import toydata
from test_features import _teacher_file
from test_ray import FIELDS, _reshard_files
from test_sample_out_of_core import make_pool, write_split
from train_runs import ENV, TIMEOUT_S, assert_same_run, command, logged_steps, start, wait_for

KILLS = 3
CLI = [sys.executable, "-m", "flyt.cli"]


def _run(cmd: list[str]) -> None:
    """Run to completion."""
    done = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-2000:]


def reference(cmd: list[str], marker: Path, log: Path) -> tuple[float, float]:
    """Run to completion: (seconds until ``marker`` appeared, i.e. the imports and setup, total seconds)."""
    started, startup = time.monotonic(), None
    proc = start(cmd, log)
    while proc.poll() is None:
        if startup is None and marker.exists():
            startup = time.monotonic() - started
        time.sleep(0.01)
    assert proc.returncode == 0 and startup is not None, log.read_text()[-2000:]
    return startup, time.monotonic() - started


def kill_loop(cmd: list[str], window: tuple[float, float], seed: int, log: Path, kills: int = KILLS,
              first=None, after_kill=lambda: None) -> int:
    """``kills`` runs of ``cmd``, each SIGKILLed (the process group) after a random delay in ``window``,
    ``after_kill()`` after each; then one rerun to completion. Returns how many runs the kill cut short.

    A run of these tiny jobs is mostly start-up, so the random kills often miss the work; with ``first``
    (a condition on the outputs, met in mid-work), the first run is killed the moment it holds."""
    rng, cut = random.Random(seed), 0
    for i in range(kills):
        proc = start(cmd, log)
        try:
            if i == 0 and first is not None:
                wait_for(proc, first, "the first kill's moment", log)
            else:
                proc.wait(rng.uniform(*window))
        except subprocess.TimeoutExpired:
            pass
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # loader workers and a local Ray included
            except ProcessLookupError:
                pass
            proc.wait()
        cut += proc.returncode == -signal.SIGKILL
        assert proc.returncode in (0, -signal.SIGKILL), log.read_text()[-2000:]
        after_kill()
    _run(cmd)
    return cut


def no_leftovers(folder: Path) -> None:
    """No temporary of ``atomic_path`` and no work folder anywhere under ``folder``."""
    left = [p for p in folder.rglob(".*") if p.name.endswith((".tmp", ".work")) or p.name == ".work"]
    assert not left, f"left behind: {left}"


def parquets(folder: Path, pattern: str) -> dict[str, pd.DataFrame]:
    return {p.name: pd.read_parquet(p) for p in sorted(folder.glob(pattern))}


def killed_in_summary_write(folder: Path):
    """After each kill: the temporary a kill in the summary's write leaves (too short a write to hit by chance)."""
    return lambda: folder.mkdir(exist_ok=True) or (folder / "._summary.json.killed.tmp").write_text("{")


def assert_same_scores(expected: Path, got: Path, pattern: str) -> None:
    """Value-equal per-shard parquets, and every uid of the pool exactly once in their union."""
    a, b = parquets(expected, pattern), parquets(got, pattern)
    assert list(a) == list(b) and a
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name], obj=name)
    union = pd.concat(b.values())["uid"]
    assert union.is_unique and set(union) == set(pd.concat(a.values())["uid"])
    no_leftovers(got)


def assert_same_embeddings(expected: Path, got: Path) -> None:
    """The same embedding cache (``flyt features --save_embeddings``), file for file, if there is one."""
    names = sorted(p.name for p in (expected / "embeddings").glob("*.npy"))
    assert names == sorted(p.name for p in (got / "embeddings").glob("*.npy"))
    for name in names:
        assert (expected / "embeddings" / name).read_bytes() == (got / "embeddings" / name).read_bytes(), name


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> dict:
    """A 4-shard pool with broken samples, its input scores, and M-FLYT, FLYT and teacher checkpoints."""
    from flyt.models.networks import ScorerSpec, build_scorer

    root = tmp_path_factory.mktemp("kill_anywhere")
    df = toydata.write_pool(root / "pool", 120, n_shards=4, seed=0, n_broken=2)
    toydata.write_score_parquets(df, root / "scores", columns=FIELDS)
    torch.manual_seed(0)
    exp = {"root": root, "df": df, "pool": root / "pool", "teacher": _teacher_file(root / "teacher.pt", 0)}
    for spec in (ScorerSpec("mflyt", parquet_fields=FIELDS), ScorerSpec("flyt", "flyt-tiny")):
        model = build_scorer(spec, mixer_init="random") if spec.mode == "mflyt" else build_scorer(spec)
        exp[spec.mode] = root / f"{spec.mode}.pt"
        torch.save({"state_dict": model.state_dict(), "flyt": {"scorer": spec.to_dict()}}, exp[spec.mode])
    return exp


def test_train_killed_anywhere_resumes_from_the_last_complete_checkpoint(train_runs, tmp_path):
    """M-FLYT ``flyt train --resume latest`` killed three times, the first in a checkpoint's write: the
    checkpoints of the uninterrupted run bit for bit, each step logged once, and every checkpoint a kill left
    complete never rewritten.

    The loop found that kill's temporary (a ``.<checkpoint>.pt.*.tmp``) left for good; ``fit`` now
    sweeps the run's folders. Mutations caught: that sweep removed (the checkpoint names differ);
    ``--resume`` ignored (a kept checkpoint rewritten)."""
    data, out, uninterrupted = train_runs
    started = time.monotonic()
    expected = uninterrupted("mflyt")
    seconds = max(time.monotonic() - started, 20.0)  # a run made earlier in the session is not timed
    run_dir = out / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    kept: dict[str, tuple[int, int]] = {}

    def after_kill():
        ckpt = run_dir / "checkpoints"
        files = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in ckpt.glob("*epoch_[0-9]*.pt")} \
            if ckpt.exists() else {}
        assert all(files[name] == identity for name, identity in kept.items() if name in files), "rewritten"
        kept.update(files)
        steps = logged_steps(run_dir / "metrics.jsonl")
        assert steps == sorted(set(steps)), f"a step logged twice: {steps}"

    cut = kill_loop(command(data, out, "mflyt"), (0.0, seconds), 13, tmp_path / "killed.log", after_kill=after_kill,
                    first=lambda: any((run_dir / "checkpoints").glob(".*.tmp")))  # in a checkpoint's write
    assert cut >= 1
    after_kill()  # the final run rewrote none of them either
    assert_same_run(expected, run_dir)
    no_leftovers(run_dir)
    shutil.rmtree(run_dir)


def _score_cmd(pool, mode: str, out: Path, *extra: str) -> list[str]:
    argv = [*CLI, "score", "--checkpoint", str(pool[mode]), "--upstream_data_dir", str(pool["pool"]),
            "--output", str(out), "--workers", "0", *extra]
    return argv + (["--parquet_dir", str(pool["root"] / "scores")] if mode == "mflyt" else ["--batch_size", "16"])


@pytest.mark.parametrize("mode", ["mflyt", pytest.param("flyt", marks=pytest.mark.slow)])
def test_score_killed_anywhere(pool, tmp_path, mode):
    """M-FLYT (FLYT, ~35 s here, is slow: a tiny CLIP forward per batch). Each pool shard's parquet equal
    to the uninterrupted run's, every uid once, no temporary left. Mutations caught: a shard counted done
    once the output folder holds any file (a stale folder as done: the shards after the first kill missing);
    the summary's temporary not swept (the planted one stays)."""
    window = reference(_score_cmd(pool, mode, tmp_path / "reference"), tmp_path / "reference", tmp_path / "ref.log")
    out = tmp_path / "out"
    cut = kill_loop(_score_cmd(pool, mode, out), window, 1, tmp_path / "killed.log",
                    first=lambda: any(out.glob("*.parquet")), after_kill=killed_in_summary_write(out))
    assert cut >= 1
    assert_same_scores(tmp_path / "reference", tmp_path / "out", "*.parquet")


# ``python -c HELD MARKER score ...``: a flyt command on at most 2 Ray actors whose driver, once the first shard's
# result is in, touches MARKER and waits there (so no further shard is handed out): a kill then is in mid-work
HELD = """import pathlib, sys, time
from flyt.runner import on_ray
run, marker = on_ray.RayExecutor.run, pathlib.Path(sys.argv.pop(1))
def held(self, job, units):
    self.max_actors = 2
    if type(job).__module__ == "flyt.jobs.repeats":  # the uid index first: run it through
        yield from run(self, job, units)
        return
    for i, result in enumerate(run(self, job, units)):
        yield result
        marker.touch()
        time.sleep(300)
on_ray.RayExecutor.run = held
from flyt.cli import main
sys.exit(main())
"""


def processes_of(sessions: set[int]) -> dict[int, str]:
    """The live (not zombie) processes of these sessions (a run started by ``start`` leads its own): pid -> name."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            comm, rest = (proc / "stat").read_text().rsplit(")", 1)
            state, _, _, session = rest.split()[:4]
        except (OSError, ValueError):
            continue
        if int(session) in sessions and state != "Z":
            found[int(proc.name)] = comm.split("(", 1)[1]
    return found


def assert_all_exit(sessions: set[int], seconds: float) -> None:
    """Every process of ``sessions`` gone within ``seconds``; stragglers are killed (so no test leaks them)."""
    deadline = time.monotonic() + seconds
    while (left := processes_of(sessions)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, f"still running {seconds:g} s after their run: {left}"


def _argv(pool, command: str, out: Path, *extra: str) -> list[str]:
    """``flyt score`` (M-FLYT) or ``flyt features``'s arguments (after ``flyt``)."""
    cmd = _score_cmd(pool, "mflyt", out, *extra) if command == "score" else [*_features_cmd(pool, out), *extra]
    return cmd[len(CLI):]


@pytest.mark.parametrize("command", ["score", pytest.param("features", marks=pytest.mark.slow)])
def test_on_ray_killed_in_mid_work_leaves_no_ray_and_the_rerun_finishes(pool, one_thread, tmp_path, command):
    """``flyt score --engine ray`` (``flyt features``: slow, ~35 s here) SIGKILLed (its process group: the
    driver and the local Ray it started) with some shards written, not all, then rerun: the files of an
    in-process run, every uid once, no temporary left.

    Ray's own cleanup, checked here: its head processes (gcs, raylet, agents) share the driver's process
    group and die with it; its actors lead process groups of their own, finish the call in flight and exit
    within seconds of their raylet (~4 s here), so a kill leaks no local Ray. Mutations caught: a shard
    counted done once the output folder holds any file (the rerun writes nothing: shards missing); the
    killed run's actors given 0.5 s instead of 30 to exit (the check names them: still running)."""
    from flyt.cli import main as cli

    out, log, marker = tmp_path / "out", tmp_path / "killed.log", tmp_path / "held"
    argv = _argv(pool, command, out, "--engine", "ray")
    pattern = "*.parquet" if command == "score" else "*_scores.parquet"
    assert cli(_argv(pool, command, tmp_path / "reference")) == 0  # here (one thread, as a 1-CPU actor): no start-up
    proc = start([sys.executable, "-c", HELD, str(marker), *argv], log)
    try:
        wait_for(proc, marker.exists, "the first shard's result", log)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    written = sorted(out.glob(pattern))
    assert 1 <= len(written) < 4, [p.name for p in written]  # in mid-work
    assert_all_exit({proc.pid}, 30)
    rerun = start([*CLI, *argv], log)
    try:
        assert rerun.wait(TIMEOUT_S) == 0, log.read_text()[-2000:]
    finally:
        assert_all_exit({rerun.pid}, 30)
    assert_same_scores(tmp_path / "reference", out, pattern)
    assert_same_embeddings(tmp_path / "reference", out)


@pytest.mark.slow  # ~75 s here: a local Ray starts in each of the five runs
def test_score_on_ray_killed_anywhere(pool, tmp_path):
    """The driver (and the local Ray it started, one process group) killed; the rerun finishes."""
    window = reference(_score_cmd(pool, "mflyt", tmp_path / "reference", "--engine", "ray"), tmp_path / "reference",
                       tmp_path / "ref.log")
    cut = kill_loop(_score_cmd(pool, "mflyt", tmp_path / "out", "--engine", "ray"), window, 2, tmp_path / "killed.log")
    assert cut >= 1
    assert_same_scores(tmp_path / "reference", tmp_path / "out", "*.parquet")


def _features_cmd(pool, out: Path) -> list[str]:
    return [*CLI, "features", "--upstream_data_dir", str(pool["pool"]), "--output", str(out), "--workers", "0",
            "--scores", "clip_score", "neg_clip_loss", "caption_words", "--teacher", f"a=flyt-tiny:{pool['teacher']}",
            "--batch_size", "16", "--neg_clip_batch_size", "16", "--neg_clip_batches", "2", "--save_embeddings"]


def test_features_killed_anywhere(pool, tmp_path):
    """The score files and the embedding cache of the uninterrupted run. Mutations caught: a shard counted
    done once the output folder holds any file (the column claim alone then stands for every shard); the
    summary's temporary not swept (the planted one stays)."""
    window = reference(_features_cmd(pool, tmp_path / "reference"), tmp_path / "reference", tmp_path / "ref.log")
    out = tmp_path / "out"
    cut = kill_loop(_features_cmd(pool, out), window, 3, tmp_path / "killed.log",
                    first=lambda: any((out / "embeddings").glob("*.npy")),  # its shard's parquet comes after
                    after_kill=killed_in_summary_write(out))
    assert cut >= 1
    assert_same_scores(tmp_path / "reference", tmp_path / "out", "*_scores.parquet")
    assert_same_embeddings(tmp_path / "reference", tmp_path / "out")


def _sample_cmd(scores: Path, out: Path) -> list[str]:
    return [*CLI, "sample", "--scores", str(scores), "--output", str(out), "--counts_output", f"{out}.counts.parquet",
            "--method", "scs", "--total_size", "6000", "--seed", "0", "--memory_limit", "1MB", "--workers", "1"]


def test_sample_out_of_core_killed_anywhere(tmp_path):
    """Out of core (6000 rows do not fit in 1MB): the passes, the work folder and the merge are killed.

    The loop found a kill in the plot's write leaving ``.s.png.*.tmp`` for good (4 of 15 seeds); that
    state is also made on purpose at the end, so the check does not hang on the timing. Mutations caught:
    ``flyt sample`` not sweeping its outputs' temporaries (the planted one stays); the work folder kept
    after the subset is written; a pass counting its files done once its folder exists (a stale work
    folder as done: the rerun fails on the files the kill kept it from writing)."""
    scores = write_split(make_pool(6000, seed=1), tmp_path / "scores", [2000, 4000], seed=0)
    window = reference(_sample_cmd(scores, tmp_path / "reference.npy"), tmp_path / ".reference.npy.work",
                       tmp_path / "ref.log")
    assert "out of core" in (tmp_path / "reference.npy.summary.json").read_text()
    out = tmp_path / "out" / "s.npy"
    out.parent.mkdir()
    cut = kill_loop(_sample_cmd(scores, out), window, 4, tmp_path / "killed.log", kills=2 * KILLS,
                    first=lambda: any((out.parent / ".s.npy.work").glob("*/collect/*.npy")))
    assert cut >= 1
    assert out.read_bytes() == (tmp_path / "reference.npy").read_bytes()
    pd.testing.assert_frame_equal(pd.read_parquet(f"{out}.counts.parquet"),
                                  pd.read_parquet(tmp_path / "reference.npy.counts.parquet"))
    final = {"s.npy", "s.npy.counts.parquet", "s.npy.summary.json", "s.png"}
    assert {p.name for p in out.parent.iterdir()} == final
    (out.parent / "s.png").unlink()  # what a kill in the plot's write leaves
    (out.parent / ".s.png.killed.tmp").write_bytes(b"half a PNG")
    _run(_sample_cmd(scores, out))
    assert {p.name for p in out.parent.iterdir()} == final and out.read_bytes() == (tmp_path / "reference.npy").read_bytes()


def test_reshard_killed_anywhere(pool, tmp_path):
    """Every uid of the subset as often as it asks, the shards, stats and meta.json of the uninterrupted run.
    Mutation caught: ``_claim`` taking an unfinished run's ``.work/job.json`` for a finished output (the
    rerun after the first kill reports it complete and fails on the missing meta.json)."""
    from flyt.data.subset import save_subset

    uids = pool["df"]["uid"].tolist()
    wanted = {uid: 1 + i % 3 for i, uid in enumerate(uids[::2])}
    save_subset(tmp_path / "subset.npy", list(wanted), list(wanted.values()))
    cmd = lambda out: [*CLI, "reshard", "--pool", str(pool["pool"]), "--subset", str(tmp_path / "subset.npy"),  # noqa: E731
                       "--output", str(out), "--shard_size", "9", "--seed", "3", "--workers", "1"]
    window = reference(cmd(tmp_path / "reference"), tmp_path / "reference", tmp_path / "ref.log")
    cut = kill_loop(cmd(tmp_path / "out"), window, 5, tmp_path / "killed.log", kills=2 * KILLS,
                    first=lambda: any((tmp_path / "out").glob("*.tar")))
    assert cut >= 1
    assert _reshard_files(tmp_path / "out") == _reshard_files(tmp_path / "reference")
    no_leftovers(tmp_path / "out")
    written = pd.concat(parquets(tmp_path / "out", "*.parquet").values())["uid"].value_counts()
    assert written.to_dict() == wanted  # every uid of the subset, as many times as it asks
