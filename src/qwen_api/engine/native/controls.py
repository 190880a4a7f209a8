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

from qwen_api.engine.native.scheduler import Sequence
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
            ids = torch.tensor(generated, dtype=torch.int64, device=device)
            self.counts[slot].index_put_((ids,), torch.ones_like(ids, dtype=torch.int32), accumulate=True)
        self.prompt[slot].zero_()
        if params.repetition_penalty != 1.0:
            prompt = [t for t in set(seq.tokens[: seq.prompt_len]) if t < vocab]
            self.prompt[slot, torch.tensor(prompt, dtype=torch.int64, device=device)] = True
        self.bias[slot].zero_()
        if bias := [(t, b) for t, b in params.logit_bias if 0 <= t < vocab]:  # ids past the row are dropped
            ids = torch.tensor([t for t, _ in bias], dtype=torch.int64, device=device)
            values = torch.tensor([b for _, b in bias], dtype=torch.float32, device=device)
            self.bias[slot].index_put_((ids,), values, accumulate=True)
        self._slot_of[seq] = slot
        return slot

    def apply(self, logits: torch.Tensor, rows: list[int], seqs: list[Sequence]) -> torch.Tensor:
        """Apply each sequence's controls to its row of `logits` [B, V] (fp32), in place; returns the slots
        tensor that `accept` takes."""
        slots = torch.tensor([self._slot(s) for s in seqs], dtype=torch.int64, device=self.device)
        index = torch.tensor(rows, dtype=torch.int64, device=self.device)
        x = logits.index_select(0, index)
        if any(s.params.logit_bias for s in seqs):
            x += self.bias.index_select(0, slots)
        counts = self.counts.index_select(0, slots)
        repetition = [s.params.repetition_penalty for s in seqs]
        if any(r != 1.0 for r in repetition):
            seen = self.prompt.index_select(0, slots) | (counts > 0)
            r = torch.tensor(repetition, dtype=x.dtype, device=self.device)[:, None]
            x = torch.where(seen, repetition_penalised(x, r), x)  # rows with r = 1 come out unchanged
        frequency = [s.params.frequency_penalty for s in seqs]
        presence = [s.params.presence_penalty for s in seqs]
        if any(frequency) or any(presence):
            f = torch.tensor(frequency, dtype=x.dtype, device=self.device)[:, None]
            p = torch.tensor(presence, dtype=x.dtype, device=self.device)[:, None]
            x -= count_penalty(counts.to(x.dtype), f, p)
        logits.index_copy_(0, index, x)
        return slots

    def accept(self, slots: torch.Tensor, tokens: torch.Tensor) -> None:
        """Count each row's sampled token (`tokens` [n], still on the device) in its slot."""
        self.counts.index_put_((slots, tokens), torch.ones_like(tokens, dtype=torch.int32), accumulate=True)
