"""Engine replicas on Ray against the engine in the front's own process, on the demo model.

Three servers, each `qwen-api serve --model demo` on a loopback port: `in-process` (the engine in the front),
`ray-1` (`--ray --replicas 1`, a local cluster the front starts) and `ray-2` (`--ray --replicas 2`).
- The Ray hop: `in-process` and `ray-1` run side by side and take turns, round after round, one streaming
  request at a time; the cost of the hop is the ratio of their median times per output token (goal: <= 1.05).
- Throughput: requests/s and output tokens/s at 8 and 16 concurrent streaming requests, for each server.
On a machine with fewer cores than replicas need, two replicas share the same cores as one: they cannot add
compute, only hold more sequences (each replica gets cores / replicas llama.cpp threads).

    .venv/bin/python bench/ray_bench.py --rounds 3 --max-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from serve_bench import Launched, Level, run_level, table

SERVERS = {"in-process": [], "ray-1": ["--ray", "--replicas", "1"], "ray-2": ["--ray", "--replicas", "2"]}


def launch(name: str, work: Path, batch: int) -> Launched:
    extra = [*SERVERS[name], "--max-batch-size", str(batch), "--log-level", "warning"]
    server = Launched("qwen-api", extra, work / name)  # a folder each: its log is named after the kind
    server.kind = name
    server.wait_ready()
    return server


def median_tpot(levels: list[Level]) -> float:
    tpots = [(s.e2e - s.ttft) / (s.tokens - 1) for lv in levels for s in lv.samples if s.tokens > 1]
    return statistics.median(tpots)


async def hop_cost(servers: dict[str, Launched], rounds: int, requests: int, max_tokens: int) -> dict[str, list[Level]]:
    """One request at a time, the servers taking turns each round, so both see the same machine noise."""
    levels: dict[str, list[Level]] = {name: [] for name in servers}
    for _ in range(rounds):
        for name, server in servers.items():
            levels[name].append(await run_level(name, server.url, 1, requests, max_tokens))
    return levels


async def throughput(servers: list[Launched], concurrency: list[int], max_tokens: int) -> list[Level]:
    """Each level on each server in turn; the load average beside each, as other work on the machine skews it."""
    levels = []
    for c in concurrency:
        for server in servers:
            level = await run_level(server.kind, server.url, c, 2 * c, max_tokens)
            level.load_average = os.getloadavg()[0]  # type: ignore[attr-defined]
            levels.append(level)
    return levels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=6, help="requests per server per round at concurrency 1")
    parser.add_argument("--concurrency", default="8,16")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("bench-results/ray_bench.json"))
    args = parser.parse_args(argv)
    concurrency = [int(c) for c in args.concurrency.split(",")]
    work = Path(tempfile.mkdtemp(prefix="ray-bench-"))
    results: dict[str, object] = {}
    all_levels: list[Level] = []

    pair = {name: launch(name, work, args.max_batch_size) for name in ("in-process", "ray-1")}
    try:
        hop = asyncio.run(hop_cost(pair, args.rounds, args.requests, args.max_tokens))
        tpot = {name: median_tpot(levels) for name, levels in hop.items()}
        # Paired by round (the two servers ran back to back): the median of the per-round ratios.
        per_round = [median_tpot([r]) / median_tpot([i]) for i, r in zip(hop["in-process"], hop["ray-1"], strict=True)]
        results["hop"] = {
            "tpot_median_s": tpot,
            "ratio": statistics.median(per_round),
            "per_round_ratios": per_round,
            "per_round_tpot_s": {name: [median_tpot([lv]) for lv in levels] for name, levels in hop.items()},
        }
        all_levels += asyncio.run(throughput(list(pair.values()), concurrency, args.max_tokens))
    finally:
        for server in pair.values():
            server.stop()
    two = launch("ray-2", work, args.max_batch_size)
    try:
        all_levels += asyncio.run(throughput([two], concurrency, args.max_tokens))
    finally:
        two.stop()

    results["throughput"] = [
        {"server": lv.server, "concurrency": lv.concurrency, "load_average_1m": lv.load_average, **lv.summary()}  # type: ignore[attr-defined]
        for lv in all_levels
    ]
    print(table(all_levels))
    hop_result = results["hop"]
    assert isinstance(hop_result, dict)
    print(
        f"\nRay hop at concurrency 1 ({args.rounds} rounds x {args.requests} requests each): time per output token "
        f"{hop_result['tpot_median_s']['in-process'] * 1000:.2f} ms in-process, "
        f"{hop_result['tpot_median_s']['ray-1'] * 1000:.2f} ms through Ray; paired by round: {hop_result['ratio']:.3f}x "
        f"(rounds: {', '.join(f'{r:.2f}' for r in hop_result['per_round_ratios'])})"
    )
    print("load average (1 min) after each level:", ", ".join(f"{lv.load_average:.1f}" for lv in all_levels))  # type: ignore[attr-defined]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"raw figures: {args.out}  (server logs: {work / 'logs'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
