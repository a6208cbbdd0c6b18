"""``flyt features`` on a generated pool with tiny random teachers: every score against a direct
computation, the embedding cache, two teachers in one pass, kill/rerun and splits, mixing, bad input."""

from __future__ import annotations

from collections import Counter
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from flyt.cli import main as cli
from flyt.demo import toydata
from flyt.method import input_scores as m

N_BROKEN = 3
SHARDS = 4
PER_TEACHER = ["clip_score", "neg_clip_loss", "normsim_inf", "normsim_2"]
CHEAP = ["caption_words", "caption_chars", "image_width", "image_height", "image_aspect"]
NEG = ["--neg_clip_batch_size", "16", "--neg_clip_batches", "3"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _teacher_file(path: Path, seed: int) -> Path:
    from flyt.models.networks import create_clip

    torch.manual_seed(seed)
    torch.save({"state_dict": create_clip("flyt-tiny")[0].state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def exp(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("features")
    df = toydata.write_pool(root / "pool", 120, n_shards=SHARDS, seed=0, n_broken=N_BROKEN,
                            corruption={"wrong_caption": 0.25, "unrelated_caption": 0.25})
    task = toydata.write_task(root / "tasks", layout="simple", n_train=40)
    exp = {"root": root, "df": df, "pool": root / "pool", "task": task.eval_dir,
           "t0": _teacher_file(root / "t0.pt", 0), "t1": _teacher_file(root / "t1.pt", 1)}
    exp["out"] = root / "reference"
    calls = []
    from flyt.data import samples

    decode = samples.decode_pair
    with pytest.MonkeyPatch.context() as mp:  # count the decodes of the two-teacher pass
        mp.setattr(samples, "decode_pair", lambda *a, **k: calls.append(1) or decode(*a, **k))
        assert _features(exp, exp["out"], "--save_embeddings") == 0
    exp["decodes"] = len(calls)
    return exp


def _argv(exp, out: Path, *extra: str, teachers=("a", "b"), scores=(*PER_TEACHER, *CHEAP, "meta:clip_l14_similarity_score")):
    argv = ["features", "--upstream_data_dir", str(exp["pool"]), "--output", str(out), "--scores", *scores,
            "--workers", "0", "--batch_size", "16", *NEG]
    for alias in teachers:
        argv += ["--teacher", f"{alias}=flyt-tiny:{exp['t0' if alias == 'a' else 't1']}"]
    if any(s.startswith("normsim") for s in scores):
        argv += ["--target_tasks", str(exp["task"])]
    return argv + list(extra)


def _features(exp, out: Path, *extra: str, **kw) -> int:
    return cli(_argv(exp, out, *extra, **kw))


def _read(out: Path) -> dict[str, pd.DataFrame]:
    return {p.name: pd.read_parquet(p) for p in sorted(out.glob("*_scores.parquet"))}


def _assert_same(a: Path, b: Path) -> None:
    fa, fb = _read(a), _read(b)
    assert list(fa) == list(fb) and len(fa) == SHARDS
    for name in fa:
        pd.testing.assert_frame_equal(fa[name], fb[name])
    assert not list(b.rglob(".*.tmp"))  # no temporaries left


def _direct_embeddings(exp, teacher: str):
    """Per pool sample (uid order of the pool) and target image: fp32 embeddings straight from the model."""
    from flyt.data.webdataset import iter_tar
    from flyt.data.samples import decode_labelled, decode_pair
    from flyt.models.networks import create_clip

    model, _, preprocess, tokenizer = create_clip("flyt-tiny", str(exp[teacher]))
    model.eval()
    samples = [s for p in sorted(exp["pool"].glob("*.tar")) for raw in iter_tar(p)
               if (s := decode_pair(raw, Counter())) is not None]
    targets = [s["image"] for p in sorted((exp["task"] / "train").glob("*.tar")) for raw in iter_tar(p)
               if (s := decode_labelled(raw, Counter())) is not None]
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(s["image"]) for s in samples]), normalize=True)
        txt = model.encode_text(tokenizer([s["text"] for s in samples]), normalize=True)
        tgt = model.encode_image(torch.stack([preprocess(i) for i in targets]), normalize=True)
    uids = [s["uid"] for s in samples]
    return uids, img, txt, tgt, float(model.logit_scale.detach().exp())


def test_every_score_equals_a_direct_computation(exp):
    """Mutations caught: clip_score against the next sample's caption; normsim_inf as a mean; NormSim-2
    without the square root; negCLIPLoss's batches seeded without the shard's name. (negCLIPLoss's formula
    is the next test's.)"""
    files = _read(exp["out"])
    table = pd.concat(files.values(), ignore_index=True)
    for name, part in files.items():
        assert set(part["key"].str[:8]) == {name.removesuffix("_scores.parquet")}
    expected = [f"{s}_{t}" for s in PER_TEACHER for t in "ab"] + CHEAP + ["clip_l14_similarity_score"]
    assert table.columns.tolist() == ["key", "uid", *expected]
    good = exp["df"][exp["df"]["kind"] != "broken"]
    assert sorted(table["uid"]) == sorted(good["uid"]) and table["uid"].is_unique
    summary = json.loads((exp["out"] / "_summary.json").read_text())
    assert summary["skipped"] == {"bad_image": N_BROKEN} and summary["samples"] == len(good)
    assert exp["decodes"] == len(exp["df"])  # one decode per image for both teachers

    uids, img, txt, tgt, tau = _direct_embeddings(exp, "t0")
    row = table.set_index("uid").loc[uids]
    np.testing.assert_allclose(row["clip_score_a"], (img * txt).sum(1), atol=2e-3)
    sims = img @ tgt.T
    np.testing.assert_allclose(row["normsim_inf_a"], sims.max(1).values, atol=2e-3)
    np.testing.assert_allclose(row["normsim_2_a"], sims.pow(2).sum(1).sqrt(), rtol=2e-3)
    for name, part in files.items():  # negCLIPLoss on the shard's own seeded assignment
        at = [uids.index(u) for u in part["uid"]]
        rng = np.random.default_rng([0, zlib.crc32(name.removesuffix("_scores.parquet").encode())])
        rounds = m.batch_assignment(len(at), 16, 3, rng)
        direct = m.neg_clip_loss(img[at], txt[at], tau, 16, rounds)
        np.testing.assert_allclose(part["neg_clip_loss_a"], direct, atol=5e-3)
    truth = exp["df"].set_index("uid").loc[table["uid"]]
    np.testing.assert_array_equal(table["caption_words"], truth["caption"].str.split().str.len())
    np.testing.assert_array_equal(table["caption_chars"], truth["caption"].str.len())
    assert (table["image_width"] == 32).all() and (table["image_aspect"] == 1).all()
    np.testing.assert_array_equal(table["clip_l14_similarity_score"], truth["clip_l14_similarity_score"])


def test_neg_clip_loss_is_its_formula_on_a_fixed_assignment():
    """Mutations caught: the normalisation without 1/2tau; the small-batch correction dropped; a wrapped-in
    sample scored twice in a round; logsumexp over one direction only; the rounds summed, not averaged."""
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    tau, big = 7.0, 3
    rounds = [np.array([[3, 0, 4], [1, 2, 3]]), np.array([[4, 3, 2], [1, 0, 4]])]  # 3 and 4 wrap in
    x, t = m.unit(img).double(), m.unit(txt).double()
    want = np.zeros(5)
    for batches in rounds:
        seen = set()
        for row in batches:
            for i in row:
                if i in seen:
                    continue
                seen.add(i)
                sij = [float(x[i] @ t[j]) for j in row]
                sji = [float(x[j] @ t[i]) for j in row]
                lse = math.log(sum(math.exp(tau * v) for v in sij)) + math.log(sum(math.exp(tau * v) for v in sji))
                want[i] += (float(x[i] @ t[i]) - lse / (2 * tau)) / len(rounds)
    np.testing.assert_allclose(m.neg_clip_loss(img, txt, tau, big, rounds), want, rtol=1e-5)
    # a shard smaller than the batch size: the batch is the shard and its sums are scaled to B
    small = [np.array([[0, 1, 2, 3, 4]])]
    scaled = m.neg_clip_loss(img, txt, tau, 10, small) - m.neg_clip_loss(img, txt, tau, 5, small)
    np.testing.assert_allclose(scaled, -math.log(2) / tau, rtol=1e-5)
    # the assignment: every sample once per round in batches of exactly min(B, n), fixed by the generator
    for n, b in ((10, 4), (3, 8), (8, 4)):
        for batches in m.batch_assignment(n, b, 2, np.random.default_rng(1)):
            assert batches.shape[1] == min(b, n) and sorted(batches.reshape(-1)[:n]) == list(range(n))
    a, b = (m.batch_assignment(10, 4, 2, np.random.default_rng(5)) for _ in range(2))
    assert all((x == y).all() for x, y in zip(a, b))


def test_the_cache_gives_the_scores_of_the_images_without_decoding_one(exp, tmp_path, monkeypatch):
    """Mutations caught: image and text arrays swapped on reading the cache; the cache path ignored (the
    pool's images decoded)."""
    cache = exp["out"] / "embeddings"
    rows = pd.read_parquet(cache / "00000001.parquet")
    for label in "ab":
        for kind in ("image", "text"):
            array = np.load(cache / f"00000001.{label}.{kind}.npy")
            assert array.dtype == np.float16 and array.shape == (len(rows), 64)
    assert rows["uid"].tolist() == _read(exp["out"])["00000001_scores.parquet"]["uid"].tolist()
    from flyt.data import samples

    monkeypatch.setattr(samples, "decode_pair", lambda *a, **k: pytest.fail("a pool image was decoded"))
    out = tmp_path / "from_cache"
    assert _features(exp, out, "--from_embeddings", str(exp["out"])) == 0
    _assert_same(exp["out"], out)


def test_two_teachers_in_one_pass_equal_two_separate_runs(exp, tmp_path):
    """Mutation caught: every teacher's embeddings computed by the first teacher's model."""
    reference = pd.concat(_read(exp["out"]).values(), ignore_index=True)
    for alias in "ab":
        out = tmp_path / alias
        assert _features(exp, out, teachers=(alias,), scores=("clip_score", "neg_clip_loss", "normsim_inf")) == 0
        alone = pd.concat(_read(out).values(), ignore_index=True)
        cols = [f"{s}_{alias}" for s in ("clip_score", "neg_clip_loss", "normsim_inf")]
        pd.testing.assert_frame_equal(alone[["key", "uid", *cols]], reference[["key", "uid", *cols]])


def test_kill_and_rerun_and_a_split_give_the_uninterrupted_files(exp, tmp_path):
    """A real SIGKILL mid-run, then a rerun; and a 2-way --shard_index split. Mutation caught: negCLIPLoss's
    batches drawn from one generator per run instead of one per (seed, shard)."""
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "flyt.cli", *_argv(exp, out, "--save_embeddings")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list(out.glob("*_scores.parquet")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(out.glob("*_scores.parquet")))
    assert 1 <= done < SHARDS, f"the kill came too late ({done} shards done)"
    assert _features(exp, out, "--save_embeddings") == 0
    _assert_same(exp["out"], out)
    assert json.loads((out / "_summary.json").read_text())["shards_already_done"] == done
    for path in (exp["out"] / "embeddings").glob("*.npy"):
        assert path.read_bytes() == (out / "embeddings" / path.name).read_bytes()

    split = tmp_path / "split"
    for i in range(2):
        assert _features(exp, split, "--shard_index", str(i), "--num_shards", "2") == 0
        assert (split / f"_summary.{i}-of-2.json").exists()
    _assert_same(exp["out"], split)


def test_repeated_uids_once_and_never_a_partial_row(exp, tmp_path):
    """A second copy of a shard adds no rows (first shard wins), and rows whose metadata value is null are
    skipped and counted. Mutations caught: the earlier shards' uids not excluded; NaN rows written."""
    pool = tmp_path / "pool"
    shutil.copytree(exp["pool"], pool)
    copy = tmp_path / "zcopy" / "x"  # sorted after the pool: its shard comes second
    copy.mkdir(parents=True)
    shutil.copy(pool / "00000000.tar", copy / "00000009.tar")
    shutil.copy(pool / "00000000.parquet", copy / "00000009.parquet")
    meta = pd.read_parquet(pool / "00000001.parquet")
    meta.loc[:4, "clip_b32_similarity_score"] = np.nan
    meta.to_parquet(pool / "00000001.parquet", index=False)
    out = tmp_path / "out"
    assert cli(["features", "--upstream_data_dir", f"{pool}::{tmp_path / 'zcopy'}", "--output", str(out),
                "--scores", "caption_words", "meta:clip_b32_similarity_score", "--workers", "0"]) == 0
    files = _read(out)
    assert len(files["00000009_scores.parquet"]) == 0
    table = pd.concat(files.values(), ignore_index=True)
    assert table["uid"].is_unique and table.notna().all().all()
    skipped = json.loads((out / "_summary.json").read_text())["skipped"]
    copies = len(_read(exp["out"])["00000000_scores.parquet"])
    assert skipped == {"bad_image": N_BROKEN + (exp["df"].query("shard == '00000000'").kind == "broken").sum(),
                       "missing_meta": 5, "repeated_uid": copies}


def test_flyt_column_equals_flyt_score(exp, tmp_path):
    """Mutation caught: the FLYT scores of a batch written in reverse order."""
    run = ["train", "--upstream_data_dir", str(exp["pool"]), "--downstream_task_names", str(exp["task"]),
           "--model", "flyt-tiny", "--upstream_batch_size", "8", "--downstream_batch_size", "4", "--workers", "0",
           "--warmup", "1", "--n_iterations", "1", "--output_dir", str(tmp_path), "--exp_name", "f", "--cos_sim_init"]
    assert cli(run) == 0
    ckpt = tmp_path / "f/checkpoints/scoring_epoch_latest.pt"
    assert cli(["score", "--checkpoint", str(ckpt), "--upstream_data_dir", str(exp["pool"]), "--output",
                str(tmp_path / "s.parquet"), "--workers", "0", "--batch_size", "16"]) == 0
    assert cli(["features", "--upstream_data_dir", str(exp["pool"]), "--output", str(tmp_path / "feat"), "--workers", "0",
                "--batch_size", "16", "--scores", "flyt", "clip_score", "--teacher", f"flyt-tiny:{exp['t1']}",
                "--flyt_checkpoint", str(ckpt)]) == 0
    score = pd.read_parquet(tmp_path / "s.parquet").set_index("uid")["score"]
    table = pd.concat(_read(tmp_path / "feat").values())
    np.testing.assert_allclose(table["flyt"], score.loc[table["uid"]], rtol=1e-5, atol=1e-6)


def _empty_tar(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w"):
        pass


def test_bad_input_is_one_line_before_any_model_loads(exp, tmp_path, capsys, monkeypatch):
    """Each bad input gives exit code 2, one line naming it, and no output. Mutation caught: the column
    definitions not compared (the run is then refused for another reason, with the wrong message)."""
    import flyt.jobs.feature_models as models

    monkeypatch.setattr(models, "load_models", lambda *a, **k: pytest.fail("a model was loaded"))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint" * 10)
    _empty_tar(tmp_path / "empty" / "00000000.tar")
    no_images = tmp_path / "notask"
    shutil.copytree(exp["task"], no_images, ignore=shutil.ignore_patterns("*.tar"))
    base = ["features", "--upstream_data_dir", str(exp["pool"]), "--output", str(tmp_path / "o")]
    cases = {
        "not an OpenCLIP model name": ["--teacher", "no-such-model", "--scores", "clip_score"],
        "is not a readable checkpoint": ["--teacher", f"flyt-tiny:{garbage}", "--scores", "clip_score"],
        "neither a file nor an OpenCLIP tag": ["--teacher", "flyt-tiny:nope", "--scores", "clip_score"],
        "no .tar shards": ["--teacher", "flyt-tiny", "--scores", "normsim_inf", "--target_tasks", str(no_images)],
        "needs --target_tasks": ["--teacher", "flyt-tiny", "--scores", "normsim_2"],
        "its own alias": ["--teacher", "flyt-tiny", "--teacher", "flyt-tiny", "--scores", "clip_score"],
        "unknown score 'clipscore'": ["--teacher", "flyt-tiny", "--scores", "clipscore"],
        "has no column 'nope'": ["--scores", "meta:nope"],
        "--flyt_checkpoint go together": ["--scores", "flyt"],
        "must be letters, digits or '_'": ["--teacher", "a-b=flyt-tiny", "--scores", "clip_score"],
        "no embeddings of teacher flyt-tiny:None": ["--teacher", "flyt-tiny", "--scores", "clip_score",
                                                    "--from_embeddings", str(exp["out"])],
    }
    for needle, extra in cases.items():
        assert cli(base + extra) == 2, needle
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], (needle, err)
    assert not (tmp_path / "o").exists()
    assert cli(["features", "--upstream_data_dir", str(tmp_path / "empty"), "--output", str(tmp_path / "o"),
                "--scores", "caption_words"]) == 2
    assert "hold no samples" in capsys.readouterr().err
    # the reference folder's clip_score_a came from teacher t0: t1 under the same alias is refused
    argv = _argv(exp, exp["out"], teachers=("b",), scores=("clip_score",))
    argv[argv.index("--teacher") + 1] = f"a=flyt-tiny:{exp['t1']}"
    assert cli(argv) == 2
    assert "column 'clip_score_a' is already there with another definition" in capsys.readouterr().err


def test_mixing_a_features_folder_with_the_released_layout(exp, tmp_path):
    """``--parquet_dir a::b``: each column from the folder that holds it. Mutation caught: a folder's
    values written to consecutive places instead of its fields' places in --parquet_fields order."""
    from flyt.data.scores import open_scores

    released = tmp_path / "released"
    released.mkdir()
    toydata.write_score_parquets(exp["df"], tmp_path / "tmp", columns=("informative", "noise_a"))
    pd.concat([pd.read_parquet(p) for p in sorted((tmp_path / "tmp").glob("*.parquet"))]).to_parquet(
        released / "part-0.parquet", index=False)  # the released dataset: any files, not one per shard
    lookup = open_scores(f"{released}::{exp['out']}", ["clip_score_b", "informative", "caption_chars"])
    mine = pd.concat(_read(exp["out"]).values()).set_index("key")
    theirs = pd.read_parquet(released / "part-0.parquet").set_index("key")
    keys = list(mine.index[:5])
    want = [[mine.loc[k, "clip_score_b"], theirs.loc[k, "informative"], mine.loc[k, "caption_chars"]] for k in keys]
    np.testing.assert_allclose(lookup.rows(keys, list(mine.loc[keys, "uid"])), want, rtol=1e-6)
    with pytest.raises(Exception, match="in none of the folders"):
        open_scores(f"{released}::{exp['out']}", ["nope"])
    twin = tmp_path / "twin"
    shutil.copytree(released, twin)
    with pytest.raises(Exception, match="both"):
        open_scores(f"{released}::{twin}", ["informative"])


def test_mflyt_learns_from_features_output(exp, tmp_path):
    """``flyt train`` M-FLYT on a ``flyt features`` column mixed with a noise column of the released layout
    (``--parquet_dir a::b``), on a pool where half the images are noise: NormSim-inf to the digits' training
    images (AUC 1 even under a random teacher) gets a positive weight. Mutation caught: normsim_inf with
    its sign flipped. In five seed/batch variants the weight was 0.035-0.17,
    the noise column's -0.11 to +0.03."""
    truth = toydata.write_pool(tmp_path / "pool", 600, n_shards=3, seed=0, corruption={"noise_image": 0.5})
    task = toydata.write_task(tmp_path / "tasks", layout="simple", n_train=100)
    toydata.write_score_parquets(truth, tmp_path / "released", columns=("noise",), informative=())
    assert cli(["features", "--upstream_data_dir", str(tmp_path / "pool"), "--output", str(tmp_path / "feat"),
                "--teacher", f"flyt-tiny:{exp['t0']}", "--scores", "normsim_inf", "--target_tasks", str(task.eval_dir),
                "--workers", "0"]) == 0
    fields = ["normsim_inf", "noise"]
    assert cli(["train", "--upstream_data_dir", str(tmp_path / "pool"), "--downstream_task_names", str(task.eval_dir),
                "--model", "flyt-tiny", "--reference_pretrained", str(exp["t0"]), "--update_reference_model",
                "--downstream_logit_scale", "2.65926", "--upstream_batch_size", "128", "--downstream_batch_size", "64",
                "--warmup", "5", "--reference_learning_rate", "1e-3", "--workers", "0", "--output_dir",
                str(tmp_path / "runs"), "--exp_name", "mflyt", "--n_iterations", "30", "--scoring_learning_rate", "2e-2",
                "--parquet_dir", f"{tmp_path / 'feat'}::{tmp_path / 'released'}", "--parquet_fields", *fields]) == 0
    ckpt = torch.load(tmp_path / "runs/mflyt/checkpoints/scoring_epoch_latest.pt", weights_only=True)
    weights = dict(zip(fields, ckpt["state_dict"]["layers.0.weight"].flatten().tolist()))
    print(f"M-FLYT weights on flyt features output: {weights}")
    assert weights["normsim_inf"] > 0.02


def test_a_local_ray_run_gives_the_same_files(exp, tmp_path):
    """``--engine ray`` (a local Ray the command starts, 2 CPUs here): the same score files and embedding
    cache as the in-process run. Mutation caught: negCLIPLoss's batches seeded by the worker's pid as well
    as (seed, shard), so that where a shard runs changes its scores."""
    out = tmp_path / "ray"
    assert _features(exp, out, "--save_embeddings", "--engine", "ray") == 0
    _assert_same(exp["out"], out)
    for path in (exp["out"] / "embeddings").glob("*.npy"):
        assert path.read_bytes() == (out / "embeddings" / path.name).read_bytes()
