"""One scheduled step in, logits out: builds the step's tensors, runs the model, replays CUDA graphs on CUDA.

Tokens are laid out as the scheduler's decodes (one each), then each prompt chunk; `sample_rows` picks the
rows whose logits are sampled (every decode, and a chunk's last token when it ends its prompt). On CUDA with
Triton, steps replay a CUDA graph captured for the next size up on a ladder of token counts (1, 2, 4, 8, 16,
24, ..., max_batch_size, then max_batch_size + 16, 32, 64, 128, 256): the whole network, rows padded with a
scratch slot, one launch instead of hundreds. Steps that also read prompt tokens replay graphs too (before,
any prompt token made the step eager: 22.8 ms against 5.1 ms at 64 sequences on an H200): the sizes past
max_batch_size hold the Triton prefill kernel (`triton_attention.paged_prefill`, checked against SDPA at load)
for their prompt chunks. Where that kernel failed its check, a graph reads every token as a decode reads its one
token (`flatten`: its own sequence's blocks up to its position, in the paged decode kernel), which reads a
token's whole context for each prompt token, so steps with long contexts behind them (`MIXED_READS`) run
eagerly. Steps with more prompt tokens than the ladder takes run eagerly, their chunks in the prefill kernel (all
of a step's chunks in one launch a layer) on CUDA, elsewhere in SDPA over each chunk's gathered blocks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from qwen_api.engine.native.attention import (
    SHORT_CHUNK,
    AttentionMetadata,
    PrefillSpan,
    PrefillTiles,
    batch_prefills,
    prefill_block_q,
    prefill_tiles,
    tile_columns,
    tiles_of,
)
from qwen_api.engine.native.kv_cache import KVCache
from qwen_api.engine.native.model import CausalLM
from qwen_api.engine.native.scheduler import PENDING, Sequence, Step, score_span
from qwen_api.engine.sampler import staged, to_device

log = logging.getLogger(__name__)


def triton_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


MIXED_EXTRA = (16, 32, 64, 128, 256)  # graph sizes past max_batch_size, for steps that also read prompt tokens
# Most (prompt token, context token) pairs a graph step may read: the decode kernel reads a prompt token's whole
# context, so a chunk of n tokens ending at position e costs n * e reads where prefill attention streams it once.
MIXED_READS = 256 * 2048


def graph_sizes(max_batch_size: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s < max_batch_size]
    sizes += list(range(16, max_batch_size, 8))
    return [*sizes, max_batch_size, *(max_batch_size + extra for extra in MIXED_EXTRA)]


def prompt_reads(step: Step) -> int:
    return sum(n * (seq.computed + n) for seq, n in step.prefills)


@dataclass(frozen=True)
class Feed:
    """The previous step's draw, still on the device: decodes whose input token the host has not read take it
    from here (`rows`: sequence id -> its row in `tokens`)."""

    rows: dict[int, int]
    tokens: torch.Tensor

    def fill(self, ids: torch.Tensor, decodes: list[Sequence]) -> None:
        """Write the pending inputs into `ids` (whose first rows are `decodes`, in order), on the device."""
        pending = [(i, self.rows[seq.id]) for i, seq in enumerate(decodes) if seq.tokens[seq.computed] == PENDING]
        if pending:
            dst = to_device([i for i, _ in pending], ids.device, torch.int64)
            src = to_device([r for _, r in pending], ids.device, torch.int64)
            ids.index_copy_(0, dst, self.tokens.index_select(0, src))


@dataclass
class FlatStep:
    """A step's tokens in the stream's order (decodes, then each prompt chunk), one row each, with what reading
    each as a decode needs: its sequence's blocks, up to its own position. The eager path takes the same rows."""

    ids: list[int]
    positions: list[int]
    slots: list[int]  # where each token's K/V goes
    sample_rows: list[int]  # rows whose logits are sampled, in the order of `step.sampled`
    score_rows: list[int]  # then rows whose logits score the next prompt token (`Step.scoring`'s positions, in order)
    seq_table: torch.Tensor  # [S, W] int32 on the host: each decode's, then each chunk's blocks, scratch-padded
    owner: list[int]  # each row's row of `seq_table`

    @property
    def lens(self) -> list[int]:
        return [p + 1 for p in self.positions]

    @property
    def table(self) -> torch.Tensor:
        """[T, W] int32 on the host: each token's sequence's blocks."""
        return self.seq_table.index_select(0, torch.tensor(self.owner))


def flatten(step: Step, block_size: int, scratch_block: int) -> FlatStep:
    spans = [(seq, 1) for seq in step.decodes] + step.prefills
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    owner: list[int] = []
    sample_rows: list[int] = []
    score_rows: list[int] = []
    for i, (seq, n) in enumerate(spans):
        start = seq.computed
        if i >= len(step.decodes):
            score_rows += [len(ids) + pos - start for pos in score_span(seq, n)]
        for pos in range(start, start + n):
            ids.append(seq.tokens[pos])
            positions.append(pos)
            slots.append(seq.blocks[pos // block_size] * block_size + pos % block_size)
        owner += [i] * n
        if i < len(step.decodes) or start + n == len(seq.tokens):
            sample_rows.append(len(ids) - 1)
    width = max(len(seq.blocks) for seq, _ in spans)
    table = [seq.blocks + [scratch_block] * (width - len(seq.blocks)) for seq, _ in spans]
    return FlatStep(ids, positions, slots, sample_rows, score_rows, torch.tensor(table, dtype=torch.int32), owner)


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        cache: KVCache,
        max_batch_size: int,
        max_blocks_per_seq: int,
        use_cuda_graphs: bool = True,
        batched_prefill: bool | None = None,
    ) -> None:
        self.model, self.cache = model, cache
        self.device = model.embed_tokens.device
        self.use_triton = triton_available(self.device)
        # One attention call for a step's short prompt chunks: on a GPU, where a call per prompt costs kernel
        # launches for nothing; the CPU keeps one call each (its numerics are what the exact CPU tests compare).
        self.batched_prefill = self.device.type == "cuda" if batched_prefill is None else batched_prefill
        self.max_blocks_per_seq = max_blocks_per_seq
        # Prompt chunks through the Triton prefill kernel on CUDA (SDPA over gathered blocks otherwise, and as the
        # fallback when the kernel fails its check at load).
        self.prefill_kernel = self.use_triton and _prefill_kernel_works(model)
        if model.ops.fused:
            try:
                model.ops.warm(model)
                log.info("elementwise steps fused with torch.compile")
            except Exception:  # an inductor or Triton failure costs speed, never the engine
                log.exception("fusing the elementwise steps with torch.compile failed; running them eagerly")
                model.ops.unfuse()
        self.eager_steps = 0  # steps run without a graph (all of them off CUDA)
        self.graphs: CudaGraphs | None = None
        if use_cuda_graphs and self.use_triton:
            self.graphs = capture_graphs(self, max_batch_size)

    @torch.inference_mode()
    def run(self, step: Step, feed: Feed | None = None) -> torch.Tensor:
        """logits [len(step.sampled), V] fp32, then a row for each position of `step.scoring` (a step that scores
        prompt tokens runs eagerly). `feed`: the draw of the step still in flight, for inputs the host has not read
        yet."""
        if self.graphs is not None and self.graphs.fits(step) and not step.scoring:
            return self.graphs.run(step, feed)
        self.eager_steps += 1
        return self.run_eager(step, feed)

    @torch.inference_mode()
    def run_flat(self, step: Step, feed: Feed | None = None) -> torch.Tensor:
        """What a CUDA graph replays, run eagerly without padding: every token read as a decode (how the CPU tests
        check that layout against transformers, every step of a run, graph-sized or not)."""
        flat = flatten(step, self.cache.block_size, self.cache.scratch_block)
        lens = flat.lens
        meta = AttentionMetadata(
            slot_mapping=to_device(flat.slots, self.device, torch.int64),
            num_decode=len(lens),
            block_tables=to_device(flat.table, self.device),
            context_lens=to_device(lens, self.device, torch.int32),
            max_context_len=max(lens),
            use_triton=self.use_triton,
        )
        return self._forward(flat, meta, step, feed)

    def run_eager(self, step: Step, feed: Feed | None = None) -> torch.Tensor:
        """Decodes through the paged decode kernel (or its SDPA reference), prompt chunks through the Triton
        prefill kernel (`prefill_kernel`), or else through SDPA: one call per long chunk, one for the short ones
        together (`batched_prefill`)."""
        bs = self.cache.block_size
        flat = flatten(step, bs, self.cache.scratch_block)
        decodes = len(step.decodes)
        tiled = self.prefill_kernel and bool(step.prefills)
        meta = AttentionMetadata(
            slot_mapping=to_device(flat.slots, self.device, torch.int64), num_decode=decodes, use_triton=self.use_triton
        )
        # one copy of the block tables: the decodes' rows, then (for the prefill kernel) each chunk's
        tables = to_device(flat.seq_table if tiled else flat.seq_table[:decodes], self.device)
        if decodes:
            lens = flat.lens[:decodes]
            meta.block_tables = tables[:decodes]
            meta.context_lens = to_device(lens, self.device, torch.int32)
            meta.max_context_len = max(lens)
        if tiled:
            meta.prefill_tiles = self._tiles(step, tables)
            return self._forward(flat, meta, step, feed)
        short = [seq for seq, n in step.prefills if n <= SHORT_CHUNK] if self.batched_prefill else []
        batched: list[tuple[int, int, int, list[int]]] = []
        row = decodes  # the chunk's first row in the stream
        for seq, n in step.prefills:
            end = seq.computed + n
            if len(short) > 1 and n <= SHORT_CHUNK:
                batched.append((row, n, end, seq.blocks))
            else:
                blocks = to_device(seq.blocks[: -(-end // bs)], self.device, torch.int64)
                meta.prefills.append(PrefillSpan(q_start=row, q_len=n, ctx_len=end, blocks=blocks))
            row += n
        if batched:
            meta.prefill_batch = batch_prefills(batched, bs, self.device)
        return self._forward(flat, meta, step, feed)

    def _tiles(self, step: Step, tables: torch.Tensor) -> PrefillTiles:
        """The step's prompt chunks as the prefill kernel's tiles; `tables` holds the decodes' rows, then each
        chunk's, as `flatten` lays them out."""
        config = self.model.config
        block_q = prefill_block_q(config.num_heads // config.num_kv_heads)
        return prefill_tiles(prompt_chunks(step, per_token=False), tables, block_q, self.device)

    def _forward(self, flat: FlatStep, meta: AttentionMetadata, step: Step, feed: Feed | None) -> torch.Tensor:
        ids = to_device(flat.ids, self.device, torch.int64)
        if feed is not None:
            feed.fill(ids, step.decodes)
        hidden = self.model(ids, to_device(flat.positions, self.device, torch.int64), self.cache.layers, meta)
        rows = flat.sample_rows + flat.score_rows
        return self.model.logits(hidden.index_select(0, to_device(rows, self.device, torch.int64)))


def prompt_chunks(step: Step, per_token: bool) -> list[tuple[int, int, int, int]]:
    """The step's prompt chunks as `attention.tile_columns` takes them: (the chunk's row of the block tables, its
    first row in the stream, its tokens, its first position). The tables hold a row per sequence, decodes first
    (`FlatStep.seq_table`, eager steps), or a row per token (`FlatStep.table`, the graphs' layout)."""
    decodes = len(step.decodes)
    chunks, row = [], decodes
    for i, (seq, n) in enumerate(step.prefills):
        chunks.append((row if per_token else decodes + i, row, n, seq.computed))
        row += n
    return chunks


def _prefill_kernel_works(model: CausalLM) -> bool:
    """Compile the Triton prefill kernel for the model's shapes and check it against SDPA (at load: a failure costs
    speed, never the engine)."""
    from qwen_api.engine.native.triton_attention import check_paged_prefill

    c, weight = model.config, model.embed_tokens
    try:
        check_paged_prefill(c.num_heads, c.num_kv_heads, c.head_dim, weight.dtype, weight.device)
    except Exception:
        log.exception("the Triton prefill kernel failed its check; prompt chunks go through SDPA instead")
        return False
    log.info("prompt chunks read by the Triton prefill kernel")
    return True


def capture_graphs(runner: ModelRunner, max_batch_size: int) -> CudaGraphs | None:
    """The step's CUDA graphs, captured with the prefill kernel where it passed its check; a capture that fails
    costs speed, never the engine: then without the prefill kernel (prompt tokens read as decodes), then none (every
    step eager)."""
    for tiled in dict.fromkeys((runner.prefill_kernel, False)):
        try:
            return CudaGraphs(runner, max_batch_size, tiled)
        except Exception:
            log.exception("capturing CUDA graphs %s the prefill kernel failed", "with" if tiled else "without")
    log.error("no CUDA graphs: every step runs eagerly")
    return None


class CudaGraphs:
    """Steps captured once per token count on the ladder, replayed with the step's inputs copied in.

    A step samples at most one row per sequence, so at most max_batch_size rows: every graph computes logits for
    the rows that `rows` names (the sampled ones, padded), not for every token of a prompt chunk.

    With the prefill kernel (`runner.prefill_kernel`), the sizes past max_batch_size are captured with it: a step
    with prompt tokens replays one of those, its decodes read by the decode kernel and its prompt chunks by the
    prefill kernel, over a fixed grid of tiles (spare tiles hold no tokens). The decode kernel also passes over the
    prompt rows, reading one key each, and the prefill kernel then writes their real values. Without it, prompt
    tokens are read as decodes (`flatten`), in any size, up to `MIXED_READS`.
    """

    def __init__(self, runner: ModelRunner, max_batch_size: int, tiled: bool) -> None:
        self.runner = runner
        self.sizes = graph_sizes(max_batch_size)
        self.max_size = self.sizes[-1]
        self.max_rows = max_batch_size
        device, cache = runner.device, runner.cache
        n = self.max_size
        self.ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.scratch_slot = cache.scratch_block * cache.block_size
        self.slots = torch.full((n,), self.scratch_slot, dtype=torch.int64, device=device)
        self.tables = torch.full((n, runner.max_blocks_per_seq), cache.scratch_block, dtype=torch.int32, device=device)
        self.lens = torch.ones(n, dtype=torch.int32, device=device)
        self.rows = torch.zeros(self.max_rows, dtype=torch.int64, device=device)
        self.tiled = tiled  # steps with prompt tokens read by the prefill kernel (`runner.prefill_kernel`) in graphs
        config = runner.model.config
        self.block_q = prefill_block_q(config.num_heads // config.num_kv_heads)
        spare, _ = tile_columns([], self.block_q, self._tiles_for(self.max_size))
        self.tile_buffer = spare.to(device)  # [4, W]: the tiles of the step being replayed (`tile_columns`' layout)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.replays = 0
        self.mixed_replays = 0  # of them, steps that also read prompt tokens
        self._capture()

    def _tiles_for(self, size: int) -> int:
        """The most tiles a step of `size` tokens cuts its chunks into: one per chunk, plus one per block_q tokens."""
        return min(size, self.max_rows) + -(-size // self.block_q)

    def _meta(self, size: int) -> AttentionMetadata:
        meta = AttentionMetadata(
            slot_mapping=self.slots[:size],
            num_decode=size,
            block_tables=self.tables[:size],
            context_lens=self.lens[:size],
            use_triton=True,
        )
        if self.tiled and size > self.max_rows:  # the sizes that steps with prompt tokens replay
            tiles = tiles_of(self.tile_buffer, self._tiles_for(size))
            meta.prefill_tiles = PrefillTiles(*tiles, tables=self.tables[:size], block_q=self.block_q)
        return meta

    def _forward(self, size: int) -> torch.Tensor:
        model = self.runner.model
        hidden = model(self.ids[:size], self.positions[:size], self.runner.cache.layers, self._meta(size))
        return model.logits(hidden.index_select(0, self.rows[: min(size, self.max_rows)]))

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for size in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory pool
                self._forward(size)  # warm-up: Triton compiles, cuBLAS picks its kernels
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    out = self._forward(size)
                pool = graph.pool()
                self.graphs[size] = (graph, out)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        log.info("captured CUDA graphs for steps of %s tokens", self.sizes)

    def fits(self, step: Step) -> bool:
        tokens = len(step.decodes) + sum(n for _, n in step.prefills)
        if tokens > self.max_size or step.size > self.max_rows:
            return False
        return self.tiled or prompt_reads(step) <= MIXED_READS  # the prefill kernel reads a context once a tile

    def run(self, step: Step, feed: Feed | None = None) -> torch.Tensor:
        cache = self.runner.cache
        flat = flatten(step, cache.block_size, cache.scratch_block)
        n, width = len(flat.ids), flat.table.size(1)
        tiled = self.tiled and bool(step.prefills)
        size = next(s for s in self.sizes if s >= n and (s > self.max_rows or not tiled))
        pad = size - n
        table = torch.cat([flat.table, torch.full((pad, width), cache.scratch_block, dtype=torch.int32)])
        sampled = len(flat.sample_rows)
        rows = flat.sample_rows + [0] * (min(size, self.max_rows) - sampled)
        lens = flat.lens
        if tiled:  # prompt rows: one key each in the decode kernel, then their real values from the prefill kernel
            decodes = len(step.decodes)
            lens = lens[:decodes] + [1] * (n - decodes)
            host, tiles = tile_columns(prompt_chunks(step, per_token=True), self.block_q, self.tile_buffer.size(1))
            assert tiles <= self._tiles_for(size), (tiles, size)
            self.tile_buffer.copy_(staged(host, self.runner.device), non_blocking=True)  # spare tiles' zeros too
        device = self.runner.device  # every input from pinned memory (`staged`): no copy waits for the step in flight
        self.ids[:size].copy_(staged(flat.ids + [0] * pad, device, torch.int64), non_blocking=True)
        if feed is not None:
            feed.fill(self.ids, step.decodes)
        self.positions[:size].copy_(staged(flat.positions + [0] * pad, device, torch.int64), non_blocking=True)
        self.slots[:size].copy_(staged(flat.slots + [self.scratch_slot] * pad, device, torch.int64), non_blocking=True)
        self.lens[:size].copy_(staged(lens + [1] * pad, device, torch.int32), non_blocking=True)
        self.tables[:size, :width].copy_(staged(table, device), non_blocking=True)
        self.rows[: len(rows)].copy_(staged(rows, device, torch.int64), non_blocking=True)
        graph, out = self.graphs[size]
        graph.replay()
        self.replays += 1
        self.mixed_replays += bool(step.prefills)
        return out[:sampled]
