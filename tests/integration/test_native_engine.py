"""The native engine (engine/native/): real forward passes of the tiny random Qwen2, checked against transformers.

On the CPU in fp32: greedy tokens equal transformers' `generate` token for token (alone, in a batch of 8 beside
sampled traffic, through the prefix cache, with chunked prefill, under preemption); seeds reproduce beside other
traffic; bad input fails only its own sequence; a closed stream gives its blocks back; the whole server answers
on this engine. The `gpu` tests repeat the comparison in bf16 on CUDA, check the Triton decode kernel against the
SDPA reference, and CUDA-graph replay against eager steps. Without a GPU, the `triton_interpret` tests run that
kernel through Triton's interpreter: against the reference, and as the attention of every step of a run in the
CUDA graphs' layout.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from qwen_api.engine.bad_words import BadWords
from qwen_api.engine.base import EngineError, SamplingParams, common_prefix_len
from qwen_api.engine.native.engine import NativeEngine
from qwen_api.engine.sampler import Row, filter_top_k_top_p, sample

from conftest import serve_in_process

EOS = 151645
GREEDY = SamplingParams(max_new_tokens=16, temperature=0.0)
SAMPLED = SamplingParams(max_new_tokens=16, temperature=0.8, top_p=0.9, top_k=50)


def random_prompt(length: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 151_000, (length,), generator=g).tolist()


async def collect(engine: NativeEngine, prompt: list[int], params: SamplingParams) -> list[int]:
    tokens: list[int] = []
    async for chunk in engine.generate(prompt, params):
        tokens += chunk.token_ids
    return tokens


def run(engine: NativeEngine, prompt: list[int], params: SamplingParams = GREEDY) -> list[int]:
    return asyncio.run(collect(engine, prompt, params))


def run_many(engine: NativeEngine, jobs: list[tuple[list[int], SamplingParams]]) -> list[list[int]]:
    async def main() -> list[list[int]]:
        return list(await asyncio.gather(*(collect(engine, p, s) for p, s in jobs)))

    return asyncio.run(main())


def run_staggered(
    engine: NativeEngine,
    jobs: list[tuple[list[int], SamplingParams]],
    gap: float,
    collector: Callable[[NativeEngine, list[int], SamplingParams], Awaitable[Any]] = collect,
) -> list[Any]:
    """Each job `gap` seconds after the one before, so later prompts arrive while the earlier ones decode."""

    async def main() -> list[Any]:
        async def later(i: int, prompt: list[int], params: SamplingParams) -> Any:
            await asyncio.sleep(gap * i)
            return await collector(engine, prompt, params)

        return list(await asyncio.gather(*(later(i, p, s) for i, (p, s) in enumerate(jobs))))

    return asyncio.run(main())


@pytest.fixture(scope="module")
def hf_model(tiny_qwen2_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32).eval()


def reference(hf_model, prompt: list[int], new_tokens: int = 16) -> list[int]:  # type: ignore[no-untyped-def]
    ids = torch.tensor([prompt], device=hf_model.device)
    # repetition_penalty=1: the fixture's generation_config.json has Qwen2-7B-Instruct's 1.05, which our API has not
    out = hf_model.generate(
        ids,
        max_new_tokens=new_tokens,
        do_sample=False,
        repetition_penalty=1.0,
        eos_token_id=EOS,
        pad_token_id=151643,
        attention_mask=torch.ones_like(ids),
    )
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module", params=[False, True], ids=["in-turn", "overlapped"])
def overlap(request: pytest.FixtureRequest) -> bool:
    """Steps read in turn (the CPU's default), or each launched before the previous one's tokens are read (the
    GPU's): every test with an engine runs both ways."""
    return bool(request.param)


@pytest.fixture(scope="module")
def engine(tiny_qwen2_dir: Path, overlap: bool) -> Iterator[NativeEngine]:
    engine = NativeEngine(tiny_qwen2_dir, [EOS], kv_cache_tokens=8192, max_batch_size=16, overlap=overlap)
    yield engine
    engine.shutdown()


def wait_idle(engine: NativeEngine, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.stats().active or engine.stats().waiting:
        assert time.monotonic() < deadline, engine.stats()
        time.sleep(0.01)


PROMPT_LENGTHS = [1, 7, 33, 100]


def test_greedy_matches_transformers_alone(engine: NativeEngine, hf_model) -> None:  # type: ignore[no-untyped-def]
    for i, length in enumerate(PROMPT_LENGTHS):
        prompt = random_prompt(length, seed=i)
        assert run(engine, prompt) == reference(hf_model, prompt), f"prompt of {length} tokens"


def test_greedy_matches_in_a_batch_of_8_beside_sampled_traffic(engine: NativeEngine, hf_model) -> None:  # type: ignore[no-untyped-def]
    greedy = [random_prompt(length, seed=10 + i) for i, length in enumerate(PROMPT_LENGTHS)]
    sampled = [(random_prompt(20 + 9 * i, seed=20 + i), SAMPLED) for i in range(4)]
    sizes: list[int] = []
    engine.on_step = sizes.append
    try:
        results = run_many(engine, [*((p, GREEDY) for p in greedy), *sampled])
    finally:
        engine.on_step = None
    assert max(sizes) == 8  # all eight were stepped together
    for prompt, tokens in zip(greedy, results, strict=False):
        assert tokens == reference(hf_model, prompt)
    for tokens in results[4:]:
        assert 1 <= len(tokens) <= 16 and all(0 <= t < 152064 for t in tokens)


def test_short_prompts_read_together_match_one_call_each(
    engine: NativeEngine,
    hf_model,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The GPU reads a step's short prompt chunks with one masked attention call (attention.PrefillBatch). Forced
    on here: eight prompts arriving together, two of them sharing a cached prefix, give transformers' tokens."""
    from qwen_api.engine.native import runner

    batched: list[int] = []
    build = runner.batch_prefills
    monkeypatch.setattr(runner, "batch_prefills", lambda spans, *a: batched.append(len(spans)) or build(spans, *a))
    shared = random_prompt(48, seed=40)
    run(engine, [*shared, 5])  # index the shared blocks, so some chunks below start after a cached prefix
    prompts = [random_prompt(length, seed=41 + i) for i, length in enumerate([1, 3, 17, 40, 90, 120])]
    prompts += [shared + random_prompt(7, seed=50), shared + random_prompt(30, seed=51)]
    engine.runner.batched_prefill = True
    try:
        hits = engine.cache.pool.hit_blocks
        results = run_many(engine, [(p, GREEDY) for p in prompts])
        assert engine.cache.pool.hit_blocks - hits == 6  # both shared prompts read three blocks from the cache
        assert batched and max(batched) >= 4  # several prompts' chunks were read in one call
    finally:
        engine.runner.batched_prefill = False
    for prompt, tokens in zip(prompts, results, strict=True):
        assert tokens == reference(hf_model, prompt), f"prompt of {len(prompt)} tokens"


def test_batched_prefill_attention_equals_one_call_per_chunk() -> None:
    """attention.prefill_batched against the per-chunk reference, chunks with and without a cached prefix."""
    from qwen_api.engine.native.attention import PrefillSpan, _prefill_span, batch_prefills, prefill_batched

    torch.manual_seed(0)
    block, kv_heads, heads, dim = 4, 2, 6, 8
    k_cache = torch.randn(40, block, kv_heads, dim)
    v_cache = torch.randn_like(k_cache)
    # (chunk tokens, context tokens, blocks): no prefix; 5 cached + 3 new; 1 new after 9 cached
    spans = [(6, 6, [3, 7]), (3, 8, [11, 2, 30]), (1, 10, [5, 6, 9])]
    starts = [2, 8, 11]  # rows in the step's stream (0 and 1 are decodes)
    q = torch.randn(12, heads, dim)
    batch = batch_prefills(
        [(r, n, c, b) for r, (n, c, b) in zip(starts, spans, strict=True)], block, torch.device("cpu")
    )
    together = prefill_batched(q.index_select(0, batch.q_rows), k_cache, v_cache, batch)
    assert batch.q_rows.tolist() == list(range(2, 12))
    row = 0
    for start, (n, ctx, blocks) in zip(starts, spans, strict=True):
        span = PrefillSpan(q_start=start, q_len=n, ctx_len=ctx, blocks=torch.tensor(blocks[: -(-ctx // block)]))
        alone = _prefill_span(q[start : start + n], k_cache, v_cache, span)
        torch.testing.assert_close(together[row : row + n], alone, rtol=1e-5, atol=1e-5)
        row += n


def test_every_token_read_as_a_decode_matches_transformers(
    engine: NativeEngine,
    hf_model,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the CUDA graphs replay (runner.flatten): every token of a step, prompt tokens included, read as a
    decode reads its one token, through its own sequence's blocks up to its position. Run eagerly on the CPU for
    every step: prompts arriving while others decode (steps with both), one after a cached prefix, one long
    enough to span blocks; the tokens are transformers'."""
    runner = engine.runner
    mixed: list[int] = []
    flat = runner.run_flat

    def counted(step, feed=None):  # type: ignore[no-untyped-def]
        if step.decodes and step.prefills:
            mixed.append(len(step.prefills))
        return flat(step, feed)

    monkeypatch.setattr(runner, "run", counted)
    shared = random_prompt(40, seed=60)
    run(engine, [*shared, 9])  # indexes the shared blocks: a prompt below starts after a cached prefix
    prompts = [random_prompt(length, seed=61 + i) for i, length in enumerate([1, 5, 18, 70])]
    prompts.append(shared + random_prompt(6, seed=66))
    params = SamplingParams(max_new_tokens=16, temperature=0.0)

    hits = engine.cache.pool.hit_blocks
    results = run_staggered(engine, [(p, params) for p in prompts], 0.03)
    assert mixed, "no step read prompt tokens beside decodes"
    assert engine.cache.pool.hit_blocks > hits
    for prompt, tokens in zip(prompts, results, strict=True):
        assert tokens == reference(hf_model, prompt), f"prompt of {len(prompt)} tokens"


def graphs_replayed_eagerly(
    monkeypatch: pytest.MonkeyPatch, engine: NativeEngine, max_batch_size: int, triton: bool = False
) -> Any:
    """`CudaGraphs` on the CPU, each captured graph replaced by an eager call of the function it captures, on the
    same static buffers, installed on `engine`'s runner. Attention through the SDPA reference, or with `triton`
    through the Triton kernel the graphs capture (Triton's interpreter on the CPU)."""
    from qwen_api.engine.native import runner as runner_module

    graphs_cls = runner_module.CudaGraphs
    real_meta = graphs_cls._meta

    def cpu_meta(self, size):  # type: ignore[no-untyped-def]
        meta = real_meta(self, size)
        if not triton:  # the SDPA reference path
            meta.use_triton, meta.max_context_len = False, int(self.lens[:size].max())
        return meta

    class Eager:
        def __init__(self, graphs, size: int) -> None:  # type: ignore[no-untyped-def]
            self.graphs, self.size = graphs, size
            self.out = torch.empty(min(size, graphs.max_rows), engine.config.vocab_size)

        def replay(self) -> None:
            self.out.copy_(self.graphs._forward(self.size))

    def capture(self) -> None:  # type: ignore[no-untyped-def]
        for size in self.sizes:
            eager = Eager(self, size)
            self.graphs[size] = (eager, eager.out)

    monkeypatch.setattr(graphs_cls, "_meta", cpu_meta)
    monkeypatch.setattr(graphs_cls, "_capture", capture)
    graphs = graphs_cls(engine.runner, max_batch_size, engine.runner.prefill_kernel)
    monkeypatch.setattr(engine.runner, "graphs", graphs)
    return graphs


def test_graph_replay_fills_its_buffers_right(
    engine: NativeEngine,
    hf_model,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`CudaGraphs.run` on the CPU (`graphs_replayed_eagerly`): the padding to the ladder's sizes, the sampled rows,
    stale buffer contents from larger earlier steps. Prompts arrive while others decode; the 300-token one's step
    is past the ladder (16 + 256 tokens) and runs eagerly. The tokens are transformers'."""
    graphs = graphs_replayed_eagerly(monkeypatch, engine, 16)
    runner = engine.runner
    eager_before = runner.eager_steps
    prompts = [random_prompt(length, seed=70 + i) for i, length in enumerate([2, 30, 300, 11, 6])]
    params = SamplingParams(max_new_tokens=16, temperature=0.0)

    results = run_staggered(engine, [(p, params) for p in prompts], 0.03)
    assert graphs.mixed_replays > 0
    assert runner.eager_steps > eager_before  # the 300-token prompt's step
    for prompt, tokens in zip(prompts, results, strict=True):
        assert tokens == reference(hf_model, prompt), f"prompt of {len(prompt)} tokens"


def test_a_failed_graph_capture_costs_speed_never_the_engine(
    engine: NativeEngine,
    hf_model,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`runner.capture_graphs`: when capturing with the prefill kernel fails, the graphs are captured again without
    it (prompt tokens read as decodes), and they answer transformers' tokens; when that fails too, there are no
    graphs and every step runs eagerly. Each failure is logged, none is raised."""
    from qwen_api.engine.native import runner as runner_module

    graphs_replayed_eagerly(monkeypatch, engine, 16)  # `CudaGraphs` made to run on the CPU; its graphs unused here
    graphs_cls = runner_module.CudaGraphs
    replayed_capture = graphs_cls._capture

    def capture(self) -> None:  # type: ignore[no-untyped-def]
        if self.tiled:
            raise RuntimeError("operation not permitted when stream is capturing")
        replayed_capture(self)

    monkeypatch.setattr(graphs_cls, "_capture", capture)
    monkeypatch.setattr(engine.runner, "prefill_kernel", True)
    graphs = runner_module.capture_graphs(engine.runner, 16)
    assert graphs is not None and not graphs.tiled
    assert "capturing CUDA graphs with the prefill kernel failed" in caplog.text
    monkeypatch.setattr(engine.runner, "prefill_kernel", False)  # the CPU's eager steps read prompts through SDPA
    monkeypatch.setattr(engine.runner, "graphs", graphs)
    prompt = random_prompt(12, seed=90)
    assert run(engine, prompt) == reference(hf_model, prompt)
    assert graphs.replays > 0

    def fail(self) -> None:  # type: ignore[no-untyped-def]
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(graphs_cls, "_capture", fail)
    assert runner_module.capture_graphs(engine.runner, 16) is None
    assert "capturing CUDA graphs without the prefill kernel failed" in caplog.text
    assert "every step runs eagerly" in caplog.text


@pytest.mark.triton_interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_decode_kernel_matches_sdpa_interpreted(dtype: torch.dtype) -> None:
    """The paged decode kernel itself, run by Triton's interpreter on the CPU: grouped-query heads (2 and 7 query
    heads a kv head, padded to 16), contexts of 1 token, one block, a block and one, and long enough that each of
    the 8 splits has blocks, or few enough that some have none; block tables in random order, padded with a
    scratch block, as the graphs pad them."""
    from qwen_api.engine.native.attention import decode_sdpa
    from qwen_api.engine.native.triton_attention import paged_decode

    torch.manual_seed(0)
    blocks, block, dim = 48, 16, 16
    lens = torch.tensor([1, 16, 17, 40, 300], dtype=torch.int32)
    width = 20
    tables = torch.full((len(lens), width), blocks - 1, dtype=torch.int32)  # the last block: scratch
    for row, n in enumerate(lens.tolist()):
        tables[row, : -(-n // block)] = torch.randperm(blocks - 1)[: -(-n // block)].to(torch.int32)
    for heads, kv_heads in ((4, 2), (7, 1)):
        k_cache = torch.randn(blocks, block, kv_heads, dim, dtype=dtype)
        v_cache = torch.randn_like(k_cache)
        q = torch.randn(len(lens), heads, dim, dtype=dtype)
        mine = paged_decode(q, k_cache, v_cache, tables, lens)
        ref = decode_sdpa(q.float(), k_cache.float(), v_cache.float(), tables, lens, int(lens.max()))
        tolerance = 1e-5 if dtype == torch.float32 else 2e-3
        torch.testing.assert_close(mine.float(), ref, atol=tolerance, rtol=tolerance)


def test_prefill_tiles_cut_each_chunk_and_keep_their_columns_aligned() -> None:
    """Tiles of at most block_q tokens, in the stream's order; each column starts on 16 bytes whatever the count
    (Triton compiles a variant per pointer alignment: unaligned columns would each cost a compile mid-serving)."""
    from qwen_api.engine.native.attention import prefill_tiles

    tables = torch.zeros(3, 4, dtype=torch.int32)
    tiles = prefill_tiles([(1, 2, 5, 0), (2, 7, 1, 40)], tables, 2, torch.device("cpu"))
    assert tiles.table_row.tolist() == [1, 1, 1, 2] and tiles.start.tolist() == [2, 4, 6, 7]
    assert tiles.count.tolist() == [2, 2, 1, 1] and tiles.position.tolist() == [0, 2, 4, 40]
    for n in range(1, 10):
        tiles = prefill_tiles([(0, 0, n, 0)], tables, 1, torch.device("cpu"))
        columns = (tiles.table_row, tiles.start, tiles.count, tiles.position)
        assert tiles.tiles == n and all(c.data_ptr() % 16 == 0 and c.is_contiguous() for c in columns)


@pytest.mark.triton_interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_prefill_kernel_matches_sdpa_interpreted(dtype: torch.dtype) -> None:
    """The prefill kernel itself, through Triton's interpreter, against SDPA over each chunk's gathered blocks:
    2 and 7 query heads a kv head (7: tiles of 18 tokens, rows not a power of two), chunks with no cached prefix,
    after one, a single token after 40, chunks of several tiles; block tables in random order, scratch-padded; the
    step's decode rows, before the chunks, are left as they were."""
    from qwen_api.engine.native.attention import PrefillSpan, _prefill_span, prefill_block_q, prefill_tiles
    from qwen_api.engine.native.triton_attention import paged_prefill

    torch.manual_seed(0)
    blocks, block, dim, decodes = 64, 16, 16, 2
    chunks = [(6, 6), (3, 40), (1, 41), (150, 150), (70, 200)]  # (chunk tokens, context tokens)
    width = max(-(-ctx // block) for _, ctx in chunks)
    for heads, kv_heads in ((4, 2), (14, 2)):
        k_cache = torch.randn(blocks + 1, block, kv_heads, dim, dtype=dtype)  # the last block: scratch
        v_cache = torch.randn_like(k_cache)
        q = torch.randn(decodes + sum(n for n, _ in chunks), heads, dim, dtype=dtype)
        order = torch.randperm(blocks).tolist()
        tables, spec, refs, row = [], [], [], decodes
        for i, (n, ctx) in enumerate(chunks):
            own, order = order[: -(-ctx // block)], order[-(-ctx // block) :]
            tables.append(own + [blocks] * (width - len(own)))
            spec.append((i, row, n, ctx - n))
            span = PrefillSpan(q_start=row, q_len=n, ctx_len=ctx, blocks=torch.tensor(own))
            refs.append(_prefill_span(q[row : row + n].float(), k_cache.float(), v_cache.float(), span))
            row += n
        block_q = prefill_block_q(heads // kv_heads)
        tiles = prefill_tiles(spec, torch.tensor(tables, dtype=torch.int32), block_q, torch.device("cpu"))
        assert tiles.tiles == sum(-(-n // block_q) for n, _ in chunks) > len(chunks)
        out = torch.full_like(q, 7.0)
        paged_prefill(q, k_cache, v_cache, tiles, out)
        assert bool((out[:decodes] == 7.0).all())
        tolerance = 1e-5 if dtype == torch.float32 else 2e-3
        torch.testing.assert_close(out[decodes:].float(), torch.cat(refs), atol=tolerance, rtol=tolerance)


# Run without TRITON_INTERPRET (kernels decorated under it are interpreted functions, which do not compile).
_COMPILE_FOR_HOPPER = """
import json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from qwen_api.engine.native import triton_attention as ta

def signature(fn, dtype):
    types = {}
    for i, name in enumerate(fn.arg_names):
        if i in fn.constexprs:
            types[name] = "constexpr"
        elif name.endswith("_ptr"):
            ints = any(word in name for word in ("table", "tile", "lens"))
            types[name] = "*i32" if ints else "*fp32" if name.startswith("part_") else "*" + dtype
        else:
            types[name] = "fp32" if name == "scale" else "i32"
    return types

tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
report = {}
for name, fn, constants in [
    ("prefill-bf16", ta._paged_prefill_kernel, ta.prefill_constants(7, 128, 16, False)),
    ("prefill-fp32", ta._paged_prefill_kernel, ta.prefill_constants(7, 128, 16, True)),
    ("decode-bf16", ta._paged_decode_kernel, ta.decode_constants(7, 128, 16, False)),
]:
    warps = constants.pop("num_warps")
    source = ASTSource(fn=fn, signature=signature(fn, "fp32" if constants["IEEE"] else "bf16"), constexprs=constants)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-resource-usage", cubin.name],
                               capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"([A-Z]+):(\\d+)", usage))
    report[name] = {"registers": int(fields["REG"]), "local": int(fields["LOCAL"]), "shared": kernel.metadata.shared}
print(json.dumps(report))
"""


def test_triton_kernels_compile_for_hopper_without_spills() -> None:
    """What the interpreter cannot show: both kernels go through Triton's real compiler to a cubin for sm_90 (H100,
    H200), with Qwen2-7B's shapes (7 query heads a kv head, 128 dims, bf16; the prefill kernel in fp32 too), no
    GPU needed. The bf16 kernels keep everything in registers (no local memory: no spills) and fit the 228 KiB of
    shared memory a Hopper SM has."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_FOR_HOPPER], env=env, capture_output=True, text=True,
                          timeout=240, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(report) == {"prefill-bf16", "prefill-fp32", "decode-bf16"}
    for name, usage in report.items():
        assert usage["shared"] <= 228 * 1024, (name, usage)
        if name.endswith("bf16"):
            assert usage["local"] == 0 and usage["registers"] <= 255, (name, usage)


@pytest.mark.triton_interpret
def test_prefill_kernel_steps_give_transformers_tokens(
    tiny_qwen2_dir: Path,
    hf_model,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Eager steps as a GPU runs them, on the CPU: decodes in the Triton decode kernel, every prompt chunk in the
    prefill kernel (both through Triton's interpreter), steps overlapped. Prompts arrive while others decode, a
    130-token one is read in chunks of 48, one starts after a cached prefix. The tokens are transformers'."""
    from qwen_api.engine.native import runner as runner_module

    engine = NativeEngine(tiny_qwen2_dir, [EOS], kv_cache_tokens=1024, max_batch_size=4, prefill_chunk=48, overlap=True)
    try:
        assert runner_module._prefill_kernel_works(engine.model)  # the load-time check, on the tiny model's heads
        monkeypatch.setattr(engine.runner, "use_triton", True)
        monkeypatch.setattr(engine.runner, "prefill_kernel", True)
        tiled: list[int] = []
        build = runner_module.prefill_tiles
        monkeypatch.setattr(
            runner_module, "prefill_tiles", lambda chunks, *a: tiled.append(len(chunks)) or build(chunks, *a)
        )
        shared = random_prompt(20, seed=83)
        prompts = [[*shared, 7], random_prompt(130, seed=84), random_prompt(9, seed=85), [*shared, 8, 9]]
        params = SamplingParams(max_new_tokens=5, temperature=0.0)
        results = run_staggered(engine, [(p, params) for p in prompts], 0.05)
        assert len(tiled) >= 4 and engine.cache.pool.hit_blocks > 0
        for prompt, tokens in zip(prompts, results, strict=True):
            assert tokens == reference(hf_model, prompt, 5), f"prompt of {len(prompt)} tokens"
    finally:
        engine.shutdown()


def test_a_prefill_kernel_that_fails_its_check_leaves_sdpa(
    tiny_qwen2_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A kernel that does not compile or computes wrong on this GPU costs speed, never the engine: logged, SDPA."""
    from qwen_api.engine.native import runner as runner_module
    from qwen_api.engine.native import triton_attention

    def broken(*args: Any) -> None:
        raise AssertionError("mismatch")

    monkeypatch.setattr(triton_attention, "check_paged_prefill", broken)
    engine = NativeEngine(tiny_qwen2_dir, [EOS], kv_cache_tokens=1024, max_batch_size=4)
    try:
        assert not runner_module._prefill_kernel_works(engine.model)
        assert "prompt chunks go through SDPA instead" in caplog.text
    finally:
        engine.shutdown()


@pytest.mark.triton_interpret
@pytest.mark.parametrize("tiled", [False, True], ids=["prompt-as-decodes", "prefill-kernel"])
def test_graph_steps_through_the_triton_kernel_give_transformers_tokens(
    tiny_qwen2_dir: Path,
    hf_model,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
    tiled: bool,
) -> None:
    """What a GPU runs, but on the CPU: every step in the CUDA graphs' layout and buffers (`graphs_replayed_eagerly`)
    with attention in the Triton kernels the graphs capture (through Triton's interpreter), steps overlapped as on
    CUDA; prompts arrive while others decode, one starts after a cached prefix. Their prompt tokens are read as
    decodes in the decode kernel, or (`tiled`, the GPU's default) in the prefill kernel's tiles inside the graphs
    past max_batch_size, where no limit on the contexts read applies (MIXED_READS 0 here). The tokens are
    transformers'."""
    from qwen_api.engine.native import runner as runner_module

    engine = NativeEngine(tiny_qwen2_dir, [EOS], kv_cache_tokens=1024, max_batch_size=4, overlap=True)
    try:
        monkeypatch.setattr(engine.runner, "use_triton", True)  # steps past the ladder: decodes in the kernel too
        monkeypatch.setattr(engine.runner, "prefill_kernel", tiled)
        if tiled:
            monkeypatch.setattr(runner_module, "MIXED_READS", 0)
        graphs = graphs_replayed_eagerly(monkeypatch, engine, 4, triton=True)
        assert graphs.tiled == tiled
        replayed: list[int] = []
        monkeypatch.setattr(
            graphs, "_forward", lambda size: replayed.append(size) or type(graphs)._forward(graphs, size)
        )
        shared = random_prompt(20, seed=80)
        prompts = [[*shared, 7], random_prompt(3, seed=81), random_prompt(9, seed=82), [*shared, 8, 9]]
        params = SamplingParams(max_new_tokens=5, temperature=0.0)
        results = run_staggered(engine, [(p, params) for p in prompts], 0.05)
        assert graphs.mixed_replays > 0
        assert engine.cache.pool.hit_blocks > 0
        if tiled:  # steps with prompt tokens replayed the sizes past max_batch_size, which hold the prefill kernel
            assert any(size > 4 for size in replayed) and graphs._meta(20).prefill_tiles is not None
        for prompt, tokens in zip(prompts, results, strict=True):
            assert tokens == reference(hf_model, prompt, 5), f"prompt of {len(prompt)} tokens"
    finally:
        engine.shutdown()


def test_graph_ladder_and_which_steps_a_graph_takes() -> None:
    from qwen_api.engine.native.kv_cache import BlockPool
    from qwen_api.engine.native.runner import MIXED_READS, flatten, graph_sizes, prompt_reads
    from qwen_api.engine.native.scheduler import Scheduler, Sequence

    assert graph_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 128, 192, 320]
    scheduler = Scheduler(BlockPool(64, 4), max_batch_size=8, prefill_budget=512)
    old, new = Sequence(list(range(10, 16)), 6, GREEDY), Sequence(list(range(20, 27)), 7, GREEDY)
    scheduler.add(old)
    scheduler.complete(scheduler.schedule()[0], [99])  # `old` read its 6-token prompt and drew 99
    scheduler.add(new)
    step, _ = scheduler.schedule()
    assert step.decodes == [old] and step.prefills == [(new, 7)]
    assert prompt_reads(step) == 7 * 7 and prompt_reads(step) <= MIXED_READS
    flat = flatten(step, block_size=4, scratch_block=63)
    assert flat.ids == [99, *range(20, 27)] and flat.positions == [6, *range(7)]
    assert flat.lens == [7, *range(1, 8)] and flat.sample_rows == [0, 7]  # the decode, the prompt's last token
    width = max(len(old.blocks), len(new.blocks))
    assert flat.table.shape == (8, width)
    assert flat.table[0].tolist()[: len(old.blocks)] == old.blocks
    assert all(row.tolist()[: len(new.blocks)] == new.blocks for row in flat.table[1:])
    assert flat.slots[1:] == [new.blocks[p // 4] * 4 + p % 4 for p in range(7)]


def test_a_prompt_that_is_scored_is_read_in_bounded_chunks_each_position_once() -> None:
    """A step reads at most `SCORE_CHUNK` tokens of a prompt whose log-probabilities are asked for (each is a row of
    logits over the vocabulary), and `flatten` names each position's row once, in order, the last token's sampled."""
    from qwen_api.engine.native.kv_cache import BlockPool
    from qwen_api.engine.native.runner import flatten
    from qwen_api.engine.native.scheduler import SCORE_CHUNK, Scheduler, Sequence

    scheduler = Scheduler(BlockPool(256, 4), max_batch_size=8, prefill_budget=512)
    scored = Sequence(list(range(600)), 600, dataclasses.replace(GREEDY, prompt_logprobs=1))
    plain = Sequence(list(range(1000, 1300)), 300, GREEDY)
    scheduler.add(scored)
    scheduler.add(plain)
    rows: list[int] = []
    for i in range(3):
        step, _ = scheduler.schedule()
        chunks = {id(seq): n for seq, n in step.prefills}
        assert chunks[id(scored)] <= SCORE_CHUNK
        assert i or chunks[id(plain)] == 512 - SCORE_CHUNK  # the rest of the step's budget goes to the other
        positions = [p for seq, span in step.scoring for p in span]
        flat = flatten(step, block_size=4, scratch_block=255)
        assert [flat.positions[r] for r in flat.score_rows] == positions
        rows += positions
        for seq, span in step.scoring:
            seq.scored = span.stop
        scheduler.advance(step)
    assert rows == list(range(599))  # every position but the last (sampled) once, in order


def test_prefix_cache_hits_and_keeps_tokens(engine: NativeEngine, hf_model) -> None:  # type: ignore[no-untyped-def]
    pool = engine.cache.pool
    shared = random_prompt(64, seed=30)  # four full blocks of 16
    first, second = shared + random_prompt(5, seed=31), shared + random_prompt(9, seed=32)
    assert run(engine, first) == reference(hf_model, first)
    hits = pool.hit_blocks
    assert run(engine, second) == reference(hf_model, second)
    assert pool.hit_blocks - hits == 4  # the shared prefix was read from the cache, not computed again
    # The whole of a finished sequence's prompt is cached too: asking it again reuses every full block but the one
    # holding its last token, whose logits must be computed.
    hits = pool.hit_blocks
    assert run(engine, shared) == reference(hf_model, shared)
    assert pool.hit_blocks - hits == 3


def test_a_requests_samples_share_their_prompts_blocks(engine: NativeEngine, hf_model) -> None:  # type: ignore[no-untyped-def]
    """A request's n samples (sequences started in one tick with one prompt) each computed and held the whole
    prompt: now the first reads it and the others take its full blocks from the prefix cache, keeping the tokens."""
    pool = engine.cache.pool
    prompt = random_prompt(70, seed=81)  # four full blocks of 16, and a tail
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    hits = pool.hit_blocks
    results = run_many(engine, [(prompt, params)] * 3)
    assert pool.hit_blocks - hits == 2 * 4  # each of the two followers took the leader's four blocks
    assert results == [reference(hf_model, prompt, 8)] * 3
    other = random_prompt(70, seed=82)  # different prompts in one tick share nothing, and wait for nothing
    hits = pool.hit_blocks
    assert run_many(engine, [(other, params), ([*other[:69], 5], params)])[0] == reference(hf_model, other, 8)
    assert pool.hit_blocks == hits


# Two 16-token blocks that differ in their first four tokens and whose CPython tuple hashes are equal (found by
# inverting the unkeyed tuple hash, which any client can do; the prefix index once keyed blocks by that hash).
_COLLIDING = [[(v >> (16 * i)) & 0xFFFF for i in range(4)] for v in (8102973175393867537, 17038303644805935641)]
COLLIDING_BLOCKS = [head + list(range(1000, 1012)) for head in _COLLIDING]


def test_the_prefix_index_compares_tokens_not_hashes() -> None:
    from qwen_api.engine.native.kv_cache import BlockPool

    a, b = COLLIDING_BLOCKS
    assert a != b and hash(tuple(a)) == hash(tuple(b)) and hash((None, tuple(a))) == hash((None, tuple(b)))
    pool = BlockPool(2, 16)
    first, second = pool.allocate(), pool.allocate()
    parent = pool.register(first, None, a)
    pool.register(second, parent, a)
    assert pool.match_prefix(a + a + [1]) == [first, second]
    assert pool.match_prefix(b + a + [1]) == []  # b collides with a's block: not a's keys and values
    assert pool.match_prefix(a + b + [1]) == [first]
    # an evicted block's prefix is gone with it, and what was indexed below it can no longer be matched
    pool.release([first, second])
    assert pool.allocate() == second  # released first (a prompt's end before its start), evicted first
    assert pool.match_prefix(a + a + [1]) == [first]
    refill = pool.allocate()
    assert refill == first and pool.match_prefix(a + a + [1]) == []
    pool.register(refill, None, a)  # the same tokens again: a new prefix, found again; nothing below it yet
    assert pool.match_prefix(a + a + [1]) == [refill]


def test_a_prompt_that_collides_with_a_cached_one_gets_its_own_answer(engine: NativeEngine, hf_model) -> None:  # type: ignore[no-untyped-def]
    first, second = (block + random_prompt(3, seed=33) for block in COLLIDING_BLOCKS)
    assert run(engine, first) == reference(hf_model, first)
    assert run(engine, second) == reference(hf_model, second)


def test_chunked_prefill_matches_unchunked(tiny_qwen2_dir: Path, engine: NativeEngine, hf_model) -> None:  # type: ignore[no-untyped-def]
    chunked = NativeEngine(
        tiny_qwen2_dir, [EOS], kv_cache_tokens=4096, max_batch_size=4, prefill_chunk=16, overlap=engine.overlap
    )
    try:
        long_prompt, short_prompt = random_prompt(150, seed=40), random_prompt(8, seed=41)
        expected = reference(hf_model, long_prompt)
        assert run(engine, long_prompt) == expected  # unchunked: 512 tokens a step
        sizes: list[int] = []
        chunked.on_step = sizes.append
        long_tokens, short_tokens = run_many(chunked, [(long_prompt, GREEDY), (short_prompt, GREEDY)])
        assert long_tokens == expected
        assert short_tokens == reference(hf_model, short_prompt)
        # 150 + 8 prompt tokens at 16 a step take at least 10 steps before both decode; both sequences were in
        # (almost) every step: the long prompt did not hold the short one back.
        assert len(sizes) >= 10 + 15 and sizes.count(2) >= 10
    finally:
        chunked.shutdown()


def test_preemption_when_blocks_run_out_keeps_tokens(tiny_qwen2_dir: Path, hf_model, overlap: bool) -> None:  # type: ignore[no-untyped-def]
    small = NativeEngine(tiny_qwen2_dir, [EOS], kv_cache_tokens=256, max_batch_size=8, overlap=overlap)  # 16 blocks
    try:
        params = SamplingParams(max_new_tokens=60, temperature=0.0)
        prompts = [random_prompt(40, seed=50 + i) for i in range(4)]  # 4 x 100 tokens: 28 blocks wanted
        usage: list[float | None] = []
        small.on_step = lambda _: usage.append(small.stats().kv_usage)
        results = run_many(small, [(p, params) for p in prompts])
        stats = small.stats()
        assert stats.preemptions == small.scheduler.preemptions > 0
        assert max(u or 0.0 for u in usage) == 1.0  # preempted because every block was held
        # the prefix-cache counters count prompts once: a preempted sequence finding its own blocks is no hit
        assert stats.prefix_hit_tokens == 0 and stats.prefix_queried_tokens == 4 * (40 // 16) * 16
        for prompt, tokens in zip(prompts, results, strict=True):
            assert tokens == reference(hf_model, prompt, 60)
        wait_idle(small)
        assert small.cache.pool.num_free == small.cache.pool.num_blocks and small.stats().kv_usage == 0.0
        with pytest.raises(EngineError, match="exceed the context"):
            run(small, random_prompt(250, seed=59), SamplingParams(max_new_tokens=10))
    finally:
        small.shutdown()


def test_prompt_logprobs_equal_transformers_chunked_cached_and_preempted(tiny_qwen2_dir: Path, hf_model) -> None:  # type: ignore[no-untyped-def]
    """The prompt's log-probabilities (echo with logprobs): each prompt token's under the tokens before it equals
    transformers' log-softmax of the same prompt, with the same best alternatives, when the prompt is read in chunks
    beside other traffic, when its prefix is in the cache (every position is computed all the same), and when its
    sequence is preempted on a small cache (each position scored once)."""
    prompt = random_prompt(100, seed=77)
    with torch.inference_mode():
        expected = torch.log_softmax(hf_model(torch.tensor([prompt])).logits[0].float(), dim=-1)
    want = SamplingParams(max_new_tokens=40, temperature=0.0, prompt_logprobs=3)

    async def scored(engine: NativeEngine, params: SamplingParams) -> tuple:
        chunks = [c async for c in engine.generate(prompt, params)]
        return chunks[0].prompt_logprobs, [t for c in chunks for t in c.token_ids]

    def check(entries: tuple | None) -> None:
        assert entries is not None and len(entries) == len(prompt) - 1
        for i, entry in enumerate(entries, start=1):
            assert entry.token == prompt[i]
            assert entry.logprob == pytest.approx(float(expected[i - 1, prompt[i]]), abs=1e-4)
            assert [t for t, _ in entry.top] == expected[i - 1].topk(3).indices.tolist()

    for kv_tokens, chunk in ((4096, 48), (256, 512)):  # chunked beside others; a cache that forces preemption
        engine = NativeEngine(tiny_qwen2_dir, [EOS], kv_cache_tokens=kv_tokens, max_batch_size=8, prefill_chunk=chunk)
        try:
            run(engine, prompt, SamplingParams(max_new_tokens=2, temperature=0.0))  # its blocks now in the cache
            others = [
                (random_prompt(60, seed=80 + i), SamplingParams(max_new_tokens=40, temperature=0.0)) for i in range(2)
            ]

            async def together(engine: NativeEngine, others: list) -> list:
                return list(await asyncio.gather(scored(engine, want), *(collect(engine, p, q) for p, q in others)))

            (entries, tokens), *_ = asyncio.run(together(engine, others))
            check(entries)
            assert tokens == reference(hf_model, prompt, 40)
            assert engine.stats().preemptions > 0 or kv_tokens == 4096
        finally:
            engine.shutdown()


def test_overlapped_steps_give_what_steps_in_turn_give(tiny_qwen2_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU launches each step before it reads the previous one's tokens, feeding them on the device. On the
    CPU both ways, staggered arrivals, every control: greedy with log-probabilities; seeded sampling with
    penalties and a bias; a JSON grammar (read in turn: its mask needs the token); one token only; an end token
    forced first (the overlapped engine ran a step for it in vain); top-k with log-probabilities; the end forced
    but held back by min_tokens (counted with the draw still in flight). Tokens and
    finish reasons are the same, log-probabilities too (to rounding)."""
    from transformers import AutoTokenizer

    from qwen_api.engine.native.runner import Feed
    from qwen_api.structured.grammar import GrammarCompiler, json_schema_grammar

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    compiler = GrammarCompiler(AutoTokenizer.from_pretrained(tiny_qwen2_dir), [EOS])
    constraint = asyncio.run(compiler.compile(json_schema_grammar(schema)))
    controls = {"repetition_penalty": 1.3, "frequency_penalty": 0.5, "logit_bias": ((5, 3.0),)}
    jobs = [
        (random_prompt(5, seed=1), SamplingParams(max_new_tokens=20, temperature=0.0, logprobs=2)),
        (random_prompt(30, seed=2), SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.9, seed=7, **controls)),
        (random_prompt(3, seed=3), SamplingParams(max_new_tokens=25, temperature=0.8, seed=11, constraint=constraint)),
        (random_prompt(60, seed=4), SamplingParams(max_new_tokens=1, temperature=0.0)),
        (random_prompt(4, seed=5), SamplingParams(max_new_tokens=10, temperature=0.0, logit_bias=((EOS, 100.0),))),
        (random_prompt(9, seed=6), SamplingParams(max_new_tokens=18, temperature=0.7, top_k=20, seed=3, logprobs=0)),
        (random_prompt(7, seed=7), SamplingParams(10, temperature=0.0, logit_bias=((EOS, 100.0),), min_tokens=6)),
    ]
    fed: list[int] = []
    fill = Feed.fill

    def counted(self, ids, decodes):  # type: ignore[no-untyped-def]
        fed.append(sum(seq.tokens[seq.computed] == -1 for seq in decodes))
        fill(self, ids, decodes)

    monkeypatch.setattr(Feed, "fill", counted)

    async def everything(engine: NativeEngine, prompt: list[int], params: SamplingParams) -> tuple:
        chunks = [chunk async for chunk in engine.generate(prompt, params)]
        tokens = [t for c in chunks for t in c.token_ids]
        return tokens, chunks[-1].finish_reason, [lp for c in chunks for lp in (c.logprobs or ())]

    outputs = []
    for overlap in (False, True):
        engine = NativeEngine(tiny_qwen2_dir, [EOS], kv_cache_tokens=4096, max_batch_size=8, overlap=overlap)
        try:
            outputs.append(run_staggered(engine, jobs, 0.02, everything))
        finally:
            engine.shutdown()
        assert (sum(fed) > 0) == overlap  # the overlapped engine fed decodes from the device
    # Arrivals meet the steps at other points from run to run, so batches differ: fp32 rounding moves with the
    # batch's shape (as beside other traffic), so log-probabilities are compared to 1e-4.
    for (tokens, reason, logprobs), (tokens2, reason2, logprobs2) in zip(*outputs, strict=True):
        assert (tokens, reason) == (tokens2, reason2)
        assert [(lp.token, [t for t, _ in lp.top]) for lp in logprobs] == [
            (lp.token, [t for t, _ in lp.top]) for lp in logprobs2
        ]
        values = [v for lp in logprobs for v in (lp.logprob, *(v for _, v in lp.top))]
        assert values == pytest.approx([v for lp in logprobs2 for v in (lp.logprob, *(v for _, v in lp.top))], abs=1e-4)
    assert [reason for _, reason, _ in outputs[1]][3:5] == ["length", "stop"]
    assert outputs[1][4][0] == [EOS] and len(outputs[1][0][2]) == len(outputs[1][0][0])
    held = outputs[1][6][0]  # min_tokens: the end forced at every step comes once the sequence has 6 tokens
    assert len(held) == 7 and held[-1] == EOS and EOS not in held[:-1] and outputs[1][6][1] == "stop"


def test_overlapped_steps_under_preemption_and_closed_streams(tiny_qwen2_dir: Path) -> None:
    """A tight cache (32 blocks for 8 sequences of up to 200 tokens: preemption, also of sequences whose token is
    still in flight), a third of the streams closed after three tokens, the rest to the end: every stream that
    was not closed ends with its reason and no more tokens than it asked for, and every block comes back."""
    import random

    engine = NativeEngine(tiny_qwen2_dir, [EOS], kv_cache_tokens=512, max_batch_size=8, overlap=True)
    rng = random.Random(0)

    async def one(i: int) -> tuple[bool, int, str | None, int]:
        await asyncio.sleep(rng.random())
        params = SamplingParams(
            max_new_tokens=rng.randint(1, 80),
            temperature=rng.choice([0.0, 0.8]),
            seed=i,
            logprobs=rng.choice([None, 1]),
            repetition_penalty=rng.choice([1.0, 1.2]),
        )
        closes, count, reason = rng.random() < 0.3, 0, None
        async with aclosing(engine.generate(random_prompt(rng.randint(1, 120), seed=i), params)) as chunks:
            async for chunk in chunks:
                count, reason = count + len(chunk.token_ids), chunk.finish_reason
                if closes and count >= 3:
                    break
        return closes, count, reason, params.max_new_tokens

    async def main() -> list[tuple[bool, int, str | None, int]]:
        return list(await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(60))), 240))

    try:
        results = asyncio.run(main())
        assert engine.scheduler.preemptions > 0
        for closes, count, reason, asked in results:
            if not closes:
                assert reason in ("stop", "length") and count <= asked
                assert reason == "stop" or count == asked
        wait_idle(engine)
        assert engine.cache.pool.num_free == engine.cache.pool.num_blocks
    finally:
        engine.shutdown()


def test_a_sequence_preempted_with_a_token_in_flight_waits_for_it() -> None:
    """Scheduler bookkeeping of overlapped steps: a sequence preempted while its drawn token is still unread
    (a `PENDING` place), with blocks free again in the same schedule (as when one schedule preempts several
    sequences): it waits until the token is read, then comes back with it."""
    from qwen_api.engine.native.kv_cache import BlockPool
    from qwen_api.engine.native.scheduler import PENDING, Scheduler, Sequence

    scheduler = Scheduler(BlockPool(16, 4), max_batch_size=4, prefill_budget=64)
    b = Sequence(list(range(20, 24)), 4, GREEDY)
    scheduler.add(b)
    scheduler.complete(scheduler.schedule()[0], [200])  # read its prompt, drew 200
    step, _ = scheduler.schedule()
    assert step.decodes == [b]
    in_flight = scheduler.advance(step)  # launched, its token not read yet
    scheduler._preempt(b)  # as `_grow` does when a decode finds no free block
    step, _ = scheduler.schedule()
    assert not step and list(scheduler.waiting) == [b] and b.tokens[-1] == PENDING  # blocks are free, yet it waits
    scheduler.resolve(in_flight, [201])
    assert b.tokens == [20, 21, 22, 23, 200, 201]
    step, _ = scheduler.schedule()
    assert step.prefills == [(b, 2)]  # its cached first block, then 200 and 201 read again


def test_prompt_batching_holds_new_prompts_while_others_decode_then_reads_them_together() -> None:
    from qwen_api.engine.native.kv_cache import BlockPool
    from qwen_api.engine.native.scheduler import Scheduler, Sequence

    now = [0.0]
    scheduler = Scheduler(
        BlockPool(64, 16), max_batch_size=8, prefill_budget=512, prefill_delay=2.0, clock=lambda: now[0]
    )
    first = Sequence([1, 2, 3], 3, GREEDY)
    scheduler.add(first)
    step, _ = scheduler.schedule()
    assert step.prefills == [(first, 3)]  # an idle engine reads a prompt at once
    scheduler.complete(step, [7])
    scheduler.prompt_step_s = 0.020  # the engine measured that prompt step: 20 ms
    late = [Sequence([4, 5], 2, GREEDY), Sequence([6], 1, GREEDY)]
    scheduler.add(late[0])
    now[0] = 0.030
    scheduler.add(late[1])
    step, _ = scheduler.schedule()  # 30 ms < 2 x 20 ms: the new prompts wait while `first` decodes
    assert step.decodes == [first] and not step.prefills and scheduler.held_steps == 1
    scheduler.complete(step, [8])
    now[0] = 0.041  # the oldest has waited 41 ms: both are read in one step, beside the decode
    step, _ = scheduler.schedule()
    assert step.decodes == [first] and step.prefills == [(late[0], 2), (late[1], 1)]
    off = Scheduler(BlockPool(64, 16), max_batch_size=8, prefill_budget=512, clock=lambda: now[0])
    off.prompt_step_s = 1.0
    off.add(Sequence([1], 1, GREEDY))
    off.complete(off.schedule()[0], [2])
    off.add(Sequence([3], 1, GREEDY))
    assert not off.holding() and len(off.schedule()[0].prefills) == 1  # delay 0: read at the next step


def test_prompt_batching_keeps_the_tokens(tiny_qwen2_dir: Path, engine: NativeEngine) -> None:
    batching = NativeEngine(tiny_qwen2_dir, [EOS], kv_cache_tokens=8192, max_batch_size=16, prefill_delay=50.0)
    try:
        params = SamplingParams(max_new_tokens=24, temperature=0.0)
        jobs = [(random_prompt(9 + i, seed=90 + i), params) for i in range(4)]
        held = run_staggered(batching, jobs, 0.05)
        assert batching.scheduler.prompt_step_s > 0  # the engine measured its prompt steps
        assert batching.scheduler.held_steps > 0  # and held later prompts back while the first ones decoded
        assert held == run_staggered(engine, jobs, 0.05)
    finally:
        batching.shutdown()


def test_seed_reproduces_beside_other_traffic(engine: NativeEngine) -> None:
    prompt = random_prompt(12, seed=60)
    seeded = SamplingParams(max_new_tokens=16, temperature=0.9, top_p=0.95, top_k=100, seed=1234)
    alone = run(engine, prompt, seeded)
    others = [(random_prompt(5 + i, seed=61 + i), SAMPLED) for i in range(5)]
    together = run_many(engine, [*others[:3], (prompt, seeded), *others[3:]])[3]
    assert together == alone
    other_seed = run(
        engine, prompt, SamplingParams(max_new_tokens=16, temperature=0.9, top_p=0.95, top_k=100, seed=4321)
    )
    assert other_seed != alone


def test_sequences_started_in_one_event_loop_tick_share_their_first_step(engine: NativeEngine) -> None:
    """A request's n samples start in one tick of the event loop; they reach the worker together, so they share
    their steps the same way every time (in 16-bit the logits depend on the batch's shape: README, `seed`). With
    the interpreter switching threads as often as it can, the worker would otherwise take the first alone."""
    import sys

    wait_idle(engine)
    firsts: list[int] = []
    engine.on_step = firsts.append
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for seed in range(5):
            firsts.clear()
            prompt = random_prompt(9, seed=80 + seed)
            run_many(engine, [(prompt, dataclasses.replace(SAMPLED, seed=seed * 10 + i)) for i in range(4)])
            assert firsts[0] == 4, firsts
    finally:
        sys.setswitchinterval(before)
        engine.on_step = None


def test_bad_input_fails_only_its_sequence(engine: NativeEngine, hf_model) -> None:  # type: ignore[no-untyped-def]
    good = random_prompt(9, seed=70)

    async def main() -> tuple[list[int], list[BaseException | list[int]]]:
        task = asyncio.create_task(collect(engine, good, GREEDY))
        bad = await asyncio.gather(
            collect(engine, [], GREEDY),
            collect(engine, [1, 2, 152064], GREEDY),
            collect(engine, [-1], GREEDY),
            collect(engine, good, SamplingParams(max_new_tokens=engine.max_context_tokens)),
            return_exceptions=True,
        )
        return await task, bad

    tokens, bad = asyncio.run(main())
    assert tokens == reference(hf_model, good)
    assert [type(b) for b in bad] == [EngineError] * 4
    assert "empty" in str(bad[0]) and "vocabulary" in str(bad[1]) and "context" in str(bad[3])
    assert engine.is_healthy()


def test_closing_a_stream_frees_its_blocks(engine: NativeEngine) -> None:
    wait_idle(engine)
    pool = engine.cache.pool
    assert pool.num_free == pool.num_blocks  # idle: every block is free (cached ones are evictable)

    async def main() -> int:
        stream = engine.generate(random_prompt(40, seed=80), SamplingParams(max_new_tokens=500, temperature=0.0))
        for _ in range(3):
            await anext(stream)
        held = pool.num_blocks - pool.num_free
        await stream.aclose()
        return held

    assert asyncio.run(main()) >= 3
    wait_idle(engine)
    assert pool.num_free == pool.num_blocks
    assert engine.stats().running == 0
    # The stream's event loop closed while the worker still stepped it: its outputs are dropped, the worker lives.
    assert engine.is_healthy()


def test_sampler_filters_like_transformers_and_survives_nan() -> None:
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    scores = torch.randn(4, 1000) * 3
    for k, p in [(50, 0.9), (0, 0.5), (10, 1.0), (1, 0.3)]:
        mine = filter_top_k_top_p(scores, [k] * 4, [p] * 4)
        theirs = TopKLogitsWarper(k)(None, scores) if k else scores
        theirs = TopPLogitsWarper(p)(None, theirs) if p < 1 else theirs
        assert torch.equal(torch.isinf(mine), torch.isinf(theirs)), (k, p)
    logits = torch.randn(3, 1000)
    logits[1] = float("nan")
    rows = [Row(GREEDY, 0), Row(SAMPLED, 0), Row(SamplingParams(4, temperature=0.7, seed=5), 3)]
    tokens = sample(logits, rows)
    assert tokens[0] == logits[0].argmax() and all(0 <= t < 1000 for t in tokens.tolist())
    assert sample(logits, rows)[2] == tokens[2]  # a seeded row draws the same token again


def test_a_seeded_draw_among_candidates_is_the_draw_over_the_vocabulary() -> None:
    """With a top-k on every row the sampler draws among each row's k best tokens; a seeded row's noise is hashed
    per token id, so it picks what the draw over the whole vocabulary (taken when any row lacks a top-k) picks."""
    torch.manual_seed(0)
    logits = torch.randn(4, 5000) * 2
    params = [SamplingParams(8, temperature=0.9, top_k=k, top_p=p, min_p=m, seed=s)
              for k, p, m, s in [(20, 1.0, 0.0, 1), (50, 0.9, 0.0, 2), (5, 1.0, 0.05, 3), (200, 0.7, 0.02, 4)]]  # fmt: skip
    no_top_k = Row(SamplingParams(8, temperature=0.9, seed=9), 0)
    for step in range(20):
        rows = [Row(p, step) for p in params]
        among_candidates = sample(logits, rows)
        over_vocabulary = sample(torch.cat([logits, logits[:1]]), [*rows, no_top_k])[:4]
        assert torch.equal(among_candidates, over_vocabulary), step


def test_server_on_the_native_engine(tiny_qwen2_dir: Path) -> None:
    with serve_in_process(tiny_qwen2_dir, engine="native", dtype="float32") as server:
        assert type(server.runtime.generator().engine).__name__ == "NativeEngine"
        url = server.base_url
        r = httpx.post(f"{url}/generate", json={"prompt": "Hello", "max_length": 8, "temperature": 0}, timeout=60)
        assert r.status_code == 200, r.text
        assert len(r.json()["generated_texts"]) == 1
        chat = {"model": "x", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "temperature": 0}
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        r = httpx.post(f"{url}/v1/chat/completions", json={**chat, "model": model}, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["usage"]["completion_tokens"] == 6 and body["choices"][0]["finish_reason"] == "length"
        with httpx.stream(
            "POST", f"{url}/v1/chat/completions", json={**chat, "model": model, "stream": True}, timeout=60
        ) as stream:
            events = [line for line in stream.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and len(events) >= 3
        streamed = "".join(
            c["choices"][0]["delta"].get("content") or ""
            for c in (httpx.Response(200, content=e[6:]).json() for e in events[:-1])
            if c["choices"]
        )
        assert streamed == body["choices"][0]["message"]["content"]  # greedy: the same text both ways
        # the KV cache in /metrics: the same chat twice, so its prompt's full block was found cached the second time
        wait_idle(server.runtime.generator().engine)
        metrics = {
            line.split()[0]: float(line.split()[1])
            for line in httpx.get(f"{url}/metrics").text.splitlines()
            if line.startswith("qwen_api_") and " " in line
        }
        assert metrics["qwen_api_kv_cache_usage_ratio"] == 0.0  # idle: the blocks left are cached, and free
        assert metrics["qwen_api_prefix_cache_hit_tokens_total"] >= 16
        assert metrics["qwen_api_prefix_cache_queried_tokens_total"] > metrics["qwen_api_prefix_cache_hit_tokens_total"]
        assert metrics["qwen_api_preemptions_total"] == 0.0
        # the same load under vLLM's names, for the tools built around vLLM (an inference gateway, an autoscaler)
        text = httpx.get(f"{url}/metrics").text
        for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "gpu_cache_usage_perc"):
            assert f'vllm:{name}{{model_name="{model}"}} 0.0' in text, name
        generated = metrics["qwen_api_generation_tokens_total"]
        assert f'vllm:generation_tokens_total{{model_name="{model}"}} {generated}' in text and generated >= 12


def test_auto_picks_native_for_qwen2_and_llama_on_cuda_only(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    import json

    from qwen_api.engine.loading import ModelSource
    from qwen_api.runtime import choose_engine

    tiny = ModelSource("tiny", tiny_qwen2_dir)
    assert choose_engine("auto", tiny, "cuda") == "native"
    assert choose_engine("auto", tiny, "cuda:1") == "native"
    assert choose_engine("auto", tiny, "cpu") == "transformers"  # on the CPU auto stays as it was
    assert choose_engine("auto", ModelSource("g", tmp_path, gguf_file="m.gguf"), "cuda") == "transformers"
    scaled = json.loads((tiny_qwen2_dir / "config.json").read_text())
    for name, change in [("mixtral", {"model_type": "mixtral"}), ("scaled", {"rope_scaling": {"rope_type": "yarn"}})]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({**scaled, **change}))
        assert choose_engine("auto", ModelSource(name, tmp_path / name), "cuda") == "transformers", name
    assert choose_engine("native", tiny, "cpu") == "native"


def test_llama_with_tied_embeddings_matches_transformers(tmp_path: Path) -> None:
    """The Llama family through the same code: no q/k/v biases, and an lm_head tied to the embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, rope_theta=10000.0,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    hf = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    llama = NativeEngine(tmp_path, [2], kv_cache_tokens=1024, max_batch_size=4)
    try:
        assert llama.model.lm_head is None and llama.max_context_tokens == 256
        prompts = [[int(t) % 512 for t in random_prompt(n, seed=110 + n)] for n in (3, 20)]
        results = run_many(llama, [(p, GREEDY) for p in prompts])
        for prompt, tokens in zip(prompts, results, strict=True):
            ids = torch.tensor([prompt])
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                              eos_token_id=2, pad_token_id=0)[0, len(prompt):].tolist()  # fmt: skip
            assert tokens == ref
    finally:
        llama.shutdown()


def test_fused_elementwise_steps_trace_whole_and_compute_the_same(tiny_qwen2_dir: Path) -> None:
    """The functions the GPU fuses with torch.compile (engine/native/pointwise.py) trace without a graph break
    (fullgraph) at the shapes the engine warms, and compute what the eager ones do. Dynamo with its eager backend:
    the tracing is what is tested here; inductor's kernels are tested on a GPU (`-m gpu`)."""
    from qwen_api.engine.native.config import load_config
    from qwen_api.engine.native.model import CausalLM
    from qwen_api.engine.native.pointwise import Pointwise
    from qwen_api.engine.native.weights import load_weights

    model = CausalLM(load_config(tiny_qwen2_dir), torch.device("cpu"), torch.float32)
    load_weights(model, tiny_qwen2_dir)
    traced, eager = Pointwise(fused=True, backend="eager"), Pointwise()
    traced.warm(model)
    torch.manual_seed(0)
    x, r, w = torch.randn(5, 64), torch.randn(5, 64), torch.randn(64)
    q, k, cos, sin = torch.randn(5, 4, 16), torch.randn(5, 2, 16), torch.randn(5, 16), torch.randn(5, 16)
    parts = torch.randn(2, 4, 8, 16), torch.randn(2, 4, 8), torch.rand(2, 4, 8)
    for name, args in [("rms_norm", (x, w, 1e-6)), ("add_rms_norm", (x, r, w, 1e-6)), ("rotary_qk", (q, k, cos, sin)),
                       ("silu_mul", (torch.randn(5, 32),)), ("merge_splits", (*parts, torch.float32))]:  # fmt: skip
        torch.testing.assert_close(getattr(traced, name)(*args), getattr(eager, name)(*args), rtol=0, atol=0)
    assert not Pointwise.wanted(torch.device("cpu"), torch.bfloat16)
    assert not Pointwise.wanted(torch.device("cuda"), torch.float32)
    assert Pointwise.wanted(torch.device("cuda"), torch.bfloat16)


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
def test_gpu_fp32_greedy_matches_transformers(tiny_qwen2_dir: Path) -> None:
    """The CPU tests' exact check, on CUDA in fp32 (Triton decode kernel, CUDA graphs, prefix cache)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32).to("cuda").eval()
    gpu = NativeEngine(tiny_qwen2_dir, [EOS], device="cuda", dtype=torch.float32, max_batch_size=16)
    try:
        assert gpu.runner.use_triton and gpu.runner.graphs is not None and gpu.runner.prefill_kernel
        prompts = [random_prompt(length, seed=90 + i) for i, length in enumerate([1, 7, 33, 100, 300])]
        results = run_many(gpu, [*((p, GREEDY) for p in prompts), *((p, SAMPLED) for p in prompts[:3])])
        for prompt, tokens in zip(prompts, results, strict=False):
            assert tokens == reference(hf, prompt)
        hits = gpu.cache.pool.hit_blocks
        assert run(gpu, prompts[4]) == results[4]
        assert gpu.cache.pool.hit_blocks > hits
    finally:
        gpu.shutdown()


@pytest.mark.gpu
def test_gpu_bf16_greedy_against_transformers(tiny_qwen2_dir: Path) -> None:
    """bf16 on CUDA: rounding differs between our kernels and transformers' (fused q/k/v and gate/up products,
    paged attention, graph batch padding), and on this random tiny model the best two logits are often within
    bf16's rounding of each other, so a greedy text may take the other branch of a near-tie and then diverge.
    What must hold is teacher-forced: fed our tokens, transformers' own bf16 logits rate every token we chose
    within 0.05 of their maximum (the logits here span about +-1). The first divergence is printed."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.bfloat16).to("cuda").eval()
    gpu = NativeEngine(tiny_qwen2_dir, [EOS], device="cuda", dtype=torch.bfloat16, max_batch_size=16)
    try:
        assert gpu.model.ops.fused  # bf16 on CUDA runs the torch.compile'd elementwise steps, not a fallback
        assert gpu.runner.prefill_kernel  # and the Triton prefill kernel passed its check
        prompts = [random_prompt(length, seed=90 + i) for i, length in enumerate([1, 7, 33, 100, 300])]
        results = run_many(gpu, [(p, GREEDY) for p in prompts])
        for prompt, tokens in zip(prompts, results, strict=True):
            agree = common_prefix_len(tokens, reference(hf, prompt))
            print(f"{len(prompt)}-token prompt: agrees with generate for {agree}")
            with torch.no_grad():
                logits = hf(torch.tensor([prompt + tokens], device="cuda")).logits[0].float()
            rows = logits[len(prompt) - 1 : len(prompt) - 1 + len(tokens)]  # the logits each choice was made from
            chosen = rows.gather(-1, torch.tensor(tokens, device="cuda")[:, None])[:, 0]
            assert float((rows.max(dim=-1).values - chosen).max()) <= 0.05
    finally:
        gpu.shutdown()


@pytest.mark.gpu
def test_gpu_prompt_logprobs_and_min_tokens_beside_traffic(tiny_qwen2_dir: Path) -> None:
    """Prompt scoring on CUDA in fp32, steps overlapped: a 600-token prompt read 256 tokens a step (eager) beside
    decodes that replay graphs; each prompt token's log-probability and rank are transformers' log-softmax's, a
    sequence whose end token is forced is held back by min_tokens, and allowed ids and bad words hold."""
    check_prompt_logprobs_beside_traffic(tiny_qwen2_dir, "cuda")


def test_prompt_logprobs_of_a_long_prompt_beside_traffic(tiny_qwen2_dir: Path) -> None:
    """The GPU test's check, on the CPU (eager steps, no overlap): the same 256-token chunks and the same rows."""
    check_prompt_logprobs_beside_traffic(tiny_qwen2_dir, "cpu")


def check_prompt_logprobs_beside_traffic(tiny_qwen2_dir: Path, device: str) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32).to(device).eval()
    engine = NativeEngine(tiny_qwen2_dir, [EOS], device=device, dtype=torch.float32, max_batch_size=16)
    try:
        prompt = random_prompt(600, seed=99)
        with torch.no_grad():
            expected = torch.log_softmax(hf(torch.tensor([prompt], device=device)).logits[0].float(), dim=-1).cpu()
        want = SamplingParams(max_new_tokens=8, temperature=0.0, prompt_logprobs=2)
        held = SamplingParams(max_new_tokens=10, temperature=0.0, logit_bias=((EOS, 100.0),), min_tokens=6)
        allowed = SamplingParams(max_new_tokens=6, temperature=1.0, seed=3, allowed_ids=(11, 12, 13))
        greedy = SamplingParams(max_new_tokens=6, temperature=0.0)
        plain = asyncio.run(collect(engine, random_prompt(25, seed=6), greedy))
        bad = BadWords(tuple((t,) for t in sorted(set(plain))))  # every token of the plain greedy answer, banned
        banned = dataclasses.replace(greedy, constraint=bad)

        async def scored() -> Any:
            chunks = [c async for c in engine.generate(prompt, want)]  # the first carries the prompt's
            return chunks[0].prompt_logprobs

        async def main() -> list[Any]:
            others = [collect(engine, random_prompt(30, seed=i), SAMPLED) for i in range(4)]
            controlled = [collect(engine, random_prompt(25, seed=6), p) for p in (allowed, banned)]
            held_one = collect(engine, random_prompt(20, seed=5), held)
            return list(await asyncio.gather(scored(), held_one, *controlled, *others))

        entries, held_tokens, allowed_tokens, banned_tokens, *_ = asyncio.run(main())
        assert entries is not None and len(entries) == len(prompt) - 1
        for i, entry in enumerate(entries, start=1):
            assert entry.logprob == pytest.approx(float(expected[i - 1, prompt[i]]), abs=1e-3), i
            row = expected[i - 1, : engine.decodable]  # its rank among the decodable ids, ties within 1e-4 either way
            lowest, highest = int((row > entry.logprob + 1e-4).sum()) + 1, int((row >= entry.logprob - 1e-4).sum())
            assert lowest <= entry.rank <= highest, (i, entry.rank, lowest, highest)
        assert len(held_tokens) == 7 and held_tokens[-1] == EOS and EOS not in held_tokens[:-1]
        assert len(allowed_tokens) == 6 and set(allowed_tokens) <= {11, 12, 13}
        assert len(banned_tokens) == 6 and not set(banned_tokens) & set(plain)
    finally:
        engine.shutdown()


@pytest.mark.gpu
def test_gpu_triton_decode_matches_sdpa() -> None:
    from qwen_api.engine.native.attention import decode_sdpa
    from qwen_api.engine.native.triton_attention import paged_decode

    torch.manual_seed(0)
    blocks, block, kv_heads, heads, dim = 256, 16, 4, 28, 128
    k_cache = torch.randn(blocks, block, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    lens = torch.tensor([1, 15, 16, 17, 200, 513], device="cuda", dtype=torch.int32)
    tables = torch.randperm(blocks, device="cuda")[: 6 * 33].view(6, 33).to(torch.int32)
    q = torch.randn(6, heads, dim, device="cuda", dtype=torch.bfloat16)
    mine = paged_decode(q, k_cache, v_cache, tables, lens)
    ref = decode_sdpa(q.float(), k_cache.float(), v_cache.float(), tables, lens, int(lens.max()))
    torch.testing.assert_close(mine.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_triton_prefill_matches_sdpa(dtype: torch.dtype) -> None:
    """The prefill kernel compiled for Qwen2-7B's heads (28 query heads on 4 kv heads, 128 dims), against SDPA."""
    from qwen_api.engine.native.triton_attention import check_paged_prefill

    check_paged_prefill(28, 4, 128, dtype, torch.device("cuda"))


def test_step_inputs_are_staged_as_asked_on_the_cpu() -> None:
    """Off CUDA, `staged` is the host tensor itself (no page-locking there), with the dtype asked for."""
    from qwen_api.engine.sampler import staged, to_device

    cpu = torch.device("cpu")
    assert staged([1, 2], cpu, torch.int32).dtype == torch.int32
    host = torch.arange(4, dtype=torch.int32)
    assert staged(host, cpu) is host
    assert (
        staged(host, cpu, torch.int64).tolist() == [0, 1, 2, 3] and staged(host, cpu, torch.int64).dtype == torch.int64
    )
    assert to_device([3, 4], cpu, torch.int64).tolist() == [3, 4]


@pytest.mark.gpu
def test_gpu_step_inputs_reach_the_device_without_the_host_waiting() -> None:
    """A step's inputs are copied from pinned memory, so the host does not wait for the work queued before the copy
    (the step in flight, when steps overlap): here a device sleep of 10^9 clock cycles (0.5 s at 2 GHz). From
    pageable memory CUDA may make such a copy synchronous with the host."""
    import time

    from qwen_api.engine.sampler import staged, to_device

    cuda = torch.device("cuda")
    assert staged([1, 2, 3], cuda, torch.int64).is_pinned()
    assert staged(torch.arange(3), cuda).is_pinned()

    def queue() -> tuple[list[torch.Tensor], torch.Tensor]:
        copies = [to_device(list(range(i, i + 64)), cuda, torch.int64) for i in range(8)]
        table = torch.full((4, 8), 7, dtype=torch.int32, device=cuda)
        table[:2, :3].copy_(staged(torch.ones(2, 3, dtype=torch.int32), cuda), non_blocking=True)  # strided, as graphs
        return copies, table

    queue()  # the pinned-memory cache's first allocations of these sizes, before the device is kept busy
    torch.cuda.synchronize()
    start = time.perf_counter()
    torch.cuda._sleep(1_000_000_000)
    copies, table = queue()
    queued = time.perf_counter() - start
    torch.cuda.synchronize()
    slept = time.perf_counter() - start
    assert slept > 0.25, f"the device slept only {slept:.3f} s: too short to tell"
    assert queued < 0.1, f"queuing the copies took {queued:.3f} s of the device's {slept:.3f} s: the host waited"
    assert [c.tolist() for c in copies] == [list(range(i, i + 64)) for i in range(8)]
    assert table[:2, :3].eq(1).all() and table[2:].eq(7).all() and table[:, 3:].eq(7).all()


@pytest.mark.gpu
def test_gpu_cuda_graph_replay_matches_eager(tiny_qwen2_dir: Path) -> None:
    """fp32 on CUDA so that graph padding (5 rows run as 8) cannot flip a bf16 near-tie. Prompts arrive while
    others decode: steps with prompt tokens replay graphs too, except the 300-token prompt's (past the ladder).
    Graphs with overlapped steps (the CUDA default) against eager steps read in turn."""
    prompts = [random_prompt(length, seed=100 + i) for i, length in enumerate([3, 9, 27, 60, 130, 300])]
    params = SamplingParams(max_new_tokens=24, temperature=0.0)
    outputs = []
    for graphs in (True, False):
        gpu = NativeEngine(
            tiny_qwen2_dir,
            [EOS],
            device="cuda",
            dtype=torch.float32,
            max_batch_size=8,
            use_cuda_graphs=graphs,
            overlap=graphs,
        )
        try:
            assert (gpu.runner.graphs is not None) == graphs
            outputs.append(run_staggered(gpu, [(p, params) for p in prompts], 0.02))
            if gpu.runner.graphs is not None:
                assert gpu.runner.graphs.mixed_replays > 0  # steps with prompt tokens ran in graphs
                assert gpu.runner.eager_steps > 0  # and the long prompt's step did not
        finally:
            gpu.shutdown()
    assert outputs[0] == outputs[1]
