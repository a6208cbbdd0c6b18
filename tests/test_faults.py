"""Every (case, command) row of docs/reliability.md's fault table, run on the fault-injection pool.

Each command runs in process (``flyt.cli.main``) on its case's folder; the observed outcome is written
in the table's own words (``exit 0; skipped: CAUSE N`` from the command's summary, reshard's ``note:``
lines, ``exit N; names FILE`` from its last error lines) and must equal the row. Mutations seen to fail this test: ``tar_samples``
ignoring ``on_damage`` (train and train-clip exit 2 on truncated_tar); ``_text`` returning "" for an empty
caption (empty_caption: "skipped: none"); ``_image`` without the DecompressionBombWarning filter
(decompression_bomb: "skipped: none", after decoding 10^8 pixels); a table row's outcome edited.
With --workers 2: ``DamagedShards`` printing in the workers too (train-clip names the shard 3 times);
the train loop not naming what its workers hand over (train --seed 5, whose probe batch, read in
process, misses the damaged shard: no warning). ``decode_pair`` not counting ``missing_uid`` (the
json_without_uid rows of score and features: "skipped: none"). ``flyt eval``: ``run``
without its per-task ``except FlytError`` (task_truncated_tar: exit 2); ``test_shards`` without the
``nshards.txt`` check (task_missing_shard: exit 0); the summary's skipped counts left out
(task_not_an_image, task_missing_label: "skipped: none").
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from flyt import cli
from flyt.data import webdataset
from flyt.data.webdataset import DamagedShards
from flyt.demo import faulty_pool, toydata

TABLE = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"
NAMED = ("00000001.tar", "meta.json", "scores.parquet", "subset.npy", "test/1.tar", "nshards.txt")


def table_rows() -> list[tuple[str, str, str]]:
    """(case, command, outcome) of the fault table: the rows between its two marker comments."""
    text = TABLE.read_text()
    body = text.split("<!-- fault table -->")[1].split("<!-- end fault table -->")[0]
    rows = [[c.strip().strip("`") for c in line.strip().strip("|").split("|")] for line in body.splitlines()
            if line.startswith("|") and not line.startswith("|---")]
    return [tuple(r) for r in rows[1:]]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    task = toydata.write_task(root / "tasks", name="digits", layout="simple", n_train=20, n_test=4)
    return faulty_pool.write_faulty_pool(root / "cases"), task.eval_dir, root


@pytest.fixture(scope="module")
def scorer(world):
    """A FLYT checkpoint for ``flyt score`` (one step on a clean pool), made when a row first needs it."""
    _, task, root = world
    toydata.write_pool(root / "clean" / "pool", 16, n_shards=1, corruption={})
    assert cli.main(_argv("flyt train", root / "clean", task, root / "run") + ["--n_iterations", "1"]) == 0
    return next((root / "run").glob("*/checkpoints/scoring_epoch_latest.pt"))


def _argv(command: str, case: Path, task: Path, out: Path, checkpoint: Path | None = None) -> list[str]:
    """The command line of a row; flags written in its command cell (``flyt train --workers 2``) come last,
    so they win over the defaults here."""
    words = command.split()
    return _base_argv(" ".join(words[:2]), case, task, out, checkpoint) + words[2:]


def _base_argv(command: str, case: Path, task: Path, out: Path, checkpoint: Path | None) -> list[str]:
    pool = str(case / "pool")
    if command == "flyt score":
        return ["score", "--checkpoint", str(checkpoint), "--upstream_data_dir", pool, "--output", str(out),
                "--workers", "0"]
    if command == "flyt train":
        return ["train", "--upstream_data_dir", pool, "--downstream_task_names", str(task), "--model", "flyt-tiny",
                "--upstream_batch_size", "8", "--downstream_batch_size", "4", "--n_iterations", "2", "--workers", "0",
                "--shuffle_buffer", "8", "--output_dir", str(out)]
    if command == "flyt train-clip":
        return ["train-clip", "--upstream_data_dir", pool, "--model", "flyt-tiny", "--steps", "2", "--batch_size", "8",
                "--workers", "0", "--output_dir", str(out)]
    if command == "flyt features":
        return ["features", "--upstream_data_dir", pool, "--output", str(out), "--scores", "caption_words",
                "image_width", "--workers", "0"]
    if command == "flyt reshard":
        subset = case / "subset.npy"
        if not subset.exists():
            from flyt.data.subset import save_subset

            save_subset(out.parent / f"{out.name}_subset.npy", _uids(case))
            subset = out.parent / f"{out.name}_subset.npy"
        return ["reshard", "--pool", pool, "--subset", str(subset), "--output", str(out), "--workers", "1"]
    if command == "flyt eval":  # a clean task first: it is still evaluated and written when the case's task fails
        return ["eval", "--model", "flyt-tiny", "--tasks", str(task), str(case / "task"), "--output",
                str(out.with_suffix(".jsonl")), "--batch_size", "8", "--workers", "0"]
    if command == "flyt sample":
        return ["sample", "--scores", str(case / "scores.parquet"), "--method", "topk", "--fraction", "0.5",
                "--output", str(out.with_suffix(".npy"))]
    raise AssertionError(f"no command line for {command!r}")


def _uids(case: Path) -> list[str]:
    import pandas as pd

    return sorted(set(pd.concat([pd.read_parquet(p) for p in sorted((case / "pool").glob("*.parquet"))])["uid"].dropna()))


def _observed(rc: int, out: str, err: str, command: str) -> str:
    if rc != 0:
        last = [line for line in err.splitlines() + out.splitlines() if "FAILED" in line or line.startswith("flyt")]
        named = [n for n in NAMED if any(n in line for line in last[-3:])]
        return f"exit {rc}; names {named[0] if named else 'nothing'}"
    done = next((line for line in out.splitlines() if re.match(r"flyt [\w-]+: (done|.*skipped: )", line)), "")
    if command.startswith("flyt reshard"):  # its summary notes what the subset's rows could not take
        return "exit 0; " + ("; ".join(line for line in out.splitlines() if line.startswith("note: ")) or "no note")
    if ": done {" in done:  # train and train-clip: skipped causes (their counts follow the seeded draws)
        causes = json.loads(done.split(": done ", 1)[1])["skipped"]
        shown = ", ".join(sorted(causes)) or "none"
        warned = [n for n in NAMED if "damaged shard" in err and n in err]
        return f"exit 0; skipped: {shown}" + (f"; warns once naming {warned[0]}" if warned else "")
    return f"exit 0; skipped: {done.rsplit('skipped: ', 1)[1]}"


def test_the_fault_table_covers_every_case():
    """Mutation seen to fail: the empty_caption row deleted from the table."""
    cases = {row[0] for row in table_rows()}
    assert cases == set(faulty_pool.CASES)


@pytest.mark.parametrize("case,command,outcome", table_rows())
def test_each_fault_has_the_outcome_its_row_states(world, request, case, command, outcome, capfd, tmp_path):
    """Mutations seen to fail: see the module's docstring."""
    folders, task, _ = world
    webdataset.NAMED.clear()  # named once per process: each command here is a process of its own
    checkpoint = request.getfixturevalue("scorer") if command.startswith("flyt score") else None
    capfd.readouterr()
    rc = cli.main(_argv(command, folders[case], task, tmp_path / "out", checkpoint))
    out, err = capfd.readouterr()
    observed = _observed(rc, out, err, command)
    assert observed == outcome, f"{case} / {command}: observed {observed!r}\n{out[-1500:]}\n{err[-1500:]}"
    if "warns once" in outcome:
        assert err.count("damaged shard") == 1


def test_a_damaged_shard_keeps_exactly_the_samples_before_the_damage(world, tmp_path, capsys):
    """The truncated shard gives every sample whose successor's first member precedes the cut (the one in
    progress is lost), the next shard is read whole, the read counts once; a pool of shards that all break
    before a sample is an error, not an endless loop. Mutations seen to fail: ``on_damage`` called with
    ``read + 1``; ``DamagedShards`` without its ``samples_read == 0`` guard (100 draws of the junk shard
    end quietly instead of raising; a resampled stream would loop for ever)."""
    import itertools
    import tarfile
    from collections import Counter

    from flyt.data.webdataset import tar_samples
    from flyt.errors import FlytError

    folders, _, _ = world
    pool = folders["truncated_tar"] / "pool"
    whole = tmp_path / "whole"
    toydata.write_pool(whole, faulty_pool.SAMPLES, n_shards=faulty_pool.SHARDS, seed=0, corruption={})
    cut = (pool / "00000001.tar").stat().st_size
    with tarfile.open(whole / "00000001.tar") as tar:
        firsts = {}  # key -> end of its first member's data
        for m in tar:
            firsts.setdefault(m.name.partition(".")[0], m.offset_data + m.size)
    keys = list(firsts)
    expected = [k for k, nxt in zip(keys, keys[1:]) if firsts[nxt] <= cut]
    skipped, reported = Counter(), []
    damage = DamagedShards(skipped, 2)
    samples = list(tar_samples([str(pool / "00000001.tar"), str(pool / "00000000.tar")],
                               on_damage=lambda url, msg, n: (reported.append(n), damage(url, msg, n))))
    kept = [s["__key__"] for s in samples if s["__url__"].endswith("00000001.tar")]
    assert 0 < len(expected) < len(keys) and kept == expected and reported == [len(expected)]
    assert all({"jpg", "txt", "json"} <= set(s) for s in samples)
    assert len(samples) - len(kept) == faulty_pool.SAMPLES // faulty_pool.SHARDS and skipped == {"damaged_shard": 1}
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar" * 100)
    with pytest.raises(FlytError, match=r"no shard can be read: cannot read .*junk\.tar"):
        list(tar_samples(itertools.repeat(str(junk), 100), on_damage=DamagedShards(Counter(), 1)))


def test_a_damaged_shard_is_named_once_in_its_message(world):
    """The reason comes without webdataset's ``@ <_io.BufferedReader name=...>`` suffix, which named the
    shard a second time. Mutation caught: the suffix kept (the path appears twice)."""
    from flyt.data.webdataset import tar_samples
    from flyt.errors import FlytError

    shard = world[0]["truncated_tar"] / "pool" / "00000001.tar"
    with pytest.raises(FlytError) as caught:
        list(tar_samples([str(shard)]))
    assert str(caught.value) == f"cannot read {shard}: unexpected end of data"
