"""The per-shard runner: split, skip what is done, sweep temporaries, failures by unit, executors agree.

Mutations checked: ``share`` taking ``j % parts == 0`` for every part (the split test sees overlap);
``run_job`` running done units too (the rerun test sees them run again); no sweep (a stale temporary
survives); ``InProcess`` swallowing a unit's error (the failure test sees no failure).
"""

import json
import os
from pathlib import Path

import pytest

from flyt.atomic import atomic_path
from flyt.errors import FlytError
from flyt.runner.job import Job, Unit, job_split, missing_units, run_job, share
from flyt.runner.local import InProcess


class Squares(Job):
    """Unit i writes i*i to OUT/i.json; unit ``bad`` raises."""

    title = "squares"

    def __init__(self, out: Path, n: int, bad: int | None = None):
        self.out, self.n, self.bad = out, n, bad

    def units(self):
        return [Unit(f"{i:03d}", i) for i in range(self.n)]

    def outputs(self, unit):
        return [self.out / f"{unit.name}.json"]

    def setup(self):
        return {"pid": os.getpid()}

    def run(self, unit, state):
        if unit.payload == self.bad:
            raise FlytError(f"unit {unit.name} is broken")
        with atomic_path(self.outputs(unit)[0]) as tmp:
            tmp.write_text(json.dumps({"square": unit.payload ** 2, "pid": state["pid"]}))
        return {"samples": unit.payload, "skipped": {"odd": unit.payload % 2}}


@pytest.mark.parametrize("executor", [InProcess(1), InProcess(2, "thread"), InProcess(2, "process")],
                         ids=["inline", "threads", "processes"])
def test_every_unit_once_and_totals(tmp_path, executor):
    report = run_job(Squares(tmp_path, 7), executor)
    assert sorted(report.done) == [f"{i:03d}" for i in range(7)] and not report.failed
    assert report.totals() == {"samples": 21, "skipped": {"odd": 3}}
    assert [json.loads((tmp_path / f"{i:03d}.json").read_text())["square"] for i in range(7)] == [i * i for i in range(7)]


def test_parts_cover_the_units_once(tmp_path):
    job = Squares(tmp_path, 10)
    seen = []
    for part in range(3):
        seen += list(run_job(job, InProcess(1), part, 3).done)
    assert sorted(seen) == [u.name for u in job.units()]
    assert share(job.units(), 1, 3) == [Unit("001", 1), Unit("004", 4), Unit("007", 7)]


def test_rerun_skips_done_units_and_sweeps_temporaries(tmp_path):
    job = Squares(tmp_path, 4)
    run_job(job, InProcess(1), 0, 2)
    stale = tmp_path / ".001.json.abc123.tmp"
    stale.write_text("half")
    report = run_job(job, InProcess(1))
    assert report.already_done == 2 and sorted(report.done) == ["001", "003"]
    assert not stale.exists() and not missing_units(job)


def test_a_failed_unit_is_reported_and_the_others_finish(tmp_path):
    for executor in (InProcess(1), InProcess(2, "process")):
        job = Squares(tmp_path / executor.kind, 5, bad=2)
        report = run_job(job, executor)
        assert report.failed == {"002": "unit 002 is broken"}
        assert sorted(report.done) == ["000", "001", "003", "004"]
        assert [u.name for u in missing_units(job)] == ["002"]


def test_job_split_from_flags_and_torchrun():
    assert job_split(1, 3, {"RANK": "1", "WORLD_SIZE": "2"}) == (3, 6)
    assert job_split(None, None, {}) == (0, 1)
    for bad in ((1, None), (3, 3), (0, 0)):
        with pytest.raises(FlytError):
            job_split(*bad, {})


def test_progress_counts_units_and_samples_per_second(tmp_path, capsys):
    """Mutation: ``run_job`` without its ``set_postfix`` call (the line has no samples/s)."""
    run_job(Squares(tmp_path, 7), InProcess(1))
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("squares: 7/7 shard (100%)") and "samples_per_s=" in line


SLOW_JOB = """
import sys, time
sys.path.insert(0, {tests!r})
from pathlib import Path
from test_runner import Squares
from flyt.errors import FlytError, Preempted
from flyt.runner.job import run_job
from flyt.runner.local import InProcess

class Slow(Squares):
    def run(self, unit, state):
        time.sleep(0.2)
        return super().run(unit, state)

try:
    report = run_job(Slow(Path({out!r}), 20), InProcess(1))
    print("ran", sorted(report.done))
except (FlytError, Preempted) as exc:
    print(exc, file=sys.stderr)
    sys.exit(exc.exit_code)
"""


def test_sigterm_stops_cleanly_and_a_rerun_finishes(tmp_path):
    """A real SIGTERM mid-job: exit 75 with one line, finished units kept, none half-written, and the
    rerun does only the rest. Mutation checked: no SIGTERM handler (the process dies with -15 and no line)."""
    import signal
    import subprocess
    import sys
    import time

    script = SLOW_JOB.format(tests=str(Path(__file__).parent), out=str(tmp_path))
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("*.json"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 75, err
    assert "stopped by SIGTERM with" in err and "of 20 shards done" in err
    kept = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.json")}
    assert 3 <= len(kept) < 20 and not list(tmp_path.glob(".*.tmp"))
    assert all(json.loads((tmp_path / name).read_text())["square"] == int(name[:3]) ** 2 for name in kept)
    rerun = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert rerun.returncode == 0, rerun.stderr
    assert len(list(tmp_path.glob("*.json"))) == 20
    assert all((tmp_path / name).stat().st_mtime_ns == mtime for name, mtime in kept.items())  # not redone


def test_sigterm_ends_any_command_with_one_line_and_exit_75(tmp_path):
    """``flyt sample`` in memory (no runner, no checkpoint) gets SIGTERM mid-work, once it has used a
    second of CPU: exit 75, one line, nothing half-written. Mutation checked: ``cli._stop_on_sigterm`` not
    installed (the process dies with -15, no line)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    n = 3_000_000
    pd.DataFrame({"uid": [f"{i:032x}" for i in rng.choice(2**62, n, replace=False)],
                  "score": rng.normal(size=n)}).to_parquet(tmp_path / "scores.parquet")
    child = subprocess.Popen([sys.executable, "-m", "flyt.cli", "sample", "--scores", str(tmp_path / "scores.parquet"),
                              "--method", "scs", "--total_size", str(n), "--seed", "0",
                              "--output", str(tmp_path / "out" / "s.npy")], stderr=subprocess.PIPE, text=True)
    ticks = os.sysconf("SC_CLK_TCK")
    while child.poll() is None:  # SIGTERM once it has worked a second: well inside its ~5 s of CPU
        fields = open(f"/proc/{child.pid}/stat").read().rsplit(")", 1)[1].split()
        if (int(fields[11]) + int(fields[12])) / ticks >= 1.0:
            child.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    err = child.communicate(timeout=60)[1]
    assert child.returncode == 75, err[-2000:]
    assert err.strip().splitlines()[-1] == ("flyt sample: error: stopped by SIGTERM: every output written so far "
                                            "is complete; rerun the same command")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
