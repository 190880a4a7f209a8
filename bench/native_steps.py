"""The native engine without HTTP: how long the model's decode step takes, and what the engine's API delivers.

Two measurements on one loaded engine, so the serving benchmark (`bench/native_gpu.py`) can be read against them:
- forward: on CUDA, one step of the whole network replayed from its CUDA graph, and the same step run eagerly,
  at each batch size asked for, and at the largest plus 32 and plus 256 tokens (a step that also reads prompt
  tokens), timed with CUDA events (median of the timed repeats). At batch 1 this is the number to hold against
  the bandwidth bound: the weights' bytes over the GPU's bandwidth. And one eager step reading fresh prompt
  chunks (`--prefill-shapes`, prompts x tokens), with attention in the Triton prefill kernel and in SDPA over
  gathered blocks: the step that time to first token waits for.
- engine: N concurrent sequences through `NativeEngine.generate` (no HTTP, no detokeniser), each a distinct random
  prompt and the sampling Qwen2-7B-Instruct's generation_config.json gives every /v1 request (temperature 0.7,
  top-p 0.8, top-k 20, repetition penalty 1.05): output tokens/s and milliseconds per engine step.
Optionally (`--profile`) a torch profiler table of a few engine steps at the largest concurrency,
(`--compare-unfused`) the step again with the eager elementwise functions instead of the fused ones, and
(`--compare-in-turn`) each wave also with steps read in turn instead of overlapped (CUDA's default), alternating.

    .venv/bin/python bench/native_steps.py --model-dir DIR --device cpu --dtype float32 --concurrency 1,4
    python bench/native_steps.py --model-dir /tmp/qwen2-7b --device cuda --dtype bfloat16 --concurrency 1,16,64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from qwen_api.engine.base import SamplingParams
from qwen_api.engine.native.engine import NativeEngine
from qwen_api.engine.native.runner import CudaGraphs
from qwen_api.engine.native.scheduler import Sequence, Step

QWEN2_SAMPLING = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}


def timed(fn, repeats: int, cuda: bool = True) -> float:  # type: ignore[no-untyped-def]
    """Median milliseconds of `fn` after 3 untimed calls: on the GPU by CUDA events, on the CPU by the clock."""
    times = []
    for i in range(repeats + 3):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end)
        else:
            began = time.perf_counter()
            fn()
            elapsed = 1000 * (time.perf_counter() - began)
        if i >= 3:
            times.append(elapsed)
    return statistics.median(times)


def forward_ms(engine: NativeEngine, size: int, repeats: int) -> dict[str, float]:
    """Median milliseconds of one decode step at `size` rows: graph replay, and eager (CUDA only)."""
    graphs = engine.runner.graphs
    assert graphs is not None and size in graphs.graphs, f"no CUDA graph for batch {size}"
    graph, _ = graphs.graphs[size]
    with torch.inference_mode():
        return {"graph_ms": timed(graph.replay, repeats), "eager_ms": timed(lambda: graphs._forward(size), repeats)}


def prefill_ms(engine: NativeEngine, prompts: int, tokens: int, repeats: int) -> dict[str, float]:
    """Median milliseconds of one eager step reading `prompts` fresh chunks of `tokens` prompt tokens, attention in
    the Triton prefill kernel (on CUDA, when it passed its check at load) and in SDPA over gathered blocks. The
    engine must be idle: the step takes blocks from its pool."""
    pool, runner = engine.cache.pool, engine.runner
    params = SamplingParams(max_new_tokens=1)
    seqs = [Sequence([(7 * i + t) % 1000 for t in range(tokens)], tokens, params) for i in range(prompts)]
    for seq in seqs:
        seq.blocks = [pool.allocate() for _ in range(-(-tokens // pool.block_size))]
    step = Step(prefills=[(seq, tokens) for seq in seqs])
    checked, result = runner.prefill_kernel, {}
    try:
        with torch.inference_mode():
            for name, kernel in (("kernel_ms", True), ("sdpa_ms", False)):
                if kernel and not checked:
                    continue
                runner.prefill_kernel = kernel
                result[name] = timed(lambda: runner.run_eager(step), repeats, engine.device.type == "cuda")
    finally:
        runner.prefill_kernel = checked
        for seq in seqs:
            pool.release(seq.blocks)
    return result


async def engine_wave(engine: NativeEngine, concurrency: int, prompt_tokens: int, new_tokens: int) -> dict:
    generator = torch.Generator().manual_seed(concurrency)
    vocab = min(engine.config.vocab_size, 151_000)
    prompts = [torch.randint(0, vocab, (prompt_tokens,), generator=generator).tolist() for _ in range(concurrency)]
    params = SamplingParams(max_new_tokens=new_tokens, **QWEN2_SAMPLING)
    steps_before = engine.stats().steps

    firsts: list[float] = []

    async def one(prompt: list[int]) -> int:
        count = 0
        async for chunk in engine.generate(prompt, params):
            if not count:
                firsts.append(time.perf_counter() - start)
            count += len(chunk.token_ids)
        return count

    variants = triton_variants()
    graphs = engine.runner.graphs
    eager_before = engine.runner.eager_steps
    mixed_before = graphs.mixed_replays if graphs is not None else 0
    start = time.perf_counter()
    counts = await asyncio.gather(*(one(p) for p in prompts))
    wall = time.perf_counter() - start
    steps = engine.stats().steps - steps_before
    return {
        "concurrency": concurrency,
        "tokens": sum(counts),
        "wall_s": wall,
        "tokens_per_s": sum(counts) / wall,
        "steps": steps,
        "ms_per_step": 1000 * wall / max(steps, 1),
        "ttft_max_s": max(firsts),
        # steps that read prompt tokens inside a CUDA graph, and steps run without one
        "mixed_graph_steps": (graphs.mixed_replays - mixed_before) if graphs is not None else 0,
        "eager_steps": engine.runner.eager_steps - eager_before,
        # Triton kernels compiled during this wave: a first token that waits for a compile shows here
        "triton_compiles": None if variants is None else (triton_variants() or 0) - variants,
    }


def triton_variants() -> int | None:
    """How many variants of the paged decode and prefill kernels Triton has compiled so far (None without Triton)."""
    try:
        from qwen_api.engine.native.triton_attention import _paged_decode_kernel, _paged_prefill_kernel
    except ImportError:
        return None
    total = 0
    for kernel in (_paged_decode_kernel, _paged_prefill_kernel):
        caches = getattr(kernel, "device_caches", None) or getattr(kernel, "cache", {})
        total += sum(len(c[0] if isinstance(c, tuple) else c) for c in caches.values())
    return total


def profile(engine: NativeEngine, concurrency: int, prompt_tokens: int) -> str:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        asyncio.run(engine_wave(engine, concurrency, prompt_tokens, 16))
    key = "self_cuda_time_total" if engine.device.type == "cuda" else "self_cpu_time_total"
    return str(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--prefill-shapes", default="2x1024,16x128", help="prompts x tokens of the timed prefill steps")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--compare-unfused", action="store_true", help="CUDA: also time the step with eager elementwise ops"
    )
    parser.add_argument(
        "--compare-in-turn",
        action="store_true",
        help="also run each wave with steps read in turn (the CPU's way), alternating with overlapped ones",
    )
    parser.add_argument("--waves", type=int, default=1, help="waves per level (and mode)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    started = time.perf_counter()
    engine = NativeEngine(
        args.model_dir, [151645], device=args.device, dtype=getattr(torch, args.dtype), max_batch_size=max(levels)
    )
    result: dict = {"device": args.device, "load_s": time.perf_counter() - started, "forward": {}, "engine": [],
                    "fused": engine.model.ops.fused}  # fmt: skip
    if args.device == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
        weights = sum(p.numel() * p.element_size() for p in engine.model.parameters())
        result["weight_bytes"] = weights
        print(f"{result['gpu']}: weights {weights / 1e9:.2f} GB, loaded in {result['load_s']:.1f} s, "
              f"fused elementwise: {result['fused']}", flush=True)  # fmt: skip
        # the levels, then steps that also read prompt tokens: the largest level plus 32 and plus 256 tokens
        for size in [*levels, max(levels) + 32, max(levels) + 256]:
            result["forward"][size] = forward_ms(engine, size, args.repeats)
            print(f"forward {size:>3} tokens: {result['forward'][size]}", flush=True)
    result["prefill"] = {}
    for shape in args.prefill_shapes.split(","):
        prompts, tokens = (int(x) for x in shape.split("x"))
        result["prefill"][shape] = prefill_ms(engine, prompts, tokens, args.repeats)
        print(f"prefill step of {prompts} x {tokens} prompt tokens: {result['prefill'][shape]}", flush=True)
    try:
        asyncio.run(engine_wave(engine, 2, args.prompt_tokens, 4))  # warm-up
        modes = [engine.overlap, not engine.overlap] if args.compare_in_turn else [engine.overlap]
        for c in levels:
            for _ in range(args.waves):
                for overlap in modes:  # alternating, on one engine (the worker reads the switch each step)
                    engine.overlap = overlap
                    wave = asyncio.run(engine_wave(engine, c, args.prompt_tokens, args.new_tokens))
                    wave["overlap"] = overlap
                    result["engine"].append(wave)
                    print(f"engine concurrency {c:>3}{' overlapped' if overlap else ' in turn'}: "
                          f"{wave['tokens_per_s']:8.1f} tok/s, {wave['ms_per_step']:.2f} ms/step "
                          f"({wave['steps']} steps, {wave['tokens']} tokens), slowest first token "
                          f"{wave['ttft_max_s']:.3f} s, Triton compiles {wave['triton_compiles']}, steps with prompt "
                          f"tokens in a graph {wave['mixed_graph_steps']}, eager steps {wave['eager_steps']}",
                          flush=True)  # fmt: skip
        engine.overlap = modes[0]
        if args.profile:
            print(profile(engine, max(levels), args.prompt_tokens), flush=True)
        if args.compare_unfused and engine.model.ops.fused:  # recapture the graphs with the eager functions
            engine.model.ops.unfuse()
            tiled = engine.runner.graphs is not None and engine.runner.graphs.tiled
            engine.runner.graphs = CudaGraphs(engine.runner, max(levels), tiled)
            result["forward_unfused"] = {}
            for size in levels:
                result["forward_unfused"][size] = forward_ms(engine, size, args.repeats)
                print(f"forward batch {size:>3}, eager elementwise: {result['forward_unfused'][size]}", flush=True)
    finally:
        engine.shutdown()
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
