"""End to end on the real embedded model: the CLI as a subprocess, the seed's client script, a dead port."""

from __future__ import annotations

import subprocess
import sys

import httpx

from conftest import REPO, LiveServer, free_port

CLIENT = REPO / "src" / "api_examples.py"


def run_client(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(CLIENT), *args], capture_output=True, text=True, timeout=300, check=False
    )


def test_demo_model_answers_paris(demo_server: LiveServer) -> None:
    root = httpx.get(f"{demo_server.base_url}/").json()
    assert root["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    r = httpx.post(
        f"{demo_server.base_url}/generate",
        json={"prompt": "What is the capital of France?", "temperature": 0, "max_length": 32},
        timeout=120,
    )
    assert r.status_code == 200
    [text] = r.json()["generated_texts"]
    assert "Paris" in text
    assert "What is the capital" not in text and "<|im_end|>" not in text


def test_client_script_prints_each_sequence(demo_server: LiveServer) -> None:
    result = run_client(
        "--url", demo_server.base_url, "--prompt", "What is the capital of France?",
        "--max-length", "24", "--temperature", "0.8", "--top-p", "0.95", "--top-k", "40", "--num-sequences", "2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "--- Sequence 1 of 2 ---" in result.stdout and "--- Sequence 2 of 2 ---" in result.stdout
    assert "Prompt: What is the capital of France?" in result.stdout


def test_client_script_greedy_default_flags(demo_server: LiveServer) -> None:
    result = run_client("--url", demo_server.base_url, "--prompt", "What is the capital of France?",
                        "--temperature", "0", "--max-length", "32")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_client_script_reports_an_error_answer_in_one_line(demo_server: LiveServer) -> None:
    result = run_client("--url", demo_server.base_url, "--top-p", "1.5")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "HTTP 422" in result.stderr and "top_p" in result.stderr


def test_client_script_against_a_dead_port_fails_in_one_line() -> None:
    result = run_client("--url", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert result.stderr.startswith("error: cannot reach") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr
