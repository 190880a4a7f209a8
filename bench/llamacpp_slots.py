"""The llama.cpp engine without HTTP, under closed-loop clients: tokens/s and llama.cpp passes per decode step.

With a KV stream per sequence, llama.cpp decodes a batch in one pass over the weights only when the batch's sequence
ids are consecutive in batch order; each break in the run costs another pass (`split_equal(sequential=true)` in
llama-batch.cpp). This bench counts the passes each of the engine's `llama_decode` calls needs (the same split rule,
replayed on the batch the engine hands over) and the output tokens per second, while `--streams` clients each send
`--requests` chat prompts back to back (varied lengths, varied max_tokens, greedy), as a serving bench's clients do.

`--variant NAME=PYTHONPATH` (repeatable) runs the same load on another source tree (a copy of `src` before a change),
repeat by repeat alternating with this checkout, so that the variants see the same machine noise.

    .venv/bin/python bench/llamacpp_slots.py --streams 8 --repeats 3
    git worktree add /tmp/before HEAD~1 && .venv/bin/python bench/llamacpp_slots.py --variant before=/tmp/before/src
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOPICS = ["the sea", "a lighthouse", "bread", "the moon", "rivers", "chess", "owls", "glass", "trains", "tea"]


def passes(seq_ids: list[int], n_ubatch: int) -> int:
    """How many ubatches llama.cpp splits a batch into (tokens' sequence ids, in batch order): each ubatch takes, in
    batch order, sequences whose ids follow one another, and the same number of tokens from each."""
    left = list(seq_ids)
    count = 0
    while left:
        chosen: list[int] = []
        for seq in left:
            if seq not in chosen and (not chosen or seq == chosen[-1] + 1):
                chosen.append(seq)
        per_seq = max(1, min(min(left.count(s) for s in chosen), n_ubatch // len(chosen)))
        for seq in chosen:
            for _ in range(per_seq):
                left.remove(seq)
        count += 1
    return count


def worker(streams: int, requests: int, seed: int) -> dict[str, float]:
    from qwen_api.engine.base import SamplingParams
    from qwen_api.engine.loading import resolve_model
    from qwen_api.runtime import default_loader
    from qwen_api.settings import Settings

    generator = default_loader(Settings(model="demo", engine="llamacpp"), resolve_model("demo"))()
    engine = generator.engine
    per_step: list[int] = []
    decode_s: list[float] = []
    ttft: list[float] = []
    decode = engine._ctx.decode

    def counted(batch) -> None:  # type: ignore[no-untyped-def]
        raw = batch.batch
        per_step.append(passes([raw.seq_id[i][0] for i in range(raw.n_tokens)], int(raw.n_tokens) + 1024))
        start = time.perf_counter()
        decode(batch)
        decode_s.append(time.perf_counter() - start)

    engine._ctx.decode = counted
    rng = random.Random(seed)
    jobs = [
        [
            (f"Write {rng.randint(2, 6)} sentences about {rng.choice(TOPICS)}.", rng.randint(48, 160))
            for _ in range(requests)
        ]
        for _ in range(streams)
    ]

    async def client(todo: list[tuple[str, int]]) -> int:
        tokens = 0
        for text, max_tokens in todo:
            prompt = generator.chat_prompt_ids([{"role": "user", "content": text}])
            params = SamplingParams(max_new_tokens=max_tokens, temperature=0)
            start, first = time.perf_counter(), True
            async for chunk in engine.generate(prompt, params):
                if first:
                    ttft.append(time.perf_counter() - start)
                    first = False
                tokens += len(chunk.token_ids)
        return tokens

    async def run() -> tuple[int, float]:
        start = time.perf_counter()
        counts = await asyncio.gather(*(client(todo) for todo in jobs))
        return sum(counts), time.perf_counter() - start

    try:
        asyncio.run(client([("Say hello.", 8)]))  # warm-up: first decode allocations
        per_step.clear(), decode_s.clear(), ttft.clear()
        tokens, seconds = asyncio.run(run())
    finally:
        engine.shutdown()
    return {
        "tokens": tokens,
        "tok_s": tokens / seconds,
        "steps": len(per_step),
        "passes_per_step": statistics.mean(per_step),
        "decode_ms_per_step": 1000 * statistics.mean(decode_s),
        "other_ms_per_step": 1000 * (seconds - sum(decode_s)) / len(decode_s),
        "ttft_p50_s": statistics.median(ttft),
        "moved": getattr(engine, "moved_sequences", 0),
        "reused_tokens": engine.reused_tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--requests", type=int, default=4, help="requests per client, back to back")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=PYTHONPATH")
    parser.add_argument("--json", type=Path, help="write every run's figures here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.streams, args.requests, args.seed)))
        return
    variants = {"this checkout": str(REPO / "src")}
    variants.update(v.split("=", 1) for v in args.variant)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    for repeat in range(args.repeats):
        for name, path in variants.items():
            env = {**os.environ, "PYTHONPATH": path}
            command = [sys.executable, __file__, "--worker", "--streams", str(args.streams),
                       "--requests", str(args.requests), "--seed", str(args.seed)]  # fmt: skip
            out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            runs[name].append(result)
            print(f"repeat {repeat + 1} {name}: {json.dumps(result)}", flush=True)
    print(f"\n{args.streams} clients x {args.requests} requests, greedy, demo GGUF; medians of {args.repeats}:")
    base = statistics.median(r["tok_s"] for r in runs["this checkout"])
    for name, results in runs.items():
        tok_s = statistics.median(r["tok_s"] for r in results)
        per_step = statistics.median(r["passes_per_step"] for r in results)
        ttft = statistics.median(r["ttft_p50_s"] for r in results)
        decode_ms = statistics.median(r["decode_ms_per_step"] for r in results)
        print(
            f"  {name:>14}: {tok_s:6.1f} tok/s ({tok_s / base:.2f}x), {per_step:.2f} llama.cpp passes per step, "
            f"{decode_ms:.1f} ms in llama_decode per step, TTFT p50 {ttft:.3f} s"
        )
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
