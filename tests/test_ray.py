"""``--engine ray`` on one local Ray with 2 CPUs: the same files as in-process, lost workers survived.

Mutations checked (each made once, the test seen failing, then restored):
- ``RayExecutor.run`` not requeueing the unit of a lost actor (``queue.appendleft`` -> ``pass``): the
  SIGKILL test finds unit ``002`` never done;
- the ``job.done(unit)`` check after a loss disabled: the SIGKILL test sees unit ``004`` run twice;
- only the first unit of a lost call requeued (``for unit in batch[:1]``): with two units per call,
  the unit queued behind the killed one is never done;
- one retry more than asked (``> self.retries + 1``): the self-killing unit fails after 3 losses, not 2;
- ``ScoreJob.units`` giving every unit ``taken=None``: the copied shard's uids are scored twice on Ray;
- ``_probe`` removed: ``ray.init`` retries the dead address for minutes (the subprocess times out);
- reshard making its executor after claiming ``--output``: the refused run leaves an output folder;
- an actor not handed back after its unit (``idle.append(actor)`` removed): the Ray reshard stops after
  the first two units (``ray.wait`` on nothing).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from flyt.atomic import atomic_path
from flyt.cli import main as cli
from flyt.demo import toydata
from flyt.runner.job import Job, Unit, run_job

import ray  # noqa: E402  (the test extra installs it: never skipped)
FIELDS = ["informative", "noise_a", "noise_b"]


@pytest.fixture(scope="module")
def local_ray():
    """One Ray for the module (2 CPUs, no dashboard); this module's jobs travel to its workers by value."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    if ray.is_initialized():  # a local Ray an earlier test's command started in this process (it keeps it)
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


# ---------------------------------------------------------------------------------------------- the executor


class Blocking(Job):
    """Unit i writes OUT/i.json and a line per run to OUT/runs/; units in ``block_before`` (``block_after``)
    block on their first run before (after) writing their output, with their pid in OUT/<name>.pid, until
    the test kills them; units in ``suicide`` SIGKILL their own worker every time."""

    title = "blocking"

    def __init__(self, out: Path, n: int, block_before=(), block_after=(), suicide=()):
        self.out, self.n = out, n
        self.block_before, self.block_after, self.suicide = set(block_before), set(block_after), set(suicide)

    def units(self):
        return [Unit(f"{i:03d}", i) for i in range(self.n)]

    def outputs(self, unit):
        return [self.out / f"{unit.name}.json"]

    def _block_first_time(self, unit):
        pid_file = self.out / f"{unit.name}.pid"
        if not pid_file.exists():
            with atomic_path(pid_file) as tmp:
                tmp.write_text(str(os.getpid()))
            time.sleep(60)  # killed long before

    def run(self, unit, state):
        (self.out / "runs").mkdir(exist_ok=True)
        (self.out / "runs" / f"{unit.name}.{os.getpid()}").write_text("ran")
        if unit.payload in self.suicide:
            os.kill(os.getpid(), signal.SIGKILL)
        if unit.payload in self.block_before:
            self._block_first_time(unit)
        with atomic_path(self.outputs(unit)[0]) as tmp:
            tmp.write_text(json.dumps({"unit": unit.payload}))
        if unit.payload in self.block_after:
            self._block_first_time(unit)
        return {"samples": 10}


def _kill_when_blocked(out: Path, names: list[str]) -> threading.Thread:
    def watch():
        for name in names:
            pid_file = out / f"{name}.pid"
            deadline = time.monotonic() + 30
            while not pid_file.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            os.kill(int(pid_file.read_text()), signal.SIGKILL)  # a real kill: no cleanup in the worker

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("per_call", [1, 2])
def test_a_killed_worker_costs_its_unit_one_rerun_and_a_finished_unit_none(local_ray, tmp_path, per_call):
    """With two units per call, the unit queued behind a killed one is requeued too (it never started)."""
    from flyt.runner.on_ray import RayExecutor

    job = Blocking(tmp_path, 6, block_before={2}, block_after={4})
    job.units_per_call = per_call
    watcher = _kill_when_blocked(tmp_path, ["002", "004"])
    report = run_job(job, RayExecutor())
    watcher.join(5)
    assert sorted(report.done) == [f"{i:03d}" for i in range(6)] and not report.failed
    for i in range(6):
        assert json.loads((tmp_path / f"{i:03d}.json").read_text()) == {"unit": i}
    runs = sorted(p.name.split(".")[0] for p in (tmp_path / "runs").iterdir())
    assert runs == ["000", "001", "002", "002", "003", "004", "005"]  # 002 again on a fresh actor, 004 not
    assert report.done["004"] == {} and report.totals()["samples"] == 50  # 004's counts are in its outputs
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_unit_that_keeps_killing_its_worker_fails_after_the_retries(local_ray, tmp_path):
    from flyt.runner.on_ray import RayExecutor

    report = run_job(Blocking(tmp_path, 3, suicide={1}), RayExecutor(retries=1, max_actors=1))
    assert sorted(report.done) == ["000", "002"]
    assert report.failed["001"].startswith("lost its Ray worker 2 times")
    assert len(list((tmp_path / "runs").glob("001.*"))) == 2


# ---------------------------------------------------------------------------------------------- flyt score


@pytest.fixture(scope="module")
def exp(tmp_path_factory) -> dict:
    """A 4-shard pool plus a copy of shard 0 (its uids repeated), input scores, M-FLYT and FLYT checkpoints."""
    import torch

    from flyt.models.networks import ScorerSpec, build_scorer

    root = tmp_path_factory.mktemp("ray_score")
    df = toydata.write_pool(root / "pool", 160, n_shards=4, seed=0, n_broken=3)
    toydata.write_score_parquets(df, root / "scores", columns=FIELDS)
    for ext in ("tar", "parquet"):
        shutil.copy(root / "pool" / f"00000000.{ext}", root / "pool" / f"00000009.{ext}")
    torch.manual_seed(0)
    ckpts = {}
    for spec in (ScorerSpec("mflyt", parquet_fields=FIELDS), ScorerSpec("flyt", "flyt-tiny")):
        model = build_scorer(spec, mixer_init="random") if spec.mode == "mflyt" else build_scorer(spec)
        ckpts[spec.mode] = root / f"{spec.mode}.pt"
        torch.save({"state_dict": model.state_dict(), "flyt": {"scorer": spec.to_dict()}}, ckpts[spec.mode])
    return {"root": root, "df": df, **ckpts}


def _score(exp, mode: str, out: Path, *extra) -> int:
    argv = ["score", "--checkpoint", str(exp[mode]), "--upstream_data_dir", str(exp["root"] / "pool"),
            "--output", str(out), "--workers", "0"]
    argv += ["--parquet_dir", str(exp["root"] / "scores")] if mode == "mflyt" else ["--batch_size", "16"]
    return cli(argv + [str(a) for a in extra])


def _parquets(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.parquet"))}


@pytest.mark.parametrize("mode", ["mflyt", "flyt"])
def test_score_on_ray_writes_the_in_process_files(local_ray, one_thread, exp, tmp_path, mode):
    """One torch thread here, as in a 1-CPU actor: the same float sums, so the same bytes."""
    import pandas as pd

    assert _score(exp, mode, tmp_path / "local") == 0
    # FLYT: one actor of 2 CPUs, its data loader 2 processes reading 2 shards per call
    assert _score(exp, mode, tmp_path / "ray", "--engine", "ray", *(["--workers", 2] if mode == "flyt" else [])) == 0
    reference = _parquets(tmp_path / "local")
    assert len(reference) == 5 and _parquets(tmp_path / "ray") == reference  # byte for byte
    union = pd.concat([pd.read_parquet(tmp_path / "ray" / name) for name in reference])
    assert union["uid"].is_unique and len(pd.read_parquet(tmp_path / "ray" / "00000009.parquet")) == 0
    summary = json.loads((tmp_path / "ray" / "_summary.json").read_text())
    assert summary["engine"] == "ray" and summary["shards_done"] == 5
    copy = summary["per_shard"]["00000009"]  # every uid of the copied shard is a repeat: scored by 00000000
    assert copy["scored"] == 0 and copy["skipped"]["repeated_uid"] == summary["per_shard"]["00000000"]["scored"]
    assert summary["coverage"] == {"pool_shards": 5, "with_scores": 5, "complete": True, "extra_files": []}
    if mode == "mflyt":  # two jobs on Ray, each a part of the pool: the same files again
        for part in range(2):
            assert _score(exp, mode, tmp_path / "split", "--engine", "ray", "--shard_index", part,
                          "--num_shards", 2) == 0
        assert _parquets(tmp_path / "split") == reference


def test_an_address_that_does_not_answer_is_one_line_and_fast(exp, tmp_path):
    with socket.socket() as sock:  # a port nothing listens on (bound, never listening)
        sock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "flyt.cli", "score", "--checkpoint", str(exp["mflyt"]),
                               "--upstream_data_dir", str(exp["root"] / "pool"), "--output", str(tmp_path / "out"),
                               "--parquet_dir", str(exp["root"] / "scores"), "--engine", "ray",
                               "--ray_address", address], capture_output=True, text=True, timeout=60)
        seconds = time.monotonic() - started
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == [f"flyt score: error: --ray_address {address}: no Ray cluster answers there (Connection "
                     "refused); start one with `ray start --head`, or leave --ray_address and RAY_ADDRESS unset "
                     "for a local Ray"]
    assert seconds < 30 and not list((tmp_path / "out").glob("*.parquet"))
    # the same from RAY_ADDRESS, for reshard: refused before its output folder is made
    from flyt.data.subset import save_subset

    save_subset(tmp_path / "subset.npy", exp["df"]["uid"].tolist()[:5], [1] * 5)
    done = subprocess.run([sys.executable, "-m", "flyt.cli", "reshard", "--pool", str(exp["root"] / "pool"),
                           "--subset", str(tmp_path / "subset.npy"), "--output", str(tmp_path / "resharded"),
                           "--engine", "ray"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "RAY_ADDRESS": address})
    assert done.returncode == 2 and f"--ray_address {address}: no Ray cluster" in done.stderr.strip()
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "resharded").exists()


# ---------------------------------------------------------------------------------------------- flyt reshard


def _reshard_files(out: Path) -> dict:
    """Every output file's bytes; the stats files without their clock readings, meta.json without its folder."""
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.suffix != ".json"}
    for path in out.glob("*_stats.json"):
        files[path.name] = {k: v for k, v in json.loads(path.read_text()).items()
                            if k not in ("duration", "start_time", "end_time")}
    files["meta"] = {k: v for k, v in json.loads((out / "meta.json").read_text()).items() if k != "output_dir"}
    return files


def test_reshard_on_ray_writes_the_in_process_shards(local_ray, exp, tmp_path):
    from flyt.data.subset import save_subset

    uids = exp["df"]["uid"].tolist()
    wanted = {uid: 1 + i % 3 for i, uid in enumerate(uids[::3])}
    save_subset(tmp_path / "subset.npy", list(wanted), list(wanted.values()))
    argv = ["reshard", "--pool", str(exp["root"] / "pool"), "--subset", str(tmp_path / "subset.npy"),
            "--shard_size", "9", "--seed", "3"]
    assert cli(argv + ["--output", str(tmp_path / "local"), "--workers", "1"]) == 0
    assert cli(argv + ["--output", str(tmp_path / "ray"), "--engine", "ray"]) == 0
    reference = _reshard_files(tmp_path / "local")
    assert len([name for name in reference if name.endswith(".tar")]) == -(-sum(wanted.values()) // 9)
    assert _reshard_files(tmp_path / "ray") == reference
