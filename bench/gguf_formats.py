"""Decode speed of the llama.cpp engine by GGUF weight type: which file to serve on a CPU.

The demo's Q4_1 weights are re-quantised with llama.cpp's own `llama_model_quantize` into other types (Q8_0
and F16 keep them almost exactly; Q4_0 rounds them again, so its text can differ), then each file is loaded in
`LlamaCppEngine` and decodes 64 greedy tokens for 1 sequence and for 8 at once, in alternating rounds.
Engine only, no HTTP: what the kernels allow. Prints a table and writes `gguf_formats.json`.

    .venv/bin/python bench/gguf_formats.py --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

from serve_bench import demo_gguf

from qwen_api.engine.base import SamplingParams
from qwen_api.engine.llamacpp_engine import LlamaCppEngine

TYPES = {
    "Q4_1": None,
    "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "F16": "LLAMA_FTYPE_MOSTLY_F16",
}


def requantise(name: str, out_dir: Path) -> Path:
    from llama_cpp import llama_cpp

    source = demo_gguf()
    if TYPES[name] is None:
        return source
    target = out_dir / f"{source.stem.rsplit('.', 1)[0]}.{name}.gguf"
    if not target.is_file():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.allow_requantize = getattr(llama_cpp, TYPES[name]), True
        if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params) != 0:
            raise SystemExit(f"llama_model_quantize failed for {name}")
    return target


async def tokens_per_second(engine: LlamaCppEngine, sequences: int, max_tokens: int) -> float:
    params = SamplingParams(max_new_tokens=max_tokens, temperature=0.0)

    async def one(i: int) -> int:
        count = 0
        # A prompt of token ids with no natural end: every sequence decodes all max_tokens (a real question ends
        # early at the end-of-turn token, after a different count per type), so the types do the same work.
        async for chunk in engine.generate([*range(1, 10), 10 + i], params):
            count += len(chunk.token_ids)
        return count

    start = time.perf_counter()
    counts = await asyncio.gather(*(one(i) for i in range(sequences)))
    elapsed = time.perf_counter() - start
    if set(counts) != {max_tokens}:
        raise SystemExit(f"a sequence ended early ({counts}): the figures would not compare")
    return sum(counts) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--types", default=",".join(TYPES), help=f"comma-separated, of {', '.join(TYPES)}")
    parser.add_argument("--out-dir", type=Path, default=Path("bench-results"))
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    names = args.types.split(",")
    paths = {name: requantise(name, args.out_dir) for name in names}
    runs: dict[str, dict[int, list[float]]] = {name: {1: [], 8: []} for name in names}
    for _ in range(args.rounds):
        for name in names:  # alternate, so each type sees the same machine noise
            # One engine loaded at a time: beside each other, their llama.cpp thread pools slowed every figure.
            engine = LlamaCppEngine(paths[name], eos_token_ids=[], max_batch_size=8, kv_cache_tokens=8192)
            try:
                asyncio.run(tokens_per_second(engine, 8, 4))  # warm-up: the first batch of 8 pays one-time costs
                for sequences in (1, 8):
                    runs[name][sequences].append(asyncio.run(tokens_per_second(engine, sequences, args.max_tokens)))
            finally:
                engine.shutdown()
    report = {}
    print(f"{'type':<6} {'MB':>6} {'1 seq tok/s':>12} {'8 seqs tok/s':>13} {'8 vs 1':>7}")
    for name in names:
        one, eight = (statistics.median(runs[name][n]) for n in (1, 8))
        size = paths[name].stat().st_size / 1e6
        print(f"{name:<6} {size:>6.0f} {one:>12.1f} {eight:>13.1f} {eight / one:>6.2f}x")
        report[name] = {"file_mb": size, "one_sequence_tok_s": runs[name][1], "eight_sequences_tok_s": runs[name][8]}
    (args.out_dir / "gguf_formats.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
