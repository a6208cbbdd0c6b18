"""A resharded pool (renamed keys, repeated uids, no metadata parquet) through M-FLYT training, ``flyt
score`` and ``flyt sample``; the folders flyt writes checked against img2dataset's, DataComp's and
clip_benchmark's layouts.

The pool is resharded by ``flyt reshard`` from a subset with repeats (copies ``KEY_r``), shuffled so
repeats land in different shards, and its first shard is renamed as DataComp's resharder names samples
(``<uid>-<j>``), so both renaming schemes are in one pool; then its metadata parquets are deleted.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from flyt.demo import toydata
from flyt.cli import main as cli
from flyt.data.samples import decode_pair
from flyt.data.scores import ScoreLookup
from flyt.errors import FlytError
from flyt.data.webdataset import iter_tar
from flyt.data.subset import load_subset, save_subset
from flyt.commands.train_clip import check_not_resharded_from

FIELDS = ["informative", "noise_a", "noise_b"]
STATS_KEYS = {"count", "successes", "failed_to_download", "failed_to_resize", "duration", "start_time",
              "end_time", "status_dict"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _rename_datacomp_style(tar_path: Path) -> None:
    """Rewrite one shard with its members named ``<uid>-<j>`` (j: the uid's copy), bytes unchanged."""
    samples = list(iter_tar(tar_path))
    seen: dict[str, int] = {}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for sample in samples:
            uid = json.loads(sample["json"])["uid"]
            name = f"{uid}-{seen.get(uid, 0)}"
            seen[uid] = seen.get(uid, 0) + 1
            for ext, data in sample.items():
                if ext != "__key__":
                    info = tarfile.TarInfo(f"{name}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    tar_path.write_bytes(buf.getvalue())


@pytest.fixture(scope="module")
def exp(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("resharded")
    df = toydata.write_pool(root / "pool", 120, n_shards=3, seed=3)
    toydata.write_score_parquets(df, root / "scores", columns=FIELDS)
    toydata.write_task(root / "tasks", name="wds_digits_test", n_train=40, n_test=20, n_test_shards=2)
    wanted = {uid: 1 + i % 3 for i, uid in enumerate(df["uid"][::2])}  # every other sample, 1-3 times
    subset = root / "subset.npy"
    save_subset(subset, list(wanted), list(wanted.values()))
    resharded = root / "resharded"
    assert cli(["reshard", "--pool", str(root / "pool"), "--subset", str(subset), "--output", str(resharded),
                "--shard_size", "25", "--shuffle_seed", "4", "--workers", "1"]) == 0
    _rename_datacomp_style(resharded / "00000000.tar")
    for meta in resharded.glob("*.parquet"):
        meta.unlink()
    return {"root": root, "df": df, "wanted": wanted, "subset": subset, "resharded": resharded}


def test_the_resharded_pool_has_renamed_keys_and_repeats(exp):
    """Guards the fixture: without renamed members and cross-shard repeats the other tests prove nothing."""
    keys, uids, shard_of = [], [], {}
    for j, tar in enumerate(sorted(exp["resharded"].glob("*.tar"))):
        for sample in iter_tar(tar):
            keys.append(sample["__key__"])
            uids.append(json.loads(sample["json"])["uid"])
            shard_of.setdefault(uids[-1], set()).add(j)
    pool_keys = set(exp["df"]["key"])
    assert any("-" in k for k in keys) and any("_" in k for k in keys) and not set(keys) <= pool_keys
    assert len(uids) == sum(exp["wanted"].values()) > len(set(uids)) == len(exp["wanted"])
    assert any(len(s) > 1 for s in shard_of.values())  # some uid is repeated across shards


def test_score_rows_are_found_by_the_json_key(exp):
    """Every resharded sample gets its pool sample's input-score row, found by its json's ``key``.

    Mutation: ``decode_pair`` returning the tar member name as ``key`` -> "no M-FLYT score row for key
    000000000002_1" / "no M-FLYT score file .../<uid[:8]>_scores.parquet"."""
    lookup = ScoreLookup(exp["root"] / "scores", FIELDS)
    rows = pd.concat(pd.read_parquet(p) for p in sorted((exp["root"] / "scores").glob("*.parquet"))).set_index("uid")
    from collections import Counter

    for tar in sorted(exp["resharded"].glob("*.tar")):
        for raw in iter_tar(tar):
            sample = decode_pair(raw, Counter(), need_image=False)
            assert np.array_equal(lookup.rows([sample["key"]], [sample["uid"]])[0], rows.loc[sample["uid"], FIELDS].to_numpy())


@pytest.fixture(scope="module")
def checkpoints(exp) -> dict:
    """M-FLYT and FLYT trained a step on the resharded pool (the task found by name as wds_digits_test)."""
    root = exp["root"]
    base = ["train", "--upstream_data_dir", str(exp["resharded"]), "--downstream_data_dir", str(root / "tasks"),
            "--downstream_task_names", "digits", "--model", "flyt-tiny", "--upstream_batch_size", "16",
            "--downstream_batch_size", "8", "--workers", "0", "--warmup", "1", "--output_dir", str(root / "runs")]
    assert cli(base + ["--exp_name", "mflyt", "--n_iterations", "3", "--parquet_dir", str(root / "scores"),
                       "--parquet_fields", *FIELDS]) == 0
    assert cli(base + ["--exp_name", "flyt", "--n_iterations", "1", "--cos_sim_init"]) == 0
    mflyt = root / "runs" / "mflyt" / "checkpoints" / "scoring_epoch_latest.pt"
    ckpt = torch.load(mflyt, weights_only=True)  # distinct weights, so equal scores mean equal inputs
    ckpt["state_dict"]["layers.0.weight"] = torch.tensor([[1.5, -0.25, 0.125]])
    ckpt["state_dict"]["layers.0.bias"] = torch.tensor([0.3])
    torch.save(ckpt, mflyt)
    return {"mflyt": mflyt, "flyt": root / "runs" / "flyt" / "checkpoints" / "scoring_epoch_latest.pt"}


def _score(exp, ckpt: Path, pool: Path, out: Path) -> pd.DataFrame:
    argv = ["score", "--checkpoint", str(ckpt), "--upstream_data_dir", str(pool), "--output", str(out),
            "--workers", "0", "--batch_size", "16"]
    if "mflyt" in str(ckpt):
        argv += ["--parquet_dir", str(exp["root"] / "scores")]
    assert cli(argv) == 0
    return pd.concat(pd.read_parquet(p) for p in sorted(out.glob("*.parquet")))


@pytest.mark.parametrize("mode", ["mflyt", "flyt"])
def test_score_writes_each_uid_once_with_the_pools_scores_and_sample_accepts_it(exp, checkpoints, mode):
    """Scoring the resharded pool gives each selected uid once, scored as in the original pool, the
    repeats counted as skipped; ``flyt sample`` takes the output.

    Mutations: ``first_copies`` keeping every row -> uids repeated (and ``flyt sample`` refuses them);
    ``Repeats.of`` returning None -> uids repeated across shards; ``shard_ids`` keying
    samples by the tar member name -> M-FLYT "missing_scores" skips."""
    root = exp["root"] / f"score_{mode}"
    pool = _score(exp, checkpoints[mode], exp["root"] / "pool", root / "pool")
    resharded = _score(exp, checkpoints[mode], exp["resharded"], root / "resharded")
    assert resharded["uid"].is_unique and set(resharded["uid"]) == set(exp["wanted"])
    expected = pool.set_index("uid").loc[resharded["uid"]]
    np.testing.assert_allclose(resharded["score"], expected["score"], rtol=1e-5, atol=1e-6)
    assert list(resharded["key"]) == list(expected["key"])  # the pool keys, not the renamed members
    summary = json.loads((root / "resharded" / "_summary.json").read_text())
    assert summary["skipped"] == {"repeated_uid": sum(exp["wanted"].values()) - len(exp["wanted"])}
    subset = root / "subset.npy"
    assert cli(["sample", "--scores", str(root / "resharded"), "--method", "topk", "--fraction", "0.5",
                "--output", str(subset)]) == 0
    assert len(load_subset(subset)) == len(exp["wanted"]) // 2


def test_train_clip_refuses_the_subset_a_folder_was_resharded_from(exp, tmp_path, capsys):
    """Mutation: comparing ``subset_file`` paths only (not the content's sha256) -> a copy of the subset
    under another name passes (and the run then stops only at the unknown model: no training here)."""
    copy = tmp_path / "same_rows.npy"
    copy.write_bytes(exp["subset"].read_bytes())
    argv = ["train-clip", "--upstream_data_dir", str(exp["resharded"]), "--subset", str(copy), "--steps", "1",
            "--model", "no-such-model"]
    assert cli(argv) == 2
    assert "resharded from" in capsys.readouterr().err
    other = tmp_path / "other.npy"
    save_subset(other, list(exp["wanted"])[:5])
    check_not_resharded_from(str(exp["resharded"]), str(other))  # another subset: allowed, with a warning
    assert "warning" in capsys.readouterr().err
    check_not_resharded_from(str(exp["root"] / "pool"), str(copy))  # not a reshard: nothing to say
    assert capsys.readouterr().err == ""
    with pytest.raises(FlytError, match="without --subset"):
        check_not_resharded_from(f"{exp['root'] / 'pool'}::{exp['resharded']}", str(exp["subset"]))


def _check_img2dataset_shards(folder: Path) -> None:
    tars = sorted(folder.glob("*.tar"))
    assert tars and [t.name for t in tars] == [f"{j:08d}.tar" for j in range(len(tars))]
    for tar in tars:
        stats = json.loads(tar.with_name(f"{tar.stem}_stats.json").read_text())
        count = sum(1 for _ in iter_tar(tar))
        assert set(stats) == STATS_KEYS
        assert stats["count"] == stats["successes"] == count and stats["status_dict"] == {"success": count}
        assert stats["failed_to_download"] == stats["failed_to_resize"] == 0
        assert stats["end_time"] >= stats["start_time"] and stats["duration"] >= 0


def test_written_folders_follow_the_datacomp_layouts(exp, tmp_path):
    """img2dataset's ``NNNNNNNN_stats.json`` beside every pool and reshard shard; clip_benchmark's
    ``wds_<task>_test/`` with ``test/nshards.txt``, found by task name.

    Mutations: no stats file from ``flyt reshard`` or ``write_pool``; ``nshards.txt`` holding 1 -> fail."""
    _check_img2dataset_shards(exp["root"] / "pool")
    resharded = tmp_path / "again"  # a fresh reshard: the fixture's first shard was rewritten
    assert cli(["reshard", "--pool", str(exp["root"] / "pool"), "--subset", str(exp["subset"]), "--output",
                str(resharded), "--shard_size", "25", "--workers", "1"]) == 0
    _check_img2dataset_shards(resharded)
    task = exp["root"] / "tasks" / "wds_digits_test"
    tests = sorted((task / "test").glob("*.tar"))
    assert len(tests) == 2 and (task / "test" / "nshards.txt").read_text().strip() == "2"
    assert (task / "classnames.txt").is_file() and (task / "zeroshot_classification_templates.txt").is_file()
    from flyt.data.tasks import resolve_task
    from flyt.commands.eval import resolve_eval_task

    assert resolve_eval_task("digits", exp["root"] / "tasks").test_dir == task / "test"
    assert resolve_task("digits", str(exp["root"] / "tasks")).name == "digits"
    assert resolve_task(str(task)).name == "digits"
