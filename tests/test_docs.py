"""The reliability docs stay true: the README's fault table is docs/reliability.md's (which
``tests/test_faults.py`` runs row by row), and every test the reliability page names exists.

Mutations caught: a row of the README's table edited; a test named in the page renamed in its file.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKERS = ("<!-- fault table -->", "<!-- end fault table -->")


def _fault_table(path: Path) -> str:
    text = path.read_text()
    assert all(m in text for m in MARKERS), f"{path} has no fault table between {MARKERS}"
    return text.split(MARKERS[0])[1].split(MARKERS[1])[0].strip()


def test_the_readme_fault_table_is_the_reliability_pages():
    assert _fault_table(ROOT / "README.md") == _fault_table(ROOT / "docs" / "reliability.md"), \
        "README.md's fault table differs from docs/reliability.md's: copy it from there"


def test_every_test_the_reliability_page_names_exists():
    named = re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?`", (ROOT / "docs" / "reliability.md").read_text())
    assert len(named) > 10
    for file, name in named:
        path = ROOT / file
        assert path.exists(), f"docs/reliability.md names {file}, which does not exist"
        if name:
            defined = {n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)}
            assert name in defined, f"docs/reliability.md names {file}::{name}, which {file} does not define"
