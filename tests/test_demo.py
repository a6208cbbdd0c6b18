"""``flyt demo --quick`` runs the whole pipeline end to end and writes a complete report, and
``examples.ipynb`` runs top to bottom on what it wrote.

The demo takes minutes on a CPU, so it runs once per module and both tests read its folder. Its
side-by-side steps report a failure by command and log file.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import flyt
from flyt.cli import main as cli
from flyt.demo.pipeline import Pipeline
from flyt.demo.report import SECTIONS, _compute_section, _outcome, compare
from flyt.demo.steps import main as demo_step
from flyt.errors import FlytError

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "examples.ipynb"


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory) -> Path:
    """The output folder of one ``flyt demo --quick`` run, shared by the tests of this module."""
    root = tmp_path_factory.mktemp("demo")
    assert cli(["demo", "--output_dir", str(root), "--quick"]) == 0
    return root


def test_quick_demo_writes_every_report_section(quick_demo):
    report = (quick_demo / "report" / "report.md").read_text()
    for section in SECTIONS:
        assert section in report
    for method in ("no filter", "random", "CLIP-score top-k", "FLYT + SCS", "M-FLYT + SCS", "M-FLYT + top-k",
                   "oracle: clean first"):
        assert f"| {method} |" in report
    for plot in ("score_histograms.png", "selection_by_kind.png", "training_curves.png", "diagnostics.png"):
        assert (quick_demo / "report" / plot).stat().st_size > 1000
    assert "flyt train --upstream_data_dir" in report and "flyt eval --model flyt-tiny --pretrained" in report
    assert "| FLYT + SCS vs CLIP-score top-k | 1 |" in report and "not distinguishable with 1 seed" in report
    assert "Every one of the 7 CLIPs trained on **5,120 samples seen** (40 steps of batch 128" in report
    assert "| clip_score_base | " in report and "| **the mix (M-FLYT score)** | | " in report


def test_m_flyt_inputs_come_from_flyt_features(quick_demo):
    """M-FLYT trains on ``flyt features``' columns of the base CLIP (and caption words), standardised by the
    demo's step, and the report gives each input's AUC beside its weight.

    Mutation caught: m_flyt_inputs leaving caption_words out of the fields it returns (M-FLYT's
    parquet_fields differ)."""
    report = (quick_demo / "report" / "report.md").read_text()
    fields = ["clip_score_base", "neg_clip_loss_base", "normsim_inf_base", "caption_words"]
    assert json.loads((quick_demo / "runs" / "mflyt" / "config.json").read_text())["parquet_fields"] == fields
    assert any(line.startswith("flyt features --upstream_data_dir") and "--teacher base=flyt-tiny:" in line
               for line in report.splitlines())
    for field in fields:
        assert f"| {field} | " in report


def test_standardise_scales_every_column_by_the_whole_pool(tmp_path):
    """Two shards' files on different levels: each column becomes (x - pool mean) / pool std, file by file,
    key and uid kept. Mutation caught: scaling each file by its own mean and std (values differ)."""
    rng = np.random.default_rng(0)
    frames = [pd.DataFrame({"key": [f"{i}{j}" for j in range(20)], "uid": [f"{i:031d}{j:x}" for j in range(20)],
                            "clip_score_base": rng.normal(i, 0.1, 20).astype("float32"),
                            "caption_words": rng.integers(1, 9, 20).astype("float32") * (i + 1)}) for i in range(2)]
    for i, frame in enumerate(frames):
        frame.to_parquet(tmp_path / f"{i:08d}_scores.parquet")
    assert demo_step(["standardise", "--features", str(tmp_path), "--output", str(tmp_path / "out")]) == 0
    pool = pd.concat(frames)
    fields = ["clip_score_base", "caption_words"]
    expected = (pool[fields].astype("float64") - pool[fields].astype("float64").mean()) / pool[fields].astype("float64").std()
    done = pd.concat(pd.read_parquet(tmp_path / "out" / f"{i:08d}_scores.parquet") for i in range(2))
    assert list(done.uid) == list(pool.uid) and list(done.key) == list(pool.key)
    np.testing.assert_allclose(done[fields].to_numpy(), expected.to_numpy(), rtol=1e-12)


def test_the_reproduce_section_rebuilds_the_demo_data_and_score_files(quick_demo, tmp_path):
    """The pool, its truth and the random/oracle score files come from commands in the report that a user
    can paste; run here in a fresh process into another folder, they give the same files.

    Mutation caught: `scores` drawing the oracle's tie-breaks from an unseeded generator (files differ)."""
    report = (quick_demo / "report" / "report.md").read_text()
    lines = [line for line in report.splitlines() if line.startswith("python -m flyt.demo.steps ")]
    assert [shlex.split(line)[3] for line in lines] == ["data", "standardise", "scores", "scores"]
    data = quick_demo / "data"
    for line in (lines[0], lines[3]):  # the pool and the oracle's scores (a seeded draw)
        argv = shlex.split(line.replace(str(data), str(tmp_path)))
        subprocess.run([sys.executable, *argv[1:]], check=True, capture_output=True)
    for shard in sorted((data / "pool").glob("*.tar")):
        assert (tmp_path / "pool" / shard.name).read_bytes() == shard.read_bytes()
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "truth.parquet"), pd.read_parquet(data / "truth.parquet"))
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "oracle_scores.parquet"),
                                  pd.read_parquet(data / "oracle_scores.parquet"))


def test_quick_demo_validates_and_compares_at_equal_distinct_counts(quick_demo):
    """Scores with the best validation step's checkpoint, tables diagnostics and val/gain per step, and gives
    SCS and top-k the same number of distinct examples.

    Mutations caught: scoring with scoring_epoch_latest.pt although scoring_best.pt exists (the score
    command line); SCS drawing --total_size 0.4 n without --unique_fraction (distinct counts differ)."""
    report = (quick_demo / "report" / "report.md").read_text()
    commands = [line for line in report.splitlines() if line.startswith("flyt score")]
    assert len(commands) == 2 and all("scoring_best.pt" in c for c in commands)
    for label, name in (("FLYT", "flyt"), ("M-FLYT", "mflyt")):
        best = torch.load(quick_demo / "runs" / name / "checkpoints" / "scoring_best.pt", weights_only=True)
        assert f"{label}: the best validation step's checkpoint (step {best['flyt']['step']})" in report
        assert f"| {label} | {best['flyt']['step']} (best) |" in report
    for key in ("diag/score_std", "diag/ess_share", "diag/probe_spearman", "val/gain"):
        assert f"- `{key}`: " in report
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in report.splitlines()
            if line.startswith("| ") and line.split(" | ")[0][2:].endswith(("_scs", "_topk"))}
    n_usable = int(rows["mflyt_scs"][1])  # SCS draws as many as the usable pool holds
    assert int(rows["mflyt_topk"][2]) == round(0.4 * n_usable)
    for name in ("flyt_scs", "mflyt_scs"):
        assert int(rows[name][1]) == n_usable and float(rows[name][3]) > 0
        assert abs(int(rows[name][2]) - 0.4 * n_usable) < 0.05 * n_usable


def _paired(differences, start=(0.10, 0.55, 0.20, 0.65, 0.30)) -> pd.DataFrame:
    """Accuracies of "no filter" and "filter" per seed: the seeds' levels vary far more than the differences,
    and the rows come in no order of seed, so only pairing by seed finds the differences."""
    rows = [{"method": "no filter", "seed": s, "acc1": start[s]} for s in range(len(differences))]
    rows += [{"method": "filter", "seed": s, "acc1": start[s] + d} for s, d in enumerate(differences)]
    return pd.DataFrame(rows).sample(frac=1.0, random_state=0)


@pytest.mark.parametrize("sign, verdict", [(1, "better"), (-1, "worse")])
def test_a_clear_difference_is_better_or_worse_with_its_paired_t_interval(sign, verdict):
    """Mutations caught: differences taken by row order instead of by seed (rows shuffled: the verdict
    turns into a tie); an interval from the two methods' unpaired spreads (dominated by the seeds' levels)."""
    differences = sign * np.array([0.04, 0.05, 0.06, 0.05, 0.05])
    result = compare(_paired(differences), "filter", "no filter")
    half = 2.7764451051977987 * differences.std(ddof=1) / np.sqrt(5)  # t quantile, 4 degrees of freedom
    assert result.seeds == 5 and result.mean == pytest.approx(sign * 0.05)
    assert (result.low, result.high) == pytest.approx((sign * 0.05 - half, sign * 0.05 + half))
    assert result.verdict == verdict


def test_a_tie_within_wide_intervals_is_not_distinguishable():
    """Mutations caught: the normal quantile 1.96 instead of Student's t (3 seeds: the interval [+0.04, +0.16]
    would call it better); a verdict from the sign of the mean instead of the interval."""
    result = compare(_paired([0.05, 0.10, 0.15]), "filter", "no filter")
    assert result.mean == pytest.approx(0.10) and result.low < 0 < result.high
    assert result.verdict == "not distinguishable with 3 seeds"
    wide = compare(_paired([0.20, -0.15, 0.10, -0.10, 0.05]), "filter", "no filter")
    assert wide.verdict == "not distinguishable with 5 seeds" and wide.high - wide.low > 0.3
    single = compare(_paired([0.3]), "filter", "no filter")
    assert (single.seeds, single.low, single.verdict) == (1, None, "not distinguishable with 1 seed")


def test_the_outcome_answers_the_question_in_plain_words():
    """Mutation caught: a learned filter's tie with CLIP-score top-k reported as a loss in the answer."""
    start = [0.1, 0.5, 0.2, 0.6, 0.3]
    gaps = {"no filter": [0] * 5, "random": [0.01, -0.01, 0.02, 0.0, -0.02], "CLIP-score top-k": [0.3] * 5,
            "FLYT + SCS": [0.4, 0.41, 0.39, 0.4, 0.42], "M-FLYT + SCS": [0.1, 0.12, 0.09, 0.11, 0.1],
            "M-FLYT + top-k": [0.5, 0.1, 0.4, 0.2, 0.3]}
    table = pd.DataFrame([{"method": m, "seed": s, "acc1": start[s] + g[s]} for m, g in gaps.items() for s in range(5)])
    text = "\n".join(_outcome(table))
    assert "| FLYT + SCS vs CLIP-score top-k | 5 | +0.104 | [+0.090, +0.118] | better |" in text
    assert "| M-FLYT + top-k vs CLIP-score top-k | 5 | +0.000 | [-0.196, +0.196] | not distinguishable with 5 seeds |" in text
    assert "- Against **random**: better: CLIP-score top-k, FLYT + SCS, M-FLYT + SCS, M-FLYT + top-k." in text
    assert ("here?** Yes: FLYT + SCS (while M-FLYT + SCS is worse; M-FLYT + top-k is not distinguishable "
            "with 5 seeds).") in text


def test_a_yardstick_that_cannot_tell_the_oracle_from_no_filter_says_so():
    """Mutation caught: the check reading the oracle's comparison with random instead of with no filter
    (here the oracle beats random, so the warning would vanish)."""
    start = [0.1, 0.5, 0.2, 0.6, 0.3]
    gaps = {"no filter": [0] * 5, "random": [-0.1] * 5, "oracle: clean first": [0.4, 0.0, -0.05, 0.1, 0.35]}
    table = pd.DataFrame([{"method": m, "seed": s, "acc1": start[s] + g[s]} for m, g in gaps.items() for s in range(5)])
    assert ("**The yardstick fails its own check**: the oracle, which keeps only clean pairs, and no filter are "
            "not distinguishable with 5 seeds.") in "\n".join(_outcome(table))
    table.loc[table.method == "oracle: clean first", "acc1"] = [0.9, 0.95, 0.92, 0.91, 0.93]
    assert "yardstick fails" not in "\n".join(_outcome(table))


def test_unequal_compute_is_reported_from_the_runs_own_outputs(tmp_path):
    """A run whose metrics end early (killed, or another budget) breaks equal compute, whatever its command
    line asked for; a run whose last loss is about ln(batch) is named as left on the plateau.
    Mutations caught: steps read from the logged --steps flag instead of metrics.jsonl; the plateau test
    comparing the loss with the margin alone instead of ln(batch) minus it."""
    rows = []
    for run, last, loss in (("a", 40, 1.0), ("b", 30, 2.7)):  # ln(16) = 2.77
        (tmp_path / "runs" / run).mkdir(parents=True)
        (tmp_path / "runs" / run / "metrics.jsonl").write_text(
            "".join(json.dumps({"step": s, "loss": loss}) + "\n" for s in range(10, last + 1, 10)))
        (tmp_path / "logs").mkdir(exist_ok=True)
        (tmp_path / "logs" / f"{run}.log").write_text(
            f"$ flyt train-clip --subset {run}.npy --steps 40 --batch_size 16 --seed 0\n"
            f'flyt train-clip: done {{"steps": 40, "unique_samples_seen": {last}}}\n')
        rows.append({"method": run.upper(), "subset": run, "seed": 0, "run": run, "acc1": 0.5})
    counts = pd.Series([2, 1], index=["u1", "u2"])
    lines = _compute_section(tmp_path, pd.DataFrame(rows), {"a": counts, "b": counts})
    assert lines[0].startswith("**Compute is NOT equal**: the 2 CLIPs saw between 480 and 640 samples")
    assert "| B | b | 2 | 3 | 480 | 30 |" in lines
    assert lines[0].endswith("1 of the 2 runs end with a training loss within 0.2 of ln(batch), the loss of a CLIP "
                             "that has learnt nothing: B (seed 0).")


@pytest.mark.parametrize("argv, flag", [(["data", "--pool_size", "10", "--shards", "20"], "--shards"),
                                        (["scores", "--kind", "random", "--truth", "TMP/none.parquet"], "--truth"),
                                        (["standardise", "--features", "TMP"], "--features")])
def test_demo_steps_refuse_bad_input_in_one_line(tmp_path, capsys, argv, flag):
    """A shard count above the pool size, a missing truth file, an empty features folder: one line naming the flag,
    nothing written. Mutation caught: write_data without its own check (toydata's ValueError escapes)."""
    argv = [a.replace("TMP", str(tmp_path)) for a in argv] + ["--output", str(tmp_path / "out")]
    assert demo_step(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"python -m flyt.demo.steps {argv[0]}: error: ") and flag in err[0]
    assert not (tmp_path / "out").exists()


def _outputs(cell) -> tuple[str, int]:
    """All text a code cell showed (streams, plain and HTML results) and how many images it drew."""
    texts, images = [], 0
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            texts.append(out["text"])
        data = out.get("data", {})
        texts += [data.get("text/plain", ""), data.get("text/html", "")]
        images += "image/png" in data
    return "\n".join(texts), images


def test_examples_notebook_runs_on_the_quick_demo(quick_demo, tmp_path, monkeypatch):
    import nbclient
    import nbformat

    stored = nbformat.read(NOTEBOOK, as_version=4)
    code_cells = [cell for cell in stored.cells if cell.cell_type == "code"]
    assert stored.cells[0].cell_type == "markdown" and "flyt demo" in stored.cells[0].source
    assert all(not cell.outputs and cell.execution_count is None for cell in code_cells), \
        "examples.ipynb must be stored without outputs"

    monkeypatch.setenv("FLYT_DEMO_DIR", str(quick_demo))
    # the kernel imports the same flyt as this process, however it was installed
    path = [str(Path(flyt.__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in path if p))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    client = nbclient.NotebookClient(stored, kernel_name="python3", timeout=600, startup_timeout=180,
                                     resources={"metadata": {"path": str(tmp_path)}})
    ran = client.execute()  # raises CellExecutionError, with the failing cell and traceback, on any error

    shown = [_outputs(cell) for cell in ran.cells if cell.cell_type == "code"]
    text = "\n".join(t for t, _ in shown)
    assert "Traceback" not in text
    fields = json.loads((quick_demo / "runs" / "mflyt" / "config.json").read_text())["parquet_fields"]
    weights_cell = next(t for t, _ in shown if "(bias)" in t)
    for field in fields:
        assert field in weights_cell
    for expected in ("mflyt", "flyt-tiny", "SCS (penalty", "HCS (cap", "clean share", "acc1",
                     "mean_per_class_recall", "mean per-class recall"):
        assert expected in text
    assert sum(n for _, n in shown) >= 4  # weights, score histograms, sample counts, per-class recall


def test_a_failing_parallel_step_names_its_command_and_log(tmp_path):
    pd.DataFrame({"uid": ["0" * 31 + "1", "0" * 31 + "2"], "score": [1.0, 2.0]}).to_parquet(tmp_path / "scores.parquet")
    missing = tmp_path / "missing.parquet"
    topk = ["--method", "topk", "--fraction", "1"]
    step = Pipeline(tmp_path, jobs=2)
    with pytest.raises(FlytError, match=r"flyt sample --scores .*missing\.parquet.*\(log: .*bad\.log\)"):
        step.parallel({"good": [["sample", "--scores", tmp_path / "scores.parquet", *topk, "--output", tmp_path / "all.npy"]],
                       "bad": [["sample", "--scores", missing, *topk, "--output", tmp_path / "x.npy"]]}, "testing")
    assert (tmp_path / "all.npy").is_file()  # the other lane still finished its work
    assert f"--scores {missing}: no such file or folder" in (tmp_path / "logs" / "bad.log").read_text()
    assert [c.split()[:2] for c in step.commands] == [["flyt", "sample"]] * 2  # both recorded for the report


@pytest.mark.parametrize("flags", [["--jobs", "0"], ["--seed", "-1"]])
def test_bad_flags_fail_in_one_line_before_any_work(tmp_path, capsys, flags):
    assert cli(["demo", "--output_dir", str(tmp_path / "out"), *flags]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("flyt demo: error: ") and flags[0] in err[0]
    assert not (tmp_path / "out").exists()
