"""``flyt train-clip``: a subset's repeats are repeated training examples, and the checkpoint is OpenCLIP's."""

from __future__ import annotations

import open_clip
import pytest
import torch

from flyt.demo import toydata
from flyt.cli import main as cli
from flyt.config import ClipTrainConfig
from flyt.data.subset import array_to_uids, is_sorted, save_subset
from flyt.commands.train_clip import train_clip
from flyt.streams.subset import SeenUids


def _as_dict(seen) -> dict[str, int]:
    uids, counts = seen
    return dict(zip(array_to_uids(uids).to_pylist(), counts.tolist()))


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    df = toydata.write_pool(root / "pool", 30, n_shards=3, seed=0, corruption={}, n_broken=2)
    return root, df[df.kind != "broken"].reset_index(drop=True)


def _config(root, subset, steps: int, batch: int, workers: int, out) -> ClipTrainConfig:
    return ClipTrainConfig(upstream_data_dir=str(root / "pool"), subset=str(subset), model="flyt-tiny",
                           output_dir=str(out), exp_name="run", steps=steps, batch_size=batch, lr=1e-3, warmup=1,
                           workers=workers, device="cpu", log_every_n_steps=1)


def test_subset_repeats_are_seen_that_often_per_pass(pool, tmp_path):
    root, df = pool
    wanted = {df.uid[0]: 3, df.uid[1]: 2, **{u: 1 for u in df.uid[2:13]}}  # 16 rows, one uid 3x, one 2x
    subset = tmp_path / "subset.npy"
    assert save_subset(subset, list(wanted), list(wanted.values())) == 16
    passes, batch = 2, 4
    summary, seen = train_clip(_config(root, subset, passes * 16 // batch, batch, 0, tmp_path))
    assert _as_dict(seen) == {u: passes * c for u, c in wanted.items()}
    assert summary["unique_samples_seen"] == 13


def test_checkpoint_loads_in_open_clip_and_unfiltered_pool_is_seen_once(pool, tmp_path):
    root, df = pool
    summary, seen = train_clip(ClipTrainConfig(upstream_data_dir=str(root / "pool"), model="flyt-tiny",
                                               output_dir=str(tmp_path), exp_name="all", steps=len(df), batch_size=1,
                                               warmup=0, workers=0, device="cpu"))
    assert _as_dict(seen) == {u: 1 for u in df.uid}  # no subset: every decodable sample once, the broken ones skipped
    assert summary["skipped_samples"] == 2
    path = tmp_path / "all" / "checkpoints" / "epoch_latest.pt"
    model = open_clip.create_model("flyt-tiny", pretrained=str(path))
    assert torch.equal(model.logit_scale, torch.load(path, weights_only=True)["state_dict"]["logit_scale"])


def test_subset_without_any_pool_uid_is_a_one_line_error(pool, tmp_path, capsys):
    root, _ = pool
    subset = tmp_path / "other.npy"
    save_subset(subset, ["0" * 32])
    argv = ["train-clip", "--upstream_data_dir", str(root / "pool"), "--subset", str(subset), "--model", "flyt-tiny",
            "--output_dir", str(tmp_path), "--steps", "2", "--batch_size", "2", "--workers", "0"]
    assert cli(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert last.startswith("flyt train-clip: error: ") and "selects no sample" in last


def test_seen_uids_count_like_a_counter_across_merges():
    """``SeenUids`` (arrays, merged when the buffer outgrows them) counts exactly what a Counter counts.

    Mutations run: ``_merge`` dropping the old counts (``weights = np.ones(len(rows))``: fails the totals);
    merging without sorting (``order = np.arange(len(rows))``: repeats stay split, fails the equality).
    """
    from collections import Counter

    import numpy as np

    rng = np.random.default_rng(0)
    pool = [rng.bytes(16).hex() for _ in range(50_000)]
    seen, expected = SeenUids(), Counter()
    for size in (40_000, 30_000, 40_000, 5):  # the first merge happens inside add, the others later
        batch = [pool[i] for i in rng.integers(0, len(pool), size)]
        seen.add(batch)
        expected.update(batch)
    uids, counts = seen.result()
    assert is_sorted(uids) and len(uids) == len(expected)  # sorted, each uid once
    assert _as_dict((uids, counts)) == dict(expected)
    assert counts.dtype == np.int64 and int(counts.sum()) == 110_005
