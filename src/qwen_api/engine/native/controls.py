"""Logit bias and penalties for a whole step at once, on the device: the native engine's `LogitControls`.

The rules are `engine/sampling.py`'s (`LogitControls` documents them: bias, then the repetition penalty over
prompt and output, then OpenAI's frequency and presence penalties over the output). Applied row by row they
cost several small kernels and a host-to-device copy per sequence per step, which at 64 sequences is
milliseconds of host time on a GPU step of a few. And every `/v1` request to a Qwen2 checkpoint has a
repetition penalty (its generation_config.json sets 1.05). Here the whole step takes a fixed handful of
kernels, whatever the number of rows.

The state lives on the device in slots, one per sequence in the batch that has controls:
- `counts` [S, V] int32: how often each token has been generated (frequency and presence penalties);
- `seen` [S, C] int64: the ids the repetition penalty reads, the prompt's distinct tokens then every generated
  token, `lengths[seq]` of them (the host knows how many); the rest of the row repeats the first id;
- `bias` [S, V] float32: the logit bias, and -inf for every id but a request's `allowed_ids` where it has them.
The repetition penalty (every Qwen2 request's) touches only those ids: gathered from the step's logits, divided
or multiplied, written back, a few hundred values a row where a pass over the vocabulary reads 152k (and at 64
rows, 39 MB, about ten times a step). An id that is there twice gets the same value written twice.
A sequence takes a slot the first time it is sampled, filled from its tokens so far (so a preempted sequence
that comes back starts where it was), counts its sampled tokens there without leaving the device, and gives
the slot back once it has left the batch. The batch never holds more sequences than slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qwen_api.engine.native.scheduler import PENDING, Sequence
from qwen_api.engine.sampler import to_device
from qwen_api.engine.sampling import count_penalty, repetition_penalised


@dataclass(frozen=True)
class Applied:
    """What `apply` did, for `accept`: the rows' slots, and where each row's next token goes in `seen`."""

    seqs: list[Sequence]
    slots: torch.Tensor  # [n] int64
    ends: torch.Tensor  # [n] int64


class BatchControls:
    def __init__(self, slots: int, vocab: int, device: torch.device, capacity: int) -> None:
        """`capacity`: the most tokens one sequence holds (prompt and output), so the most ids `seen` needs."""
        self.vocab, self.device = vocab, device
        self.counts = torch.zeros(slots, vocab, dtype=torch.int32, device=device)
        self.seen = torch.zeros(slots, capacity, dtype=torch.int64, device=device)
        self.bias = torch.zeros(slots, vocab, dtype=torch.float32, device=device)
        self._free = list(range(slots))
        self._slot_of: dict[Sequence, int] = {}
        self.lengths: dict[Sequence, int] = {}  # valid ids in each slot's row of `seen`

    def retain(self, running: list[Sequence]) -> None:
        """Give back the slots of sequences that are no longer in the batch (finished, cancelled, preempted)."""
        if len(self._slot_of) > 0:
            keep = set(running)
            for seq in [s for s in self._slot_of if s not in keep]:
                self._free.append(self._slot_of.pop(seq))
                del self.lengths[seq]

    def _slot(self, seq: Sequence) -> int:
        if (slot := self._slot_of.get(seq)) is not None:
            return slot
        slot = self._free.pop()
        params, device, vocab = seq.params, self.device, self.vocab
        generated = seq.tokens[seq.prompt_len :]
        # a slot is taken at a sequence's first draw, or back from preemption: never over a token in flight
        assert PENDING not in generated, "counts would miss a token the previous step drew"
        self.counts[slot].zero_()
        if generated:
            ids = to_device(generated, device, torch.int64)
            self.counts[slot].index_put_((ids,), torch.ones_like(ids, dtype=torch.int32), accumulate=True)
        seen = generated
        if params.repetition_penalty != 1.0:
            seen = sorted({t for t in seq.tokens[: seq.prompt_len] if t < vocab}) + generated
        if seen:
            self.seen[slot].fill_(seen[0])
            self.seen[slot, : len(seen)].copy_(to_device(seen, device, torch.int64))
        self.lengths[seq] = len(seen)
        self.bias[slot].zero_()
        if allowed := [t for t in params.allowed_ids if 0 <= t < vocab]:  # the others can never be drawn
            self.bias[slot].fill_(float("-inf"))
            self.bias[slot].index_fill_(0, to_device(allowed, device, torch.int64), 0.0)
        if bias := [(t, b) for t, b in params.logit_bias if 0 <= t < vocab]:  # ids past the row are dropped
            ids = to_device([t for t, _ in bias], device, torch.int64)
            values = to_device([b for _, b in bias], device, torch.float32)
            self.bias[slot].index_put_((ids,), values, accumulate=True)
        self._slot_of[seq] = slot
        return slot

    def apply(self, logits: torch.Tensor, rows: list[int], seqs: list[Sequence]) -> Applied:
        """Apply each sequence's controls to its row of `logits` [B, V] (fp32, contiguous), in place, in the rules'
        order: bias, repetition penalty, frequency and presence penalties. Returns what `accept` takes."""
        slots = to_device([self._slot(s) for s in seqs], self.device, torch.int64)
        index = to_device(rows, self.device, torch.int64)
        if any(s.params.logit_bias or s.params.allowed_ids for s in seqs):
            logits.index_add_(0, index, self.bias.index_select(0, slots))
        repetition = [s.params.repetition_penalty for s in seqs]
        width = max(self.lengths[s] for s in seqs)
        if any(r != 1.0 for r in repetition) and width:
            flat = logits.view(-1)  # fails loudly on a non-contiguous tensor rather than writing into a copy
            at = (index * logits.size(-1))[:, None] + self.seen[:, :width].index_select(0, slots)  # [n, width]
            values = flat[at]
            r = to_device(repetition, self.device, logits.dtype)[:, None]
            flat[at] = repetition_penalised(values, r)  # rows with r = 1 come out unchanged
        frequency = [s.params.frequency_penalty for s in seqs]
        presence = [s.params.presence_penalty for s in seqs]
        if any(frequency) or any(presence):
            f = to_device(frequency, self.device, logits.dtype)[:, None]
            p = to_device(presence, self.device, logits.dtype)[:, None]
            counts = self.counts.index_select(0, slots).to(logits.dtype)
            logits.index_copy_(0, index, logits.index_select(0, index) - count_penalty(counts, f, p))
        ends = to_device([self.lengths[s] for s in seqs], self.device, torch.int64)
        return Applied(seqs, slots, ends)

    def accept(self, applied: Applied, tokens: torch.Tensor) -> None:
        """Count each row's sampled token (`tokens` [n], still on the device) in its slot, and add it to `seen`."""
        self.counts.index_put_((applied.slots, tokens), torch.ones_like(tokens, dtype=torch.int32), accumulate=True)
        self.seen.index_put_((applied.slots, applied.ends), tokens)
        for seq in applied.seqs:
            self.lengths[seq] += 1
