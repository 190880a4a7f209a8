"""Per-request seeds inside a shared batch: a continuous-batching logits processor doing Gumbel-max sampling.

The batch samples with one global RNG, so a request's draws would depend on its neighbours. For a request
with a seed, this processor draws Gumbel noise from a counter-based hash of (seed, step, token id),
picks argmax(scores + noise) -- an exact sample from softmax(scores) -- and leaves only that token, so the
batch's own multinomial draw can only return it. Rows without a seed are untouched. The hash is plain
integer tensor arithmetic (no Python loop over rows, no host sync on GPU), so it also runs in CUDA graphs.

Being last, it also guards the batch: the draw is one `torch.multinomial` for every row, and a single row
with NaN or without any finite score makes it raise, which stops the engine for everybody. Such a row
becomes uniform instead: that one request gets noise, the others are unharmed.

`GrammarMask`, the structured-outputs processor, lives here too: it runs first in the same list, so a seeded
draw is a draw among the tokens a request's grammar allows. So do `RequestControls` (before it: records the raw
log-probabilities a request asked for, then applies its logit bias and penalties) and `MinP` (after top-p).
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

import torch
from transformers.generation.continuous_batching.cb_logits_processors import ContinuousBatchingLogitsProcessor

from qwen_api.engine.base import SamplingParams, TokenLogprob
from qwen_api.engine.sampling import LogitControls, gumbel_noise, min_p_filter, row_key, token_logprobs

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


class GrammarMask(ContinuousBatchingLogitsProcessor):
    """Structured outputs: masks each constrained row to the tokens its grammar allows. Must run first, before
    temperature, top-k, top-p and `SeededSampling`, so that a seeded draw is a draw among allowed tokens.

    The engine registers a `TokenMatcher` per request id; before each step the matcher takes the tokens the
    request generated since the last step (the batch appends them itself), then gives the next mask.
    """

    supported_kwargs: dict[str, type] = {}  # noqa: RUF012 (declared so by the base class)
    ignored_kwargs: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.matchers: dict[str, list[Any]] = {}  # request id -> [matcher, tokens it has taken]
        self._rows: list[tuple[int, Any]] = []  # this step's constrained rows, set by prepare_tensor_args

    def register(self, request_id: str, matcher: Any) -> None:
        self.matchers[request_id] = [matcher, 0]

    def unregister(self, request_id: str) -> None:
        self.matchers.pop(request_id, None)

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.fill_(0)

    def prepare_tensor_args(self, requests_with_new_token: list[Any]) -> torch.Tensor:
        rows: list[tuple[int, Any]] = []
        for row, request in enumerate(requests_with_new_token):
            entry = self.matchers.get(request.state.request_id)
            if entry is None:
                continue
            matcher, taken = entry
            generated = request.state.generated_tokens
            for token in generated[taken:]:
                matcher.advance(token)
            entry[1] = len(generated)
            rows.append((row, matcher))
        self._rows = rows
        flags = torch.zeros(len(requests_with_new_token), dtype=torch.int32)
        for row, _ in rows:
            flags[row] = 1
        return flags

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        rows, self._rows = self._rows, []
        if not rows:
            return scores
        allowed = torch.ones(scores.shape, dtype=torch.bool)
        for row, matcher in rows:
            if row < scores.size(0):
                allowed[row] = torch.from_numpy(matcher.allowed(scores.size(-1)))
        return scores.masked_fill(~allowed.to(scores.device), float("-inf"))


def install_grammar(manager: Any) -> GrammarMask:
    """Put the grammar mask first in a manager's list (before `manager.start()`); returns it for registration."""
    processors = manager.logit_processor
    mask = GrammarMask()
    processors.logits_processor.insert(0, mask)
    processors.tensors_required += 1
    processors.do_processing = True
    return mask


class _Controlled:
    """One request's state in `RequestControls`: its bias and penalties, and the raw log-probability rows of the
    positions it sampled, waiting for their tokens (which reach the engine later, through the output handler)."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int]) -> None:
        self.params = params
        self.controls = LogitControls(params, prompt_ids) if LogitControls.needed(params) else None
        self.accepted = 0  # generated tokens the penalties have counted
        self.rows: deque[torch.Tensor] = deque()  # one log-softmax row per sampled position, oldest first

    def logprobs(self, tokens: list[int]) -> tuple[TokenLogprob, ...] | None:
        """The entries of the next `tokens`, in order (called on the event loop as tokens arrive)."""
        if self.params.logprobs is None:
            return None
        rows = torch.stack([self.rows.popleft() for _ in tokens])
        return tuple(token_logprobs(rows, tokens, [self.params.logprobs] * len(tokens)))


class RequestControls(ContinuousBatchingLogitsProcessor):
    """First in the list, so it sees the raw logits: keeps each registered request's log-softmax row when it asked
    for log-probabilities, then applies its logit bias and penalties (engine/sampling.py) in place."""

    supported_kwargs: dict[str, type] = {}  # noqa: RUF012 (declared so by the base class)
    ignored_kwargs: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.requests: dict[str, _Controlled] = {}
        self._lock = threading.Lock()  # registration on the event loop, reads on the generation thread
        self._rows: list[tuple[int, _Controlled]] = []

    def register(self, request_id: str, params: SamplingParams, prompt_ids: list[int]) -> _Controlled | None:
        if params.logprobs is None and not LogitControls.needed(params):
            return None
        state = _Controlled(params, prompt_ids)
        with self._lock:
            self.requests[request_id] = state
        return state

    def unregister(self, request_id: str) -> None:
        with self._lock:
            self.requests.pop(request_id, None)

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.fill_(0)

    def prepare_tensor_args(self, requests_with_new_token: list[Any]) -> torch.Tensor:
        rows: list[tuple[int, _Controlled]] = []
        with self._lock:
            for row, request in enumerate(requests_with_new_token):
                state = self.requests.get(request.state.request_id)
                if state is None:
                    continue
                if state.controls is not None:
                    generated = request.state.generated_tokens
                    for token in generated[state.accepted :]:
                        state.controls.accept(token)
                    state.accepted = len(generated)
                rows.append((row, state))
        self._rows = rows
        return torch.zeros(len(requests_with_new_token), dtype=torch.int32)

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        rows, self._rows = self._rows, []
        for row, state in rows:
            if row >= scores.size(0):
                continue
            if state.params.logprobs is not None:
                state.rows.append(torch.log_softmax(scores[row].float(), dim=-1).cpu())
            if state.controls is not None:
                state.controls.apply(scores[row])
        return scores


class MinP(ContinuousBatchingLogitsProcessor):
    """min-p per request, after temperature, top-k and top-p and before the draw (`SeededSampling`)."""

    supported_kwargs: dict[str, type] = {"min_p": float}  # noqa: RUF012 (declared so by the base class)
    ignored_kwargs: tuple[str, ...] = ()

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.copy_(torch.zeros_like(int32_tensor, dtype=torch.float32).view(dtype=torch.int32))

    def prepare_tensor_args(self, requests_with_new_token: list[Any]) -> torch.Tensor:
        values = [float(r.state.logit_processor_kwargs.get("min_p", 0.0)) for r in requests_with_new_token]
        return torch.tensor(values, dtype=torch.float32).view(dtype=torch.int32)

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        min_p = tensor_arg[: scores.size(0)].view(dtype=torch.float32)
        if scores.device.type == "cpu" and not bool((min_p > 0).any()):
            return scores
        return min_p_filter(scores, min_p.to(scores.dtype))


def install_controls(manager: Any) -> RequestControls:
    """Put `RequestControls` first and `MinP` last in a manager's list; call after `install_grammar` and before
    `install` (which appends the seeded draw after `MinP`) and `manager.start()`."""
    processors = manager.logit_processor
    controls = RequestControls()
    processors.logits_processor.insert(0, controls)
    processors.logits_processor.append(MinP())
    processors.tensors_required += 2
    processors.supported_keys.update(MinP.supported_kwargs)
    processors.do_processing = True
    return controls
