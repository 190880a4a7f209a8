"""Serving benchmark: drive OpenAI-compatible servers with concurrent streaming requests, side by side.

For each concurrency level, each server in turn gets the same prompts (so all servers see the same machine
noise, level by level), through the official `openai` async client, streaming. Per server and level it
reports time to first token, time per output token and end-to-end latency (p50, p99), output tokens/s
and requests/s; it prints a table, writes the raw numbers as JSON and draws a PNG chart.

Servers are given as NAME=URL (already running), or launched with --launch:
  qwen-api            qwen-api serve --model demo (this repository; engine auto: llama.cpp for the GGUF)
  qwen-api-transformers, qwen-api-llamacpp, qwen-api-native   the same with the engine named (native: our
                      own Qwen2 engine, for model directories, e.g. --model DIR on a GPU; see bench/native_gpu.py)
  llama-cpp-python    python -m llama_cpp.server on the demo GGUF (needs llama-cpp-python[server]); with
                      --interrupt_requests False, else each new request cuts the running one short, and
                      --n_threads set to the CPU count as qwen-api uses (its own default is one thread)
  transformers-serve  transformers serve --continuous-batching (needs transformers[serving]) on the demo's
                      weights written out as a plain fp32 checkpoint (bench/export_demo.py; it cannot read
                      the GGUF file itself)
  llama-server        llama.cpp's own C++ server (`make bench-tools` builds it from the vendored llama.cpp of
                      the pinned llama-cpp-python sdist; $LLAMA_SERVER names another binary)
                      on the demo GGUF, on the same kernels as qwen-api's engine: as many threads (the CPU
                      count), flash attention off, no repacked/AMX weights (-nr, as safe_model_params), one
                      KV stream per slot; -np 8 slots of 2048 tokens unless --launch-args says otherwise

Each level runs --rounds times, the servers alternating within a round; the table shows per server and level
the median round (by output tokens/s) and the JSON keeps every round.

The client must not be what limits a fast server: the `openai` SDK costs its process about 160 us of CPU per
streamed token on the team's 2-core VM, so one process reads at most about 6,000-8,000 tokens/s. Against a fake
engine that steps 64 streams every 4 ms (`bench/stream_overhead.py --concurrency 64 --pace 0.004 --requests 64
--client sdk --client-procs N`, 3 rounds alternating with a raw-bytes client): one SDK process received 7,664
tokens/s, two 9,396, the raw client (16 us a token) 10,826. So a level's streams are spread over `--client-procs`
processes, each with its own event loop and SDK client, released together; by default one per 16 streams, with at
most half the machine's cores (so one on two cores, four at 64 streams on 16). Each request is timed in its own
process; a level's wall time runs from the release to the last answer.

    .venv/bin/python bench/serve_bench.py --launch qwen-api --concurrency 1,4,16,64 --max-tokens 64
    .venv/bin/python bench/serve_bench.py --server mine=http://127.0.0.1:2025 --server other=http://...:8000
    make bench-tools && .venv/bin/python bench/serve_bench.py --launch qwen-api --launch llama-server \
        --concurrency 1,8,16 --max-tokens 128 --temperature 0 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import openai

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle stays upright.",
    "List some tips for learning a new language.",
    "Describe the water cycle.",
    "What makes a good cup of tea?",
    "Explain recursion to a child.",
    "Describe a busy market in the morning.",
    "Why is the sky blue?",
]

REPO = Path(__file__).resolve().parent.parent
# Where `make bench-tools` puts llama.cpp's server (build/ is ignored by git).
LLAMA_SERVER = Path(os.environ.get("LLAMA_SERVER", REPO / "build" / "bench-tools" / "bin" / "llama-server"))


@dataclass
class Sample:
    ttft: float
    e2e: float
    tokens: int


@dataclass
class Level:
    server: str
    concurrency: int
    requests: int
    wall_s: float
    samples: list[Sample] = field(default_factory=list)
    errors: int = 0
    round: int = 0
    clients: int = 1  # client processes that drove the level

    def summary(self) -> dict[str, float]:
        ok = self.samples
        tokens = sum(s.tokens for s in ok)
        tpots = [(s.e2e - s.ttft) / (s.tokens - 1) for s in ok if s.tokens > 1]
        return {
            "ttft_p50_s": _pct([s.ttft for s in ok], 50),
            "ttft_p99_s": _pct([s.ttft for s in ok], 99),
            "tpot_p50_s": _pct(tpots, 50),
            "tpot_p99_s": _pct(tpots, 99),
            "e2e_p50_s": _pct([s.e2e for s in ok], 50),
            "e2e_p99_s": _pct([s.e2e for s in ok], 99),
            "output_tok_s": tokens / self.wall_s if self.wall_s else 0.0,
            "requests_s": len(ok) / self.wall_s if self.wall_s else 0.0,
            "errors": float(self.errors),
        }


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if q < 100 else max(values)


# ------------------------------------------------------------------------------------------------ load
async def one_request(
    client: openai.AsyncOpenAI, model: str, prompt: str, max_tokens: int, temperature: float = 0.7
) -> Sample:
    start = time.perf_counter()
    first = None
    tokens = 0
    usage_tokens = None
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=temperature,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        if chunk.usage is not None:
            usage_tokens = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            tokens += 1  # a fallback count: one content chunk per token on the servers measured here
            if first is None:
                first = time.perf_counter() - start
    e2e = time.perf_counter() - start
    return Sample(ttft=first if first is not None else e2e, e2e=e2e, tokens=usage_tokens or tokens)


STREAMS_PER_CLIENT = 16  # concurrent streams one client process drives, by default (see the module docstring)


def client_processes(concurrency: int, cpus: int | None = None) -> int:
    """Client processes for a level by default: one per STREAMS_PER_CLIENT streams, at most half the cores."""
    cpus = cpus or os.cpu_count() or 1
    return max(1, min(-(-concurrency // STREAMS_PER_CLIENT), cpus // 2))


async def _drive(
    base_url: str, concurrency: int, indices: list[int], max_tokens: int, prompts: list[str], temperature: float,
    ready: asyncio.Event | None = None, go: asyncio.Event | None = None,
) -> tuple[list[Sample], int, float]:  # fmt: skip
    """`concurrency` closed-loop workers send the requests `indices` (prompt i % len(prompts)) one after another.
    Returns the samples, the errors and the seconds from the first request to the last answer."""
    samples: list[Sample] = []
    errors = 0
    async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="bench", max_retries=0, timeout=1800) as client:
        model = (await client.models.list()).data[0].id
        todo = list(reversed(indices))

        async def worker() -> None:
            nonlocal errors
            while todo:
                i = todo.pop()
                try:
                    samples.append(await one_request(client, model, prompts[i % len(prompts)], max_tokens, temperature))
                except openai.OpenAIError:
                    errors += 1

        if ready is not None and go is not None:
            ready.set()
            await go.wait()
        start = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        wall = time.perf_counter() - start
    return samples, errors, wall


def _client_process(
    base_url: str, concurrency: int, indices: list[int], max_tokens: int, prompts: list[str], temperature: float,
    ready: multiprocessing.Queue, go: multiprocessing.Event, out: multiprocessing.Queue,
) -> None:  # fmt: skip
    """One client process of a level: connects, says it is ready, waits for the release, streams its share."""

    async def main() -> tuple[list[Sample], int, float]:
        here_ready, here_go = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(
            _drive(base_url, concurrency, indices, max_tokens, prompts, temperature, here_ready, here_go)
        )
        await here_ready.wait()
        ready.put(os.getpid())
        await asyncio.to_thread(go.wait)
        here_go.set()
        return await task

    try:
        samples, errors, _ = asyncio.run(main())
    except BaseException:
        out.put(([], len(indices)))  # the parent is waiting for this share: every request of it failed
        raise
    out.put(([asdict(s) for s in samples], errors))


async def run_level(
    name: str,
    base_url: str,
    concurrency: int,
    requests: int,
    max_tokens: int,
    prompts: list[str] | None = None,
    temperature: float = 0.7,
    processes: int | None = None,
) -> Level:
    """`requests` streaming chats, `concurrency` at a time, from `processes` client processes (default
    `client_processes(concurrency)`): request i goes to process i % processes, which runs its share of the
    concurrency."""
    prompts = prompts or PROMPTS
    processes = min(processes or client_processes(concurrency), concurrency, requests)
    level = Level(name, concurrency, requests, 0.0)
    if processes <= 1:
        level.samples, level.errors, level.wall_s = await _drive(base_url, concurrency, list(range(requests)),
                                                                 max_tokens, prompts, temperature)  # fmt: skip
        return level
    ctx = multiprocessing.get_context("spawn")
    ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    shares = [concurrency // processes + (k < concurrency % processes) for k in range(processes)]
    children = [
        ctx.Process(target=_client_process, daemon=True, args=(
            base_url, shares[k], list(range(k, requests, processes)), max_tokens, prompts, temperature, ready, go, out))
        for k in range(processes)
    ]  # fmt: skip
    for child in children:
        child.start()
    try:
        pids = {await asyncio.to_thread(ready.get, True, 120) for _ in children}
        level.clients = len(pids - {os.getpid()})
        start = time.perf_counter()
        go.set()
        for _ in children:
            samples, errors = await asyncio.to_thread(out.get, True, 3600)
            level.samples += [Sample(**s) for s in samples]
            level.errors += errors
        level.wall_s = time.perf_counter() - start
    finally:
        for child in children:
            child.join(timeout=30)
            if child.is_alive():
                child.kill()
    return level


# ------------------------------------------------------------------------------------------------ servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def demo_gguf() -> Path:
    from qwen_api.engine.loading import resolve_model

    source = resolve_model("demo")
    assert source.gguf_file is not None
    return source.path / source.gguf_file


def launch_command(kind: str, port: int, extra: list[str], work_dir: Path, model: str = "demo") -> list[str]:
    bin_dir = Path(sys.executable).parent
    threads = str(os.cpu_count() or 1)
    if kind.startswith("qwen-api"):  # qwen-api (engine auto), qwen-api-transformers, -llamacpp, -native
        engine = kind.removeprefix("qwen-api").removeprefix("-") or "auto"
        # `python -m qwen_api.cli`, not the console script: it also runs from PYTHONPATH=src (the GPU machine)
        return [sys.executable, "-m", "qwen_api.cli", "serve", "--model", model, "--engine", engine,
                "--host", "127.0.0.1", "--port", str(port), *extra]  # fmt: skip
    if kind == "llama-cpp-python":
        return [sys.executable, "-m", "llama_cpp.server", "--model", str(demo_gguf()), "--port", str(port),
                "--n_ctx", "8192", "--interrupt_requests", "False", "--n_threads", threads, "--n_threads_batch", threads,
                *extra]  # fmt: skip
    if kind == "transformers-serve":
        if not extra and model != "demo":
            extra = [model]
        if not extra:  # default: the demo's own weights, de-quantised once into the output directory
            from export_demo import export

            checkpoint = work_dir / "smollm2-fp32"
            extra = [str(checkpoint if (checkpoint / "config.json").is_file() else export(checkpoint))]
        cli = bin_dir / "transformers"  # beside this Python, else wherever pip put it (a --user install)
        cli_path = str(cli) if cli.exists() else shutil.which("transformers") or str(cli)
        return [cli_path, "serve", "--continuous-batching", "--port", str(port), *extra]
    if kind == "llama-server":
        return llama_server_command(port, extra, model)
    raise SystemExit(f"unknown server kind {kind!r}")


def llama_server_command(port: int, extra: list[str], model: str = "demo", binary: Path | None = None) -> list[str]:
    """llama.cpp's server on the kernels qwen-api's engine uses: the CPU count in threads, flash attention off (as
    `LlamaCppEngine`), no extra buffer types (`-nr`, as `safe_model_params`: AMX dies with SIGILL on the team's
    VMs), a KV stream per slot (`--no-kv-unified`, as the engine). `extra` may override -np/-c (later flags win)."""
    binary = binary or LLAMA_SERVER
    if not binary.is_file():
        raise SystemExit(f"{binary} not found: run `make bench-tools` (or set LLAMA_SERVER)")
    threads = str(os.cpu_count() or 1)
    gguf = str(demo_gguf()) if model == "demo" else model
    return [str(binary), "--model", gguf, "--host", "127.0.0.1", "--port", str(port), "--threads", threads,
            "--threads-batch", threads, "--parallel", "8", "--ctx-size", "16384", "--flash-attn", "off",
            "--no-repack", "--no-kv-unified", "--no-webui", *extra]  # fmt: skip


class Launched:
    def __init__(self, kind: str, extra: list[str], work_dir: Path, model: str = "demo", name: str = "") -> None:
        self.kind, self.port = kind, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        log_dir = work_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log = open(log_dir / f"{name or kind}.log", "wb")  # noqa: SIM115 (closed in stop)
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen(
            launch_command(kind, self.port, extra, work_dir, model), stdout=self.log, stderr=subprocess.STDOUT, env=env
        )

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.kind} exited with {self.proc.returncode}; see its log")
            try:  # ready means answering a completion: some servers list models before their model has loaded
                models = httpx.get(f"{self.url}/v1/models", timeout=2)
                if models.status_code == 200:
                    body = {"model": models.json()["data"][0]["id"], "messages": [{"role": "user", "content": "hi"}],
                            "max_tokens": 1}  # fmt: skip
                    if httpx.post(f"{self.url}/v1/chat/completions", json=body, timeout=60).status_code == 200:
                        return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise SystemExit(f"{self.kind} not ready after {timeout} s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


# ------------------------------------------------------------------------------------------------ report
def table(levels: list[Level]) -> str:
    head = f"{'server':<20} {'conc':>4} {'req':>4} {'ttft p50':>9} {'ttft p99':>9} {'tpot p50':>9} {'e2e p50':>8} {'e2e p99':>8} {'tok/s':>7} {'req/s':>6} {'err':>4}"
    lines = [head, "-" * len(head)]
    for lv in levels:
        s = lv.summary()
        lines.append(
            f"{lv.server:<20} {lv.concurrency:>4} {len(lv.samples):>4} {s['ttft_p50_s']:>8.3f}s {s['ttft_p99_s']:>8.3f}s "
            f"{s['tpot_p50_s'] * 1000:>7.1f}ms {s['e2e_p50_s']:>7.2f}s {s['e2e_p99_s']:>7.2f}s "
            f"{s['output_tok_s']:>7.1f} {s['requests_s']:>6.2f} {lv.errors:>4}"
        )
    return "\n".join(lines)


def medians(levels: list[Level]) -> dict[tuple[str, int], dict[str, float]]:
    """Per server and level, the median over rounds of output tokens/s, time to first token p50 and tpot p50."""
    keys = dict.fromkeys((lv.server, lv.concurrency) for lv in levels)
    out = {}
    for server, concurrency in keys:
        runs = [lv.summary() for lv in levels if (lv.server, lv.concurrency) == (server, concurrency)]
        out[server, concurrency] = {
            key: statistics.median(r[key] for r in runs) for key in ("output_tok_s", "ttft_p50_s", "tpot_p50_s")
        } | {"rounds": float(len(runs))}
    return out


def median_table(levels: list[Level], baseline: str | None) -> str:
    """The medians over rounds, and each server's tokens/s and TTFT p50 as a ratio to `baseline`'s."""
    med = medians(levels)
    head = f"{'server':<20} {'conc':>4} {'rounds':>6} {'tok/s':>7} {'ttft p50':>9} {'tpot p50':>9}"
    if baseline:
        head += f" {'tok/s vs ' + baseline:>24} {'ttft vs ' + baseline:>24}"
    lines = [head, "-" * len(head)]
    for (server, concurrency), m in med.items():
        line = (
            f"{server:<20} {concurrency:>4} {int(m['rounds']):>6} {m['output_tok_s']:>7.1f} "
            f"{m['ttft_p50_s']:>8.3f}s {m['tpot_p50_s'] * 1000:>7.1f}ms"
        )
        if baseline and (ref := med.get((baseline, concurrency))):
            line += f" {m['output_tok_s'] / ref['output_tok_s']:>23.3f}x {m['ttft_p50_s'] / ref['ttft_p50_s']:>23.3f}x"
        lines.append(line)
    return "\n".join(lines)


def chart(levels: list[Level], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = [("output_tok_s", "output tokens/s"), ("ttft_p50_s", "time to first token p50 (s)"),
              ("tpot_p50_s", "time per output token p50 (s)")]  # fmt: skip
    for server in dict.fromkeys(lv.server for lv in levels):
        mine = sorted((lv for lv in levels if lv.server == server and lv.round == 0), key=lambda lv: lv.concurrency)
        xs = [lv.concurrency for lv in mine]
        for ax, (key, _) in zip(axes, panels, strict=True):
            ax.plot(xs, [lv.summary()[key] for lv in mine], marker="o", label=server)
    axes[1].set_yscale("log")  # queueing at high concurrency would flatten the low-concurrency differences
    for ax, (_, title) in zip(axes, panels, strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", action="append", default=[], metavar="NAME=URL", help="a running server")
    parser.add_argument(
        "--launch", action="append", default=[], metavar="KIND", help="start a server on the demo model"
    )
    parser.add_argument(
        "--launch-args", action="append", default=[], metavar="KIND=ARGS", help="extra flags for a launched server"
    )
    parser.add_argument("--model", default="demo", help="what launched servers serve: demo, or a model directory")
    parser.add_argument("--concurrency", default="1,4,16,64", help="comma-separated levels")
    parser.add_argument(
        "--requests", type=int, default=0, help="requests per level (default: 2 x concurrency, at least 8)"
    )
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.7, help="0: greedy")
    parser.add_argument(
        "--rounds", type=int, default=1, help="runs of each level, the servers alternating; medians are reported"
    )
    parser.add_argument("--baseline", metavar="NAME", help="report the other servers' medians as ratios to this one")
    parser.add_argument(
        "--client-procs", type=int, default=0, help="client processes per level (default: one per 16 streams, "
        "at most half the cores)"
    )  # fmt: skip
    parser.add_argument("--out-dir", default="bench-results")
    parser.add_argument("--from-json", metavar="FILE", help="only redraw the table and chart of an earlier run")
    args = parser.parse_args(argv)
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        levels = [
            Level(
                lv["server"],
                lv["concurrency"],
                lv["requests"],
                lv["wall_s"],
                [Sample(**x) for x in lv["samples"]],
                lv["errors"],
                lv.get("round", 0),
                lv.get("clients", 1),
            )
            for lv in saved["levels"]
        ]
        chart(levels, Path(args.from_json).with_suffix(".png"))
        print(table(levels))
        if any(lv.round for lv in levels):
            print("\n" + median_table(levels, args.baseline))
        return 0
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    extras = {k: v.split() for k, _, v in (a.partition("=") for a in args.launch_args)}
    servers = [tuple(s.split("=", 1)) for s in args.server]
    launched = [Launched(kind, extras.get(kind, []), out, args.model) for kind in args.launch]
    try:
        for server in launched:
            server.wait_ready()
            servers.append((server.kind, server.url))
        if not servers:
            parser.error("give at least one --server or --launch")
        levels: list[Level] = []
        for concurrency in [int(c) for c in args.concurrency.split(",")]:
            count = args.requests or max(8, 2 * concurrency)
            for round_ in range(args.rounds):
                for name, url in servers:
                    asyncio.run(run_level(name, url, 1, 2, 4))  # warm-up, not measured
                    level = asyncio.run(
                        run_level(name, url, concurrency, count, args.max_tokens, temperature=args.temperature,
                                  processes=args.client_procs or None)
                    )  # fmt: skip
                    level.round = round_
                    levels.append(level)
                    print(
                        f"{name}: concurrency {concurrency} round {round_} done in {level.wall_s:.1f} s, "
                        f"{level.summary()['output_tok_s']:.1f} tok/s",
                        file=sys.stderr,
                    )
    finally:
        for server in launched:
            server.stop()
    report = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "rounds": args.rounds,
        "servers": dict(servers),
        "levels": [{**asdict(lv), "summary": lv.summary()} for lv in levels],
    }
    (out / "serve_bench.json").write_text(json.dumps(report, indent=2))
    chart(levels, out / "serve_bench.png")
    print(table(levels))
    if args.rounds > 1 or args.baseline:
        print("\n" + median_table(levels, args.baseline))
    print(f"\nraw numbers: {out / 'serve_bench.json'}\nchart: {out / 'serve_bench.png'}")
    return 1 if any(lv.errors for lv in levels) else 0


if __name__ == "__main__":
    sys.exit(main())
