"""One scheduled step in, logits out: builds the step's tensors, runs the model, replays CUDA graphs on CUDA.

Tokens are laid out as the scheduler's decodes (one each), then each prompt chunk; `sample_rows` picks the
rows whose logits are sampled (every decode, and a chunk's last token when it ends its prompt). On CUDA with
Triton, decode-only steps of up to `max_batch_size` rows replay a CUDA graph captured for the next size up
on a ladder (1, 2, 4, 8, 16, 24, 32, ...): the whole network, rows padded with a scratch slot, one launch
instead of hundreds. Steps that read prompt chunks run eagerly (their shapes vary).
"""

from __future__ import annotations

import logging

import torch

from qwen_api.engine.native.attention import SHORT_CHUNK, AttentionMetadata, PrefillSpan, batch_prefills
from qwen_api.engine.native.kv_cache import KVCache
from qwen_api.engine.native.model import CausalLM
from qwen_api.engine.native.scheduler import Sequence, Step
from qwen_api.engine.sampler import to_device

log = logging.getLogger(__name__)


def triton_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def graph_sizes(max_batch_size: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s < max_batch_size]
    sizes += list(range(16, max_batch_size, 8))
    return [*sizes, max_batch_size]


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
        if model.ops.fused:
            try:
                model.ops.warm(model)
                log.info("elementwise steps fused with torch.compile")
            except Exception:  # an inductor or Triton failure costs speed, never the engine
                log.exception("fusing the elementwise steps with torch.compile failed; running them eagerly")
                model.ops.unfuse()
        self.graphs: CudaGraphs | None = None
        if use_cuda_graphs and self.use_triton:
            self.graphs = CudaGraphs(self, max_batch_size)

    def _slot(self, seq: Sequence, pos: int) -> int:
        bs = self.cache.block_size
        return seq.blocks[pos // bs] * bs + pos % bs

    @torch.inference_mode()
    def run(self, step: Step) -> torch.Tensor:
        """logits [len(step.sampled), V] fp32."""
        if not step.prefills and self.graphs is not None and len(step.decodes) <= self.graphs.max_size:
            return self.graphs.run(step.decodes)
        return self.run_eager(step)

    def run_eager(self, step: Step) -> torch.Tensor:
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        for seq in step.decodes:
            pos = seq.computed
            ids.append(seq.tokens[pos])
            positions.append(pos)
            slots.append(self._slot(seq, pos))
        meta = AttentionMetadata(slot_mapping=torch.empty(0), num_decode=len(step.decodes), use_triton=self.use_triton)
        if step.decodes:
            width = max(len(seq.blocks) for seq in step.decodes)
            table = [seq.blocks + [self.cache.scratch_block] * (width - len(seq.blocks)) for seq in step.decodes]
            lens = [seq.computed + 1 for seq in step.decodes]
            meta.block_tables = to_device(table, self.device, torch.int32)
            meta.context_lens = to_device(lens, self.device, torch.int32)
            meta.max_context_len = max(lens)
        sample_rows = list(range(len(step.decodes)))
        bs = self.cache.block_size
        short = [seq for seq, n in step.prefills if n <= SHORT_CHUNK] if self.batched_prefill else []
        batched: list[tuple[int, int, int, list[int]]] = []
        for seq, n in step.prefills:
            start, end = seq.computed, seq.computed + n
            if len(short) > 1 and n <= SHORT_CHUNK:
                batched.append((len(ids), n, end, seq.blocks))
            else:
                blocks = to_device(seq.blocks[: -(-end // bs)], self.device, torch.int64)
                meta.prefills.append(PrefillSpan(q_start=len(ids), q_len=n, ctx_len=end, blocks=blocks))
            ids.extend(seq.tokens[start:end])
            positions.extend(range(start, end))
            slots.extend(self._slot(seq, p) for p in range(start, end))
            if end == len(seq.tokens):
                sample_rows.append(len(ids) - 1)
        if batched:
            meta.prefill_batch = batch_prefills(batched, bs, self.device)
        meta.slot_mapping = to_device(slots, self.device, torch.int64)
        hidden = self.model(
            to_device(ids, self.device, torch.int64),
            to_device(positions, self.device, torch.int64),
            self.cache.layers,
            meta,
        )
        rows = to_device(sample_rows, self.device, torch.int64)
        return self.model.logits(hidden.index_select(0, rows))


class CudaGraphs:
    """Decode steps captured once per batch size on the ladder, replayed with the step's inputs copied in."""

    def __init__(self, runner: ModelRunner, max_batch_size: int) -> None:
        self.runner = runner
        self.sizes = graph_sizes(max_batch_size)
        self.max_size = self.sizes[-1]
        device, cache = runner.device, runner.cache
        n = self.max_size
        self.ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.scratch_slot = cache.scratch_block * cache.block_size
        self.slots = torch.full((n,), self.scratch_slot, dtype=torch.int64, device=device)
        self.tables = torch.full((n, runner.max_blocks_per_seq), cache.scratch_block, dtype=torch.int32, device=device)
        self.lens = torch.ones(n, dtype=torch.int32, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._capture()

    def _meta(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slots[:size],
            num_decode=size,
            block_tables=self.tables[:size],
            context_lens=self.lens[:size],
            use_triton=True,
        )

    def _forward(self, size: int) -> torch.Tensor:
        model = self.runner.model
        hidden = model(self.ids[:size], self.positions[:size], self.runner.cache.layers, self._meta(size))
        return model.logits(hidden)

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
        log.info("captured CUDA graphs for decode batch sizes %s", self.sizes)

    def run(self, decodes: list[Sequence]) -> torch.Tensor:
        n = len(decodes)
        size = next(s for s in self.sizes if s >= n)
        runner = self.runner
        width = max(len(seq.blocks) for seq in decodes)
        scratch = runner.cache.scratch_block
        rows = [seq.blocks + [scratch] * (width - len(seq.blocks)) for seq in decodes]
        table = torch.tensor(rows + [[scratch] * width] * (size - n), dtype=torch.int32)
        pos = [seq.computed for seq in decodes]
        host = {
            "ids": [seq.tokens[p] for seq, p in zip(decodes, pos, strict=True)] + [0] * (size - n),
            "positions": pos + [0] * (size - n),
            "slots": [runner._slot(seq, p) for seq, p in zip(decodes, pos, strict=True)]
            + [self.scratch_slot] * (size - n),
            "lens": [p + 1 for p in pos] + [1] * (size - n),
        }
        self.ids[:size].copy_(torch.tensor(host["ids"]), non_blocking=True)
        self.positions[:size].copy_(torch.tensor(host["positions"]), non_blocking=True)
        self.slots[:size].copy_(torch.tensor(host["slots"]), non_blocking=True)
        self.lens[:size].copy_(torch.tensor(host["lens"], dtype=torch.int32), non_blocking=True)
        self.tables[:size, :width].copy_(table, non_blocking=True)
        graph, out = self.graphs[size]
        graph.replay()
        return out[:n]
