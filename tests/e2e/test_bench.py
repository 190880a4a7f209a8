"""Smoke test of the serving benchmark: tiny settings against a live server; the report must be well formed."""

from __future__ import annotations

import json
import os
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


def test_a_level_spread_over_client_processes_keeps_every_request(tiny_server: InProcessServer) -> None:
    """The load of one level from two client processes (each its own event loop and SDK client, released
    together): every request answered once, with its tokens, and the streams shared out as the concurrency asks."""
    import asyncio

    sys.path.insert(0, str(REPO / "bench"))
    try:
        import serve_bench

        level = asyncio.run(serve_bench.run_level("tiny", tiny_server.base_url, 3, 5, 4, processes=2))
    finally:
        sys.path.remove(str(REPO / "bench"))
    assert level.clients == 2 and level.errors == 0 and len(level.samples) == 5 and level.wall_s > 0
    assert all(1 <= s.tokens <= 4 and 0 < s.ttft <= s.e2e <= level.wall_s for s in level.samples)
    assert serve_bench.client_processes(64, cpus=16) == 4 and serve_bench.client_processes(16, cpus=16) == 1
    assert serve_bench.client_processes(64, cpus=2) == 1 and serve_bench.client_processes(1, cpus=64) == 1


def test_llama_server_runs_on_the_engines_kernels_and_says_how_to_build_it(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import serve_bench
    finally:
        sys.path.remove(str(REPO / "bench"))
    fake = tmp_path / "llama-server"
    fake.write_text("")
    cmd = serve_bench.llama_server_command(8123, ["--parallel", "16"], model="/m.gguf", binary=fake)
    flags = " ".join(cmd)
    assert cmd[0] == str(fake) and "--model /m.gguf" in flags and "--port 8123" in flags
    threads = str(os.cpu_count() or 1)
    assert f"--threads {threads} --threads-batch {threads}" in flags
    assert "--flash-attn off" in flags and "--no-repack" in flags and "--no-kv-unified" in flags
    assert cmd[-2:] == ["--parallel", "16"]  # extra flags come last, so they win
    try:
        serve_bench.llama_server_command(8123, [], binary=tmp_path / "absent")
        raise AssertionError("a missing binary must stop the run")
    except SystemExit as exc:
        assert "make bench-tools" in str(exc)


def test_rounds_are_reported_as_medians_and_ratios_to_a_baseline() -> None:
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import serve_bench
    finally:
        sys.path.remove(str(REPO / "bench"))
    Level, Sample = serve_bench.Level, serve_bench.Sample

    def level(server: str, tok_s: float, round_: int) -> object:
        return Level(server, 8, 1, 100 / tok_s, [Sample(0.5, 1.0, 100)], 0, round_)

    levels = [level("a", t, r) for r, t in enumerate((90, 100, 200))] + [level("b", 50, r) for r in range(3)]
    med = serve_bench.medians(levels)  # type: ignore[arg-type]
    assert med["a", 8]["output_tok_s"] == 100 and med["b", 8]["rounds"] == 3
    text = serve_bench.median_table(levels, "b")  # type: ignore[arg-type]
    assert "2.000x" in text and "1.000x" in text
