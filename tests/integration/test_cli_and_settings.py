"""The settings schema drives both CLI flags and QWEN_API_* variables; the CLI fails fast on missing weights."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from qwen_api.engine.loading import DEMO_NAME, ModelUnavailable, resolve_model
from qwen_api.settings import Settings

from conftest import VENV_BIN


def test_flags_override_environment_which_overrides_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().port == 2025 and Settings().model == "Qwen/Qwen2-7B-Instruct"
    monkeypatch.setenv("QWEN_API_PORT", "8080")
    monkeypatch.setenv("QWEN_API_MAX_BATCH_SIZE", "4")
    assert Settings().port == 8080 and Settings().max_batch_size == 4
    s = Settings(_cli_parse_args=["--port", "9000", "--model", "demo", "--trust-remote-code"])  # type: ignore[call-arg]
    assert (s.port, s.model, s.max_batch_size, s.trust_remote_code) == (9000, "demo", 4, True)


def test_invalid_setting_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QWEN_API_DEVICE", "tpu")
    with pytest.raises(ValueError, match="device"):
        Settings()


def test_a_bad_setting_value_is_one_line_naming_it_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from qwen_api.cli import main

    assert main(["serve", "--port", "abc", "--max-batch-size", "0"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and "Traceback" not in "".join(lines)
    assert lines[0].startswith("qwen-api serve: --port (QWEN_API_PORT): ") and "'abc'" in lines[0]
    assert lines[1].startswith("qwen-api serve: --max-batch-size (QWEN_API_MAX_BATCH_SIZE): ")
    monkeypatch.setenv("QWEN_API_DTYPE", "fp16")
    assert main(["serve"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert "--dtype (QWEN_API_DTYPE)" in line and "'fp16'" in line


def test_resolve_model_kinds(tmp_path) -> None:  # type: ignore[no-untyped-def]
    demo = resolve_model("demo")
    assert demo.name == DEMO_NAME and demo.gguf_file and (demo.path / demo.gguf_file).is_file()
    gguf = resolve_model(str(demo.path / demo.gguf_file))
    assert gguf.gguf_file == demo.gguf_file
    with pytest.raises(ModelUnavailable, match=r"config\.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelUnavailable, match="owner/name"):
        resolve_model("./no/such/dir")


def test_serve_fails_fast_in_one_line_when_weights_cannot_be_had() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": "/nonexistent-hf-home"}
    start = time.monotonic()
    result = subprocess.run(
        [str(VENV_BIN / "qwen-api"), "serve", "--model", "Qwen/Qwen2-7B-Instruct"],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert time.monotonic() - start < 60
    assert result.stderr.count("\n") == 1, result.stderr
    assert "Qwen/Qwen2-7B-Instruct" in result.stderr and "--model /path/to/dir" in result.stderr
