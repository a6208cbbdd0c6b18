"""``flyt reshard``: the output holds exactly the subset's multiset of samples, byte for byte, and is
the same whatever the worker count and however often a run is killed and restarted.

The pool is a toy DataComp pool (4 shards with parquets) plus a hand-made shard without a parquet in a
subfolder, holding a long key (PAX headers), extra member types, a key with a folder, and a sample
without a json.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import re
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds

import flyt.commands.reshard
from flyt.cli import main
from flyt.data.shards import list_shards
from flyt.errors import FlytError
from flyt.data.subset import save_subset
from flyt.demo.toydata import write_pool

REPO = Path(__file__).resolve().parents[1]
SHARD_SIZE = 7
LONG_KEY = "k" * 120
NAME = re.compile(r"^((?:.*/)?[^./]+)\.([^/]*)$")  # (key, extension), as WebDataset splits a member name
EXTRA_UIDS = {"long": "0123456789abcdef0123456789abcd00", "folder": "fedcba9876543210fedcba9876543200"}


def _tar_bytes(samples) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_600_000_000
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """(pool folder, {uid: {ext: bytes}} of every sample, pool-order uids of the toy shards)."""
    root = tmp_path_factory.mktemp("pool")
    df = write_pool(root, 60, n_shards=4, image_size=16, seed=1)
    extra = [
        (f"{LONG_KEY}.jpg", b"\xff\xd8 not really a jpeg"), (f"{LONG_KEY}.txt", b"long key"),
        (f"{LONG_KEY}.json", json.dumps({"uid": EXTRA_UIDS["long"]}).encode()),
        (f"{LONG_KEY}.seg.png", b"\x89PNG mask"), (f"{LONG_KEY}.cls", b"3"),
        ("nouid.jpg", b"image without json"), ("nouid.txt", b"no uid here"),
        ("dir/c1.json", json.dumps({"uid": EXTRA_UIDS["folder"], "key": "c1"}).encode()),
        ("dir/c1.webp", b"RIFF....WEBP"), ("dir/c1.npy", bytes(range(256))),
    ]
    (root / "extra").mkdir()
    (root / "extra" / "00000099.tar").write_bytes(_tar_bytes(extra))
    return root, _samples_by_uid(sorted(root.rglob("*.tar"))), df["uid"].tolist()


def _read(tar_paths):
    """[(key, {ext: bytes})] of the samples of some tars, in order, grouped as WebDataset does."""
    out = []
    for path in tar_paths:
        with tarfile.open(path) as tar:
            members = [(*NAME.match(m.name).groups(), m) for m in tar if m.isfile()]
            for key, group in itertools.groupby(members, key=lambda member: member[0]):
                out.append((key, {ext: tar.extractfile(m).read() for _, ext, m in group}))
    return out


def _member_offsets(path) -> list[tuple[int, int]]:
    with tarfile.open(path) as tar:
        return [(m.offset, m.offset_data) for m in tar]


def _samples_by_uid(tar_paths) -> dict:
    return {json.loads(s["json"])["uid"]: s for _, s in _read(tar_paths) if "json" in s}


def _subset(path, uids_counts: dict) -> Path:
    save_subset(path, list(uids_counts), list(uids_counts.values()))
    return path


@pytest.fixture(scope="module")
def wanted(pool):
    """{uid: count}: repeats, shards 1 and 3 untouched (their parquets let the scan skip them)."""
    _, _, uids = pool
    counts = {u: 1 + i % 4 for i, u in enumerate(uids[:9])} | {u: 1 for u in uids[30:34]}
    return counts | {EXTRA_UIDS["long"]: 3, EXTRA_UIDS["folder"]: 2}


def reshard(pool_dir, subset, out, *extra) -> int:
    parser = argparse.ArgumentParser()
    flyt.commands.reshard.add_arguments(parser)
    args = ["--pool", pool_dir, "--subset", subset, "--output", out, "--shard_size", SHARD_SIZE, *extra]
    return flyt.commands.reshard.run(parser.parse_args([str(a) for a in args]))


def _files(out: Path) -> dict:
    """Every output file's bytes, meta.json without the one field that names the folder itself, the
    stats files without their clock readings."""
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.suffix != ".json"}
    for path in out.glob("*_stats.json"):
        stats = json.loads(path.read_text())
        files[path.name] = {k: v for k, v in stats.items() if k not in ("duration", "start_time", "end_time")}
    meta = json.loads((out / "meta.json").read_text())
    del meta["output_dir"]
    return files | {"meta": meta}


@pytest.fixture(scope="module")
def reference(pool, wanted, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    subset = _subset(tmp / "subset.npy", wanted)
    assert reshard(pool[0], subset, tmp / "out", "--workers", 1) == 0
    return subset, tmp / "out"


def test_output_is_the_requested_multiset_byte_for_byte(pool, wanted, reference):
    _, source, _ = pool
    _, out = reference
    tars = sorted(out.glob("*.tar"))
    samples = _read(tars)
    assert Counter(json.loads(s["json"])["uid"] for _, s in samples) == Counter(wanted)
    for key, members in samples:
        assert members == source[json.loads(members["json"])["uid"]]  # every member, bytes unchanged
    keys = [key for key, _ in samples]
    assert len(set(keys)) == len(keys)
    assert {LONG_KEY, f"{LONG_KEY}_1", f"{LONG_KEY}_2", "dir/c1", "dir/c1_1"} <= set(keys)
    # pool order: shard by shard, each sample's copies together
    assert keys[:3] == ["000000000000", "000000000001", "000000000001_1"]
    sizes = [len(_read([t])) for t in tars]
    total = sum(wanted.values())
    assert sizes == [SHARD_SIZE] * (total // SHARD_SIZE) + ([total % SHARD_SIZE] if total % SHARD_SIZE else [])
    assert [t.name for t in tars] == [f"{j:08d}.tar" for j in range(len(tars))]
    for tar in tars:  # the parquet beside each shard lists what it holds, by the json's (pool) key
        table = pq.read_table(tar.with_suffix(".parquet")).to_pydict()
        held = [(json.loads(s["json"]), k) for k, s in _read([tar])]
        assert list(zip(table["uid"], table["key"])) == [(j["uid"], j.get("key", re.sub(r"_\d+$", "", k)))
                                                         for j, k in held]

    by_wds = [(s["__key__"], json.loads(s["json"])["uid"]) for s in wds.WebDataset([str(t) for t in tars],
                                                                                     shardshuffle=False)]
    assert by_wds == [(k, json.loads(s["json"])["uid"]) for k, s in samples]

    meta = json.loads((out / "meta.json").read_text())
    assert meta["output_shard_count"] == len(tars) and meta["output_shard_format"] == "{:08d}.tar"
    assert meta["output_count"] == total == meta["requested_count"]
    assert meta["requested_unique"] == meta["found_unique"] == len(wanted)
    assert meta["missing_unique"] == meta["missing_count"] == 0
    assert meta["input_shard_count"] == 5 and meta["input_shards_skipped"] == 2  # shards 1 and 3
    assert meta["processed_count"] == 30 + 3 and meta["no_uid_count"] == 1
    assert meta["shard_size"] == SHARD_SIZE and len(meta["subset_sha256"]) == 64
    assert not (out / ".work").exists()
    assert list_shards(out, "--pool") == [str(t) for t in tars]  # usable as a pool, meta.json agreeing


def test_workers_and_reruns_give_identical_output(pool, reference, tmp_path):
    subset, out = reference
    assert reshard(pool[0], subset, tmp_path / "two", "--workers", 2) == 0
    assert _files(tmp_path / "two") == _files(out)
    assert reshard(pool[0], subset, tmp_path / "two", "--workers", 2) == 0  # complete: nothing to do
    assert _files(tmp_path / "two") == _files(out)


def test_shuffle_is_a_seeded_permutation(pool, wanted, reference, tmp_path):
    subset, out = reference
    for name, workers in (("a", 1), ("b", 2)):
        assert reshard(pool[0], subset, tmp_path / name, "--workers", workers, "--shuffle_seed", 5) == 0
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    shuffled = _read(sorted((tmp_path / "a").glob("*.tar")))
    plain = _read(sorted(out.glob("*.tar")))
    assert sorted(map(repr, shuffled)) == sorted(map(repr, plain)) and shuffled != plain


@pytest.mark.parametrize("phase", ["_scan_shard", "_write_output_shard"])
def test_killed_run_restarts_to_the_same_output(pool, reference, tmp_path, monkeypatch, phase):
    subset, out = reference
    real, calls = getattr(flyt.commands.reshard, phase), []

    def dies_on_third_call(task):
        calls.append(task)
        if len(calls) == 3:
            raise KeyboardInterrupt  # like a kill: no cleanup beyond what atomic writes guarantee
        real(task)

    monkeypatch.setattr(flyt.commands.reshard, phase, dies_on_third_call)
    with pytest.raises(KeyboardInterrupt):
        reshard(pool[0], subset, tmp_path / "out", "--workers", 1)
    monkeypatch.undo()
    assert not (tmp_path / "out" / "meta.json").exists()
    (tmp_path / "out" / ".00000001.tar.x1y2.tmp").write_bytes(b"half a shard")  # left by a SIGKILL
    assert reshard(pool[0], subset, tmp_path / "out", "--workers", 2) == 0
    assert _files(tmp_path / "out") == _files(out)


def test_missing_uids_are_counted_and_refused_unless_allowed(pool, wanted, tmp_path, capsys):
    absent = {"00" * 15 + "01": 2, "ff" * 16: 1}
    subset = _subset(tmp_path / "subset.npy", wanted | absent)
    args = ["reshard", "--pool", str(pool[0]), "--subset", str(subset), "--output", str(tmp_path / "out")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"2 of {len(wanted) + 2} uids" in err and "(3 of" in err and "--allow_missing" in err
    assert not list((tmp_path / "out").glob("*.tar"))
    assert main(args + ["--allow_missing", "--workers", "1"]) == 0
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert (meta["missing_unique"], meta["missing_count"]) == (2, 3)
    assert meta["output_count"] == sum(wanted.values())
    samples = _read(sorted((tmp_path / "out").glob("*.tar")))
    assert Counter(json.loads(s["json"])["uid"] for _, s in samples) == Counter(wanted)


def test_refuses_to_mix_subsets_or_settings(pool, wanted, reference, tmp_path, monkeypatch):
    subset, out = reference
    other = _subset(tmp_path / "other.npy", dict(itertools.islice(wanted.items(), 3)))
    with pytest.raises(FlytError, match="different subset"):
        reshard(pool[0], other, out)
    with pytest.raises(FlytError, match="--shard_size 7, not 8"):
        reshard(pool[0], subset, out, "--shard_size", 8)
    with pytest.raises(FlytError, match="--shuffle_seed None, not 0"):
        reshard(pool[0], subset, out, "--shuffle_seed", 0)

    def killed(task):
        raise KeyboardInterrupt

    monkeypatch.setattr(flyt.commands.reshard, "_write_output_shard", killed)  # an unfinished run is protected too
    with pytest.raises(KeyboardInterrupt):
        reshard(pool[0], subset, tmp_path / "partial", "--workers", 1)
    with pytest.raises(FlytError, match="different subset"):
        reshard(pool[0], other, tmp_path / "partial")
    (tmp_path / "unrelated").mkdir()
    (tmp_path / "unrelated" / "notes.txt").write_text("mine")
    with pytest.raises(FlytError, match="not empty"):
        reshard(pool[0], subset, tmp_path / "unrelated")


def test_input_errors_name_the_file(pool, reference, tmp_path):
    subset, _ = reference
    with pytest.raises(FlytError, match="nowhere"):
        reshard(tmp_path / "nowhere", subset, tmp_path / "out")
    with pytest.raises(FlytError, match="no such file"):
        reshard(pool[0], tmp_path / "none.npy", tmp_path / "out")
    with pytest.raises(FlytError, match="inside --upstream_data_dir"):
        reshard(pool[0], subset, pool[0] / "resharded")

    broken = tmp_path / "broken"
    shutil.copytree(pool[0], broken)
    tar1 = broken / "00000001.tar"  # no uid of this shard is selected: its parquet says so
    tar1.write_bytes(tar1.read_bytes()[: _member_offsets(tar1)[5][0]] + b"garbage" * 300)
    assert reshard(broken, subset, tmp_path / "skipped", "--workers", 1) == 0
    with pytest.raises(FlytError, match=r"00000001\.tar: damaged tar shard"):
        reshard(broken, subset, tmp_path / "read_all", "--workers", 1, "--no_parquet")
    tar0 = broken / "00000000.tar"  # selected uids here: the shard must be read, and it is cut short
    tar0.write_bytes(tar0.read_bytes()[: _member_offsets(tar0)[-1][1] + 5])
    with pytest.raises(FlytError, match=r"00000000\.tar: cannot read"):
        reshard(broken, subset, tmp_path / "cut", "--workers", 2)


def test_a_uid_twice_in_the_pool_is_written_as_often_as_requested(pool, wanted, reference, tmp_path):
    subset, _ = reference
    doubled = tmp_path / "doubled"
    shutil.copytree(pool[0], doubled)
    for ext in ("tar", "parquet"):
        shutil.copy(doubled / f"00000000.{ext}", doubled / f"00000007.{ext}")
    assert reshard(doubled, subset, tmp_path / "out", "--workers", 2) == 0
    samples = _read(sorted((tmp_path / "out").glob("*.tar")))
    assert Counter(json.loads(s["json"])["uid"] for _, s in samples) == Counter(wanted)
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["duplicate_count"] == 9


def test_command_line_keeps_torch_out(pool, reference, tmp_path):
    subset, out = reference
    code = (
        "import sys; from flyt.cli import main; "
        f"rc = main(['reshard', '--pool', {str(pool[0])!r}, '--subset', {str(subset)!r}, "
        f"'--output', {str(tmp_path / 'out')!r}, '--shard_size', '{SHARD_SIZE}']); "
        "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "wrote 30 samples in 5 shards" in done.stdout
    assert _files(tmp_path / "out") == _files(out)
