"""Paged attention as Triton kernels: each query token reads only its own sequence's blocks, through its table.

- `paged_decode`, one query token per sequence: flash-decoding over the block table, split along the context:
  program (b, kv_head, split) walks its share of row b's blocks with an online softmax, for all query heads of
  that kv head at once (grouped-query attention: the group is one small matrix product per block), and writes a
  partial (max, sum, weighted values); `pointwise.merge_splits` then merges the splits. Splitting keeps the GPU
  busy when the batch is small (at batch 1 there are only kv_heads rows of work otherwise). Everything the kernel
  reads is on the device (block tables, context lengths), and shapes depend only on the batch size, so a CUDA
  graph can capture it.
- `paged_prefill`, the prompt chunks of a step: each chunk is cut into tiles of up to `BLOCK_Q` consecutive
  query tokens (`prefill_tiles`); program (tile, kv_head) holds the tile's queries for every query head of that
  kv head as one [tokens x heads, head_dim] matrix and streams the sequence's keys and values block by block from
  the cache (flash attention: online softmax, fp32 accumulators), up to the tile's last query, causal within the
  chunk, the cached prefix included. One launch a layer for every chunk of the step, nothing gathered or
  repeated per query head, no mask in memory: what SDPA over gathered blocks cost the prompt steps on a GPU.

Imported only on CUDA where Triton is installed (and by the tests, through Triton's interpreter on the CPU);
`attention.decode_sdpa` and `attention._prefill_span` are the references they are tested against.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from qwen_api.engine.native.attention import PrefillSpan, PrefillTiles, _prefill_span, prefill_block_q, prefill_tiles
from qwen_api.engine.native.pointwise import merge_splits

SPLITS = 8  # context splits per (row, kv head); partials merged in torch


@triton.jit
def _scores(q, k, scale, IEEE: tl.constexpr):
    """q [R, D] against k [N, D]: scaled scores [R, N] in fp32 (exact fp32 products for fp32 caches, not TF32: the
    fp32 tests compare tokens exactly)."""
    if IEEE:  # noqa: SIM108 (a constexpr branch, resolved when Triton compiles; one return, kept plain for its parser)
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    return s * scale


@triton.jit
def _online_softmax(s, v, m, s_sum, acc, IEEE: tl.constexpr):
    """Fold one block of scores s [R, N] (-inf where masked; at least one finite score a row once m is) and its
    values v [N, D] into the running max m [R], softmax denominator s_sum [R] and weighted values acc [R, D]."""
    m_new = tl.maximum(m, tl.max(s, 1))
    alpha = tl.exp(m - m_new)
    p = tl.exp(s - m_new[:, None])
    s_sum = s_sum * alpha + tl.sum(p, 1)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, s_sum, acc


# The block table's row stride is the widest row of the step, which changes from step to step in eager steps:
# Triton would compile a variant for each kind of value it sees (1, multiples of 16, others), the first time it
# sees it, in the middle of serving (a likely cause of the slow first tokens at each new load level; not yet
# confirmed on a GPU: bench/native_steps.py now counts the compiles of each wave).
@triton.jit(do_not_specialize=["stride_bt"])
def _paged_decode_kernel(
    q_ptr,  # [B, H, D]
    k_ptr,  # [N, BLOCK, KV, D]
    v_ptr,
    block_tables_ptr,  # [B, W] int32
    context_lens_ptr,  # [B] int32
    part_out_ptr,  # [B, H, SPLITS, D] fp32
    part_max_ptr,  # [B, H, SPLITS] fp32
    part_sum_ptr,  # [B, H, SPLITS] fp32
    scale,
    stride_qb,
    stride_qh,
    stride_kn,
    stride_kt,
    stride_kh,
    stride_bt,
    GROUPS: tl.constexpr,
    GROUPS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK: tl.constexpr,
    N_SPLITS: tl.constexpr,
    IEEE: tl.constexpr,  # fp32 caches (_scores)
):
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(context_lens_ptr + row)
    n_blocks = tl.cdiv(ctx, BLOCK)
    per_split = tl.cdiv(n_blocks, N_SPLITS)
    first = split * per_split
    last = tl.minimum(first + per_split, n_blocks)

    g = tl.arange(0, GROUPS_PAD)
    d = tl.arange(0, HEAD_DIM)
    t = tl.arange(0, BLOCK)
    heads = kv_head * GROUPS + g
    g_ok = g < GROUPS
    q = tl.load(q_ptr + row * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=g_ok[:, None], other=0.0)

    m = tl.full([GROUPS_PAD], float("-inf"), tl.float32)
    s_sum = tl.zeros([GROUPS_PAD], tl.float32)
    acc = tl.zeros([GROUPS_PAD, HEAD_DIM], tl.float32)
    for i in range(first, last):
        block = tl.load(block_tables_ptr + row * stride_bt + i).to(tl.int64)
        t_ok = i * BLOCK + t < ctx
        offs = block * stride_kn + t[:, None] * stride_kt + kv_head * stride_kh + d[None, :]
        k = tl.load(k_ptr + offs, mask=t_ok[:, None], other=0.0)  # [BLOCK, D]
        v = tl.load(v_ptr + offs, mask=t_ok[:, None], other=0.0)
        s = tl.where(t_ok[None, :], _scores(q, k, scale, IEEE), float("-inf"))  # [G, BLOCK]
        m, s_sum, acc = _online_softmax(s, v, m, s_sum, acc, IEEE)

    part = (row * (GROUPS * tl.num_programs(1)) + heads) * N_SPLITS + split  # index into [B, H, SPLITS]
    tl.store(part_max_ptr + part, m, mask=g_ok)
    tl.store(part_sum_ptr + part, s_sum, mask=g_ok)
    tl.store(part_out_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=g_ok[:, None])


def paged_decode(
    q: torch.Tensor,  # [B, H, D]
    k_cache: torch.Tensor,  # [N, BLOCK, KV, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, W] int32
    context_lens: torch.Tensor,  # [B] int32, each >= 1
    merge: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.dtype], torch.Tensor] = merge_splits,
) -> torch.Tensor:  # [B, H, D]
    q = q.contiguous()
    batch, heads, dim = q.shape
    _, block, kv_heads, _ = k_cache.shape
    groups = heads // kv_heads
    part_out = torch.empty(batch, heads, SPLITS, dim, device=q.device, dtype=torch.float32)
    part_max = torch.empty(batch, heads, SPLITS, device=q.device, dtype=torch.float32)
    part_sum = torch.empty(batch, heads, SPLITS, device=q.device, dtype=torch.float32)
    _paged_decode_kernel[(batch, kv_heads, SPLITS)](
        q, k_cache, v_cache, block_tables, context_lens, part_out, part_max, part_sum,
        dim**-0.5,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        **decode_constants(groups, dim, block, q.dtype == torch.float32),
    )  # fmt: skip
    return merge(part_out, part_max, part_sum, q.dtype)


def decode_constants(groups: int, head_dim: int, block: int, ieee: bool) -> dict[str, int | bool]:
    """The decode kernel's compile-time arguments for a model (one place: `paged_decode` and the compile test)."""
    return {"GROUPS": groups, "GROUPS_PAD": max(16, triton.next_power_of_2(groups)), "HEAD_DIM": head_dim,
            "BLOCK": block, "N_SPLITS": SPLITS, "IEEE": ieee, "num_warps": 4}  # fmt: skip


PREFILL_KEYS = 64  # keys (4 blocks of 16) a prefill program reads per iteration


@triton.jit(do_not_specialize=["stride_bt"])
def _paged_prefill_kernel(
    q_ptr,  # [T, H, D]
    k_ptr,  # [N, BLOCK, KV, D]
    v_ptr,
    out_ptr,  # [T, H, D]
    block_tables_ptr,  # [S, W] int32
    tile_row_ptr,  # [tiles] int32 each (PrefillTiles)
    tile_start_ptr,
    tile_count_ptr,
    tile_position_ptr,
    scale,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kn,
    stride_kt,
    stride_kh,
    stride_bt,
    GROUPS: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    ROWS: tl.constexpr,  # BLOCK_Q * GROUPS, padded to a power of two
    HEAD_DIM: tl.constexpr,
    BLOCK: tl.constexpr,
    KEYS: tl.constexpr,
    IEEE: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    table_row = tl.load(tile_row_ptr + tile)
    start = tl.load(tile_start_ptr + tile)
    count = tl.load(tile_count_ptr + tile)
    if count == 0:  # a spare tile of a CUDA graph's fixed grid
        return
    first = tl.load(tile_position_ptr + tile)

    r = tl.arange(0, ROWS)
    token = r // GROUPS  # row r is query token r // GROUPS of the tile, for query head r % GROUPS of this kv head
    head = kv_head * GROUPS + r % GROUPS
    valid = token < count
    # rows past the tile's tokens read as its last token: finite sums, never stored
    position = first + tl.minimum(token, count - 1)
    d = tl.arange(0, HEAD_DIM)
    q_rows = (start + token).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :], mask=valid[:, None],
                other=0.0)  # fmt: skip

    m = tl.full([ROWS], float("-inf"), tl.float32)
    s_sum = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    context = first + count  # keys up to the tile's last query; key 0 is within every row's reach
    j = tl.arange(0, KEYS)
    for key0 in range(0, context, KEYS):
        keys = key0 + j
        in_context = keys < context
        block = tl.load(block_tables_ptr + table_row * stride_bt + keys // BLOCK, mask=in_context, other=0)
        offs = block.to(tl.int64) * stride_kn + (keys % BLOCK) * stride_kt + kv_head * stride_kh
        k = tl.load(k_ptr + offs[:, None] + d[None, :], mask=in_context[:, None], other=0.0)  # [KEYS, D]
        v = tl.load(v_ptr + offs[:, None] + d[None, :], mask=in_context[:, None], other=0.0)
        causal = keys[None, :] <= position[:, None]  # and so within the context
        s = tl.where(causal, _scores(q, k, scale, IEEE), float("-inf"))  # [ROWS, KEYS]
        m, s_sum, acc = _online_softmax(s, v, m, s_sum, acc, IEEE)

    out = acc / s_sum[:, None]
    o_rows = (start + token).to(tl.int64)
    tl.store(out_ptr + o_rows[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=valid[:, None])  # fmt: skip


def paged_prefill(
    q: torch.Tensor,  # [T, H, D]: the step's stream; the tiles name the prompt rows
    k_cache: torch.Tensor,  # [N, BLOCK, KV, D], the chunks' own keys and values already written
    v_cache: torch.Tensor,
    tiles: PrefillTiles,
    out: torch.Tensor,  # [T, H, D]: the tiles' rows are written, the others left as they are
) -> None:
    _, heads, dim = q.shape
    _, block, kv_heads, _ = k_cache.shape
    groups = heads // kv_heads
    assert tiles.block_q == prefill_block_q(groups) and q.stride(2) == 1 and out.stride(2) == 1
    _paged_prefill_kernel[(tiles.tiles, kv_heads)](
        q, k_cache, v_cache, out, tiles.tables, tiles.table_row, tiles.start, tiles.count, tiles.position,
        dim**-0.5,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), tiles.tables.stride(0),
        **prefill_constants(groups, dim, block, q.dtype == torch.float32),
    )  # fmt: skip


def prefill_constants(groups: int, head_dim: int, block: int, ieee: bool) -> dict[str, int | bool]:
    """The prefill kernel's compile-time arguments for a model (one place: `paged_prefill` and the compile test)."""
    block_q = prefill_block_q(groups)
    return {"GROUPS": groups, "BLOCK_Q": block_q, "ROWS": max(16, triton.next_power_of_2(block_q * groups)),
            "HEAD_DIM": head_dim, "BLOCK": block, "KEYS": PREFILL_KEYS, "IEEE": ieee,
            "num_warps": 8 if head_dim >= 128 else 4}  # fmt: skip


def check_paged_prefill(heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
    """Compile the prefill kernel for this model's shapes and check it against the SDPA reference on a small random
    step (two chunks, one after a cached prefix, tiles crossing blocks): at load, so that a kernel that fails to
    compile or computes wrong on this GPU is found before any prompt, and the engine keeps SDPA instead."""
    generator = torch.Generator(device=device).manual_seed(0)
    block, blocks = 16, 24
    k_cache = torch.randn(blocks, block, kv_heads, head_dim, device=device, dtype=dtype, generator=generator)
    v_cache = torch.randn(k_cache.shape, device=device, dtype=dtype, generator=generator)
    chunks = [(40, 40, [3, 9, 1]), (150, 180, [*range(10, 22)])]  # (tokens, context, blocks)
    q = torch.randn(1 + sum(n for n, _, _ in chunks), heads, head_dim, device=device, dtype=dtype, generator=generator)
    width = max(len(b) for _, _, b in chunks)
    tables = torch.tensor([b + [0] * (width - len(b)) for _, _, b in chunks], dtype=torch.int32, device=device)
    spec, row = [], 1  # row 0 stands for a decode, which the kernel must leave alone
    for i, (n, ctx, _) in enumerate(chunks):
        spec.append((i, row, n, ctx - n))
        row += n
    out = torch.zeros_like(q)
    paged_prefill(q, k_cache, v_cache, prefill_tiles(spec, tables, prefill_block_q(heads // kv_heads), device), out)
    k32, v32 = k_cache.float(), v_cache.float()
    for (_, start, n, _), (_, ctx, b) in zip(spec, chunks, strict=True):
        span = PrefillSpan(q_start=start, q_len=n, ctx_len=ctx, blocks=torch.tensor(b, device=device))
        ref = _prefill_span(q[start : start + n].float(), k32, v32, span)
        tolerance = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out[start : start + n].float(), ref, atol=tolerance, rtol=tolerance)
    if out[0].abs().max().item() != 0:
        raise AssertionError("the prefill kernel wrote a row outside its tiles")
