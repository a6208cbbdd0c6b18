"""flyt.demo.toydata writes what DataComp/img2dataset and the original FLYT layout promise, deterministically."""

from __future__ import annotations

import io
import json
import re
import tarfile

import numpy as np
import pandas as pd
import pytest
import webdataset as wds
from PIL import Image, ImageFile

from flyt.demo import toydata
from flyt.data.tasks import resolve_task

CORRUPTION = {"wrong_caption": 0.2, "unrelated_caption": 0.1, "noise_image": 0.1, "near_duplicate": 0.15}
N, N_BROKEN, SHARDS = 120, 4, 3


def read_tar(path) -> dict[str, dict[str, bytes]]:
    """key -> {extension: bytes}, checking that each sample's members are contiguous (as WebDataset needs)."""
    samples: dict[str, dict[str, bytes]] = {}
    last = None
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            assert key == last or key not in samples, f"members of {key} are not contiguous"
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
            last = key
    return samples


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    out = tmp_path_factory.mktemp("pool")
    df = toydata.write_pool(out, N, n_shards=SHARDS, seed=3, corruption=CORRUPTION, n_broken=N_BROKEN)
    return out, df


def test_pool_shards_members_keys_and_uids(pool):
    out, df = pool
    assert sorted(p.name for p in out.glob("*.tar")) == [f"{s:08d}.tar" for s in range(SHARDS)]
    assert len(df) == N + N_BROKEN and df["uid"].is_unique and df["key"].is_unique
    assert all(re.fullmatch(r"[0-9a-f]{32}", u) for u in df["uid"])
    rows = df.set_index("key")
    seen = []
    for tar in sorted(out.glob("*.tar")):
        for key, members in read_tar(tar).items():
            assert set(members) == {"jpg", "txt", "json"}
            assert re.fullmatch(r"\d{12}", key) and key[:8] == tar.stem == rows.loc[key, "shard"]
            meta = json.loads(members["json"])
            assert meta["uid"] == rows.loc[key, "uid"] and meta["key"] == key
            assert meta["caption"] == members["txt"].decode("utf-8") == rows.loc[key, "caption"]
            seen.append(key)
    assert seen == list(df["key"])  # tar order is the DataFrame's order


def test_metadata_parquets_match_tars(pool):
    out, df = pool
    for tar in sorted(out.glob("*.tar")):
        meta = pd.read_parquet(tar.with_suffix(".parquet"))
        samples = read_tar(tar)
        assert list(meta.columns) == ["uid", "key", "url", "text", "clip_b32_similarity_score",
                                      "clip_l14_similarity_score"]
        assert list(meta["key"]) == list(samples)
        assert list(meta["uid"]) == [json.loads(s["json"])["uid"] for s in samples.values()]
        assert list(meta["text"]) == [s["txt"].decode() for s in samples.values()]
        assert all(u.startswith("https://example.invalid/") for u in meta["url"])
        assert meta["clip_b32_similarity_score"].dtype == np.float32
        assert meta["clip_l14_similarity_score"].dtype == np.float32
    for col in ("clip_b32_similarity_score", "clip_l14_similarity_score"):  # weakly informative
        assert df.loc[df["aligned"], col].mean() > df.loc[~df["aligned"], col].mean() + 0.02


def test_corruptions_exact_and_as_described(pool):
    out, df = pool
    counts = df["kind"].value_counts().to_dict()
    for kind, frac in CORRUPTION.items():
        assert counts[kind] == round(frac * N)
    assert counts["broken"] == N_BROKEN and counts["clean"] == N - sum(round(f * N) for f in CORRUPTION.values())
    assert list(df["clean"]) == list(df["kind"] == "clean")
    wrong = df[df["kind"] == "wrong_caption"]
    assert (wrong["caption_digit"] != wrong["label"]).all() and (wrong["caption_digit"] >= 0).all()
    digit_words = set(toydata.DIGIT_NAMES) | set("0123456789")
    for caption in df.loc[df["kind"] == "unrelated_caption", "caption"]:
        assert not digit_words & set(re.findall(r"\w+", caption))
    assert (df.loc[df["kind"].isin(["noise_image", "broken"]), "label"] == -1).all()
    clean = df[df["kind"] == "clean"]
    assert (clean["caption_digit"] == clean["label"]).all()
    images = {k: v["jpg"] for tar in out.glob("*.tar") for k, v in read_tar(tar).items()}
    for _, dup in df[df["kind"] == "near_duplicate"].iterrows():
        src = df.iloc[dup["source"]]
        assert src["kind"] == "clean" and dup["caption"] == src["caption"] and dup["label"] == src["label"]
        a, b = decode(images[dup["key"]]).astype(int), decode(images[src["key"]]).astype(int)
        assert images[dup["key"]] != images[src["key"]] and np.abs(a - b).mean() < 4


def test_broken_images_fail_to_decode_and_others_decode(pool, monkeypatch):
    out, df = pool
    images = {k: v["jpg"] for tar in out.glob("*.tar") for k, v in read_tar(tar).items()}
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # broken even for a lenient reader
    for key, kind in zip(df["key"], df["kind"]):
        if kind == "broken":
            with pytest.raises(Exception):
                decode(images[key])
        else:
            assert decode(images[key]).shape == (32, 32, 3)


def test_webdataset_reads_pool_and_skips_broken(pool):
    out, df = pool
    urls = [str(p) for p in sorted(out.glob("*.tar"))]
    raw = list(wds.WebDataset(urls, shardshuffle=False))
    assert [s["__key__"] for s in raw] == list(df["key"])
    decoded = list(wds.WebDataset(urls, shardshuffle=False).decode("pil", handler=wds.ignore_and_continue))
    assert [s["__key__"] for s in decoded] == list(df.loc[df["kind"] != "broken", "key"])
    assert all(s["jpg"].size == (32, 32) and s["json"]["uid"] for s in decoded)


@pytest.mark.parametrize("dtype", ["float64", "float32", "int32", "uint8"])
def test_score_parquets(pool, tmp_path, dtype):
    _, df = pool
    paths = toydata.write_score_parquets(df, tmp_path, seed=1, dtype=dtype)
    assert [p.name for p in paths] == [f"{s:08d}_scores.parquet" for s in range(SHARDS)]
    scores = pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True)
    assert list(scores.columns) == ["key", "uid", "informative", "noise_a", "noise_b"]
    assert list(scores["key"]) == sorted(df["key"])
    for p in paths:
        assert (pd.read_parquet(p)["key"].str[:8] == p.name[:8]).all()
    assert all(scores[c].dtype == np.dtype(dtype) for c in ("informative", "noise_a", "noise_b"))
    merged = scores.merge(df[["key", "uid", "clean"]], on=["key", "uid"])
    assert len(merged) == len(df)
    gap = merged.groupby("clean")["informative"].mean()
    assert gap[True] > gap[False] + (0.5 if dtype.startswith("float") else 50)


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    def files(folder, **kw):
        df = toydata.write_pool(folder / "pool", 30, n_shards=2, n_broken=1, image_format="png", **kw)
        toydata.write_score_parquets(df, folder / "scores", **kw)
        toydata.write_task(folder / "task", n_train=20, n_test=10, **kw)
        return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    a, b, c = files(tmp_path / "a", seed=5), files(tmp_path / "b", seed=5), files(tmp_path / "c", seed=6)
    assert a == b
    assert a.keys() == c.keys() and all(a[k] != c[k] for k in a if k.suffix in (".tar", ".parquet"))
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave nothing behind


def check_task_shards(shards, members, n_classes, classnames=None):
    labels = []
    for shard in shards:
        for sample in read_tar(shard).values():
            assert set(sample) == members
            label = int(sample["cls"].decode("ascii"))
            assert 0 <= label < n_classes
            if "txt" in sample:
                assert classnames[label] in sample["txt"].decode("utf-8")
            labels.append(label)
    return labels


def test_task_simple_layout(tmp_path):
    files = toydata.write_task(tmp_path, name="digits", n_train=60, n_test=30, n_train_shards=2)
    root = tmp_path / "digits"
    assert files.train_shards == (root / "train/00000000.tar", root / "train/00000001.tar")
    assert files.test_shards == (root / "test/0.tar",)
    classnames = (root / "classnames.txt").read_text().splitlines()
    templates = (root / "zeroshot_classification_templates.txt").read_text().splitlines()
    assert classnames == list(toydata.DIGIT_NAMES) and templates and all("{c}" in t for t in templates)
    train = check_task_shards(files.train_shards, {"png", "cls", "txt"}, 10, classnames)
    test = check_task_shards(files.test_shards, {"png", "cls"}, 10)
    assert len(train) == 60 and len(test) == 30 and len(set(train)) > 5
    task = resolve_task("digits", downstream_data_dir=str(files.downstream_data_dir))
    assert task.classnames == tuple(classnames) and task.train_dir == files.train_dir
    assert task.test_dir == root / "test"


def test_task_original_layout_subset_and_webp(tmp_path):
    files = toydata.write_task(tmp_path, layout="original", n_train=40, n_test=20, digits_subset=[7, 1],
                               templates=["{c}!", "a {c}"], image_format="webp")
    assert files.train_shards == (tmp_path / "downstream/mnist/00000000.tar",)
    eval_dir = tmp_path / "eval/wds_mnist_test"
    assert files.test_shards == (eval_dir / "test/0.tar",)
    assert (eval_dir / "classnames.txt").read_text() == "seven\none\n"
    assert (eval_dir / "zeroshot_classification_templates.txt").read_text() == "{c}!\na {c}\n"
    check_task_shards(files.train_shards, {"webp", "cls", "txt"}, 2, ["seven", "one"])
    check_task_shards(files.test_shards, {"webp", "cls"}, 2)
    samples = files.samples
    assert ((samples["digit"] == 7) == (samples["label"] == 0)).all() and set(samples["digit"]) == {1, 7}
    test = list(wds.WebDataset([str(p) for p in files.test_shards], shardshuffle=False).decode("pil"))
    assert len(test) == 20 and all(s["webp"].size == (32, 32) for s in test)
    task = resolve_task("mnist", str(files.downstream_data_dir), str(files.datacomp_eval_dir))
    assert task.classnames == ("seven", "one") and task.train_dir == tmp_path / "downstream/mnist"


def test_image_splits_disjoint_and_respected(pool, tmp_path):
    parts = {s: set(toydata.split_indices(s)) for s in ("pool", "train", "test")}
    assert not parts["pool"] & parts["train"] and not parts["pool"] & parts["test"]
    assert not parts["train"] & parts["test"]
    assert set.union(*parts.values()) == set(range(1797)) == set(toydata.split_indices(None))
    _, df = pool
    assert set(df.loc[df["image_index"] >= 0, "image_index"]) <= parts["pool"]
    samples = toydata.write_task(tmp_path, n_train=50, n_test=50).samples
    for split in ("train", "test"):
        assert set(samples.loc[samples["split"] == split, "image_index"]) <= parts[split]
    own = toydata.write_pool(tmp_path / "p", 40, n_shards=1, split=range(100), digits=[3, 5], corruption={})
    assert set(own["image_index"]) <= set(range(100)) and set(own["label"]) <= {3, 5}
    assert own["clean"].all()


@pytest.mark.parametrize("kwargs", [
    dict(corruption={"typo": 0.1}), dict(corruption={"wrong_caption": 0.7, "noise_image": 0.5}),
    dict(corruption={"near_duplicate": 1.0}), dict(n_shards=0), dict(image_format="gif"), dict(split="val"),
])
def test_write_pool_rejects_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        toydata.write_pool(tmp_path, 10, **{"n_shards": 1, **kwargs})


@pytest.mark.parametrize("kwargs", [
    dict(templates=["no placeholder"]), dict(classnames=["a", "b"]), dict(digits_subset=[1, 1]),
    dict(layout="flat"),
])
def test_write_task_rejects_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        toydata.write_task(tmp_path, n_train=5, n_test=5, **kwargs)
