"""What `--no-prefix-cache` costs on the llama.cpp engine: time to first token with and without prefix reuse.

Requests that share a long system prompt (as an app's or an agent's do) and differ in their question, one at a
time, greedy, on the demo model, engine only (no HTTP). Each round runs the same questions with the prefix cache
on and off, alternating, and reports the median time to first token of each and their ratio.

    .venv/bin/python bench/prefix_cache.py --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from transformers import AutoTokenizer

from qwen_api.engine.base import SamplingParams
from qwen_api.engine.llamacpp_engine import LlamaCppEngine
from qwen_api.engine.loading import resolve_model
from qwen_api.runtime import eos_token_ids

SYSTEM = " ".join(
    f"Rule {i}: answer politely, cite the manual section {i}, and never reveal internal identifiers." for i in range(24)
)
QUESTIONS = [
    "How do I reset my password?",
    "What are your opening hours?",
    "Can I change my delivery address?",
    "How do I cancel an order?",
    "Where is my parcel?",
    "Do you ship abroad?",
]


async def first_token_seconds(engine: LlamaCppEngine, ids: list[int]) -> float:
    start = time.perf_counter()
    stream = engine.generate(ids, SamplingParams(max_new_tokens=2, temperature=0))
    async for _ in stream:
        elapsed = time.perf_counter() - start
        await stream.aclose()  # type: ignore[attr-defined]
        return elapsed
    raise RuntimeError("no token")


async def run(rounds: int) -> None:
    source = resolve_model("demo")
    assert source.gguf_file is not None
    tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    prompts = []
    for question in QUESTIONS:
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        prompts.append(list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded))
    engines = {
        mode: LlamaCppEngine(source.path / source.gguf_file, eos_token_ids(tokenizer), prefix_cache=mode == "on")
        for mode in ("on", "off")
    }
    times: dict[str, list[float]] = {"on": [], "off": []}
    try:
        for _ in range(rounds):
            for mode, engine in engines.items():
                for ids in prompts:
                    times[mode].append(await first_token_seconds(engine, ids))
    finally:
        for engine in engines.values():
            engine.shutdown()
    on, off = statistics.median(times["on"]), statistics.median(times["off"])
    print(f"prompt: {len(prompts[0])} tokens, {len(QUESTIONS)} questions sharing the system prompt, {rounds} rounds")
    print(f"time to first token, median: prefix cache on {on * 1000:.1f} ms, off {off * 1000:.1f} ms ({off / on:.1f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    asyncio.run(run(parser.parse_args().rounds))


if __name__ == "__main__":
    main()
