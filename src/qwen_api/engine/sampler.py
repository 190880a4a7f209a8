"""Per-sequence sampling of one batch's logits, on the logits' device, by the shared rules of `engine/sampling.py`:
the native engine calls it on the GPU, the transformers engine from its last logits processor.

Each row has its own temperature, top-k, top-p, min-p and seed. The order is the one every engine uses:
temperature, then top-k, then top-p over what top-k left, then min-p, then one draw (bias and penalties were
applied to the raw logits before, by the engine). When every row has a top-k (Qwen2's checkpoints default to
20), the filters and the draw work on each row's k best tokens, not on the whole vocabulary.

The draw is Gumbel-max, argmax(scores + noise): a seeded row's noise is a hash of `row_key(seed, step)` and the
token id, so its draw does not depend on the rest of the batch, nor on whether the columns are candidates or
the vocabulary; other rows take Gumbel noise from the device's RNG. Greedy rows (temperature below 1e-5) take
the argmax of their raw logits. A row whose logits turn NaN is sanitised (it samples uniformly) rather than
poisoning the batch. The only host work is building a few small parameter tensors, copied without waiting
(`to_device`); nothing syncs until the caller reads the tokens.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch

from qwen_api.engine.base import SamplingParams
from qwen_api.engine.sampling import effective_top_k, gumbel_noise, held_back, is_greedy, min_p_filter, row_key


@dataclass(frozen=True)
class Row:
    params: SamplingParams
    step: int  # tokens this sequence has generated so far


def staged(values: list | torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Host values (a list, or a host tensor) as a host tensor that a copy to `device` with `non_blocking=True`
    need not wait for: in page-locked memory when `device` is a GPU. A copy from pageable memory may be synchronous
    with the host, waiting for all the work queued on the stream before it (CUDA stages it through a pinned buffer
    of its own), which would make the host wait for the step in flight before it can launch the next one: the
    overlap of steps undone. From pinned memory the copy is a DMA queued in stream order; PyTorch's pinned-memory
    cache does not hand the buffer out again before that copy has run. vLLM stages its step inputs the same way."""
    pin = device.type == "cuda"
    if isinstance(values, torch.Tensor):
        values = values if dtype is None else values.to(dtype)
        return values.pin_memory() if pin and not values.is_pinned() else values
    return torch.tensor(values, dtype=dtype, pin_memory=pin)


def to_device(values: list | torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A small tensor from host values, copied without waiting for the device: a plain `torch.tensor(values,
    device=cuda)` synchronises the stream, and each such wait in a step leaves the GPU idle while the host
    launches what follows. Asynchronous (from pinned memory, `staged`), the host queues the whole sampling step
    while the forward pass runs."""
    return staged(values, device, dtype).to(device, non_blocking=True)


def sanitise(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NaN becomes -inf, +inf the largest float. Returns those logits, each row's argmax, and which rows are left
    with no finite score (to be drawn uniformly): one pass to clean and one to reduce, over a [B, V] that at 64
    rows of Qwen2's vocabulary is 39 MB."""
    logits = torch.nan_to_num(logits, nan=float("-inf"), posinf=torch.finfo(logits.dtype).max)
    best, greedy = logits.max(dim=-1)  # the first index of the largest value, as argmax; 0 for a dead row
    return logits, greedy, torch.isneginf(best)


def forbid_undecodable(logits: torch.Tensor, decodable: int) -> None:
    """Make the ids at or past `decodable` -inf in `logits` [B, V], in place, before anything reads them. A
    checkpoint's embedding may be padded past its tokenizer (Qwen2-7B: 152,064 rows for 151,646 ids); those rows were
    never trained, the tokenizer cannot decode them, and a drawn one would come out as no text at all."""
    if decodable < logits.size(-1):
        logits[:, decodable:] = float("-inf")


def hold_back(logits: torch.Tensor, rows: list[Row], end_ids: Collection[int]) -> None:
    """min_tokens: the tokens `held_back` names for each row of `logits` [B, V] (one `Row` each) become -inf, in
    place (ids past the row are dropped), unless that leaves the row no finite score: a grammar that allows only the
    end token wins over min_tokens, and that row is left as it was. Decided on the device: nothing waits for it."""
    width = logits.size(-1)
    pairs = [(i, t) for i, row in enumerate(rows) for t in held_back(row.params, row.step, end_ids) if 0 <= t < width]
    if not pairs:
        return
    device = logits.device
    unique = sorted({r for r, _ in pairs})
    at = {r: i for i, r in enumerate(unique)}
    index = (
        to_device([r for r, _ in pairs], device, torch.int64),
        to_device([t for _, t in pairs], device, torch.int64),
    )
    saved = logits[index]
    logits[index] = float("-inf")
    alive = torch.isfinite(logits.index_select(0, to_device(unique, device, torch.int64))).any(dim=-1)  # [rows]
    keep = alive.index_select(0, to_device([at[r] for r, _ in pairs], device, torch.int64))
    logits[index] = torch.where(keep, torch.full_like(saved, float("-inf")), saved)


def top_candidates(scores: torch.Tensor, top_k: list[int], top_p: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [B, V] already divided by temperature; top_k per row (0: off), top_p per row (1: off).

    Returns (values, token ids) [B, W], best first, the filtered ones -inf. When every row has a top-k, W is the
    largest k (a `topk`, not a sort of the whole vocabulary: 152k entries a row for Qwen2); else the vocabulary.
    The width is decided from the host's lists, so nothing here waits for the device.
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
    return ordered.masked_fill(~keep, float("-inf")), order


def filter_top_k_top_p(scores: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """`top_candidates` written back over the whole vocabulary: scores [B, V] with the filtered ones -inf."""
    values, order = top_candidates(scores, top_k, top_p)
    return torch.full_like(scores, float("-inf")).scatter(-1, order, values)


def _seed(params: SamplingParams) -> int:
    assert params.seed is not None
    return params.seed


def _draw(
    scores: torch.Tensor,  # [B, W] filtered, -inf where excluded
    min_p: list[float],
    seeded: list[int],  # rows with a seed
    keys: list[int],  # their `row_key`s
    tokens: torch.Tensor | int,  # the token ids of the columns ([B, W]), or the vocabulary size (columns = ids)
) -> torch.Tensor:  # [B]: the chosen column of each row
    """min-p, then one Gumbel-max draw: device-RNG noise for unseeded rows; a seeded row's noise is hashed from its
    key and each column's token id, so it is the same whether the columns are the vocabulary or the candidates."""
    device = scores.device
    if any(m > 0 for m in min_p):
        scores = min_p_filter(scores, to_device(min_p, device, scores.dtype))
    noise = -torch.log(torch.empty_like(scores).exponential_())
    if seeded:
        index = to_device(seeded, device, torch.int64)
        ids = tokens if isinstance(tokens, int) else tokens.index_select(0, index)
        noise.index_copy_(0, index, gumbel_noise(to_device(keys, device, torch.int64), ids, scores.dtype))
    return (scores + noise).argmax(dim=-1)


def sample(logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
    """logits [B, V] (fp32) -> token ids [B] (int64), on the logits' device."""
    logits, greedy, dead = sanitise(logits)
    drawn_rows = [i for i, r in enumerate(rows) if not is_greedy(r.params.temperature)]
    if not drawn_rows:
        return greedy
    device, vocab = logits.device, logits.size(-1)
    picked = [rows[i].params for i in drawn_rows]
    index = to_device(drawn_rows, device, torch.int64)
    scores = logits.index_select(0, index) / to_device([p.temperature for p in picked], device, logits.dtype)[:, None]
    scores.masked_fill_(dead.index_select(0, index)[:, None], 0.0)  # no finite score left: uniform
    top_k = [effective_top_k(p.top_k, vocab) for p in picked]
    top_p = [p.top_p for p in picked]
    seeded = [i for i, p in enumerate(picked) if p.seed is not None]
    keys = [row_key(_seed(picked[i]), rows[drawn_rows[i]].step) for i in seeded]
    min_p = [p.min_p for p in picked]
    if all(top_k):  # every row has a top-k (Qwen2's default: 20): draw among each row's candidates only
        values, tokens = top_candidates(scores, top_k, top_p)  # [B, W]
        choice = _draw(values, min_p, seeded, keys, tokens)
        drawn = tokens.gather(-1, choice[:, None])[:, 0]
    else:
        if filtered := [i for i in range(len(picked)) if top_k[i] or top_p[i] < 1.0]:  # rows with top-k or top-p
            which = to_device(filtered, device, torch.int64)
            part = filter_top_k_top_p(scores.index_select(0, which), [top_k[i] for i in filtered],
                                      [top_p[i] for i in filtered])  # fmt: skip
            scores = scores.index_copy(0, which, part)
        drawn = _draw(scores, min_p, seeded, keys, vocab)
    return greedy.index_copy(0, index, drawn)
