"""Per-request seeds inside a shared batch: a continuous-batching logits processor doing Gumbel-max sampling.

The batch samples with one global RNG, so a request's draws would depend on its neighbours. For a request
with a seed, this processor draws Gumbel noise from a counter-based hash of (seed, step, token id),
picks argmax(scores + noise) -- an exact sample from softmax(scores) -- and leaves only that token, so the
batch's own multinomial draw can only return it. Rows without a seed are untouched. The hash is plain
integer tensor arithmetic (no Python loop over rows, no host sync on GPU), so it also runs in CUDA graphs.

Being last, it also guards the batch: the draw is one `torch.multinomial` for every row, and a single row
with NaN or without any finite score makes it raise, which stops the engine for everybody. Such a row
becomes uniform instead: that one request gets noise, the others are unharmed.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.generation.continuous_batching.cb_logits_processors import ContinuousBatchingLogitsProcessor

from qwen_api.engine.sampling import gumbel_noise, row_key

_NO_SEED = 0


def _sane(scores: torch.Tensor) -> torch.Tensor:
    """NaN becomes -inf, +inf the largest float; a row left with no finite score becomes uniform."""
    scores = torch.nan_to_num(scores, nan=float("-inf"), posinf=torch.finfo(scores.dtype).max)
    dead = torch.isneginf(scores).all(dim=-1, keepdim=True)  # [B, 1]
    return torch.where(dead, torch.zeros_like(scores), scores)


class SeededSampling(ContinuousBatchingLogitsProcessor):
    """Must run after temperature, top-k and top-p: it samples from the distribution they leave."""

    supported_kwargs: dict[str, type] = {"seed": int}  # noqa: RUF012 (declared so by the base class)
    ignored_kwargs: tuple[str, ...] = ()

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.fill_(_NO_SEED)

    def prepare_tensor_args(self, requests_with_new_token: list[Any]) -> torch.Tensor:
        keys = []
        for request in requests_with_new_token:
            seed = request.state.logit_processor_kwargs.get("seed")
            keys.append(_NO_SEED if seed is None else row_key(seed, request.state.generated_len()))
        return torch.tensor(keys, dtype=torch.int32, device="cpu")

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        scores = _sane(scores)
        keys = tensor_arg[: scores.size(0)]  # [B]
        seeded = keys != _NO_SEED
        if scores.device.type == "cpu" and not bool(seeded.any()):
            return scores  # nothing to do; on a GPU the branch would cost a sync, so it always computes
        gumbel = gumbel_noise(keys, scores.size(-1), scores.dtype)  # [B, V]
        winner = (scores + gumbel).argmax(dim=-1, keepdim=True)  # [B, 1]
        only_winner = torch.full_like(scores, float("-inf")).scatter(-1, winner, 0.0)
        return torch.where(seeded.unsqueeze(-1), only_winner, scores)


def install(manager: Any) -> None:
    """Append the processor to a manager's list. Must run before `manager.start()` sizes the argument tensors."""
    processors = manager.logit_processor
    processors.logits_processor.append(SeededSampling())
    processors.tensors_required += 1
    processors.supported_keys.update(SeededSampling.supported_kwargs)
    processors.do_processing = True
