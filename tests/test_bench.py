"""Smoke test of the serving benchmark: tiny settings against a live server; the report must be well formed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO, InProcessServer


def test_serve_bench_reports_table_json_and_chart(tiny_server: InProcessServer, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "serve_bench.py"), "--server", f"tiny={tiny_server.base_url}",
         "--concurrency", "1,2", "--requests", "2", "--max-tokens", "4", "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ttft p50" in result.stdout and "tiny" in result.stdout
    report = json.loads((tmp_path / "serve_bench.json").read_text())
    assert report["servers"] == {"tiny": tiny_server.base_url}
    assert [(lv["server"], lv["concurrency"]) for lv in report["levels"]] == [("tiny", 1), ("tiny", 2)]
    for level in report["levels"]:
        assert len(level["samples"]) == 2 and level["errors"] == 0
        assert all(1 <= s["tokens"] <= 4 and 0 < s["ttft"] <= s["e2e"] for s in level["samples"])
        summary = level["summary"]
        assert summary["output_tok_s"] > 0 and summary["requests_s"] > 0
        assert summary["ttft_p50_s"] <= summary["ttft_p99_s"] and summary["e2e_p50_s"] <= summary["e2e_p99_s"]
    assert (tmp_path / "serve_bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
