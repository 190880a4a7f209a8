"""`make test` runs the suite in groups (one pytest process each): no test file may be left out of them."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_every_test_file_is_in_exactly_one_make_test_group() -> None:
    makefile = (REPO / "Makefile").read_text()
    block = makefile.split("TEST_GROUPS = \\", 1)[1].split("\n\n", 1)[0]
    listed = re.findall(r"tests/[\w/.]+", block)
    assert len(listed) == len(set(listed)), "a test path is in two groups"
    files = {str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py") if "unit" not in p.parts}
    assert files == {p for p in listed if p.endswith(".py")}, "a test file is missing from TEST_GROUPS"
    assert "tests/unit" in listed


def test_tests_are_laid_out_as_unit_integration_and_e2e() -> None:
    """unit: a fake engine, no model or socket; integration: real models in-process, no server; e2e: real servers,
    SDKs, browsers, clusters. Nothing else sits beside the conftest."""
    assert {p.name for p in (REPO / "tests").iterdir() if p.name != "__pycache__"} == {
        "conftest.py",
        "unit",
        "integration",
        "e2e",
    }
