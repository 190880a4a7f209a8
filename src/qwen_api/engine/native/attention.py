"""Attention through the paged KV cache: each query token reads only its own sequence's blocks.

A step's tokens are laid out as `num_decode` one-token decodes first, then one contiguous span per sequence
reading a prompt chunk. Keys and values are written to the cache first (`write_kv`, an `index_copy_`, so it
also runs inside CUDA graphs), then:
- decodes: on CUDA with Triton, `triton_attention.paged_decode` walks each sequence's block table on the GPU
  (no gather, no host sync: capturable in a CUDA graph); elsewhere their blocks are gathered into a padded
  batch and read with SDPA under a length mask;
- prompt spans: on CUDA, `triton_attention.paged_prefill` reads every chunk of the step in one launch, tile by
  tile of query tokens (`PrefillTiles`), streaming each sequence's blocks. Elsewhere (and on a GPU where that
  kernel failed its check at load) each span's context (cached prefix plus the chunk) is gathered from its blocks
  and read with SDPA, causal within the chunk: a long chunk gets its own call (the flash kernel when it has no
  cached prefix); on a GPU, a step's short chunks (many new short prompts at once) share one call under a mask
  that keeps each query to its own sequence (`PrefillBatch`): one call a layer instead of one per prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from qwen_api.engine.native.pointwise import Pointwise
from qwen_api.engine.sampler import to_device


@dataclass(frozen=True)
class PrefillSpan:
    q_start: int  # first of its tokens in the step's stream
    q_len: int  # tokens of this chunk
    ctx_len: int  # tokens the chunk attends to: cached prefix + the chunk itself
    blocks: torch.Tensor  # [ceil(ctx_len / block_size)] int64 block ids


@dataclass(frozen=True)
class PrefillBatch:
    """Short prompt chunks of one step, read with one attention call instead of one call each.

    Their queries are rows `q_rows` of the step's stream; their contexts (cached prefix plus chunk) are gathered
    span after span from `ctx_slots`; `mask` lets each query read its own span's context up to its position.
    """

    q_rows: torch.Tensor  # [Q] int64
    ctx_slots: torch.Tensor  # [C] int64
    mask: torch.Tensor  # [Q, C] bool


SHORT_CHUNK = 256  # prompt chunks up to this many tokens share one attention call when a step has several


def batch_prefills(spans: list[tuple[int, int, int, list[int]]], block_size: int, device: torch.device) -> PrefillBatch:
    """spans: (first row in the stream, chunk tokens, context tokens, the sequence's blocks) each, host values.

    Built on the device from a few small host tensors (no per-token host loop, no sync); shared by every layer.
    """
    q_lens = [q for _, q, _, _ in spans]
    ctx_lens = [c for _, _, c, _ in spans]
    width = max(-(-c // block_size) for c in ctx_lens)
    table = to_device([b[:width] + [0] * (width - len(b[:width])) for *_, b in spans], device, torch.int64)
    count, queries, contexts = len(spans), sum(q_lens), sum(ctx_lens)
    ids = torch.arange(count, device=device)
    q_span = torch.repeat_interleave(ids, to_device(q_lens, device, torch.int64), output_size=queries)  # [Q]
    c_span = torch.repeat_interleave(ids, to_device(ctx_lens, device, torch.int64), output_size=contexts)  # [C]
    q_first = to_device([sum(q_lens[:i]) for i in range(count)], device, torch.int64)  # first query of each span
    c_first = to_device([sum(ctx_lens[:i]) for i in range(count)], device, torch.int64)
    prefix = to_device([c - q for c, q in zip(ctx_lens, q_lens, strict=True)], device, torch.int64)
    q_pos = torch.arange(queries, device=device) - q_first[q_span] + prefix[q_span]  # position in its sequence
    c_pos = torch.arange(contexts, device=device) - c_first[c_span]
    ctx_slots = table[c_span, c_pos // block_size] * block_size + c_pos % block_size
    mask = (q_span[:, None] == c_span[None, :]) & (c_pos[None, :] <= q_pos[:, None])
    starts = to_device([r for r, _, _, _ in spans], device, torch.int64)
    q_rows = starts[q_span] + torch.arange(queries, device=device) - q_first[q_span]
    return PrefillBatch(q_rows=q_rows, ctx_slots=ctx_slots, mask=mask)


PREFILL_ROWS = 128  # (query token, query head) rows one program of the Triton prefill kernel holds


def prefill_block_q(groups: int) -> int:
    """Query tokens a prefill tile holds when each kv head serves `groups` query heads."""
    return max(1, PREFILL_ROWS // groups)


@dataclass(frozen=True)
class PrefillTiles:
    """A step's prompt chunks cut into tiles of at most `block_q` query tokens, for the Triton prefill kernel
    (`triton_attention.paged_prefill`); [tiles] int32 tensors on the device."""

    table_row: torch.Tensor  # the tile's sequence: its row of `tables`
    start: torch.Tensor  # the tile's first query: its row in the step's stream of tokens
    count: torch.Tensor  # query tokens in the tile
    position: torch.Tensor  # the first query's position in its sequence (after the cached prefix, earlier tiles)
    tables: torch.Tensor  # [S, W] int32: the block tables the tiles' rows index
    block_q: int

    @property
    def tiles(self) -> int:
        return self.table_row.numel()


def tile_columns(chunks: list[tuple[int, int, int, int]], block_q: int, width: int = 0) -> tuple[torch.Tensor, int]:
    """chunks: (its sequence's row of the block tables, first row in the stream, tokens, first position) each, host
    values. Returns the tiles as a [4, W] int32 host tensor (table row, start, count, position; W at least `width`,
    the columns past the tiles zero: tiles of no tokens, which the kernel skips) and how many tiles there are.
    W is a multiple of 4, so on the device each column starts on 16 bytes: Triton compiles a kernel variant per
    alignment of its pointer arguments, and columns at unaligned offsets would each cost a compile mid-serving."""
    tiles: list[tuple[int, int, int, int]] = []
    for table_row, start, n, position in chunks:
        tiles += [(table_row, start + i, min(block_q, n - i), position + i) for i in range(0, n, block_q)]
    host = torch.zeros(4, -(-max(len(tiles), width) // 4) * 4, dtype=torch.int32)
    if tiles:
        host[:, : len(tiles)] = torch.tensor(tiles, dtype=torch.int32).t()
    return host, len(tiles)


def prefill_tiles(
    chunks: list[tuple[int, int, int, int]], tables: torch.Tensor, block_q: int, device: torch.device
) -> PrefillTiles:
    """The chunks (as `tile_columns` takes them) cut into tiles, in one copy to the device."""
    host, count = tile_columns(chunks, block_q)
    return PrefillTiles(*tiles_of(to_device(host, device), count), tables=tables, block_q=block_q)


def tiles_of(columns: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first `count` tiles of `tile_columns`' layout: table rows, starts, counts, positions."""
    rows, starts, counts, positions = (column[:count] for column in columns.unbind(0))
    return rows, starts, counts, positions


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: where each token's K/V goes (block * block_size + offset)
    num_decode: int = 0
    block_tables: torch.Tensor | None = None  # [num_decode, W] int32 (decode rows)
    context_lens: torch.Tensor | None = None  # [num_decode] int32 (tokens each decode attends to)
    max_context_len: int = 0  # host copy of context_lens.max(), for the gather path
    prefills: list[PrefillSpan] = field(default_factory=list)  # chunks read one call each
    prefill_batch: PrefillBatch | None = None  # short chunks read together
    prefill_tiles: PrefillTiles | None = None  # every chunk, read by the Triton prefill kernel (CUDA)
    use_triton: bool = False


def write_kv(
    k_cache: torch.Tensor,  # [blocks, block_size, KV, D]
    v_cache: torch.Tensor,
    k: torch.Tensor,  # [T, KV, D]
    v: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T]
) -> None:
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)


def paged_attention(
    q: torch.Tensor,  # [T, H, D]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    ops: Pointwise,
) -> torch.Tensor:  # [T, H, D]
    if not meta.prefills and meta.prefill_batch is None and meta.prefill_tiles is None:  # decodes only (graphs)
        return _decode(q, k_cache, v_cache, meta, ops)
    out = torch.empty_like(q)
    if meta.num_decode:
        out[: meta.num_decode] = _decode(q[: meta.num_decode], k_cache, v_cache, meta, ops)
    for span in meta.prefills:
        rows = slice(span.q_start, span.q_start + span.q_len)
        out[rows] = _prefill_span(q[rows], k_cache, v_cache, span)
    if (batch := meta.prefill_batch) is not None:
        out.index_copy_(0, batch.q_rows, prefill_batched(q.index_select(0, batch.q_rows), k_cache, v_cache, batch))
    if (tiles := meta.prefill_tiles) is not None:
        from qwen_api.engine.native.triton_attention import paged_prefill

        paged_prefill(q, k_cache, v_cache, tiles, out)
    return out


def _decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, ops: Pointwise
) -> torch.Tensor:
    assert meta.block_tables is not None and meta.context_lens is not None
    if meta.use_triton:
        from qwen_api.engine.native.triton_attention import paged_decode

        return paged_decode(q, k_cache, v_cache, meta.block_tables, meta.context_lens, ops.merge_splits)
    return decode_sdpa(q, k_cache, v_cache, meta.block_tables, meta.context_lens, meta.max_context_len)


def decode_sdpa(
    q: torch.Tensor,  # [B, H, D]
    k_cache: torch.Tensor,  # [blocks, block_size, KV, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, W]
    context_lens: torch.Tensor,  # [B]
    max_context_len: int,
) -> torch.Tensor:  # [B, H, D]
    """The reference decode: gather each row's blocks (padded to the longest row), mask the padding, SDPA."""
    block_size = k_cache.size(1)
    used = -(-max_context_len // block_size)
    table = block_tables[:, :used].long()  # [B, used]
    k = k_cache[table].flatten(1, 2)  # [B, L, KV, D]
    v = v_cache[table].flatten(1, 2)
    groups = q.size(1) // k.size(2)
    k = k.transpose(1, 2).repeat_interleave(groups, dim=1)  # [B, H, L, D]
    v = v.transpose(1, 2).repeat_interleave(groups, dim=1)
    keep = torch.arange(k.size(2), device=q.device)[None, :] < context_lens[:, None]  # [B, L]
    out = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=keep[:, None, None, :])  # [B, H, 1, D]
    return out.squeeze(2)


def prefill_batched(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: PrefillBatch) -> torch.Tensor:
    """q [Q, H, D]: every short chunk's queries; one SDPA over all their contexts under the batch's mask."""
    k = k_cache.view(-1, *k_cache.shape[2:]).index_select(0, batch.ctx_slots)  # [C, KV, D]
    v = v_cache.view(-1, *v_cache.shape[2:]).index_select(0, batch.ctx_slots)
    groups = q.size(1) // k.size(1)
    k = k.transpose(0, 1).repeat_interleave(groups, dim=0)  # [H, C, D]
    v = v.transpose(0, 1).repeat_interleave(groups, dim=0)
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k[None], v[None], attn_mask=batch.mask)
    return out[0].transpose(0, 1)  # [Q, H, D]


def _prefill_span(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, span: PrefillSpan) -> torch.Tensor:
    """q [q_len, H, D] of one chunk; its context is the first ctx_len slots of its blocks."""
    k = k_cache[span.blocks].flatten(0, 1)[: span.ctx_len]  # [ctx, KV, D]
    v = v_cache[span.blocks].flatten(0, 1)[: span.ctx_len]
    groups = q.size(1) // k.size(1)
    k = k.transpose(0, 1).repeat_interleave(groups, dim=0)  # [H, ctx, D]
    v = v.transpose(0, 1).repeat_interleave(groups, dim=0)
    qh = q.transpose(0, 1)  # [H, q_len, D]
    if span.ctx_len == span.q_len:  # no cached prefix: plain causal attention
        out = F.scaled_dot_product_attention(qh.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), is_causal=True)
    else:  # query i sits at position ctx_len - q_len + i and sees keys up to it
        first = span.ctx_len - span.q_len
        rows = torch.arange(span.q_len, device=q.device)[:, None] + first
        keep = torch.arange(span.ctx_len, device=q.device)[None, :] <= rows  # [q_len, ctx]
        out = F.scaled_dot_product_attention(qh.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), attn_mask=keep)
    return out.squeeze(0).transpose(0, 1)  # [q_len, H, D]
