"""``flyt demo --quick`` runs the whole pipeline end to end and writes a complete report."""

from __future__ import annotations

from flyt.cli import main as cli
from flyt.demo_report import SECTIONS


def test_quick_demo_writes_every_report_section(tmp_path):
    assert cli(["demo", "--output_dir", str(tmp_path), "--quick"]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    for section in SECTIONS:
        assert section in report
    for method in ("no filter", "random", "CLIP-score top-k", "FLYT + SCS", "M-FLYT + SCS"):
        assert f"| {method} |" in report
    for plot in ("score_histograms.png", "selection_by_kind.png", "training_curves.png"):
        assert (tmp_path / "report" / plot).stat().st_size > 1000
    assert "flyt train --upstream_data_dir" in report and "flyt eval --model" in report
