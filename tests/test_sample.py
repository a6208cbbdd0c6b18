"""``flyt sample`` and the DataComp subset format.

The fast samplers are checked against a literal one-draw-at-a-time loop, statistically: mean draws per
score decile over many seeds must agree within 5 standard errors (computed from the observed spread),
and the same check must reject a sampler run with a wrong penalty or cap, so it has the power to fail.
For four examples the whole joint distribution of the count vector is enumerated exactly and compared with
many draws by a chi-square test (scipy comes with scikit-learn, a test dependency).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.stats

import flyt.select.race
from flyt.cli import main
from flyt.errors import FlytError
from flyt.data.subset import UID_DTYPE, array_to_uids, load_subset, save_subset, sort_order, uids_to_array
from flyt.select.race import race_counts
from flyt.select.samplers import batched_counts

REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------ statistical checks

POOL = np.sort(np.random.default_rng(123).normal(0.0, 1.5, 50))  # sorted, so deciles are blocks of 5
TOTAL, REPEATS, PENALTY, CAP = 200, 300, 0.15, 5


def counting_uids(n):
    """Uids 0, 1, 2, ...: neighbours differ in one low bit, the hardest case for a keyed generator."""
    uids = np.zeros(n, dtype=UID_DTYPE)
    uids["f1"] = np.arange(n, dtype=np.uint64)
    return uids


def race(logits, total, rng, penalty=0.0, cap=math.inf, temperature=1.0):
    """The keyed race as the statistical checks call a sampler: a fresh seed from ``rng`` per sample,
    the same uids every time."""
    seed = int(rng.integers(0, 2**63))
    return race_counts(logits, total, counting_uids(logits.size), seed, penalty, cap, temperature)


def sequential_reference(logits, total, rng, penalty=0.0, cap=math.inf):
    """The definition, one draw at a time: softmax of the current logits, skipping capped examples."""
    counts = np.zeros(logits.size, dtype=np.int64)
    for _ in range(total):
        counts[rng.choice(logits.size, p=next_draw_probabilities(logits, counts, penalty, cap))] += 1
    return counts


def next_draw_probabilities(logits, counts, penalty, cap):
    """Softmax of logits - penalty * counts over the examples below the cap (the same as rejecting capped draws)."""
    current = logits - penalty * counts
    weights = np.where(counts < cap, np.exp(current - current.max()), 0.0)
    return weights / weights.sum()


def decile_draws(sampler, **kwargs):
    """(REPEATS, 10) draws per score decile, one row per seed."""
    rows = [sampler(POOL, TOTAL, np.random.default_rng(seed), **kwargs) for seed in range(REPEATS)]
    return np.array(rows).reshape(REPEATS, 10, 5).sum(axis=2)


def max_z(a, b):
    """Largest decile difference of means, in standard errors estimated from the samples themselves."""
    se = np.sqrt(a.var(axis=0, ddof=1) / len(a) + b.var(axis=0, ddof=1) / len(b))
    return float(np.max(np.abs(a.mean(axis=0) - b.mean(axis=0)) / np.maximum(se, 1e-12)))


@pytest.fixture(scope="module")
def scs_reference():
    return decile_draws(sequential_reference, penalty=PENALTY)


@pytest.fixture(scope="module")
def hcs_reference():
    return decile_draws(sequential_reference, cap=CAP)


def test_scs_matches_sequential_process(scs_reference, monkeypatch):
    assert max_z(decile_draws(race, penalty=PENALTY), scs_reference) < 5
    assert max_z(decile_draws(batched_counts, batch=1, penalty=PENALTY), scs_reference) < 5  # batch 1 is exact
    assert max_z(decile_draws(race, penalty=2 * PENALTY), scs_reference) > 8  # the check can fail
    for block in (1, 7):  # rounds of one arrival per example (large pools) and mixed widths
        monkeypatch.setattr(flyt.select.race, "_BLOCK", block)
        assert max_z(decile_draws(race, penalty=PENALTY), scs_reference) < 5


def test_hcs_matches_sequential_process(hcs_reference, monkeypatch):
    assert max_z(decile_draws(race, cap=CAP), hcs_reference) < 5
    assert max_z(decile_draws(batched_counts, batch=1, cap=CAP), hcs_reference) < 5
    assert max_z(decile_draws(race, cap=CAP + 1), hcs_reference) > 8
    for block in (1, 7):
        monkeypatch.setattr(flyt.select.race, "_BLOCK", block)
        assert max_z(decile_draws(race, cap=CAP), hcs_reference) < 5


# The whole joint distribution of a few examples' count vectors, enumerated exactly, against many samples.
FEW = np.array([0.8, 0.2, -0.3, -1.0])
SAMPLES = 6000


def exact_count_distribution(logits, total, penalty=0.0, cap=math.inf):
    """{count vector: probability} after ``total`` draws of the sequential process, by dynamic programming."""
    dist = {(0,) * logits.size: 1.0}
    for _ in range(total):
        after = {}
        for counts, p in dist.items():
            for i, q in enumerate(next_draw_probabilities(logits, np.array(counts), penalty, cap)):
                if q > 0:
                    drawn = counts[:i] + (counts[i] + 1,) + counts[i + 1 :]
                    after[drawn] = after.get(drawn, 0.0) + p * q
        dist = after
    return dist


def count_samples(sampler, total, seed, n=SAMPLES, **kwargs):
    rng = np.random.default_rng(seed)
    return np.array([sampler(FEW, total, rng, **kwargs) for _ in range(n)])


def chi_square_p(samples, exact):
    """p-value of Pearson's chi-square of the sampled count vectors against the exact distribution.

    Cells expected fewer than 5 times are pooled into one; a sample outside the support gives 0.
    """
    vectors, observed = np.unique(samples, axis=0, return_counts=True)
    seen = dict(zip(map(tuple, vectors.tolist()), observed))
    if not seen.keys() <= exact.keys():
        return 0.0
    expected = np.array(list(exact.values())) * len(samples)
    counts = np.array([seen.get(cell, 0) for cell in exact])
    small = expected < 5
    if small.any():
        expected = np.r_[expected[~small], expected[small].sum()]
        counts = np.r_[counts[~small], counts[small].sum()]
    statistic = float(((counts - expected) ** 2 / expected).sum())
    return float(scipy.stats.chi2.sf(statistic, expected.size - 1))


def test_scs_joint_count_distribution_is_exact(monkeypatch):
    """SCS, 4 examples, 6 draws: the frequencies of all 84 count vectors against their exact probabilities.

    Mutations caught (each fails this test): in ``_Race.run_until``, the penalty carried over a round by
    ``penalty`` instead of ``penalty * width`` (slips past the decile means above; only the block-8 rounds
    see it), ``k = count`` instead of ``count + 1``, and ``exp(log_gap)`` without ``+ penalty * ahead``;
    in ``batched_counts``, ``current[top] -= penalty / 2``.
    """
    exact = exact_count_distribution(FEW, 6, penalty=0.7)
    assert len(exact) == 84 and math.isclose(sum(exact.values()), 1.0)
    assert chi_square_p(count_samples(batched_counts, 6, seed=0, batch=1, penalty=0.7), exact) > 1e-3
    assert chi_square_p(count_samples(batched_counts, 6, seed=0, batch=2, penalty=0.7), exact) < 1e-9  # approximate
    for block in (64, 8):  # one round covers every draw; rounds of 2 to 8 arrivals per example
        monkeypatch.setattr(flyt.select.race, "_BLOCK", block)
        assert chi_square_p(count_samples(race, 6, seed=block, penalty=0.7), exact) > 1e-3
    assert chi_square_p(count_samples(race, 6, seed=1, n=2000, penalty=0.5), exact) < 1e-9  # it can fail


def test_hcs_joint_count_distribution_is_exact(monkeypatch):
    """HCS, 4 examples capped at 2, 5 draws: the frequencies of the 16 count vectors against their exact
    probabilities.

    Mutations caught: the race's cap one arrival late (``k + ahead > cap`` for ``>=``); in ``batched_counts``,
    ``counts[top] > cap`` for ``>=``.
    """
    exact = exact_count_distribution(FEW, 5, cap=2)
    assert len(exact) == 16 and max(map(max, exact)) == 2
    assert chi_square_p(count_samples(batched_counts, 5, seed=0, batch=1, cap=2), exact) > 1e-3
    for block in (64, 8):
        monkeypatch.setattr(flyt.select.race, "_BLOCK", block)
        assert chi_square_p(count_samples(race, 5, seed=block, cap=2), exact) > 1e-3
    assert chi_square_p(count_samples(race, 5, seed=1, n=2000, cap=3), exact) < 1e-9  # it can fail


@pytest.mark.parametrize(
    "logits, total, penalty, cap",
    [
        (np.zeros(10), 1, 0.15, math.inf),
        (np.linspace(-3, 3, 1000), 5000, 0.15, math.inf),
        (np.linspace(-3, 3, 1000), 5000, 0.0, math.inf),
        (np.linspace(-3, 3, 1000), 5000, 0.0, 15),
        (np.linspace(-3, 3, 1000), 15000, 0.0, 15),  # every example exactly at the cap
        (np.linspace(-30, 30, 1000), 1000, 0.0, 1),  # a cap of 1 is sampling without replacement
        (np.r_[1000.0, np.zeros(99)], 7000, 0.15, math.inf),  # one huge logit: ~6,700 draws before it cools
        (np.r_[800.0, np.zeros(99)], 50, 0.0, math.inf),  # no penalty: it takes every draw
        (np.linspace(-300, 300, 500), 2000, 1.0, math.inf),
    ],
)
def test_total_is_exact_and_cap_is_respected(logits, total, penalty, cap):
    for counts in (
        race(logits, total, np.random.default_rng(0), penalty, cap),
        batched_counts(logits, total, np.random.default_rng(0), 37, penalty, cap),
    ):
        assert counts.sum() == total
        assert counts.max() <= cap
    if total == logits.size * cap:
        assert (counts == cap).all()


def test_scores_too_wide_for_float64_are_refused():
    logits = np.zeros(2**17 + 1)
    logits[1] = -1500.0  # its first arrival lies beyond exp(700) time units, yet HCS at full capacity needs it
    with pytest.raises(FlytError, match="scores span 1500"):
        race(logits, logits.size, np.random.default_rng(0), 0.0, 1)


def test_more_draws_than_the_cap_allows_are_refused():
    with pytest.raises(FlytError, match="cannot draw 31 from 10 examples capped at 3"):
        race(np.zeros(10), 31, np.random.default_rng(0), 0.0, 3)


def test_race_is_deterministic_given_seed():
    logits, uids = np.random.default_rng(1).normal(size=5000), counting_uids(5000)
    first = race_counts(logits, 20000, uids, 7, 0.15)
    assert np.array_equal(first, race_counts(logits, 20000, uids, 7, 0.15))
    assert not np.array_equal(first, race_counts(logits, 20000, uids, 8, 0.15))


# ------------------------------------------------------------------------------------ the subset format


def random_uids(n, seed=0):
    rng = np.random.default_rng(seed)
    return [f"{a:016x}{b:016x}" for a, b in zip(rng.integers(0, 2**63, n), rng.integers(0, 2**63, n))]


def test_npy_round_trip_keeps_repeats_sorted(tmp_path):
    uids = random_uids(500) + ["0" * 32, "f" * 32, "00000000000000010000000000000000"]
    counts = np.random.default_rng(0).integers(0, 4, len(uids))
    counts[-3:] = 2
    rows = save_subset(tmp_path / "subset", uids, counts)  # no .npy suffix: the name must be kept as given
    arr = load_subset(tmp_path / "subset")
    assert arr.dtype == np.dtype("u8,u8") and rows == len(arr) == counts.sum()
    expected = sorted(u for u, c in zip(uids, counts) for _ in range(c))
    assert array_to_uids(arr).to_pylist() == expected
    assert arr[0].tolist() == arr[1].tolist() == (0, 0) and arr[-1].tolist() == (2**64 - 1, 2**64 - 1)
    assert arr[2].tolist() == (1, 0)
    whole = uids_to_array(uids)
    assert np.array_equal(uids_to_array(pa.chunked_array([uids[:7], uids[7:]])), whole)
    assert np.array_equal(uids_to_array(pa.array(uids)[5:50]), whole[5:50])  # a sliced Arrow array
    one = uids_to_array(["0123456789abcdef" + "fedcba9876543210"])
    assert one[0]["f0"] == 0x0123456789ABCDEF and one[0]["f1"] == 0xFEDCBA9876543210


def test_sort_order_is_lexicographic_with_shared_leading_bits():
    arr = uids_to_array(random_uids(3000))
    arr["f0"][:1000] = arr["f0"][0]  # identical first halves: order decided by the second half
    arr["f0"][1000:1500] = arr["f0"][1000] ^ np.arange(500, dtype=np.uint64)  # differ only in low bits
    assert np.array_equal(sort_order(arr), np.lexsort((arr["f1"], arr["f0"])))


@pytest.mark.parametrize(
    "bad, message",
    [
        (["abc"], "is 3 bytes long"),
        (["A" * 32], "malformed uid at row 3: 'AAAA"),
        (["g" * 32], "malformed uid at row 3"),
        ([None], "missing"),
        ([12], "must be strings"),
    ],
)
def test_malformed_uids_are_refused(bad, message):
    with pytest.raises(FlytError, match=message):
        uids_to_array(random_uids(3) + bad)


def test_load_subset_refuses_other_files(tmp_path):
    np.save(tmp_path / "ints.npy", np.arange(3, dtype=np.uint64))
    with pytest.raises(FlytError, match=r"ints\.npy: expected dtype u8,u8"):
        load_subset(tmp_path / "ints.npy")
    unsorted = uids_to_array(["f" * 32, "0" * 32])
    np.save(tmp_path / "unsorted.npy", unsorted)
    with pytest.raises(FlytError, match="not sorted"):
        load_subset(tmp_path / "unsorted.npy")
    (tmp_path / "text.npy").write_text("hello")
    with pytest.raises(FlytError, match="not a NumPy"):
        load_subset(tmp_path / "text.npy")


# ------------------------------------------------------------------------------------ the command

N = 200


@pytest.fixture
def pool(tmp_path):
    """A 200-uid score file with distinct scores, one of them exactly 0.5."""
    scores = np.random.default_rng(3).normal(size=N)
    scores[17] = 0.5
    frame = pd.DataFrame({"uid": random_uids(N, seed=3), "score": scores, "other": 1})
    frame.to_parquet(tmp_path / "scores.parquet")
    return frame


def sample(tmp_path, *flags, name="subset.npy"):
    """Run ``flyt sample`` on the pool; return its exit code and the output path."""
    out = tmp_path / "out" / name
    argv = ["sample", "--scores", str(tmp_path / "scores.parquet"), "--output", str(out), *map(str, flags)]
    return main(argv), out


def selected(path):
    return array_to_uids(load_subset(path)).to_pylist()


def test_scs_writes_subset_counts_summary_and_plot(tmp_path, pool, capsys):
    counts_path = tmp_path / "out" / "counts.parquet"
    rc, out = sample(tmp_path, "--method", "scs", "--total_size", 1000, "--seed", 0, "--counts_output", counts_path)
    assert rc == 0
    uids = selected(out)
    assert len(uids) == 1000 and uids == sorted(uids) and set(uids) <= set(pool.uid)
    counts = pq.read_table(counts_path).to_pandas()
    assert (counts["count"] > 0).all() and counts["count"].sum() == 1000
    assert dict(zip(counts.uid, counts["count"])) == pd.Series(uids).value_counts().to_dict()
    summary = json.loads((tmp_path / "out" / "subset.npy.summary.json").read_text())
    assert summary["total_drawn"] == 1000 and summary["pool_size"] == N
    assert summary["params"]["repetition_penalty"] == 0.15
    assert sum(summary["count_histogram"].values()) == summary["unique"] == len(set(uids))
    from PIL import Image

    with Image.open(tmp_path / "out" / "subset.png") as plot:
        assert plot.format == "PNG" and plot.size == (1100, 400)
    assert "1,000 drawn" in capsys.readouterr().out


def test_hcs_respects_the_frequency_limit(tmp_path, pool):
    rc, out = sample(tmp_path, "--method", "hcs", "--total_size", 3 * N - 10, "--frequency_limit", 3, "--seed", 1)
    assert rc == 0
    assert len(selected(out)) == 3 * N - 10
    assert pd.Series(selected(out)).value_counts().max() <= 3


@pytest.mark.parametrize("method, extra", [("scs", []), ("hcs", ["--frequency_limit", 2])])
def test_batched_approximation_respects_total_size(tmp_path, pool, method, extra):
    rc, out = sample(
        tmp_path, "--method", method, "--total_size", 333, "--seed", 0, "--sampling_batch_size", 40, *extra
    )
    assert rc == 0
    uids = selected(out)
    assert len(uids) == 333
    if method == "hcs":
        assert pd.Series(uids).value_counts().max() <= 2


def test_same_seed_same_subset_whatever_the_file_layout(tmp_path, pool):
    flags = ["--method", "scs", "--total_size", 500]
    _, first = sample(tmp_path, *flags, "--seed", 5, name="a.npy")
    _, other_seed = sample(tmp_path, *flags, "--seed", 6, name="b.npy")
    shuffled = pool.sample(frac=1.0, random_state=0)
    (tmp_path / "scores.parquet").unlink()
    (tmp_path / "scores.parquet").mkdir()  # the same pool as a folder of three files, rows shuffled
    for i in range(3):
        shuffled.iloc[i * 70 : (i + 1) * 70].to_parquet(tmp_path / "scores.parquet" / f"part{i}.parquet")
    parts = tmp_path / "scores.parquet" / ".merged.parquet.parts"  # unfinished work of `flyt score`: ignored
    parts.mkdir()
    shuffled.iloc[:10].to_parquet(parts / "part0.parquet")
    _, again = sample(tmp_path, *flags, "--seed", 5, name="c.npy")
    assert first.read_bytes() == again.read_bytes()
    assert first.read_bytes() != other_seed.read_bytes()


def test_topk_and_threshold_select_exactly_the_right_uids(tmp_path, pool):
    by_score = pool.sort_values("score", ascending=False).uid
    assert sample(tmp_path, "--method", "topk", "--fraction", 0.1, name="f.npy")[0] == 0
    assert selected(tmp_path / "out" / "f.npy") == sorted(by_score[:20])
    assert sample(tmp_path, "--method", "topk", "--total_size", 7, name="k.npy")[0] == 0
    assert selected(tmp_path / "out" / "k.npy") == sorted(by_score[:7])
    assert sample(tmp_path, "--method", "threshold", "--threshold", 0.5, name="t.npy")[0] == 0
    kept = selected(tmp_path / "out" / "t.npy")
    assert kept == sorted(pool.uid[pool.score >= 0.5]) and pool.uid[17] in kept


def broken(column, index, value):
    def edit(frame):
        frame[column] = frame[column].astype(object) if value is None else frame[column]
        frame.loc[index, column] = value
        return frame

    return edit


@pytest.mark.parametrize(
    "edit, flags, message",
    [
        (broken("score", 4, np.nan), [], "NaN, infinite or missing, e.g. uid [0-9a-f]{32}"),
        (broken("score", 4, np.inf), [], "NaN, infinite or missing"),
        (broken("score", 4, None), [], "NaN, infinite or missing"),
        (lambda f: pd.concat([f, f.iloc[:1]]), [], "uid [0-9a-f]{32} appears more than once"),
        (broken("uid", 9, "abc"), [], "malformed uid"),
        (broken("uid", 9, "Z" * 32), [], "malformed uid at row 9"),
        (lambda f: f.drop(columns="score"), [], "no column 'score'"),
        (lambda f: f.drop(columns="uid"), [], "no column 'uid'"),
        (lambda f: f.iloc[:0], [], "the pool is empty"),
        (None, ["--total_size", 15 * N + 1], "hard cap sampling cannot draw that many"),
        (None, ["--method", "topk", "--fraction", 0], r"--fraction must be in \(0, 1\]"),
        (None, ["--method", "topk", "--fraction", 1.5], r"--fraction must be in \(0, 1\]"),
        (None, ["--method", "topk"], "exactly one of --fraction and --total_size"),
        (None, ["--method", "topk", "--fraction", 0.5, "--total_size", 3], "exactly one of"),
        (None, ["--method", "topk", "--total_size", N + 1], "expected 1 to the pool size, 200"),
        (None, ["--method", "softcap"], "'softcap' is not one of scs, hcs, topk, threshold"),
        (None, ["--method", "scs", "--seed", 0], "--method scs needs --total_size"),
        (None, ["--method", "scs", "--total_size", 10], "--method scs needs --seed"),
        (None, ["--method", "threshold"], "--method threshold needs --threshold"),
        (None, ["--method", "threshold", "--threshold", 99], "keeps nothing"),
        (None, ["--method", "scs", "--total_size", 10, "--seed", 0, "--fraction", 0.5], "--fraction does not apply"),
        (None, ["--method", "scs", "--total_size", 10, "--seed", 0, "--repetition_penalty", -1], "must be >= 0"),
        (None, ["--score_column", "clip"], "no column 'clip'"),
    ],
)
def test_errors_name_the_problem_and_write_nothing(tmp_path, pool, capsys, edit, flags, message):
    if edit is not None:
        edit(pool.copy()).to_parquet(tmp_path / "scores.parquet")
    if "--method" not in flags:
        flags = ["--method", "hcs", "--seed", 0, *(["--total_size", 10] if "--total_size" not in flags else []), *flags]
    rc, _ = sample(tmp_path, *flags)
    assert rc == 2
    err = capsys.readouterr().err
    assert err.strip().startswith("flyt sample: error: ") and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_unreadable_scores_are_refused(tmp_path, capsys):
    (tmp_path / "scores.parquet").write_text("not parquet")
    assert sample(tmp_path, "--method", "topk", "--fraction", 0.5)[0] == 2
    assert "cannot read as parquet" in capsys.readouterr().err
    (tmp_path / "scores.parquet").unlink()
    assert sample(tmp_path, "--method", "topk", "--fraction", 0.5)[0] == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_sample_does_not_import_torch(tmp_path, pool):
    script = (
        "import sys; from flyt.cli import main; "
        f"main(['sample', '--scores', {str(tmp_path / 'scores.parquet')!r}, '--method', 'topk', "
        f"'--fraction', '0.5', '--output', {str(tmp_path / 'out' / 's.npy')!r}]); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", script], cwd=REPO, check=True, capture_output=True)
