"""``flyt demo --quick`` runs the whole pipeline end to end and writes a complete report, and
``examples.ipynb`` runs top to bottom on what it wrote.

The demo takes minutes on a CPU, so it runs once per module and both tests read its folder. Its
side-by-side steps report a failure by command and log file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
import torch

import flyt
from flyt.cli import main as cli
from flyt.demo.pipeline import Pipeline
from flyt.demo.report import SECTIONS
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
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")

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
