"""Paged decode attention as a Triton kernel: one query token per sequence, reading only that sequence's blocks.

Flash-decoding over the block table, split along the context: program (b, kv_head, split) walks its share of
row b's blocks with an online softmax, for all query heads of that kv head at once (grouped-query attention:
the group is one small matrix product per block), and writes a partial (max, sum, weighted values);
`pointwise.merge_splits` then merges the splits. Splitting keeps the GPU busy when the batch is small (at batch 1
there are only kv_heads rows of work otherwise). Everything the kernel reads is on the device (block tables, context
lengths), and shapes depend only on the batch size, so a CUDA graph can capture it. Imported only on CUDA
where Triton is installed; `attention.decode_sdpa` is the reference it is tested against.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from qwen_api.engine.native.pointwise import merge_splits

SPLITS = 8  # context splits per (row, kv head); partials merged in torch


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
    IEEE: tl.constexpr,  # fp32 caches: exact fp32 products, not TF32 (the fp32 tests compare tokens exactly)
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
        if IEEE:  # noqa: SIM108 (a constexpr branch, resolved when Triton compiles; kept plain for its parser)
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # [G, BLOCK], fp32
        else:
            s = tl.dot(q, tl.trans(k)) * scale
        s = tl.where(t_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        s_sum = s_sum * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new

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
        GROUPS=groups, GROUPS_PAD=max(16, triton.next_power_of_2(groups)), HEAD_DIM=dim, BLOCK=block,
        N_SPLITS=SPLITS, IEEE=q.dtype == torch.float32,
    )  # fmt: skip
    return merge(part_out, part_max, part_sum, q.dtype)
