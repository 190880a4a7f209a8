"""Sampling rules every engine shares, written once: what greedy means, how top-k is clamped, how seeds work.

The order of the sampling transforms is the same in every engine and documented in the README: temperature
first, then top-k, then top-p over what top-k left, then one draw. A temperature below `GREEDY_BELOW` is
greedy (dividing by it would overflow to inf, and inf - inf is NaN in the softmax).

Seeds: a seeded sequence draws from its own counter-based noise, a hash of (seed, step, token id), so the
draw does not depend on what else shares the batch. `choice_seed` gives each of a request's n samples its own
seed, so n samples with one request seed differ from each other and still reproduce.
"""

from __future__ import annotations

from typing import Any

GREEDY_BELOW = 1e-5
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


def uniform_noise(keys: Any, vocab: int) -> Any:
    """U(0,1) of shape [B, V] (float64) from per-row int keys [B], by a 32-bit integer mix of (key, token id).

    Plain integer tensor arithmetic: no Python loop over rows and no host sync, so it also runs in CUDA graphs.
    """
    import torch

    token = torch.arange(vocab, device=keys.device, dtype=torch.int64)
    x = (keys.to(torch.int64).unsqueeze(-1) * 0x9E3779B1 + token) & _MASK32  # [B, V]
    for _ in range(2):
        x = x ^ (x >> 16)
        x = (x * 0x45D9F3B) & _MASK32
    x = x ^ (x >> 16)
    return (x.to(torch.float64) + 0.5) / 2.0**32


def gumbel_noise(keys: Any, vocab: int, dtype: Any) -> Any:
    """Gumbel(0, 1) noise [B, V]: argmax(logits + noise) is an exact sample from softmax(logits)."""
    import torch

    return (-torch.log(-torch.log(uniform_noise(keys, vocab)))).to(dtype)
