"""Server CPU per streamed token, above the engine: the HTTP, SSE, guard and text layers on a fake engine.

The real app and server (create_app, uvicorn with the bounded httptools protocol, as `qwen-api serve` runs them) serve
/v1/chat/completions over a fake engine from qwen_api.dev, which decodes nothing: `--engine stepped` (the default)
steps every open sequence together from a worker thread every `--pace` seconds and hands the event loop each
step's tokens in one call, as the llama.cpp and native engines do; `--engine paced` yields each sequence's tokens
from its own asyncio timer. C concurrent clients stream `--tokens` tokens each; the server process's CPU time (from
/proc) divided by the tokens streamed is what one token costs the server's event loop, machine noise mostly aside
(CPU time, not wall time). On a 2-core machine every such microsecond is taken from llama.cpp's compute threads.
A pace shorter than the event loop can follow (e.g. 64 streams every 4 ms, a GPU's step) shows the most tokens a
second the HTTP layers deliver: the `tok/s` column against the offered concurrency / pace.

`--host-ms MS` gives the stepped engine's worker MS of Python work a step (the GIL held) while the step's pace runs,
as a GPU engine's worker schedules, launches and reads tokens while the device computes: whether the event loop
and that worker, sharing one interpreter, keep the device busy. `--switch-ms 5,0.5` serves with each of those
interpreter switch intervals as a variant, alternating: CPython's default, and what `qwen-api serve` sets for an
engine on a GPU (`qwen_api.engine.base.favour_worker_threads`; the fake engine is on no device, so without the flag
the server keeps the default).

`--variant NAME=PYTHONPATH` (repeatable) serves the same load from another source tree (e.g. a copy of `src`
before a change), round by round alternating with this checkout, so the variants see the same noise.

`--client sdk` drives the server with `bench/serve_bench.py`'s client instead (the `openai` SDK, in
`--client-procs` processes) and also reports that client's time per token: whether the serving benchmark's own
client keeps up with a fast engine, or is what its figures measure.

    .venv/bin/python bench/stream_overhead.py --concurrency 8 --rounds 5
    .venv/bin/python bench/stream_overhead.py --concurrency 64 --pace 0.004 --tokens 256   # offered: 16,000 tok/s
    .venv/bin/python bench/stream_overhead.py --concurrency 64 --pace 0.005 --host-ms 2 --tokens 256 --switch-ms 5,0.5
    cp -r src /tmp/before && ...edit... && .venv/bin/python bench/stream_overhead.py --variant before=/tmp/before
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
TEXT = "The quick brown fox jumps over the lazy dog, and then it writes a story about a lighthouse keeper. "


def serve(port: int, pace: float, tokens: int, engine: str, host: float, switch: float | None) -> None:
    import uvicorn

    from qwen_api.admission import Admission
    from qwen_api.api.app import create_app, observe_with
    from qwen_api.dev.fake_engine import FakeEngine, SteppedFakeEngine
    from qwen_api.dev.random_qwen2 import build_qwen2_tokenizer
    from qwen_api.runtime import Runtime
    from qwen_api.server import Server, bounded_http, connection_bound
    from qwen_api.settings import Settings
    from qwen_api.textgen import TextGenerator

    if switch is not None:
        sys.setswitchinterval(switch)
    tokenizer = build_qwen2_tokenizer()
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    script = (ids * (tokens // len(ids) + 1))[:tokens]
    overrides: dict[str, object] = {"model": "fake-model", "host": "127.0.0.1", "port": port, "log_level": "warning"}
    settings = Settings(**overrides)  # type: ignore[arg-type]
    # `host` only when asked: a --variant tree from before it existed can still serve the other loads
    stepped = {"host": host} if host else {}
    fake = SteppedFakeEngine(script, pace=pace, **stepped) if engine == "stepped" else FakeEngine(script, pace=pace)
    runtime = Runtime(lambda: TextGenerator(fake, tokenizer), "fake-model")
    admission = Admission(settings.admission_capacity())
    app = create_app(settings, runtime, admission)
    http = bounded_http(connection_bound(settings.max_connections), settings.header_timeout)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", http=http)
    server = Server(config, runtime, admission, settings.drain_timeout)
    runtime.connect(on_ready=observe_with(app.state.metrics), on_fatal=server.request_exit)
    server.run()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(url: str, concurrency: int, requests: int, tokens: int) -> tuple[int, int, float]:
    """Stream `requests` chat completions, `concurrency` at a time; returns the tokens streamed (each stream's usage),
    the content events seen (fewer than the tokens when the server sent a client that fell behind several tokens
    in one event), and wall time.

    The client reads raw bytes and parses each response once it has ended, so that it costs little CPU per token:
    on a 2-core machine a client that parses every event (httpx, the openai SDK) takes as much CPU per token as the
    server, and becomes what limits tokens/s."""
    host, port = url.removeprefix("http://").split(":")
    request = {"model": "fake-model", "messages": [{"role": "user", "content": "Tell me a story."}],
               "max_tokens": tokens, "stream": True, "temperature": 0, "stream_options": {"include_usage": True}}  # fmt: skip
    payload = json.dumps(request).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    ).encode()
    streamed = events = 0
    todo = list(range(requests))

    async def worker() -> None:
        nonlocal streamed, events
        while todo:
            todo.pop()
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(head + payload)
            parts = []
            while data := await reader.read(1 << 16):
                parts.append(data)
            writer.close()
            response = b"".join(parts)
            if not response.startswith(b"HTTP/1.1 200"):
                raise SystemExit(f"request failed: {response[:300]!r}")
            events += response.count(b'"content":"') - response.count(b'"content":""')
            usage = re.search(rb'"completion_tokens":(\d+)', response)
            streamed += int(usage.group(1)) if usage else 0

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return streamed, events, time.perf_counter() - start


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure(name: str, pythonpath: str | None, switch_ms: str | None, args: argparse.Namespace) -> dict[str, float]:
    port = free_port()
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, __file__, "--serve", str(port), "--pace", str(args.pace), "--tokens", str(args.tokens),
           "--engine", args.engine, "--host-ms", str(args.host_ms)]  # fmt: skip
    if switch_ms is not None:
        cmd += ["--switch-ms", switch_ms]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise SystemExit(f"{name}: server exited: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
            time.sleep(0.2)
        asyncio.run(load(url, 2, 2, 8))  # warm-up
        before, client_before = cpu_seconds(proc.pid), time.process_time()
        tpot = float("nan")
        if args.client == "sdk":
            sys.path.insert(0, str(REPO / "bench"))
            from serve_bench import run_level

            level = asyncio.run(
                run_level(name, url, args.concurrency, args.requests, args.tokens, temperature=0,
                          processes=args.client_procs)
            )  # fmt: skip
            streamed, events, wall = sum(s.tokens for s in level.samples), 0, level.wall_s
            tpot = level.summary()["tpot_p50_s"]
        else:
            streamed, events, wall = asyncio.run(load(url, args.concurrency, args.requests, args.tokens))
        cpu, client_cpu = cpu_seconds(proc.pid) - before, time.process_time() - client_before
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    if streamed != args.requests * args.tokens:
        raise SystemExit(f"{name}: {streamed} tokens streamed, {args.requests * args.tokens} expected")
    return {"us_per_token": cpu / streamed * 1e6, "server_cpu_s": cpu, "tokens": streamed, "events": events,
            "tokens_per_event": streamed / events if events else float("nan"), "tok_s": streamed / wall,
            "tpot_p50_ms": 1000 * tpot,
            # the client's own CPU a token, when it runs in this process (not --client-procs > 1)
            "client_us_per_token": client_cpu / streamed * 1e6 if args.client_procs == 1 else float("nan")}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=0, help="default: 2 x concurrency")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per request")
    parser.add_argument("--pace", type=float, default=0.02, help="seconds between a sequence's tokens")
    parser.add_argument("--engine", choices=["stepped", "paced"], default="stepped", help="which fake engine")
    parser.add_argument(
        "--host-ms",
        type=float,
        default=0.0,
        help="stepped: Python work a step (GIL held) while its --pace runs, as an overlapped GPU engine",
    )
    parser.add_argument("--switch-ms", help="interpreter switch intervals to serve with, as variants (e.g. 5,0.5)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=PYTHONPATH")
    parser.add_argument("--json", metavar="FILE", help="write every round's numbers here")
    parser.add_argument("--client", choices=["raw", "sdk"], default="raw", help="sdk: serve_bench.py's client")
    parser.add_argument("--client-procs", type=int, default=1, help="with --client sdk: its processes")
    args = parser.parse_args(argv)
    if args.serve:
        switch = float(args.switch_ms) / 1000 if args.switch_ms else None
        serve(args.serve, args.pace, args.tokens, args.engine, args.host_ms / 1000, switch)
        return 0
    args.requests = args.requests or 2 * args.concurrency
    variants: list[tuple[str, str | None, str | None]] = [("this-checkout", None, None)]
    if args.switch_ms:
        variants = [(f"switch={ms}ms", None, ms) for ms in args.switch_ms.split(",")]
    variants += [(name, path, None) for name, _, path in (v.partition("=") for v in args.variant)]
    results: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in variants}
    for round_ in range(args.rounds):
        for name, path, switch_ms in variants if round_ % 2 == 0 else variants[::-1]:
            r = measure(name, path, switch_ms, args)
            results[name].append(r)
            print(
                f"round {round_} {name}: {r['us_per_token']:.0f} us/token, {r['tok_s']:.0f} tok/s, "
                f"{r['tokens_per_event']:.2f} tokens/event, client tpot p50 {r['tpot_p50_ms']:.1f} ms, client "
                f"{r['client_us_per_token']:.0f} us/token",
                file=sys.stderr,
            )
    print(f"{'variant':<16} {'us/token p50':>12} {'min':>6} {'max':>6} {'tok/s p50':>10} {'tokens/event':>13} "
          f"{'tpot p50':>9}")  # fmt: skip
    for name, rounds in results.items():
        us = [r["us_per_token"] for r in rounds]
        print(
            f"{name:<16} {statistics.median(us):>12.0f} {min(us):>6.0f} {max(us):>6.0f} "
            f"{statistics.median(r['tok_s'] for r in rounds):>10.0f} "
            f"{statistics.median(r['tokens_per_event'] for r in rounds):>13.2f} "
            f"{statistics.median(r['tpot_p50_ms'] for r in rounds):>7.1f}ms"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
