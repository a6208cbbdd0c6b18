"""Progress and noise in logs: plain lines in a log file, a bar on a terminal, no third-party warnings."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
import torch

from flyt import progress

from flyt.demo import toydata
from flyt.errors import FlytError

NOISE = ("torch.jit.script", "initialized randomly", "WARNING:root")


def _env(seconds: str) -> dict:
    return dict(os.environ, FLYT_PROGRESS_SECONDS=seconds)


def test_log_file_gets_plain_progress_lines_and_no_noise(tmp_path):
    """A 4-step ``flyt train-clip`` into a file: one plain line per step (N=0), no redraw, no warning.

    Mutations run: ``bar`` always returning tqdm (carriage returns, the test fails); the ``ending``
    guard of ``PlainProgress.update`` removed (a fifth line, the last one twice: fails);
    ``create_clip`` without its ``_SayRandomInit`` filter (OpenCLIP's root-logger line: fails).
    """
    toydata.write_pool(tmp_path / "pool", 16, n_shards=1, seed=0)
    log = tmp_path / "log.txt"
    with log.open("w") as out:
        rc = subprocess.run([sys.executable, "-m", "flyt.cli", "train-clip", "--upstream_data_dir", str(tmp_path / "pool"),
                             "--model", "flyt-tiny", "--steps", "4", "--batch_size", "4", "--workers", "0",
                             "--output_dir", str(tmp_path / "out"), "--log_every_n_steps", "2"],
                            stdout=out, stderr=subprocess.STDOUT, env=_env("0"), timeout=120).returncode
    text = log.read_text()
    assert rc == 0, text
    assert "\r" not in text and "|" not in text
    assert not [noise for noise in NOISE if noise in text], text
    lines = [line for line in text.splitlines() if line.startswith("flyt train-clip: ") and " step (" in line]
    assert [line.split()[2] for line in lines] == [f"{i}/4" for i in range(1, 5)], text
    assert "(100%)" in lines[-1] and "after" in lines[-1] and "loss=" in lines[-1]
    assert text.count("flyt: model flyt-tiny: random initialisation") == 1


def test_forward_ad_after_create_clip_says_no_jit_warning():
    """torch's forward-AD decompositions, loaded by ``create_clip``, leave no ``torch.jit.script`` warning.

    Mutation run: the ``_load_forward_ad_quietly()`` call removed from ``create_clip`` (the jvp then
    warns: the test fails).
    """
    code = ("import torch; from flyt.models.networks import create_clip; create_clip('flyt-tiny'); "
            "torch.func.jvp(torch.sin, (torch.zeros(2),), (torch.ones(2),)); print('jvp ok')")
    done = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "jvp ok" in done.stdout, done.stderr
    assert "torch.jit.script" not in done.stderr and "FutureWarning" not in done.stderr, done.stderr


def test_terminal_gets_a_bar():
    """On a pseudo-terminal the same call draws tqdm's bar (carriage returns), not plain lines.

    Mutation run: ``_is_terminal`` returning False (plain lines on the terminal: the test fails).
    """
    code = ("from flyt import progress\n"
            "with progress.bar(total=3, desc='flyt x', unit='step') as b:\n"
            "    [b.update() for _ in range(3)]\n")
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # tqdm sizes its bar to it
    child = subprocess.Popen([sys.executable, "-c", code], stderr=follower, env=_env("0"))
    os.close(follower)
    out = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(leader)
    assert child.wait(timeout=60) == 0
    text = out.decode()
    assert "\r" in text and "3/3" in text and "|" in text, text
    assert "step (100%)" not in text


def test_plain_lines_at_most_every_n_seconds_plus_a_final_one():
    """With N an hour, 200 updates write only the final line; iteration counts its items.

    Mutation run: the time check of ``PlainProgress.update`` dropped (200 lines: the test fails).
    """
    out = io.StringIO()
    with progress.PlainProgress(total=200, desc="flyt t", unit="sample", initial=0, disable=False, file=out,
                                every=3600) as meter:
        for _ in range(200):
            meter.update()
    assert out.getvalue().splitlines() == [out.getvalue().splitlines()[0]]
    assert out.getvalue().startswith("flyt t: 200/200 sample (100%), ")
    out = io.StringIO()
    items = list(progress.PlainProgress(iter("abc"), total=None, desc="flyt i", unit="run", initial=0, disable=False,
                                        file=out, every=3600))
    assert items == ["a", "b", "c"] and out.getvalue().startswith("flyt i: 3 run, ")


@pytest.mark.parametrize("value", ["soon", "-1", "nan"])
def test_bad_progress_seconds_is_one_clear_error(monkeypatch, value):
    """Mutation run: ``_seconds`` without its range check (``-1`` accepted: the test fails)."""
    monkeypatch.setenv("FLYT_PROGRESS_SECONDS", value)
    with pytest.raises(FlytError, match="FLYT_PROGRESS_SECONDS"):
        progress.bar(total=1, file=io.StringIO())


def test_loaded_scorer_says_no_random_initialisation(tmp_path, capsys):
    """Its weights come next: ``load_scorer``'s own filter drops OpenCLIP's record before flyt's line.

    Mutation run: ``create_clip`` putting its filter first (``filters.insert(0, ...)``): the line is
    printed for a loaded scorer and the test fails.
    """
    from flyt.models.checkpoint import load_scorer
    from flyt.models.networks import ScorerSpec, build_scorer

    path = Path(tmp_path / "scorer.pt")
    torch.save({"state_dict": build_scorer(ScorerSpec("flyt", "flyt-tiny")).state_dict()}, path)
    assert "flyt: model flyt-tiny: random initialisation" in capsys.readouterr().err  # a new model says it
    load_scorer(path, model="flyt-tiny")
    assert "random initialisation" not in capsys.readouterr().err
