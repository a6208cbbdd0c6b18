"""``flyt score`` on generated pools: exactly-once coverage, exact scores, restarts, splits, bad input."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from flyt.demo import toydata
from flyt.cli import main as cli

FIELDS = ["informative", "noise_a", "noise_b"]
N_BROKEN = 5


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def exp(tmp_path_factory) -> dict:
    """A 4-shard pool with broken samples, its M-FLYT input scores, and one FLYT and one M-FLYT checkpoint."""
    root = tmp_path_factory.mktemp("score")
    df = toydata.write_pool(root / "pool", 300, n_shards=4, seed=0, n_broken=N_BROKEN)
    toydata.write_score_parquets(df, root / "scores", columns=FIELDS)
    toydata.write_task(root / "tasks", layout="simple")
    base = ["train", "--upstream_data_dir", str(root / "pool"), "--downstream_task_names", str(root / "tasks" / "digits"),
            "--model", "flyt-tiny", "--upstream_batch_size", "8", "--downstream_batch_size", "4", "--workers", "0",
            "--warmup", "1", "--n_iterations", "1", "--output_dir", str(root / "runs")]
    assert cli(base + ["--exp_name", "flyt", "--cos_sim_init"]) == 0
    assert cli(base + ["--exp_name", "mflyt", "--parquet_dir", str(root / "scores"), "--parquet_fields", *FIELDS]) == 0
    flyt_ckpt = root / "runs" / "flyt" / "checkpoints" / "scoring_epoch_latest.pt"
    mflyt_ckpt = root / "runs" / "mflyt" / "checkpoints" / "scoring_epoch_latest.pt"
    # one step from a zero init leaves the mixer almost constant: give it distinct weights to check against
    ckpt = torch.load(mflyt_ckpt, weights_only=True)
    ckpt["state_dict"]["layers.0.weight"] = torch.tensor([[1.5, -0.25, 0.125]])
    ckpt["state_dict"]["layers.0.bias"] = torch.tensor([0.3])
    torch.save(ckpt, mflyt_ckpt)
    return {"root": root, "df": df, "pool": root / "pool", "scores": root / "scores", "flyt": flyt_ckpt, "mflyt": mflyt_ckpt}


def _score(exp, ckpt: str, out: Path, *extra: str, pool: Path | None = None) -> int:
    argv = ["score", "--checkpoint", str(exp[ckpt]), "--upstream_data_dir", str(pool or exp["pool"]), "--output", str(out)]
    if ckpt == "mflyt":
        argv += ["--parquet_dir", str(exp["scores"])]
    else:
        argv += ["--workers", "0", "--batch_size", "32"]
    return cli(argv + list(extra))


def _read_folder(out: Path) -> dict[str, pd.DataFrame]:
    return {p.name: pd.read_parquet(p) for p in sorted(out.glob("*.parquet"))}


def _union(out: Path) -> pd.DataFrame:
    return pd.concat(_read_folder(out).values(), ignore_index=True)


def _direct_mixer(exp) -> pd.Series:
    """w . x + b per uid, straight from the score files and the checkpoint (float64, then float32)."""
    sd = torch.load(exp["mflyt"], weights_only=True)["state_dict"]
    scores = pd.concat([pd.read_parquet(p) for p in sorted(exp["scores"].glob("*_scores.parquet"))])
    x = scores[FIELDS].to_numpy(np.float64)
    w, b = sd["layers.0.weight"].double().numpy()[0], float(sd["layers.0.bias"])
    return pd.Series((x @ w + b).astype(np.float32), index=scores["uid"].to_numpy())


@pytest.fixture(scope="module")
def flyt_reference(exp, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("flyt_ref") / "out"
    assert _score(exp, "flyt", out) == 0
    return out


@pytest.fixture(scope="module")
def mflyt_reference(exp, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mflyt_ref") / "out"
    assert _score(exp, "mflyt", out) == 0
    return out


def _assert_same_outputs(a: Path, b: Path) -> None:
    fa, fb = _read_folder(a), _read_folder(b)
    assert list(fa) == list(fb)
    for name in fa:
        pd.testing.assert_frame_equal(fa[name], fb[name])
    assert sorted(p.name for p in b.iterdir() if not p.name.startswith("_")) == sorted(fa)  # no stale temporaries


# ---------------------------------------------------------------------------------------------- M-FLYT


def test_mflyt_scores_every_uid_once_with_the_mixer_and_never_opens_images(exp, mflyt_reference, tmp_path, monkeypatch):
    out = mflyt_reference
    files = _read_folder(out)
    assert list(files) == [f"{s:08d}.parquet" for s in range(4)]
    table = pd.concat(files.values(), ignore_index=True)
    assert table.columns.tolist() == ["uid", "score", "key"] and table["score"].dtype == np.float32
    # the mixer needs no images: every sample of the pool is scored, broken ones included
    assert sorted(table["uid"]) == sorted(exp["df"]["uid"]) and table["uid"].is_unique
    for name, part in files.items():  # each shard's file holds that shard's samples
        assert set(part["key"].str[:8]) == {name.removesuffix(".parquet")}
    direct = _direct_mixer(exp)
    np.testing.assert_array_equal(table["score"].to_numpy(), direct[table["uid"]].to_numpy())
    # ... which is also what the rebuilt torch model computes
    from flyt.models.checkpoint import load_scorer

    model, spec = load_scorer(exp["mflyt"])
    scores = pd.concat([pd.read_parquet(p) for p in sorted(exp["scores"].glob("*.parquet"))]).set_index("uid")
    with torch.no_grad():
        torch_scores = model.double()({"scores": torch.from_numpy(scores.loc[table["uid"], FIELDS].to_numpy())}).numpy()
    np.testing.assert_allclose(table["score"], torch_scores, rtol=1e-6, atol=1e-6)
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["samples_scored"] == len(exp["df"]) and summary["shards_done"] == 4 and summary["skipped"] == {}
    assert _score(exp, "mflyt", tmp_path / "sequential", "--workers", "0") == 0  # threads (default) or not: the same
    _assert_same_outputs(out, tmp_path / "sequential")

    # no image is ever decoded, not even without the metadata parquets (uids from the tars' .json members)
    def no_images(*a, **k):
        raise AssertionError("M-FLYT scoring decoded an image")

    monkeypatch.setattr("PIL.Image.open", no_images)
    monkeypatch.setattr("flyt.data.samples.decode_pair", no_images)
    tars_only = tmp_path / "pool"
    tars_only.mkdir()
    for tar in exp["pool"].glob("*.tar"):
        shutil.copy(tar, tars_only / tar.name)
    assert _score(exp, "mflyt", tmp_path / "from_tars", pool=tars_only) == 0
    _assert_same_outputs(out, tmp_path / "from_tars")
    # and with the metadata parquets, the tars are not even opened
    import flyt.data.pool

    monkeypatch.setattr(flyt.data.pool, "iter_tar", no_images)
    assert _score(exp, "mflyt", tmp_path / "again") == 0
    _assert_same_outputs(out, tmp_path / "again")


def test_mflyt_missing_score_rows_are_counted_and_uid_join_and_whole_folder_index(exp, tmp_path):
    direct = _direct_mixer(exp)
    # 1) score files without a key column (joined on uid), rows shuffled, 3 rows dropped
    by_uid = tmp_path / "by_uid"
    by_uid.mkdir()
    dropped = []
    for p in sorted(exp["scores"].glob("*_scores.parquet")):
        frame = pd.read_parquet(p).drop(columns="key").sample(frac=1.0, random_state=0)
        if p.name.startswith("00000001"):
            dropped += frame["uid"].iloc[:3].tolist()
            frame = frame.iloc[3:]
        frame.to_parquet(by_uid / p.name, index=False)
    argv = ["score", "--checkpoint", str(exp["mflyt"]), "--upstream_data_dir", str(exp["pool"]), "--parquet_dir", str(by_uid)]
    assert cli(argv + ["--output", str(tmp_path / "a")]) == 0
    table = _union(tmp_path / "a")
    assert sorted(table["uid"]) == sorted(set(exp["df"]["uid"]) - set(dropped))
    np.testing.assert_array_equal(table["score"].to_numpy(), direct[table["uid"]].to_numpy())
    summary = json.loads((tmp_path / "a" / "_summary.json").read_text())
    assert summary["skipped"] == {"missing_scores": 3}
    assert summary["per_shard"]["00000001"]["skipped"] == {"missing_scores": 3}
    # 2) no *_scores.parquet files: every parquet file of the folder is indexed once (here: 2 files, any names)
    released = tmp_path / "released"
    (released / "part").mkdir(parents=True)
    everything = pd.concat([pd.read_parquet(p) for p in sorted(exp["scores"].glob("*.parquet"))])
    everything = everything.sample(frac=1.0, random_state=1)
    everything.iloc[:150].to_parquet(released / "a.parquet", index=False)
    everything.iloc[150:].to_parquet(released / "part" / "b.parquet", index=False)
    argv[-1] = str(released)
    assert cli(argv + ["--output", str(tmp_path / "b")]) == 0
    table = _union(tmp_path / "b")
    assert sorted(table["uid"]) == sorted(exp["df"]["uid"])
    np.testing.assert_array_equal(table["score"].to_numpy(), direct[table["uid"]].to_numpy())


def test_mflyt_over_two_folders_adds_each_folders_part(exp, tmp_path):
    """``--parquet_dir a::b`` as in ``flyt train``: columns 0 and 2 from a per-shard folder joined on key,
    column 1 from a released-style file joined on uid that lacks 2 rows (counted, not scored). Mutations
    caught: the bias added once per folder; a folder's weights taken from consecutive places instead of its
    fields' places in the mixer; a row missing in one folder scored from the other alone."""
    direct = _direct_mixer(exp)
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    parts = [pd.read_parquet(p) for p in sorted(exp["scores"].glob("*_scores.parquet"))]
    for p, frame in zip(sorted(exp["scores"].glob("*_scores.parquet")), parts):
        frame[["key", "uid", FIELDS[0], FIELDS[2]]].to_parquet(first / p.name, index=False)
    everything = pd.concat(parts).sample(frac=1.0, random_state=2)
    dropped = everything["uid"].iloc[:2].tolist()
    everything.iloc[2:][["uid", FIELDS[1]]].to_parquet(second / "released.parquet", index=False)
    argv = ["score", "--checkpoint", str(exp["mflyt"]), "--upstream_data_dir", str(exp["pool"]),
            "--parquet_dir", f"{first}::{second}", "--output", str(tmp_path / "out")]
    assert cli(argv) == 0
    table = _union(tmp_path / "out")
    assert sorted(table["uid"]) == sorted(set(exp["df"]["uid"]) - set(dropped))
    # the sum's association differs from one folder's (float64), so equal to float32 rounding
    np.testing.assert_allclose(table["score"].to_numpy(), direct[table["uid"]].to_numpy(), rtol=2e-7, atol=0)
    assert json.loads((tmp_path / "out" / "_summary.json").read_text())["skipped"] == {"missing_scores": 2}


def test_id_lookups_match_a_plain_dictionary():
    """Both joins (one score file's ``index_in``, a whole folder's sorted-once index) against a dict.

    Mutations run: the same-order shortcut returning positions for any query of equal length (fails the
    permuted rows); missing ids mapped to 0 by ``fill_null(0)`` (fails the absent ids); ``IdIndex`` sorting
    with an unstable sort and keeping the last of repeated ids (``first[:-1] = ids[1:] != ids[:-1]``: fails the
    repeats); ``IdIndex`` without the equality check after the search (fails the absent ids).
    """
    from flyt.data.input_scores import IdIndex, positions

    rng = np.random.default_rng(0)
    uids = [rng.bytes(16).hex() for _ in range(500)]
    keys = [f"00000007{i:04d}" for i in range(500)]
    words = [f"k{i}" for i in range(500)]
    for lookup in (positions, lambda values, query: IdIndex(values)(query)):
        for values in (uids, keys, words):
            for order in (np.arange(500), rng.permutation(500)):
                table = [values[i] for i in order]
                query = [values[i] for i in rng.permutation(500)[:300]] + ["f" * 32, "000000079999", "nope"]
                where = {v: i for i, v in enumerate(table)}
                expected = [where.get(q, -1) for q in query]
                assert lookup(pa.array(table), pa.array(query)).tolist() == expected
                assert lookup(pa.array(table), pa.array(table)).tolist() == list(range(500))
                shuffled = [table[i] for i in rng.permutation(500)]  # same length, other order: a real join
                assert lookup(pa.array(table), pa.array(shuffled)).tolist() == [where[q] for q in shuffled]
        repeated = pa.array(keys[:10] + keys[:10])  # repeated ids: the first row wins
        assert lookup(repeated, pa.array(keys[:10][::-1])).tolist() == list(range(10))[::-1]
        assert lookup(pa.array(keys, pa.large_string()), pa.array(keys[:3])).tolist() == [0, 1, 2]


# ---------------------------------------------------------------------------------------------- FLYT


def _direct_flyt(exp) -> pd.Series:
    """A direct forward of the rebuilt model on every decodable sample, read with webdataset."""
    import webdataset as wds

    from flyt.models.checkpoint import load_scorer
    from flyt.data.samples import decode_pair
    from flyt.jobs.score_flyt import val_transforms

    model, spec = load_scorer(exp["flyt"])
    preprocess, tokenizer = val_transforms(model, spec)
    skipped = Counter()
    samples = []
    for shard in sorted(exp["pool"].glob("*.tar")):
        for raw in wds.WebDataset(str(shard), shardshuffle=False):
            sample = decode_pair(raw, skipped)
            if sample is not None:
                samples.append(sample)
    assert skipped == {"bad_image": N_BROKEN}
    with torch.no_grad():
        scores = model({"image": torch.stack([preprocess(s["image"]) for s in samples]),
                        "text": tokenizer([s["text"] for s in samples])})
    return pd.Series(scores.numpy(), index=[s["uid"] for s in samples])


def test_flyt_scores_equal_a_direct_forward_and_skip_broken_samples(exp, flyt_reference, tmp_path):
    table = _union(flyt_reference)
    broken = set(exp["df"].loc[exp["df"]["kind"] == "broken", "uid"])
    assert len(broken) == N_BROKEN
    assert sorted(table["uid"]) == sorted(set(exp["df"]["uid"]) - broken) and table["uid"].is_unique
    direct = _direct_flyt(exp)
    np.testing.assert_allclose(table["score"].to_numpy(), direct[table["uid"]].to_numpy(), rtol=1e-5, atol=1e-5)
    assert table["score"].std() > 0
    summary = json.loads((flyt_reference / "_summary.json").read_text())
    assert summary["skipped"] == {"bad_image": N_BROKEN} and summary["samples_scored"] == len(table)
    assert sum(s["skipped"].get("bad_image", 0) for s in summary["per_shard"].values()) == N_BROKEN
    # data-loader workers (2 processes, 4 shards) give the same files
    assert _score(exp, "flyt", tmp_path / "w2", "--workers", "2", "--batch_size", "20") == 0
    for name, part in _read_folder(tmp_path / "w2").items():
        ref = pd.read_parquet(flyt_reference / name)
        pd.testing.assert_frame_equal(part[["uid", "key"]], ref[["uid", "key"]])
        np.testing.assert_allclose(part["score"], ref["score"], rtol=1e-5, atol=1e-5)


def test_shard_batches_stay_in_one_shard_and_flag_the_last(exp):
    from flyt.models.checkpoint import load_scorer
    from flyt.jobs.score_flyt import _shard_batches_class, val_transforms

    model, spec = load_scorer(exp["flyt"])
    preprocess, tokenizer = val_transforms(model, spec)
    shards = [str(p) for p in sorted(exp["pool"].glob("*.tar"))[:2]]
    good = exp["df"][exp["df"]["kind"] != "broken"].groupby("shard").size()
    batch = int(good["00000000"])  # shard 0 is exactly one full batch: no empty batch may follow it
    dataset = _shard_batches_class()(shards, batch, preprocess, tokenizer)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=3)  # more workers than shards
    items = list(loader)
    for index in range(2):
        mine = [it for it in items if it["shard"] == index]
        assert [it["last"] for it in mine] == [False] * (len(mine) - 1) + [True]
        assert all(len(it["uid"]) <= batch and {k[:8] for k in it["key"]} <= {f"{index:08d}"} for it in mine)
        assert sum(len(it["uid"]) for it in mine) == good[f"{index:08d}"]
        assert sum(it["read"] for it in mine) == (exp["df"]["shard"] == f"{index:08d}").sum()
    assert len([it for it in items if it["shard"] == 0]) == 1


def test_kill_and_rerun_gives_the_uninterrupted_result(exp, flyt_reference, tmp_path, monkeypatch):
    import flyt.jobs.score_flyt as flyt_images

    # a deleted shard output and a stale temporary file of a killed write
    out = tmp_path / "restart"
    shutil.copytree(flyt_reference, out)
    (out / "00000002.parquet").unlink()
    (out / ".00000002.parquet.x1y2z3.tmp").write_bytes(b"half a file")
    assert _score(exp, "flyt", out) == 0
    _assert_same_outputs(flyt_reference, out)
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["shards_done"] == 1 and summary["shards_skipped_existing"] == 3
    assert summary["all_outputs"]["skipped"] == {"bad_image": N_BROKEN}  # the earlier shards' counts are kept

    # a crash right after the first shard's file is written
    out = tmp_path / "crash"
    original = flyt_images.write_shard
    calls = []

    def write_then_die(*args, **kwargs):
        original(*args, **kwargs)
        calls.append(args[0])
        raise KeyboardInterrupt

    monkeypatch.setattr(flyt_images, "write_shard", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        _score(exp, "flyt", out)
    assert [p.name for p in out.glob("*.parquet")] == [calls[0].name]
    monkeypatch.setattr(flyt_images, "write_shard", original)
    assert _score(exp, "flyt", out) == 0
    _assert_same_outputs(flyt_reference, out)


# ---------------------------------------------------------------------------------------------- splits and merging


def test_two_way_split_and_torchrun_ranks_cover_the_pool_once(exp, mflyt_reference, tmp_path, monkeypatch):
    from flyt.runner.job import job_split

    parts = []
    for i in range(2):
        out = tmp_path / f"job{i}"
        assert _score(exp, "mflyt", out, "--shard_index", str(i), "--num_shards", "2") == 0
        parts.append(_read_folder(out))
        assert (out / f"_summary.{i}-of-2.json").exists()
    assert sorted(parts[0]) == ["00000000.parquet", "00000002.parquet"]
    assert sorted(parts[1]) == ["00000001.parquet", "00000003.parquet"]
    union = {**parts[0], **parts[1]}
    reference = _read_folder(mflyt_reference)
    assert sorted(union) == sorted(reference)
    for name in reference:
        pd.testing.assert_frame_equal(union[name], reference[name])
    # torchrun: RANK / WORLD_SIZE split the same way, also combined with the flags
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "rank1"
    assert _score(exp, "mflyt", out) == 0
    assert sorted(_read_folder(out)) == sorted(parts[1])
    assert job_split(1, 3, {"RANK": "1", "WORLD_SIZE": "2"}) == (3, 6)
    assert job_split(None, None, {}) == (0, 1)


def test_merged_output_equals_the_folder_union(exp, mflyt_reference, tmp_path):
    target = tmp_path / "all" / "scores.parquet"
    assert _score(exp, "mflyt", target, "--shard_index", "0", "--num_shards", "2") == 0
    assert not target.exists()  # the other job's shards are not scored yet
    assert _score(exp, "mflyt", target, "--shard_index", "1", "--num_shards", "2") == 0
    merged = pd.read_parquet(target)
    union = _union(mflyt_reference)
    pd.testing.assert_frame_equal(merged, union)
    parts = target.parent / ".scores.parquet.parts"
    assert sorted(p.name for p in parts.glob("*.parquet")) == [f"{s:08d}.parquet" for s in range(4)]
    assert (target.parent / "scores_summary.1-of-2.json").exists()
    # a plain single job merges at once; a rerun re-merges the same file
    target = tmp_path / "one.parquet"
    (tmp_path / ".one.parquet.k1ll3d.tmp").write_bytes(b"a merge killed half-way")
    for _ in range(2):
        assert _score(exp, "mflyt", target) == 0
        pd.testing.assert_frame_equal(pd.read_parquet(target), union)
    summary = json.loads((tmp_path / "one_summary.json").read_text())
    assert summary["merged"]["rows"] == len(union) and summary["shards_skipped_existing"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == [".one.parquet.parts", "all", "one.parquet", "one_summary.json"]


def test_unreadable_shards_are_named_and_the_others_written(exp, tmp_path, capsys):
    pool = tmp_path / "pool"
    shutil.copytree(exp["pool"], pool)
    data = (pool / "00000001.tar").read_bytes()
    (pool / "00000001.tar").write_bytes(data[: len(data) * 2 // 3])  # truncated after some batches
    (pool / "00000003.tar").write_bytes(b"this is not a tar file" * 40)
    out = tmp_path / "out"
    assert _score(exp, "flyt", out, "--batch_size", "16", pool=pool) == 1
    captured = capsys.readouterr()
    for name in ("00000001.tar", "00000003.tar"):
        assert f"FAILED shard {pool / name}" in captured.out
    assert sorted(p.name for p in out.glob("*.parquet")) == ["00000000.parquet", "00000002.parquet"]
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["shards_failed"] == 2 and str(pool / "00000001.tar") in summary["failed"]
    # M-FLYT reads a tar only without its metadata parquet
    (pool / "00000003.parquet").unlink()
    assert _score(exp, "mflyt", tmp_path / "m", pool=pool) == 1
    assert f"FAILED shard {pool / '00000003.tar'}" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "m").glob("*.parquet")) == [f"{s:08d}.parquet" for s in (0, 1, 2)]


def test_shards_sharing_a_stem_are_named_by_relative_path(exp, tmp_path):
    from flyt.data.pool import pool_shards

    for sub in ("a", "b/c"):
        (tmp_path / sub).mkdir(parents=True)
        shutil.copy(exp["pool"] / "00000000.tar", tmp_path / sub / "00000000.tar")
    shutil.copy(exp["pool"] / "00000001.tar", tmp_path / "a" / "00000001.tar")
    assert [s.name for s in pool_shards(str(tmp_path))] == ["a__00000000", "a__00000001", "b__c__00000000"]
    assert [s.name for s in pool_shards(str(exp["pool"]))] == [f"{s:08d}" for s in range(4)]


# ---------------------------------------------------------------------------------------------- original checkpoints, errors


def test_original_style_checkpoints(exp, mflyt_reference, flyt_reference, tmp_path, capsys):
    sd = torch.load(exp["mflyt"], weights_only=True)["state_dict"]
    plain = tmp_path / "mixer.pt"
    torch.save({"layers.0.weight": sd["layers.0.weight"], "layers.0.bias": sd["layers.0.bias"]}, plain)
    argv = ["score", "--checkpoint", str(plain), "--upstream_data_dir", str(exp["pool"]),
            "--parquet_dir", str(exp["scores"]), "--output", str(tmp_path / "m")]
    assert "--parquet_fields" in _error_of(capsys, argv)
    assert cli(argv + ["--parquet_fields", *FIELDS]) == 0
    _assert_same_outputs(mflyt_reference, tmp_path / "m")
    # a checkpoint that names its fields reads them by name, whatever order --parquet_fields lists them in
    assert _score(exp, "mflyt", tmp_path / "named", "--parquet_fields", *FIELDS[::-1]) == 0
    _assert_same_outputs(mflyt_reference, tmp_path / "named")
    # a FLYT head saved the original's way: state_dict under DDP's "module." prefix, no flyt metadata
    ckpt = torch.load(exp["flyt"], weights_only=True)
    original = tmp_path / "scoring_epoch_1.pt"
    torch.save({"epoch": 1, "name": "flyt", "state_dict": {f"module.{k}": v for k, v in ckpt["state_dict"].items()}},
               original)
    argv = ["score", "--checkpoint", str(original), "--upstream_data_dir", str(exp["pool"]),
            "--output", str(tmp_path / "f"), "--workers", "0", "--batch_size", "32"]
    assert "--model" in _error_of(capsys, argv)
    assert cli(argv + ["--model", "flyt-tiny"]) == 0
    _assert_same_outputs(flyt_reference, tmp_path / "f")


def _error_of(capsys, argv) -> str:
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("flyt score: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_bad_flags_give_one_line_errors(exp, tmp_path, capsys):
    def argv(ckpt="mflyt", pool=None, out=None, *extra):
        a = ["score", "--checkpoint", str(exp[ckpt]) if ckpt in exp else ckpt,
             "--upstream_data_dir", str(pool or exp["pool"]), "--output", str(out or tmp_path / "out")]
        return a + list(extra)

    assert "does not exist" in _error_of(capsys, argv(str(tmp_path / "missing.pt")))
    assert "--parquet_dir" in _error_of(capsys, argv("mflyt"))
    assert "--parquet_dir" in _error_of(capsys, argv("flyt", None, None, "--parquet_dir", str(exp["scores"])))
    msg = _error_of(capsys, argv("mflyt", None, None, "--parquet_dir", str(exp["scores"]), "--parquet_fields", "a", "b", "c"))
    assert "lacks --parquet_fields column(s) a, b, c" in msg
    assert "names 1 columns" in _error_of(capsys, argv("mflyt", None, None, "--parquet_dir", str(exp["scores"]),
                                                       "--parquet_fields", "informative"))
    assert "is not a folder" in _error_of(capsys, argv("mflyt", None, None, "--parquet_dir", str(tmp_path / "nope")))
    assert "does not exist" in _error_of(capsys, argv("flyt", tmp_path / "no_pool"))
    assert "--shard_index" in _error_of(capsys, argv("flyt", None, None, "--shard_index", "2", "--num_shards", "2"))
    assert "go together" in _error_of(capsys, argv("flyt", None, None, "--shard_index", "0"))
    assert "--batch_size" in _error_of(capsys, argv("flyt", None, None, "--batch_size", "0"))
    (tmp_path / "file").write_text("x")
    assert "is a file" in _error_of(capsys, argv("flyt", None, tmp_path / "file"))
    assert "overwrite the pool's metadata" in _error_of(capsys, argv("flyt", None, exp["pool"]))
    assert "--model" in _error_of(capsys, argv("flyt", None, None, "--model", "ViT-B-32"))
    if not torch.cuda.is_available():
        assert "CUDA" in _error_of(capsys, argv("flyt", None, None, "--precision", "amp"))
        assert "CUDA" in _error_of(capsys, argv("flyt", None, None, "--device", "cuda"))
    assert not (tmp_path / "out").exists()  # nothing is written before the flags are known to be good


def test_coverage_check_names_files_of_no_pool_shard(exp, mflyt_reference, tmp_path, capsys):
    """Mutation: ``_coverage`` computing no extra files (``extra = []``) passes the stray file unnoticed."""
    out = tmp_path / "out"
    shutil.copytree(mflyt_reference, out)
    (out / "zz_other_pool.parquet").write_bytes((out / "00000000.parquet").read_bytes())
    assert _score(exp, "mflyt", out) == 0  # every shard done: only the check runs
    coverage = json.loads((out / "_summary.json").read_text())["coverage"]
    assert coverage == {"pool_shards": 4, "with_scores": 4, "complete": True, "extra_files": ["zz_other_pool.parquet"]}
    assert "also holds 1 file(s) of no shard of this pool (e.g. zz_other_pool.parquet)" in capsys.readouterr().err
    (out / "zz_other_pool.parquet").unlink()
    assert _score(exp, "mflyt", out, "--shard_index", "0", "--num_shards", "2") == 0
    assert "every shard of the pool is scored exactly once (4 shards)" in capsys.readouterr().out
