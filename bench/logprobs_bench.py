"""Log-probabilities' cost: completion tokens/s at N concurrent chat requests that each ask for `top_logprobs`
alternatives, against the same load without logprobs, on one server (the demo model by default).

    .venv/bin/python bench/logprobs_bench.py [--engine llamacpp] [--concurrency 8] [--top-logprobs 5] [--rounds 5]

It launches `qwen-api serve` on a free port, then runs `rounds` waves of `concurrency` seeded requests per mode,
interleaving the modes so both see the same machine, and prints the median tokens/s of each mode's waves and their
ratio. Every answer with logprobs is checked to carry one entry per completion token.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import httpx
from launch import qwen_api_server


async def _wave(client: httpx.AsyncClient, model: str, n: int, top: int | None, max_tokens: int) -> float:
    """Tokens/s of one wave of n concurrent requests."""

    async def one(i: int) -> int:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": f"Write a short story about the number {i}."}],
            "max_tokens": max_tokens,
            "seed": i,
            "temperature": 0.7,
            **({"logprobs": True, "top_logprobs": top} if top is not None else {}),
        }
        reply = (await client.post("/v1/chat/completions", json=body)).json()
        tokens = int(reply["usage"]["completion_tokens"])
        if top is not None:
            entries = reply["choices"][0]["logprobs"]["content"]
            assert len(entries) == tokens and all(len(e["top_logprobs"]) == top for e in entries)
        return tokens

    start = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(i) for i in range(n))))
    return tokens / (time.perf_counter() - start)


async def _run(base: str, args: argparse.Namespace) -> dict[str, list[float]]:
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        await _wave(client, model, 2, args.top_logprobs, 8)  # warm-up
        rates: dict[str, list[float]] = {"none": [], "logprobs": []}
        for _ in range(args.rounds):
            rates["none"].append(await _wave(client, model, args.concurrency, None, args.max_tokens))
            rates["logprobs"].append(await _wave(client, model, args.concurrency, args.top_logprobs, args.max_tokens))
        return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--engine", default="llamacpp")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--top-logprobs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=96)
    args = parser.parse_args()
    with qwen_api_server(args.model, args.engine) as base:
        rates = asyncio.run(_run(base, args))
    plain, with_logprobs = statistics.median(rates["none"]), statistics.median(rates["logprobs"])
    print(f"{args.model} on {args.engine}, {args.concurrency} concurrent, max_tokens {args.max_tokens}, ", end="")
    print(f"median of {args.rounds} interleaved waves")
    print(f"without logprobs:  {plain:.1f} tokens/s")
    print(f"top_logprobs {args.top_logprobs}:    {with_logprobs:.1f} tokens/s  ({with_logprobs / plain:.2f}x)")


if __name__ == "__main__":
    main()
