"""SCS and HCS with a controllable sharpness: ``--temperature`` and ``--unique_fraction``.

The unique-fraction search predicts the exact race's share of distinct examples from the logits alone; it
is checked against the race itself on differently shaped score distributions, within 4 binomial standard
errors (an upper bound on the spread of a share of distinct examples).
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pandas as pd
import pytest

from flyt.cli import main
from flyt.errors import FlytError
from flyt.select.race import race_counts
from flyt.select.samplers import batched_counts
from flyt.data.subset import UID_DTYPE
from flyt.select.sharpness import expected_unique_fraction, temperature_for_unique_fraction, unique_fraction_range

N = 20_000
UIDS = np.zeros(N, dtype=UID_DTYPE)
UIDS["f1"] = np.arange(N, dtype=np.uint64)
_rng = np.random.default_rng(11)
DISTRIBUTIONS = {
    "narrow normal": _rng.normal(0.0, 0.3, N),
    "wide normal": _rng.normal(0.0, 3.0, N),
    "bimodal": np.where(_rng.random(N) < 0.5, -2.0, 2.0) + _rng.normal(0.0, 0.5, N),
    "heavy-tailed": _rng.standard_t(2, N),
}
# sampler -> (penalty, cap, a target every distribution can reach)
SAMPLERS = {"scs": (0.15, math.inf, 0.3), "scs, penalty 1": (1.0, math.inf, 0.4), "hcs": (0.0, 15, 0.3),
            "hcs, cap 2": (0.0, 2, 0.6)}


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_unique_fraction_target_is_met_within_sampling_error(distribution, sampler):
    """Mutations caught: the SCS fluid limit log(1 + p x) / p used as mean draws for every penalty
    (``_FLUID_PENALTY = 10``: the penalty-1 cases land 0.02-0.05 off), and HCS mean draws of
    E min(N, cap - 1) (``cap * (1 - _poisson_cdf(x, cap - 2))``: the cap-2 cases land far off)."""
    logits, (penalty, cap, target) = DISTRIBUTIONS[distribution], SAMPLERS[sampler]
    temperature = temperature_for_unique_fraction(logits, N, target, penalty, cap)
    assert expected_unique_fraction(logits, N, temperature, penalty, cap) == pytest.approx(target, abs=1e-5)
    counts = race_counts(logits, N, UIDS, 0, penalty, cap, temperature)
    assert counts.sum() == N
    assert abs(np.count_nonzero(counts) / N - target) < 4 * math.sqrt(target * (1 - target) / N)


def test_temperature_sharpens_and_one_changes_nothing():
    """Mutation caught: ``tempered`` ignoring the temperature (returning ``logits``): the T = 0.5 draws
    equal today's and the share does not shrink."""
    logits = DISTRIBUTIONS["narrow normal"]
    today = race_counts(logits, N, UIDS, 3, 0.15)
    assert np.array_equal(race_counts(logits, N, UIDS, 3, 0.15, temperature=1.0), today)
    sharp = race_counts(logits, N, UIDS, 3, 0.15, temperature=0.5)
    assert np.array_equal(sharp, race_counts(logits / 0.5, N, UIDS, 3, 0.15))
    assert np.count_nonzero(sharp) < np.count_nonzero(today) - 500
    shares = [expected_unique_fraction(logits, N, t, 0.15) for t in (0.05, 0.2, 1.0, 5.0)]
    assert shares == sorted(shares) and shares[0] < 0.15 < 0.6 < shares[-1]


def test_reachable_range_and_refused_targets():
    """Mutation caught: dropping the range check in ``temperature_for_unique_fraction`` (the search then
    returns the flattest temperature for 0.9 instead of refusing it)."""
    logits = DISTRIBUTIONS["wide normal"]
    low, high = unique_fraction_range(logits, N, cap=15)
    assert low == pytest.approx(1 / 15, abs=0.01)  # sharpest: the top examples take 15 draws each
    assert high == pytest.approx(1 - math.exp(-1), abs=1e-6)  # uniform: Poisson(1) draws each
    with pytest.raises(FlytError, match=r"out of reach .* 0\.0\d+ \(the sharpest .*\) to 0\.6321 \(uniform\)"):
        temperature_for_unique_fraction(logits, N, 0.9, cap=15)
    with pytest.raises(FlytError, match="out of reach"):  # never more distinct examples than draws
        temperature_for_unique_fraction(logits, N // 10, 0.2, penalty=0.15)
    with pytest.raises(FlytError, match=r"must be in \(0, 1\]"):
        temperature_for_unique_fraction(logits, N, 0.0)
    flat = np.zeros(1000)  # equal scores: every temperature gives the same subsets, so T = 1
    share, same = unique_fraction_range(flat, 1000, cap=3)
    assert share == same and temperature_for_unique_fraction(flat, 1000, share, cap=3) == 1.0
    with pytest.raises(FlytError, match="out of reach"):
        temperature_for_unique_fraction(flat, 1000, share - 0.01, cap=3)


# ------------------------------------------------------------------------------------ the command


@pytest.fixture
def scores(tmp_path):
    rng = np.random.default_rng(5)
    uids = [rng.bytes(16).hex() for _ in range(2000)]
    path = tmp_path / "scores.parquet"
    pd.DataFrame({"uid": uids, "score": rng.normal(0.0, 0.3, len(uids))}).to_parquet(path)
    return path


def sample(scores, out, *flags):
    return main(["sample", "--scores", str(scores), "--output", str(out), *map(str, flags)])


@pytest.mark.parametrize("method, extra", [("scs", []), ("hcs", []), ("scs", ["--sampling_batch_size", 300])])
def test_temperature_one_gives_todays_subsets_exactly(tmp_path, scores, method, extra):
    """Mutations caught: ``_select`` seeding its generator with ``[seed, 1]`` whenever a temperature is
    given (T = 1 no longer matches bitwise); ``_select`` passing the raw scores to the batched sampler (its
    T = 0.3 subset equals today's)."""
    flags = ["--method", method, "--total_size", 3000, "--seed", 4, *extra]
    assert sample(scores, tmp_path / "a.npy", *flags) == 0
    assert sample(scores, tmp_path / "b.npy", *flags, "--temperature", 1) == 0
    assert sample(scores, tmp_path / "c.npy", *flags, "--temperature", 0.3) == 0
    assert (tmp_path / "a.npy").read_bytes() == (tmp_path / "b.npy").read_bytes()
    assert (tmp_path / "a.npy").read_bytes() != (tmp_path / "c.npy").read_bytes()


def test_unique_fraction_summary_and_console(tmp_path, scores, capsys):
    """Mutation caught: the summary reporting the target as the realised share."""
    flags = ["--method", "hcs", "--total_size", 2000, "--seed", 0, "--unique_fraction", 0.3]
    assert sample(scores, tmp_path / "u.npy", *flags) == 0
    summary = json.loads((tmp_path / "u.npy.summary.json").read_text())
    assert summary["unique_fraction"]["target"] == 0.3
    assert summary["unique_fraction"]["realised"] == summary["unique"] / 2000 != 0.3
    assert abs(summary["unique"] / 2000 - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 2000)
    assert 0 < summary["temperature"] < 1 and summary["params"]["unique_fraction"] == 0.3
    out = capsys.readouterr().out
    assert re.search(r"temperature 0\.\d+ \(found for unique fraction 0\.3\): unique fraction 0\.\d{4}", out)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--temperature", 0], "--temperature must be a positive number, got 0.0"),
        (["--temperature", -2], "--temperature must be a positive number"),
        (["--temperature", "nan"], "--temperature must be a positive number"),
        (["--unique_fraction", 0], r"--unique_fraction must be in \(0, 1\], got 0.0"),
        (["--unique_fraction", 1.5], r"--unique_fraction must be in \(0, 1\]"),
        (["--temperature", 2, "--unique_fraction", 0.3], "exclude each other"),
        (["--method", "topk", "--fraction", 0.5, "--temperature", 2], "--temperature does not apply to --method topk"),
        (["--method", "threshold", "--threshold", 0, "--unique_fraction", 0.3], "--unique_fraction does not apply"),
    ],
)
def test_bad_values_fail_in_one_line_before_reading(tmp_path, capsys, flags, message):
    """The scores file does not exist: the flag error must come first.

    Mutation caught: removing the temperature check in ``_check_flags`` (the temperature cases then
    fail on the missing file instead)."""
    if "--method" not in flags:
        flags = ["--method", "scs", "--total_size", 10, "--seed", 0, *flags]
    assert sample(tmp_path / "missing.parquet", tmp_path / "out" / "s.npy", *flags) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flyt sample: error: ") and len(err.splitlines()) == 1 and re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_unreachable_target_fails_in_one_line_and_writes_nothing(tmp_path, scores, capsys):
    """Mutation caught: the CLI sampling at the flattest temperature instead of refusing (range check
    dropped): it writes a subset."""
    flags = ["--method", "hcs", "--total_size", 2000, "--seed", 0, "--unique_fraction", 0.8]
    assert sample(scores, tmp_path / "out" / "s.npy", *flags) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert re.search(r"--unique_fraction: a unique fraction of 0\.8 is out of reach .* to 0\.632\d \(uniform\)", err)
    assert not (tmp_path / "out").exists()

