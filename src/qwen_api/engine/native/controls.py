"""Logit bias and penalties for a whole step at once, on the device: the native engine's `LogitControls`.

The rules are `engine/sampling.py`'s (`LogitControls` documents them: bias, then the repetition penalty over
prompt and output, then OpenAI's frequency and presence penalties over the output). Applied row by row they
cost several small kernels and a host-to-device copy per sequence per step, which at 64 sequences is
milliseconds of host time on a GPU step of a few. And every `/v1` request to a Qwen2 checkpoint has a
repetition penalty (its generation_config.json sets 1.05). Here the whole step takes a fixed handful of
kernels, whatever the number of rows.

The state lives on the device in slots, one per sequence in the batch that has controls:
- `counts` [S, V] int32: how often each token has been generated;
- `prompt` [S, V] bool: which tokens the prompt holds (read by the repetition penalty only);
- `bias` [S, V] float32: the logit bias.
A sequence takes a slot the first time it is sampled, filled from its tokens so far (so a preempted sequence
that comes back starts where it was), counts its sampled tokens there without leaving the device, and gives
the slot back once it has left the batch. The batch never holds more sequences than slots.
"""

from __future__ import annotations

import torch

from qwen_api.engine.native.scheduler import PENDING, Sequence
from qwen_api.engine.sampler import to_device
from qwen_api.engine.sampling import count_penalty, repetition_penalised


class BatchControls:
    def __init__(self, slots: int, vocab: int, device: torch.device) -> None:
        self.vocab, self.device = vocab, device
        self.counts = torch.zeros(slots, vocab, dtype=torch.int32, device=device)
        self.prompt = torch.zeros(slots, vocab, dtype=torch.bool, device=device)
        self.bias = torch.zeros(slots, vocab, dtype=torch.float32, device=device)
        self._free = list(range(slots))
        self._slot_of: dict[Sequence, int] = {}

    def retain(self, running: list[Sequence]) -> None:
        """Give back the slots of sequences that are no longer in the batch (finished, cancelled, preempted)."""
        if len(self._slot_of) > 0:
            keep = set(running)
            for seq in [s for s in self._slot_of if s not in keep]:
                self._free.append(self._slot_of.pop(seq))

    def _slot(self, seq: Sequence) -> int:
        if (slot := self._slot_of.get(seq)) is not None:
            return slot
        slot = self._free.pop()
        params, device, vocab = seq.params, self.device, self.vocab
        self.counts[slot].zero_()
        if generated := seq.tokens[seq.prompt_len :]:
            # a slot is taken at a sequence's first draw, or back from preemption: never over a token in flight
            assert PENDING not in generated, "counts would miss a token the previous step drew"
            ids = to_device(generated, device, torch.int64)
            self.counts[slot].index_put_((ids,), torch.ones_like(ids, dtype=torch.int32), accumulate=True)
        self.prompt[slot].zero_()
        if params.repetition_penalty != 1.0:
            prompt = [t for t in set(seq.tokens[: seq.prompt_len]) if t < vocab]
            self.prompt[slot, to_device(prompt, device, torch.int64)] = True
        self.bias[slot].zero_()
        if bias := [(t, b) for t, b in params.logit_bias if 0 <= t < vocab]:  # ids past the row are dropped
            ids = to_device([t for t, _ in bias], device, torch.int64)
            values = to_device([b for _, b in bias], device, torch.float32)
            self.bias[slot].index_put_((ids,), values, accumulate=True)
        self._slot_of[seq] = slot
        return slot

    def apply(self, logits: torch.Tensor, rows: list[int], seqs: list[Sequence]) -> torch.Tensor:
        """Apply each sequence's controls to its row of `logits` [B, V] (fp32), in place; returns the slots
        tensor that `accept` takes."""
        slots = to_device([self._slot(s) for s in seqs], self.device, torch.int64)
        index = to_device(rows, self.device, torch.int64)
        x = logits.index_select(0, index)
        if any(s.params.logit_bias for s in seqs):
            x += self.bias.index_select(0, slots)
        counts = self.counts.index_select(0, slots)
        repetition = [s.params.repetition_penalty for s in seqs]
        if any(r != 1.0 for r in repetition):
            seen = self.prompt.index_select(0, slots) | (counts > 0)
            r = to_device(repetition, self.device, x.dtype)[:, None]
            x = torch.where(seen, repetition_penalised(x, r), x)  # rows with r = 1 come out unchanged
        frequency = [s.params.frequency_penalty for s in seqs]
        presence = [s.params.presence_penalty for s in seqs]
        if any(frequency) or any(presence):
            f = to_device(frequency, self.device, x.dtype)[:, None]
            p = to_device(presence, self.device, x.dtype)[:, None]
            x -= count_penalty(counts.to(x.dtype), f, p)
        logits.index_copy_(0, index, x)
        return slots

    def accept(self, slots: torch.Tensor, tokens: torch.Tensor) -> None:
        """Count each row's sampled token (`tokens` [n], still on the device) in its slot."""
        self.counts.index_put_((slots, tokens), torch.ones_like(tokens, dtype=torch.int32), accumulate=True)
