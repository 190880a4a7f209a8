"""Concurrency benchmark: aggregate output tokens/s of N chat completions at once versus one at a time.

Starts `qwen-api serve` (the demo model unless --model says otherwise) as a subprocess, times how long it
takes to answer 200 on /health, then alternates rounds of "one at a time" and "all at once" on the same
prompts, so both conditions see the same machine noise. Reports medians and the ratio, and writes JSON.

    .venv/bin/python bench/throughput.py --rounds 3 --concurrency 8 --max-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from serve_bench import PROMPTS, free_port  # same prompts and helper as the serving benchmark


def start_server(model: str, port: int, extra: list[str]) -> tuple[subprocess.Popen[bytes], float]:
    exe = Path(sys.executable).parent / "qwen-api"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.monotonic()
    cmd = [str(exe), "serve", "--model", model, "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen([*cmd, *extra], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc, time.monotonic() - start
        except httpx.HTTPError:
            pass
        if time.monotonic() - start > 600:
            proc.kill()
            raise SystemExit("server not healthy after 600 s")
        time.sleep(0.1)


async def one(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> int:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}
    r = await client.post("/v1/chat/completions", json=body)
    r.raise_for_status()
    return int(r.json()["usage"]["completion_tokens"])


async def sequential(client: httpx.AsyncClient, model: str, prompts: list[str], max_tokens: int) -> float:
    start, tokens = time.perf_counter(), 0
    for p in prompts:
        tokens += await one(client, model, p, max_tokens)
    return tokens / (time.perf_counter() - start)


async def concurrent(client: httpx.AsyncClient, model: str, prompts: list[str], max_tokens: int) -> float:
    start = time.perf_counter()
    counts = await asyncio.gather(*[one(client, model, p, max_tokens) for p in prompts])
    return sum(counts) / (time.perf_counter() - start)


async def measure(base_url: str, rounds: int, n: int, max_tokens: int) -> dict[str, list[float]]:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        await concurrent(client, model, prompts[:2], 8)  # warm-up
        results: dict[str, list[float]] = {"sequential": [], "concurrent": []}
        for _ in range(rounds):
            results["sequential"].append(await sequential(client, model, prompts, max_tokens))
            results["concurrent"].append(await concurrent(client, model, prompts, max_tokens))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", default="bench-results/throughput.json")
    parser.add_argument("server_args", nargs="*", help="extra flags for qwen-api serve (after --)")
    args = parser.parse_args()
    port = free_port()
    proc, startup = start_server(args.model, port, args.server_args)
    try:
        results = asyncio.run(measure(f"http://127.0.0.1:{port}", args.rounds, args.concurrency, args.max_tokens))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    seq, conc = statistics.median(results["sequential"]), statistics.median(results["concurrent"])
    report = {
        "model": args.model,
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "startup_to_healthy_s": round(startup, 2),
        "rounds": results,
        "median_tok_s_one_at_a_time": round(seq, 2),
        "median_tok_s_concurrent": round(conc, 2),
        "ratio": round(conc / seq, 2),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"startup to healthy: {startup:.1f} s")
    print(f"one at a time:      {seq:.1f} tok/s (median of {args.rounds})")
    print(f"{args.concurrency} at once:         {conc:.1f} tok/s (median of {args.rounds})")
    print(f"ratio:              {conc / seq:.2f}x")


if __name__ == "__main__":
    main()
