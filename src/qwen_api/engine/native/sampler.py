"""Per-sequence sampling of one batch's logits, on the logits' device, by the shared rules of `engine/sampling.py`.

Each row has its own temperature, top-k, top-p, min-p and seed. The order is the one every engine uses:
temperature, then top-k, then top-p over what top-k left, then min-p, then one draw (bias and penalties were
applied to the raw logits before, by the engine). The draw is Gumbel-max, argmax(scores + noise): a
seeded row's noise is a hash of `row_key(seed, step)` and the token id, so its draw does not depend on the rest
of the batch; other rows take Gumbel noise from the device's RNG. Greedy rows (temperature below 1e-5) take the
argmax of their raw logits. A row whose logits turn NaN is sanitised (it samples uniformly) rather than
poisoning the batch. The only host work is building a few small parameter tensors, copied without waiting
(`to_device`); no sync until the caller
reads the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qwen_api.engine.base import SamplingParams
from qwen_api.engine.sampling import effective_top_k, gumbel_noise, is_greedy, min_p_filter, row_key


@dataclass(frozen=True)
class Row:
    params: SamplingParams
    step: int  # tokens this sequence has generated so far


def to_device(values: list, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A small tensor from host values, copied without waiting for the device: a plain `torch.tensor(values,
    device=cuda)` synchronises the stream, and each such wait in a step leaves the GPU idle while the host
    launches what follows. Asynchronous, the host queues the whole sampling step while the forward pass runs."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def sanitise(logits: torch.Tensor) -> torch.Tensor:
    """NaN becomes -inf, +inf the largest float; a row left with no finite score becomes uniform."""
    logits = torch.nan_to_num(logits, nan=float("-inf"), posinf=torch.finfo(logits.dtype).max)
    dead = torch.isneginf(logits).all(dim=-1, keepdim=True)  # [B, 1]
    return torch.where(dead, torch.zeros_like(logits), logits)


def filter_top_k_top_p(scores: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """scores [B, V] already divided by temperature; top_k per row (0: off), top_p per row (1: off). Filtered -> -inf.

    When every row has a top-k, a `topk` of the largest k replaces a sort of the whole vocabulary (152k entries a
    row for Qwen2). The width is decided from the host's lists, so nothing here waits for the device.
    """
    vocab = scores.size(-1)
    width = min(max(top_k), vocab) if all(k > 0 for k in top_k) else vocab
    k = to_device([min(k, vocab) if k > 0 else vocab for k in top_k], scores.device, torch.int64)  # [B]
    p = to_device(top_p, scores.device, scores.dtype)[:, None]  # [B, 1]
    ordered, order = scores.topk(width, dim=-1) if width < vocab else scores.sort(dim=-1, descending=True)  # [B, W]
    rank = torch.arange(width, device=scores.device)[None, :]  # [1, W]
    kth = ordered.gather(-1, (k.clamp(max=width) - 1)[:, None])  # [B, 1]: ties with the k-th are kept, as transformers
    keep = ordered >= kth  # [B, W] in sorted order
    ordered = ordered.masked_fill(~keep, float("-inf"))
    probs = ordered.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass strictly ahead of each token
    # top-p over what top-k left; the best token always stays, and p = 1 keeps all (the cumsum may round past 1)
    keep &= (before < p) | (rank == 0) | (p >= 1.0)
    filtered = torch.full_like(scores, float("-inf"))
    return filtered.scatter(-1, order, ordered.masked_fill(~keep, float("-inf")))


def _seed(params: SamplingParams) -> int:
    assert params.seed is not None
    return params.seed


def sample(logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
    """logits [B, V] (fp32) -> token ids [B] (int64), on the logits' device."""
    logits = sanitise(logits)
    greedy = logits.argmax(dim=-1)
    drawn_rows = [i for i, r in enumerate(rows) if not is_greedy(r.params.temperature)]
    if not drawn_rows:
        return greedy
    device, vocab = logits.device, logits.size(-1)
    picked = [rows[i].params for i in drawn_rows]
    index = to_device(drawn_rows, device, torch.int64)
    scores = logits.index_select(0, index) / to_device([p.temperature for p in picked], device, logits.dtype)[:, None]
    top_k = [effective_top_k(p.top_k, vocab) for p in picked]
    top_p = [p.top_p for p in picked]
    if filtered := [i for i in range(len(picked)) if top_k[i] or top_p[i] < 1.0]:  # rows with top-k or top-p
        which = to_device(filtered, device, torch.int64)
        scores = scores.index_copy(
            0,
            which,
            filter_top_k_top_p(
                scores.index_select(0, which), [top_k[i] for i in filtered], [top_p[i] for i in filtered]
            ),
        )
    if any(p.min_p > 0 for p in picked):
        scores = min_p_filter(scores, to_device([p.min_p for p in picked], device, scores.dtype))
    # Device-RNG Gumbel noise for unseeded rows; seeded rows replace theirs with their own hashed noise.
    noise = -torch.log(torch.empty_like(scores).exponential_())
    seeded = [i for i, p in enumerate(picked) if p.seed is not None]
    if seeded:
        keys = to_device([row_key(_seed(picked[i]), rows[drawn_rows[i]].step) for i in seeded], device, torch.int64)
        noise.index_copy_(0, to_device(seeded, device, torch.int64), gumbel_noise(keys, vocab, scores.dtype))
    drawn = (scores + noise).argmax(dim=-1)
    return greedy.index_copy(0, index, drawn)
