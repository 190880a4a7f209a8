"""POST /generate with "stream": true, read as raw server-sent events; and the client's --stream."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx

from conftest import REPO, SCRIPT, InProcessServer, serve_in_process


def raw_events(base_url: str, body: dict, path: str = "/generate") -> tuple[httpx.Response, list[str]]:
    """POST and split the SSE body into its events, checking the framing on the way."""
    with httpx.stream("POST", f"{base_url}{path}", json=body, timeout=120) as r:
        text = "".join(r.iter_text())
    assert r.headers["content-type"].startswith("text/event-stream")
    assert text.endswith("\n\n"), "every event ends with a blank line"
    return r, text[:-2].split("\n\n")


def data_of(events: list[str]) -> tuple[list[dict], str]:
    """JSON payloads of the data events, and the last event (which must be [DONE])."""
    payloads = []
    for event in events[:-1]:
        assert event.startswith("data: "), event
        payloads.append(json.loads(event[len("data: ") :]))
    return payloads, events[-1]


def test_generate_stream_frames_cjk_and_emoji_whole(scripted_server: InProcessServer) -> None:
    body = {"prompt": "Say it.", "temperature": 0, "max_length": 100, "stream": True}
    r, events = raw_events(scripted_server.base_url, body)
    assert r.status_code == 200
    payloads, last = data_of(events)
    assert last == "data: [DONE]"
    deltas, final = payloads[:-1], payloads[-1]
    assert len(deltas) > 5  # streamed, not one blob
    assert all(set(d) == {"index", "text"} and d["index"] == 0 for d in deltas)
    assert all("\ufffd" not in d["text"] for d in deltas)
    assert "".join(d["text"] for d in deltas) == SCRIPT
    generator = scripted_server.runtime.generator()
    prompt_ids = generator.chat_prompt_ids([{"role": "user", "content": "Say it."}])
    script_tokens = len(generator.text_prompt_ids(SCRIPT))
    assert final == {
        "index": 0,
        "finish_reason": "stop",
        "prompt_tokens": len(prompt_ids),
        "completion_tokens": script_tokens + 1,  # the script, then <|im_end|>
    }


def test_generate_without_stream_is_the_same_text(scripted_server: InProcessServer) -> None:
    r = httpx.post(f"{scripted_server.base_url}/generate", json={"prompt": "Say it.", "temperature": 0}, timeout=60)
    assert r.json()["generated_texts"] == [SCRIPT]
    assert "stream" not in r.json()["parameters"]


def test_generate_stream_length_finish(scripted_server: InProcessServer) -> None:
    body = {"prompt": "Say it.", "temperature": 0, "max_length": 3, "stream": True}
    payloads, last = data_of(raw_events(scripted_server.base_url, body)[1])
    assert last == "data: [DONE]"
    assert payloads[-1]["finish_reason"] == "length" and payloads[-1]["completion_tokens"] == 3
    assert SCRIPT.startswith("".join(p.get("text", "") for p in payloads))


def test_generate_stream_interleaves_sequences_by_index(api_server: InProcessServer) -> None:
    body = {"prompt": "Go.", "max_length": 10, "num_return_sequences": 3, "stream": True, "temperature": 1.0}
    payloads, last = data_of(raw_events(api_server.base_url, body)[1])
    assert last == "data: [DONE]"
    finals = [p for p in payloads if "finish_reason" in p]
    assert sorted(p["index"] for p in finals) == [0, 1, 2]
    assert all(p["completion_tokens"] <= 10 for p in finals)
    assert {p["index"] for p in payloads if "text" in p} <= {0, 1, 2}


def test_generate_stream_validation_errors_come_before_the_stream(api_server: InProcessServer) -> None:
    r = httpx.post(f"{api_server.base_url}/generate", json={"prompt": "", "stream": True})
    assert r.status_code == 422 and r.headers["content-type"] == "application/json"


def test_failure_after_the_stream_began_is_an_error_event_then_done(tiny_qwen2_dir: Path) -> None:
    with serve_in_process(tiny_qwen2_dir) as server:
        model = server.runtime.generator().engine.model
        calls = {"n": 0}

        def fail_on_fourth_step(module: object, args: object) -> None:  # a real forward pass that fails mid-way
            calls["n"] += 1
            if calls["n"] >= 4:
                raise RuntimeError("injected fault")

        model.register_forward_pre_hook(fail_on_fourth_step)
        body = {"prompt": "Go.", "max_length": 50, "stream": True, "temperature": 0}
        r, events = raw_events(server.base_url, body)
        assert r.status_code == 200
        assert events[-1] == "data: [DONE]"
        assert events[-2].startswith("event: error\ndata: ")
        error = json.loads(events[-2].split("data: ", 1)[1])
        assert error["detail"].startswith("Generation failed: ") and "injected fault" in error["detail"]
        assert any(e.startswith('data: {"index":0,"text"') for e in events[:-2])  # text came first


def test_client_script_streams(scripted_server: InProcessServer) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "src" / "api_examples.py"), "--url", scripted_server.base_url,
         "--stream", "--temperature", "0", "--max-length", "64"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert SCRIPT in result.stdout
