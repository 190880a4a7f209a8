"""Structured outputs' cost: completion tokens/s at N concurrent requests, every one schema-constrained, against
the same load unconstrained, on one server (the demo model by default). Goal: constrained >= 0.9x unconstrained.

    .venv/bin/python bench/structured_bench.py [--engine llamacpp] [--concurrency 8] [--rounds 3]

It launches `qwen-api serve` on a free port, warms the grammar cache, then runs `rounds` waves of `concurrency`
requests per mode, interleaving the modes, and prints tokens/s for each and their ratio. Every constrained answer
is checked against the schema, so the figure is for output that really follows it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import httpx
import jsonschema
from launch import qwen_api_server

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "population": {"type": "integer", "minimum": 0, "maximum": 100000000},
        "landmarks": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 4},
        "country": {"type": "string", "maxLength": 30},
    },
    "required": ["name", "population", "landmarks", "country"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}}


async def _wave(client: httpx.AsyncClient, model: str, n: int, constrained: bool, max_tokens: int) -> int:
    async def one(i: int) -> int:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": f"Describe city number {i} as JSON."}],
            "max_tokens": max_tokens,
            "seed": i,
            "temperature": 0.7,
            **({"response_format": FORMAT} if constrained else {}),
        }
        reply = (await client.post("/v1/chat/completions", json=body)).json()
        if constrained and reply["choices"][0]["finish_reason"] == "stop":
            jsonschema.validate(json.loads(reply["choices"][0]["message"]["content"]), SCHEMA)
        return int(reply["usage"]["completion_tokens"])

    return sum(await asyncio.gather(*(one(i) for i in range(n))))


async def _run(base: str, concurrency: int, rounds: int, max_tokens: int) -> dict[str, float]:
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        await _wave(client, model, 2, True, 16)  # compile and cache the grammar, build the token table
        await _wave(client, model, 2, False, 16)
        totals = {"unconstrained": [0, 0.0], "constrained": [0, 0.0]}
        for _ in range(rounds):
            for mode in ("unconstrained", "constrained"):
                start = time.perf_counter()
                tokens = await _wave(client, model, concurrency, mode == "constrained", max_tokens)
                totals[mode][0] += tokens
                totals[mode][1] += time.perf_counter() - start
        return {mode: tokens / seconds for mode, (tokens, seconds) in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--engine", default="llamacpp")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=96)
    args = parser.parse_args()
    with qwen_api_server(args.model, args.engine) as base:
        rates = asyncio.run(_run(base, args.concurrency, args.rounds, args.max_tokens))
    ratio = rates["constrained"] / rates["unconstrained"]
    print(f"{args.engine}, {args.concurrency} concurrent, {args.rounds} rounds, max_tokens {args.max_tokens}")
    print(f"unconstrained: {rates['unconstrained']:.1f} tokens/s")
    print(f"constrained:   {rates['constrained']:.1f} tokens/s  ({ratio:.2f}x)")


if __name__ == "__main__":
    main()
