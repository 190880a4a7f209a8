"""Engine replicas on a real local Ray cluster behind one front (`qwen-api serve --ray`), with the demo model.

One cluster (`ray start --head`, 2 CPUs, no dashboard, no usage stats) and one front with 2 llama.cpp replicas
(1 CPU and 1 thread each) serve every test of this module, in order: the last one stops the front with SIGTERM.
The routing rules and the deployment's settings are checked without Ray in the first tests.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from qwen_api.cluster.deploy import replica_resources, scaling
from qwen_api.cluster.prefix import PrefixIndex
from qwen_api.settings import Settings

from conftest import REPO, VENV_BIN, free_port

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
REPLICA_TITLE = "ServeReplica:qwen-api:engine"


# ------------------------------------------------------------------------------------------------ without Ray
def test_prefix_index_finds_the_replica_holding_the_longest_prefix() -> None:
    index = PrefixIndex(slots=2, block=4)
    conversation = list(range(100, 140))
    index.add("a", conversation)
    index.add("b", [7] * 40)
    next_turn = [*conversation, 1, 2, 3, 4, 5, 6]
    assert index.matched_tokens(next_turn, ["a", "b", "c"]) == {"a": 40, "b": 0, "c": 0}
    assert index.matched_tokens([*conversation[:9], 999], ["a"]) == {"a": 8}  # whole blocks only
    index.add("a", [1] * 8)
    index.add("a", [2] * 8)  # a replica remembers as many prompts as it has slots: the oldest is gone
    assert index.matched_tokens(next_turn, ["a"]) == {"a": 0}
    index.drop("b")
    assert index.matched_tokens([7] * 40, ["b"]) == {"b": 0}


def test_replicas_or_an_autoscaling_range_and_their_resources() -> None:
    assert scaling(Settings(replicas=3)) == {"num_replicas": 3}
    auto = scaling(Settings(min_replicas=1, max_replicas=8, max_batch_size=16))["autoscaling_config"]
    assert (auto["min_replicas"], auto["max_replicas"], auto["target_ongoing_requests"]) == (1, 8, 16)
    assert replica_resources(Settings(replicas=2, device="cpu"), {"CPU": 8}) == ({"num_cpus": 4}, 4)
    assert replica_resources(Settings(replicas=4), {"CPU": 2}) == ({"num_cpus": 1}, 1)
    assert replica_resources(Settings(replicas=2), {"CPU": 32, "GPU": 2}) == ({"num_gpus": 1, "num_cpus": 1}, None)


def test_the_router_counts_no_load_for_a_request_finished_before_it_was_routed() -> None:
    """Ray Serve reports a request finished before it reports it routed, now and then (82 of 600 short requests in
    a probe): that routing counted as load nothing took away, and replicas drifted apart until prefix affinity and
    least-loaded routing went wrong."""
    import warnings
    from types import SimpleNamespace

    with warnings.catch_warnings():  # Ray Serve's own pydantic models warn as it is imported: not ours to change
        warnings.simplefilter("ignore", DeprecationWarning)
        from qwen_api.cluster.router import PrefixAffinityRouter

    router = PrefixAffinityRouter.__new__(PrefixAffinityRouter)  # its state alone: no Ray Serve around it
    router.initialize_state(slots=2)

    def pending(request_id: str) -> SimpleNamespace:
        return SimpleNamespace(metadata=SimpleNamespace(internal_request_id=request_id), args=[[1, 2, 3]])

    router.on_request_routed(pending("a"), "r1", None)  # type: ignore[arg-type]
    router.on_request_completed("r1", "a")
    router.on_request_completed("r2", "b")  # reported done first...
    router.on_request_routed(pending("b"), "r2", None)  # type: ignore[arg-type]  # ...then routed
    router.on_request_routed(pending("c"), "r2", None)  # type: ignore[arg-type]
    assert (router._load, router._in_flight, router._finished_early) == ({"r1": 0, "r2": 1}, {"c": "r2"}, {})
    router.on_request_completed("r2", "c")
    assert router._load == {"r1": 0, "r2": 0}


def test_replicas_a_local_cluster_cannot_place_are_refused_and_an_unreachable_address_fails_fast() -> None:
    """Replicas that can never be placed made the front wait without end (and deaf to SIGTERM); so did a
    --ray-address with nothing listening (ray.init waits for it)."""
    from qwen_api.cluster.deploy import check_fits, check_reachable

    check_fits(Settings(replicas=2, device="cpu"), {"CPU": 2}, local=True)
    with pytest.raises(RuntimeError, match="3 replica"):
        check_fits(Settings(replicas=3, device="cpu"), {"CPU": 2}, local=True)
    with pytest.raises(RuntimeError, match="GPU"):
        check_fits(Settings(max_replicas=3, device="cuda"), {"CPU": 32, "GPU": 2}, local=True)
    check_fits(Settings(replicas=3, device="cpu"), {"CPU": 2}, local=False)  # a cluster that may grow: a warning
    with pytest.raises(RuntimeError, match=r"cannot reach the Ray cluster at --ray-address 127\.0\.0\.1:"):
        check_reachable(f"127.0.0.1:{free_port()}", timeout=2)
    check_reachable("auto")  # Ray's to resolve
    # a port that answers, but as no Ray cluster: ray.init waited on it without end
    web = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    try:
        with pytest.raises(RuntimeError, match="answers, but not as a Ray cluster"):
            check_reachable(f"127.0.0.1:{web.server_address[1]}", timeout=2)
    finally:
        web.shutdown()
        web.server_close()
    silent = socket.create_server(("127.0.0.1", 0))  # accepts, never answers: the timeout ends the wait
    try:
        with pytest.raises(RuntimeError, match="cannot reach the Ray cluster"):
            check_reachable(f"127.0.0.1:{silent.getsockname()[1]}", timeout=1)
    finally:
        silent.close()


def test_a_front_stops_waiting_for_replicas_on_sigterm_and_exits_once_its_application_is_gone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Waiting for replicas that cannot be placed yet ends when the front is told to stop (it used to wait inside
    serve.run, deaf to SIGTERM); and a front whose replicas' application was deleted (the front that deployed it
    stopped) exits 1 for its supervisor, where it answered 503s for good."""
    import warnings
    from types import SimpleNamespace

    with warnings.catch_warnings():  # Ray Serve's own pydantic models warn as it is imported: not ours to change
        warnings.simplefilter("ignore", DeprecationWarning)
        from ray import serve

    from qwen_api.admission import Admission
    from qwen_api.cluster import deploy, front

    pending = SimpleNamespace(status="DEPLOYING", message="1 replica waits for resources", deployments={})
    monkeypatch.setattr(serve, "status", lambda: SimpleNamespace(applications={deploy.APP_NAME: pending}))
    asked = []
    with pytest.raises(RuntimeError, match="stopped while the engine replicas were starting"):
        deploy._wait_running(lambda: asked.append(1) or len(asked) > 3, period=0.01)
    pending.status = "DEPLOY_FAILED"
    with pytest.raises(RuntimeError, match="failed to deploy"):
        deploy._wait_running(lambda: False, period=0.01)

    monkeypatch.setattr(serve, "status", lambda: SimpleNamespace(applications={}))  # deleted
    monkeypatch.setattr(front, "UNREACHABLE_AFTER", 0.2)
    fatal = []
    runtime = front.ClusterRuntime(Settings(), SimpleNamespace(name="m"), Admission(4), period=0.01)  # type: ignore[arg-type]
    runtime.connect(on_fatal=lambda: fatal.append(runtime.state))
    asyncio.run(asyncio.wait_for(runtime._watch(), timeout=30))
    assert fatal == ["dead"] and runtime.exit_code == 1


def test_replicas_get_local_model_paths_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Replicas run in the Ray worker's directory, not the front's: a relative path there named nothing (or, with
    one slash, a hub id), and every replica failed to load what the front served from the same path."""
    from qwen_api.cluster.deploy import replica_model

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "m.gguf").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert replica_model("models/m.gguf") == str(tmp_path / "models" / "m.gguf")
    assert replica_model("demo") == "demo" and replica_model("Qwen/Qwen2-7B-Instruct") == "Qwen/Qwen2-7B-Instruct"


def test_a_replica_whose_engine_died_has_its_waiting_sequence_sent_again() -> None:
    """The README: a sequence with no token yet is sent again to a live replica, once, when its replica fails. A
    replica whose engine worker had died (EngineDead, its process alive) failed it at once instead. The handle is a
    stand-in here; the stream protocol is Ray Serve's (first item the replica's name, then chunks)."""
    from ray.exceptions import RayError

    from qwen_api.cluster.client import RemoteEngine, ReplicaBoard
    from qwen_api.engine.base import EngineDead, EngineError, SamplingParams, TokenChunk

    class Failed(RayError):
        def __init__(self, cause: Exception) -> None:
            super().__init__(str(cause))
            self.cause = cause

    class Stream:
        def __init__(self, replica: str, items: list) -> None:  # type: ignore[type-arg]
            self.items = [replica, *items]

        def __aiter__(self) -> Stream:
            return self

        async def __anext__(self) -> object:
            if not self.items:
                raise StopAsyncIteration
            item = self.items.pop(0)
            if isinstance(item, Exception):
                raise item
            return item

        def cancel(self) -> None:
            pass

    class Handle:
        def __init__(self, streams: list[Stream]) -> None:
            self.streams = streams
            self.generate = self

        def options(self, stream: bool) -> Handle:
            return self

        def remote(self, prompt_ids: list[int], params: SamplingParams) -> Stream:
            return self.streams.pop(0)

    def run(*streams: Stream) -> list[int]:
        board = ReplicaBoard(ready=2, target=2)
        engine = RemoteEngine(Handle(list(streams)), 1024, board)

        async def collect() -> list[int]:
            return [
                t async for chunk in engine.generate([1, 2], SamplingParams(max_new_tokens=2)) for t in chunk.token_ids
            ]

        try:
            return asyncio.run(collect())
        finally:
            assert all(c.failed == 0 for c in board.snapshot().values())  # sent again, or failed by its engine

    done = TokenChunk([7, 8], "length")
    assert run(Stream("a", [Failed(EngineDead("the worker died"))]), Stream("b", [done])) == [7, 8]
    with pytest.raises(EngineError, match="prompt too long"):  # the engine's verdict on the sequence: no retry
        run(Stream("a", [Failed(EngineError("prompt too long"))]), Stream("b", [done]))


def test_kuberay_manifest_deploys_the_same_application() -> None:
    docs = list(yaml.safe_load_all((REPO / "deploy" / "kuberay-rayservice.yaml").read_text()))
    service = next(d for d in docs if d["kind"] == "RayService")
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (app,) = serve_config["applications"]
    assert app["import_path"] == "qwen_api.cluster.deploy:app_builder"
    settings = Settings(**app["args"])  # the builder's args are valid settings
    assert settings.replicas >= 1
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"]
    front = next(c for c in head if c["name"] == "front")
    assert "--ray" in front["command"] + front.get("args", [])


# ------------------------------------------------------------------------------------------------ on Ray
@dataclass
class Cluster:
    base_url: str
    front: subprocess.Popen[bytes]
    log: Path
    env: dict[str, str]  # what every Ray process of this cluster runs with (its token)
    port: int  # the head's


def _ray(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(VENV_BIN / "ray"), *args], env=env, capture_output=True, timeout=90, check=False)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # Ray's single-machine mode: every Ray port on the loopback only
        "RAY_AUTH_MODE": "token",  # as `ray start --head` has it by default; the front joins with the same token
        # the token itself, made for this cluster: `ray start` finds none on a new machine (no ~/.ray/auth_token)
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "HF_HUB_OFFLINE": "1",
    }
    port = free_port()
    started = _ray(
        "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats",
        env=env,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr.decode()[-2000:]
    log = tmp_path_factory.mktemp("front") / "front.log"
    http = free_port()
    command = [
        str(VENV_BIN / "qwen-api"), "serve", "--model", "demo", "--ray", "--ray-address", f"127.0.0.1:{port}",
        "--replicas", "2", "--max-batch-size", "4", "--port", str(http), "--host", "127.0.0.1",
        "--drain-timeout", "30", "--log-level", "warning",
    ]  # fmt: skip
    with log.open("wb") as out:
        front = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{http}"
        _wait(lambda: _health(base) == (200, 2), 150, "the front to report 2 ready replicas", front, log)
        yield Cluster(base, front, log, env, port)
    finally:
        if front.poll() is None:
            front.kill()
            front.wait(timeout=30)
        _ray("stop", "--force", env=env)


def _wait(condition, timeout: float, what: str, front=None, log: Path | None = None) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if front is not None and front.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log else ""
            raise AssertionError(f"the front exited with {front.returncode} while waiting for {what}:\n{tail}")
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _health(base: str) -> tuple[int, int] | None:
    try:
        r = httpx.get(f"{base}/health", timeout=5)
    except httpx.HTTPError:
        return None
    return r.status_code, r.json().get("replicas", {}).get("ready", -1)


def _served(base: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    return {
        m[1]: float(m[2])
        for m in re.finditer(r'^qwen_api_replica_requests_total\{replica="([^"]+)"\} (\S+)$', text, re.M)
    }


def _lost(base: str) -> float:
    """Sequences the replicas lost, all replicas together."""
    text = httpx.get(f"{base}/metrics", timeout=10).text
    return sum(
        float(m[1]) for m in re.finditer(r'^qwen_api_replica_failures_total\{replica="[^"]+"\} (\S+)$', text, re.M)
    )


def _decoding(base: str) -> dict[str, float]:
    """Per live replica (holding sequences), how many of its sequences have tokens already."""
    text = httpx.get(f"{base}/metrics", timeout=10).text
    series = r'^qwen_api_replica_{}_sequences\{{replica="([^"]+)"\}} (\S+)$'
    running = {m[1]: float(m[2]) for m in re.finditer(series.format("running"), text, re.M)}
    waiting = {m[1]: float(m[2]) for m in re.finditer(series.format("waiting"), text, re.M)}
    return {name: running[name] - waiting.get(name, 0) for name in running if running[name] > 0}


def _replica_processes() -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if any(REPLICA_TITLE in part for part in p.info["cmdline"] or []):
            found.append(p)
    return found


def _chat(messages: list[dict[str, str]], max_tokens: int = 16, **extra: object) -> dict[str, object]:
    return {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0, **extra}


def test_health_says_how_many_replicas_run(cluster: Cluster) -> None:
    r = httpx.get(f"{cluster.base_url}/health", timeout=5)
    assert r.status_code == 200
    assert r.json() == {"status": "healthy", "replicas": {"ready": 2, "target": 2}}
    assert len(_replica_processes()) == 2


def test_a_front_for_another_model_refuses_the_replicas_it_finds(
    cluster: Cluster, tiny_qwen2_dir: Path, tmp_path: Path
) -> None:
    """A second front, for another model, on a cluster whose replicas serve the demo: it attached to them and
    answered its clients with the demo model's tokens read through its own tokenizer (garbage, as 200s). It now
    exits 1 saying why, and leaves the replicas to the front that deployed them."""
    log = tmp_path / "other-front.log"
    command = [
        str(VENV_BIN / "qwen-api"), "serve", "--model", str(tiny_qwen2_dir), "--ray", "--ray-address",
        f"127.0.0.1:{cluster.port}", "--port", str(free_port()), "--host", "127.0.0.1", "--log-level", "warning",
    ]  # fmt: skip
    with log.open("wb") as out:
        other = subprocess.run(command, env=cluster.env, stdout=out, stderr=subprocess.STDOUT, timeout=180)
    text = log.read_text(errors="replace")
    assert other.returncode == 1, text[-3000:]
    assert f"serve 'demo', not {str(tiny_qwen2_dir)!r}" in text, text[-3000:]
    assert _health(cluster.base_url) == (200, 2)  # the replicas are still the first front's


def test_seed_and_openai_answer_through_the_replicas(cluster: Cluster) -> None:
    seed = httpx.post(
        f"{cluster.base_url}/generate",
        json={"prompt": "What is the capital of France?", "max_length": 8, "temperature": 0},
        timeout=60,
    )
    assert seed.status_code == 200, seed.text
    assert seed.json()["generated_texts"][0]
    chunks = []
    with httpx.stream(
        "POST",
        f"{cluster.base_url}/v1/chat/completions",
        json=_chat([{"role": "user", "content": "Hi"}], stream=True),
        timeout=60,
    ) as r:
        assert r.status_code == 200
        chunks = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert chunks[-1] == "data: [DONE]"
    finish = [json.loads(c[6:])["choices"][0]["finish_reason"] for c in chunks[:-1] if json.loads(c[6:])["choices"]]
    assert finish[-1] in ("stop", "length")
    bad = httpx.post(f"{cluster.base_url}/v1/chat/completions", json=_chat([], max_tokens=-1), timeout=10)
    assert bad.status_code == 400  # bad input is refused at the front, never sent to a replica


def test_schemas_and_forced_tool_calls_are_enforced_on_the_replicas(cluster: Cluster) -> None:
    """A grammar crosses to the replicas as its text: each binds it to its own tokenizer (it was a 500 before,
    when Ray could not pickle llguidance's tokenizer). Both replicas get one (the router spreads idle requests)."""
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}, "year": {"type": "integer", "maximum": 3000}},
        "required": ["city", "year"],
        "additionalProperties": False,
    }
    body = _chat(
        [{"role": "user", "content": "Name a city and a year as JSON."}],
        max_tokens=48,
        response_format={"type": "json_schema", "json_schema": {"name": "place", "schema": schema}},
    )

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(
                *[client.post(f"{cluster.base_url}/v1/chat/completions", json=body) for _ in range(4)]
            )

    for reply in asyncio.run(run()):
        assert reply.status_code == 200, reply.text
        choice = reply.json()["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        answer = json.loads(choice["message"]["content"])
        assert set(answer) == {"city", "year"} and isinstance(answer["year"], int), answer
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                           "required": ["city"], "additionalProperties": False},
        },
    }  # fmt: skip
    called = httpx.post(
        f"{cluster.base_url}/v1/chat/completions",
        json=_chat(
            [{"role": "user", "content": "Weather in Paris?"}], max_tokens=64, tools=[tool], tool_choice="required"
        ),
        timeout=120,
    )
    assert called.status_code == 200, called.text
    choice = called.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert set(json.loads(call["function"]["arguments"])) == {"city"}
    # a schema the grammar engine gives up on while matching fails on the replica as it does in one process
    endless = {  # every object must hold another: llguidance compiles it, then gives up at the first key
        "$defs": {"n": {"type": "object", "properties": {"c": {"$ref": "#/$defs/n"}}, "required": ["c"]}},
        "$ref": "#/$defs/n",
    }
    failed = httpx.post(
        f"{cluster.base_url}/v1/chat/completions",
        json={**body, "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": endless}}},
        timeout=120,
    )
    assert failed.status_code == 400 and failed.json()["error"]["code"] == "schema_not_followed", failed.text


def test_sixteen_concurrent_requests_are_spread_over_both_replicas(cluster: Cluster) -> None:
    before = _served(cluster.base_url)

    async def run() -> list[int]:
        async with httpx.AsyncClient(timeout=120) as client:
            replies = await asyncio.gather(
                *[
                    client.post(
                        f"{cluster.base_url}/v1/chat/completions",
                        json=_chat([{"role": "user", "content": f"Write a line about the number {i}."}]),
                    )
                    for i in range(16)
                ]
            )
        return [r.status_code for r in replies]

    assert asyncio.run(run()) == [200] * 16
    after = _served(cluster.base_url)
    gained = {name: after[name] - before.get(name, 0) for name in after}
    assert sum(gained.values()) == 16
    assert len([g for g in gained.values() if g > 0]) == 2, gained  # both replicas served some
    assert min(gained.values()) >= 3, gained


def test_a_conversation_sticks_to_one_replica(cluster: Cluster) -> None:
    """Two conversations of 5 turns each: every turn of one goes where its first turn went (chance: 1 in 256)."""
    homes: list[str] = []
    for topic in ("rivers", "mountains"):
        messages = [{"role": "user", "content": f"Tell me something about {topic}."}]
        replicas = []
        for turn in range(5):
            before = _served(cluster.base_url)
            r = httpx.post(f"{cluster.base_url}/v1/chat/completions", json=_chat(messages), timeout=60)
            assert r.status_code == 200, r.text
            after = _served(cluster.base_url)
            (served_by,) = [name for name in after if after[name] > before.get(name, 0)]
            replicas.append(served_by)
            messages += [
                {"role": "assistant", "content": r.json()["choices"][0]["message"]["content"]},
                {"role": "user", "content": f"And one more thing, number {turn}?"},
            ]
        assert len(set(replicas)) == 1, replicas
        homes.append(replicas[0])


def test_closing_a_stream_cancels_the_sequence_on_its_replica(cluster: Cluster) -> None:
    """The replica stops decoding at once: its process goes idle, though 400 tokens were asked for."""
    replicas = _replica_processes()
    body = _chat([{"role": "user", "content": "Count from one to a thousand in words."}], max_tokens=400, stream=True)
    with httpx.stream("POST", f"{cluster.base_url}/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert all(line.startswith("data: ") or not line for line in got)
    time.sleep(1.0)  # the cancel reaches the replica, the engine drops the sequence at its next step
    busy = [p.cpu_times().user + p.cpu_times().system for p in replicas]
    time.sleep(2.0)
    used = [p.cpu_times().user + p.cpu_times().system - b for p, b in zip(replicas, busy, strict=True)]
    assert max(used) < 0.4, used  # decoding 400 tokens on 1 thread would keep one replica busy for seconds
    text = httpx.get(f"{cluster.base_url}/metrics", timeout=10).text
    running = re.findall(r'^qwen_api_replica_running_sequences\{replica="[^"]+"\} (\S+)$', text, re.M)
    assert running and all(float(v) == 0 for v in running)


def test_a_killed_replica_loses_no_request_and_is_replaced(cluster: Cluster) -> None:
    """SIGKILL one replica under load: every request gets 200 or a clear error, /health stays 200, Ray restarts it."""
    victim = _replica_processes()[0]
    statuses: list[int | None] = []
    stop = threading.Event()

    def watch_health() -> None:
        while not stop.is_set():
            h = _health(cluster.base_url)
            statuses.append(h[0] if h else None)
            time.sleep(0.1)

    async def one(client: httpx.AsyncClient, i: int) -> str:
        body = _chat(
            [{"role": "user", "content": f"Tell a long story about a cat called {i}."}], max_tokens=48, stream=True
        )
        async with client.stream("POST", f"{cluster.base_url}/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                assert r.status_code >= 500, r.text
                return f"error {r.status_code}"
            lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]", lines[-3:]  # every stream ends, with an answer or an error event
        errors = [line for line in lines if '"error"' in line]
        return "error event" if errors else "ok"

    async def run() -> list[str]:
        async with httpx.AsyncClient(timeout=90) as client:
            tasks = [asyncio.create_task(one(client, i)) for i in range(12)]
            # Kill once both replicas are decoding: whichever dies holds sequences that have started.
            deadline = time.monotonic() + 60
            while len([n for n in _decoding(cluster.base_url).values() if n >= 1]) < 2:
                assert time.monotonic() < deadline, "the replicas never decoded together"
                await asyncio.sleep(0.1)
            victim.send_signal(signal.SIGKILL)
            return await asyncio.gather(*tasks)

    lost_before = _lost(cluster.base_url)
    watcher = threading.Thread(target=watch_health, daemon=True)
    watcher.start()
    started = time.monotonic()
    try:
        outcomes = asyncio.run(run())
    finally:
        stop.set()
        watcher.join(timeout=10)
    assert time.monotonic() - started < 90
    print("outcomes after the kill:", sorted(outcomes))
    assert len(outcomes) == 12 and outcomes.count("ok") >= 1, outcomes
    assert len(outcomes) - outcomes.count("ok") >= 1, outcomes  # the victim's started sequences fail, clearly
    assert statuses and all(s == 200 for s in statuses), statuses  # one replica was up all along
    # lost: the sequences that failed; those sent again to the live replica and answered there are not
    assert _lost(cluster.base_url) - lost_before == len(outcomes) - outcomes.count("ok")
    _wait(lambda: _health(cluster.base_url) == (200, 2), 90, "Ray to replace the killed replica")
    new = [p for p in _replica_processes() if p.pid != victim.pid]
    assert len(new) == 2
    r = httpx.post(
        f"{cluster.base_url}/v1/chat/completions", json=_chat([{"role": "user", "content": "Hi"}]), timeout=60
    )
    assert r.status_code == 200


def test_sigterm_drains_the_front_and_removes_the_replicas(cluster: Cluster) -> None:
    """Admitted requests finish, the front exits 0, and the Serve application's replicas are gone."""

    async def run() -> list[int]:
        async with httpx.AsyncClient(timeout=90) as client:
            tasks = [
                asyncio.create_task(
                    client.post(
                        f"{cluster.base_url}/v1/chat/completions",
                        json=_chat([{"role": "user", "content": f"Tell a story about colour {i}."}], max_tokens=96),
                    )
                )
                for i in range(4)
            ]
            await asyncio.sleep(0.5)
            cluster.front.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.1)
            health = await client.get(f"{cluster.base_url}/health")  # as one process says it: a balancer moves on
            assert health.status_code == 503 and health.headers.get("retry-after") == "5", health.text
            assert "shutting down" in health.json()["detail"] and "replicas" in health.json(), health.text
            return [r.status_code for r in await asyncio.gather(*tasks)]

    assert asyncio.run(run()) == [200] * 4
    assert cluster.front.wait(timeout=60) == 0, cluster.log.read_text(errors="replace")[-3000:]
    _wait(lambda: not _replica_processes(), 30, "the replicas to stop")


def test_a_failed_deploy_is_deleted_and_a_lost_cluster_ends_the_front(cluster: Cluster) -> None:
    """Last, on the cluster the SIGTERM test left without a front. A front whose replicas cannot load exits 1 and
    deletes its failed application (left behind, the next front attached to it and waited in vain). The next front
    deploys afresh. Then the cluster is stopped under it: the front exits 1 on its own, soon after the 15 s the
    README gives, without waiting on the dead cluster to delete anything (it waited a minute, until Ray killed it)."""

    def front(*extra: str) -> tuple[subprocess.Popen[bytes], str, Path]:
        http, log = free_port(), cluster.log.with_name(f"front-{len(extra)}.log")
        command = [
            str(VENV_BIN / "qwen-api"), "serve", "--model", "demo", "--ray", "--ray-address",
            f"127.0.0.1:{cluster.port}", "--replicas", "1", "--port", str(http), "--host", "127.0.0.1",
            "--log-level", "warning", *extra,
        ]  # fmt: skip
        with log.open("wb") as out:
            proc = subprocess.Popen(command, env=cluster.env, stdout=out, stderr=subprocess.STDOUT)
        return proc, f"http://127.0.0.1:{http}", log

    broken, _, log = front("--engine", "native")  # the native engine reads no GGUF: every replica fails to load
    try:
        assert broken.wait(timeout=240) == 1, log.read_text(errors="replace")[-3000:]
    finally:
        if broken.poll() is None:
            broken.kill()
    assert "failed to deploy" in log.read_text(errors="replace") or "Deploying application" in log.read_text(
        errors="replace"
    )
    good, base, log = front()
    try:
        _wait(lambda: _health(base) == (200, 1), 150, "a new front to deploy over the deleted application", good, log)
        stopped = _ray("stop", "--force", env=cluster.env)
        assert stopped.returncode == 0
        gone = time.monotonic()
        assert good.wait(timeout=60) == 1, log.read_text(errors="replace")[-3000:]
        assert time.monotonic() - gone < 40, log.read_text(errors="replace")[-3000:]
        assert "nothing to delete there" in log.read_text(errors="replace")
    finally:
        if good.poll() is None:
            good.kill()
            good.wait(timeout=30)
