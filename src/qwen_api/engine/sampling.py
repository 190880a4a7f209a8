"""Sampling rules every engine shares, written once: what greedy means, how top-k is clamped, how seeds work,
how penalties, logit bias and min-p apply, and what a log-probability is.

The order of the sampling transforms is the same in every engine and documented in the README: on the raw
logits, the grammar's mask, the logit bias and the penalties (`LogitControls`), then min_tokens' hold on the end
and stop tokens (`held_back`); then temperature, top-k, top-p over what top-k left, min-p over what top-p left,
then one draw. Log-probabilities are taken from the raw logits,
before all of these (`token_logprobs`). A temperature below `GREEDY_BELOW` is
greedy (dividing by it would overflow to inf, and inf - inf is NaN in the softmax).

Seeds: a seeded sequence draws from its own counter-based noise, a hash of (seed, step, token id), so the
draw does not depend on what else shares the batch. `choice_seed` gives each of a request's n samples its own
seed, so n samples with one request seed differ from each other and still reproduce.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from qwen_api.engine.base import SamplingParams, TokenLogprob

GREEDY_BELOW = 1e-5
# The sampling fields a checkpoint's generation_config.json may set as its defaults (the ones vLLM reads too).
MODEL_DEFAULT_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
_MASK64 = 0xFFFFFFFFFFFFFFFF
_MASK32 = 0xFFFFFFFF


def is_greedy(temperature: float) -> bool:
    return temperature < GREEDY_BELOW


def effective_top_k(top_k: int, vocab_size: int) -> int:
    """0 when top-k keeps every token: k of 0 or less, or k at or past the vocabulary (a huge k would overflow
    kernels' int32)."""
    return top_k if 0 < top_k < vocab_size else 0


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a bijection on 64-bit integers that spreads every input bit."""
    x &= _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of sample `index` of a request: sample 0 keeps the request's seed (so n=1 is unchanged), the
    others get distinct seeds derived from it, so `n` samples with one seed are n different reproducible draws."""
    if seed is None or index == 0:
        return seed
    return _mix64((seed & _MASK64) ^ _mix64(index + 0x632BE59BD9B4E019))


def seed32(seed: int) -> int:
    """A 32-bit seed for libraries that take one, never 0xFFFFFFFF (llama.cpp reads that value as "random")."""
    return _mix64(seed & _MASK64) % _MASK32


def row_key(seed: int, step: int) -> int:
    """A nonzero 31-bit key for (seed, step): what the per-token noise of that draw is hashed from."""
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & _MASK64
    x ^= x >> 31
    return (x & 0x7FFFFFFF) or 1


def uniform_noise(keys: Any, tokens: Any) -> Any:
    """U(0,1) from per-row int keys [B], by a 32-bit integer mix of (key, token id): [B, V] for a vocabulary of
    `tokens` ids (an int), or [B, W] for the token ids in a tensor `tokens` [B, W] (a row's candidates only). A
    token's noise is the same either way, so drawing among candidates picks what a draw over the vocabulary would.

    Plain integer tensor arithmetic: no Python loop over rows and no host sync, so it also runs in CUDA graphs.
    """
    import torch

    if isinstance(tokens, int):
        tokens = torch.arange(tokens, device=keys.device, dtype=torch.int64)
    x = (keys.to(torch.int64).unsqueeze(-1) * 0x9E3779B1 + tokens) & _MASK32  # [B, V] or [B, W]
    for _ in range(2):
        x = x ^ (x >> 16)
        x = (x * 0x45D9F3B) & _MASK32
    x = x ^ (x >> 16)
    return (x.to(torch.float64) + 0.5) / 2.0**32


def gumbel_noise(keys: Any, tokens: Any, dtype: Any) -> Any:
    """Gumbel(0, 1) noise for `uniform_noise`'s tokens: argmax(logits + noise) is an exact sample from
    softmax(logits)."""
    import torch

    return (-torch.log(-torch.log(uniform_noise(keys, tokens)))).to(dtype)


def held_back(params: SamplingParams, generated: int, end_ids: Iterable[int]) -> list[int]:
    """The token ids a sequence that has generated `generated` tokens may not draw next: under vLLM's min_tokens,
    its end tokens and its stop tokens until it has that many (`engine/sampler.hold_back` applies them last, just
    before the draw); otherwise none."""
    if generated >= params.min_tokens:
        return []
    return sorted({*end_ids, *params.held_ids})


def repetition_penalised(logits: torch.Tensor, penalty: float | torch.Tensor) -> torch.Tensor:
    """transformers' and vLLM's repetition penalty on the logits of seen tokens: divided where positive,
    multiplied where not. `penalty` is a float or broadcasts against `logits`."""
    import torch

    return torch.where(logits > 0, logits / penalty, logits * penalty)


def count_penalty(counts: torch.Tensor, frequency: Any, presence: Any) -> torch.Tensor:
    """OpenAI's frequency and presence penalties: what a token generated `counts` times loses from its logit
    (nothing at count 0). `counts` in the logits' dtype; the penalties are floats or broadcast against it."""
    return counts * frequency + (counts > 0).to(counts.dtype) * presence


class LogitControls:
    """One sequence's logit bias and penalties, applied in place to its raw logits row before temperature.

    - `allowed_ids` (vLLM's allowed_token_ids): every other token's logit becomes -inf.
    - `logit_bias`: each listed token's logit gets its bias added (OpenAI: -100 bans, +100 all but forces).
    - `repetition_penalty` r (an extension, as in transformers and vLLM): every token seen in the prompt or the
      output so far has its logit divided by r where positive, multiplied by r where negative.
    - `frequency_penalty` f and `presence_penalty` p (OpenAI): a token generated c > 0 times so far loses
      f * c + p from its logit. Only generated tokens count, as in OpenAI's definition.

    The engine calls `accept(token)` with each sampled token, and `apply(row)` before sampling the next one.
    """

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int]) -> None:
        self._allowed = params.allowed_ids
        self._bias = params.logit_bias
        self._repetition = params.repetition_penalty
        self._frequency, self._presence = params.frequency_penalty, params.presence_penalty
        self._prompt = sorted(set(prompt_ids)) if self._repetition != 1.0 else []
        self._counts: dict[int, int] = {}
        self._tensors: dict[Any, tuple[Any, Any, Any, Any]] = {}  # device -> (bias ids, values, prompt ids, allowed)

    @staticmethod
    def needed(params: SamplingParams) -> bool:
        return (
            bool(params.logit_bias)
            or bool(params.allowed_ids)
            or params.repetition_penalty != 1.0
            or bool(params.frequency_penalty or params.presence_penalty)
        )

    def accept(self, token: int) -> None:
        self._counts[token] = self._counts.get(token, 0) + 1

    def _constant(self, device: Any, width: int) -> tuple[Any, Any, Any, Any]:
        """The bias, prompt and allowed ids as tensors on `device`, built once; ids past the row's `width` are dropped
        (the API refuses ids outside the tokenizer's vocabulary, and a model's row may be narrower: never index past
        it)."""
        import torch

        if device not in self._tensors:
            bias = [(t, b) for t, b in self._bias if 0 <= t < width]
            ids = torch.tensor([t for t, _ in bias], dtype=torch.int64, device=device)
            values = torch.tensor([b for _, b in bias], dtype=torch.float32, device=device)
            prompt = torch.tensor([t for t in self._prompt if t < width], dtype=torch.int64, device=device)
            allowed = torch.tensor([t for t in self._allowed if 0 <= t < width], dtype=torch.int64, device=device)
            self._tensors[device] = (ids, values, prompt, allowed)
        return self._tensors[device]

    def apply(self, row: torch.Tensor) -> None:
        """row: one sequence's logits [V], modified in place."""
        import torch

        bias_ids, bias, prompt, allowed = self._constant(row.device, row.size(0))
        if self._allowed:
            kept = row.index_select(0, allowed)
            row.fill_(float("-inf"))
            row.index_copy_(0, allowed, kept)
        if self._bias:
            row.index_add_(0, bias_ids, bias.to(row.dtype))
        if not self._counts and not self._prompt:
            return
        # Sampled tokens always lie inside the row. No `unique` (a device sync on CUDA): a token both in the prompt
        # and generated is written twice below, with the same value, computed from the same logit.
        generated = torch.tensor(list(self._counts), dtype=torch.int64, device=row.device)
        if self._repetition != 1.0:
            seen = torch.cat([prompt, generated])
            row.index_copy_(0, seen, repetition_penalised(row.index_select(0, seen), self._repetition))
        if self._frequency or self._presence:
            counts = torch.tensor(list(self._counts.values()), dtype=row.dtype, device=row.device)
            row.index_add_(0, generated, -count_penalty(counts, self._frequency, self._presence))


def min_p_filter(scores: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """scores [B, V] after temperature, top-k and top-p; min_p [B] (0: off). A token whose probability is below
    min_p times the row's largest becomes -inf; the most likely token always stays."""

    probs = scores.softmax(dim=-1)
    floor = probs.max(dim=-1, keepdim=True).values * min_p[:, None]  # 0 where min-p is off: nothing falls below
    return scores.masked_fill(probs < floor, float("-inf"))


def token_logprobs(
    logits: torch.Tensor, tokens: Sequence[int], tops: Sequence[int], decodable: int | None = None
) -> list[TokenLogprob]:
    """The log-probabilities of `tokens[i]` under row i of raw `logits` [B, V], with row i's `tops[i]` most likely
    tokens and its rank: an exact log-softmax in float32 of the logits before any sampling transform, over every row
    of the model's output (as transformers and vLLM compute it: a checkpoint's padding rows are part of its softmax).
    The alternatives and the rank are among the first `decodable` ids (those the tokenizer decodes; all when None)."""
    import torch

    index = torch.tensor(list(tokens), dtype=torch.int64, device=logits.device)
    chosen, values, ids, ranks = logprob_tensors(logits, index, max(tops, default=0), decodable)
    return logprob_entries(list(tokens), chosen.tolist(), values.tolist(), ids.tolist(), ranks.tolist(), tops)


def logprob_tensors(
    logits: torch.Tensor, tokens: torch.Tensor, width: int, decodable: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`token_logprobs`' arithmetic, on the logits' device without reading anything back: the chosen tokens'
    log-probabilities [B], the `width` best decodable ids of each row, values [B, width] and ids [B, width], and the
    chosen tokens' ranks [B]."""
    import torch

    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(-1, tokens[:, None])[:, 0]
    ranked = logprobs if decodable is None else logprobs[:, :decodable]
    values, ids = ranked.topk(min(width, ranked.size(-1)), dim=-1)
    rank = (ranked >= chosen[:, None]).sum(dim=-1).clamp_(min=1)  # an undecodable token still counts itself
    return chosen, values, ids, rank


def logprob_entries(
    tokens: list[int],
    chosen: list[float],
    top_values: list[list[float]],
    top_ids: list[list[int]],
    ranks: list[int],
    tops: Sequence[int],
) -> list[TokenLogprob]:
    """Host values of `logprob_tensors` as one `TokenLogprob` per token, each with its own number of tops."""
    from qwen_api.engine.base import TokenLogprob

    return [
        TokenLogprob(token, lp, tuple(zip(top_ids[i][: tops[i]], top_values[i][: tops[i]], strict=True)), ranks[i])
        for i, (token, lp) in enumerate(zip(tokens, chosen, strict=True))
    ]
