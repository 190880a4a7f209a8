"""Our logits processors inside transformers' continuous batching: the shared sampler, grammars, bias and penalties.

transformers' per-request top-k and top-p each sort every row's whole vocabulary at every step (152k entries for
Qwen2: on the tiny Qwen2 on the CPU, most of a step). So the manager is built without any sampling processor of
its own (`do_sample=False`: its last act is an argmax), and `Sampling`, last in the list, draws each row by the
rules every engine shares (`engine/sampler.py`: temperature, top-k, top-p over what top-k left, min-p, one draw,
Gumbel-max with per-request seeds hashed from (seed, step, token id), so a seed holds beside other traffic; a
row's NaN cannot stop the batch), and leaves only the drawn token finite.

First of all, `RequestControls` records the raw log-probabilities a request asked for (over every row of the
model's output, as transformers and vLLM give them), then applies its logit bias and penalties; `GrammarMask`, for
structured outputs, leaves only the tokens a request's grammar allows, so that a draw is a draw among them; then
`Decodable` makes the embedding's padding rows past the tokenizer -inf (engine/sampler.py), so none is drawn.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any, Generic, TypeVar

import torch
from transformers.generation.continuous_batching.cb_logits_processors import ContinuousBatchingLogitsProcessor

from qwen_api.engine.base import SamplingParams, TokenLogprob
from qwen_api.engine.sampler import Row, forbid_undecodable, hold_back, sample
from qwen_api.engine.sampling import LogitControls, token_logprobs

_GREEDY = SamplingParams(max_new_tokens=1, temperature=0.0)  # for a row whose request has left
State = TypeVar("State")
Processor = TypeVar("Processor", bound=ContinuousBatchingLogitsProcessor)


class _PerRequest(ContinuousBatchingLogitsProcessor, Generic[State]):
    """A processor whose per-request state lives here, keyed by request id: registered on the event loop, read on
    the generation thread (hence the lock). Its slot in the manager's argument tensors stays zeros."""

    supported_kwargs: dict[str, type] = {}  # noqa: RUF012 (declared so by the base class)
    ignored_kwargs: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.requests: dict[str, State] = {}
        self._lock = threading.Lock()

    def _put(self, request_id: str, state: State) -> None:
        with self._lock:
            self.requests[request_id] = state

    def unregister(self, request_id: str) -> None:
        with self._lock:
            self.requests.pop(request_id, None)

    def _states(self, requests_with_new_token: list[Any]) -> list[State | None]:
        """Each row's state, in the batch's row order (None where its request did not register or has left)."""
        with self._lock:
            return [self.requests.get(request.state.request_id) for request in requests_with_new_token]

    def _registered(self, requests_with_new_token: list[Any]) -> list[tuple[int, State, Any]]:
        """(row, state, request) for each row whose request registered and is still here."""
        states = self._states(requests_with_new_token)
        pairs = zip(states, requests_with_new_token, strict=True)
        return [(row, state, request) for row, (state, request) in enumerate(pairs) if state is not None]

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.fill_(0)

    def _no_args(self, requests_with_new_token: list[Any]) -> torch.Tensor:
        return torch.zeros(len(requests_with_new_token), dtype=torch.int32)


def _install(manager: Any, processor: Processor, first: bool) -> Processor:
    """Put a processor first or last in a manager's list; before `manager.start()`, which sizes the argument tensors."""
    processors = manager.logit_processor
    if first:
        processors.logits_processor.insert(0, processor)
    else:
        processors.logits_processor.append(processor)
    processors.tensors_required += 1
    processors.do_processing = True
    return processor


class Sampling(_PerRequest[SamplingParams]):
    """Last in the list: holds back the end tokens of rows under their min_tokens, then draws each row's token with
    `engine/sampler.py` and leaves only it finite, so that the manager's argmax returns it. A row whose request has
    left (cancelled while its step was built) is greedy."""

    def __init__(self, end_ids: frozenset[int]) -> None:
        super().__init__()
        self._rows: list[Row] = []
        self._end_ids = end_ids

    def register(self, request_id: str, params: SamplingParams) -> None:
        self._put(request_id, params)

    def prepare_tensor_args(self, requests_with_new_token: list[Any]) -> torch.Tensor:
        states = self._states(requests_with_new_token)
        self._rows = [
            Row(params or _GREEDY, request.state.generated_len())
            for params, request in zip(states, requests_with_new_token, strict=True)
        ]
        return self._no_args(requests_with_new_token)

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        rows, self._rows = self._rows, []
        rows = (rows + [Row(_GREEDY, 0)] * scores.size(0))[: scores.size(0)]
        hold_back(scores, rows, self._end_ids)
        tokens = sample(scores, rows)  # [B]
        return torch.full_like(scores, float("-inf")).scatter(-1, tokens[:, None], 0.0)


def install_sampling(manager: Any, end_ids: frozenset[int]) -> Sampling:
    """Append `Sampling` to a manager's list; returns it for registration. The manager must have been built with
    `do_sample=False`: no sampling processor of its own. `end_ids`: the tokens min_tokens holds back."""
    return _install(manager, Sampling(end_ids), first=False)


class _Follower:
    """A request's state that must see each token the request generates, once: the batch appends them itself."""

    taken = 0  # generated tokens already seen

    def new_tokens(self, request: Any) -> list[int]:
        """The tokens `request` generated since the last call."""
        generated: list[int] = request.state.generated_tokens
        new, self.taken = generated[self.taken :], len(generated)
        return new


class _Matched(_Follower):
    """One request's grammar state in `GrammarMask`: its matcher, and the generated tokens it has taken."""

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher


class GrammarMask(_PerRequest[_Matched]):
    """Structured outputs: masks each constrained row to the tokens its grammar allows, before `Sampling`, so that
    a draw is a draw among allowed tokens.

    The engine registers a `TokenMatcher` per request id; before each step the matcher takes the tokens the
    request generated since the last step (the batch appends them itself), then gives the next mask.
    """

    def __init__(self) -> None:
        super().__init__()
        self._rows: list[tuple[int, Any]] = []  # this step's constrained rows, set by prepare_tensor_args

    def register(self, request_id: str, matcher: Any) -> None:
        self._put(request_id, _Matched(matcher))

    def prepare_tensor_args(self, requests_with_new_token: list[Any]) -> torch.Tensor:
        rows: list[tuple[int, Any]] = []
        for row, state, request in self._registered(requests_with_new_token):
            for token in state.new_tokens(request):
                state.matcher.advance(token)
            rows.append((row, state.matcher))
        self._rows = rows
        return self._no_args(requests_with_new_token)

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
    """Put the grammar mask first in a manager's list; returns it for registration."""
    return _install(manager, GrammarMask(), first=True)


class _Controlled(_Follower):
    """One request's state in `RequestControls`: its bias and penalties (which count the generated tokens it has
    taken), and the raw log-probability rows of the positions it sampled, waiting for their tokens (which reach the
    engine later, through the output handler)."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], decodable: int | None) -> None:
        self.params, self.decodable = params, decodable
        self.controls = LogitControls(params, prompt_ids) if LogitControls.needed(params) else None
        self.rows: deque[torch.Tensor] = deque()  # one log-softmax row per sampled position, oldest first

    def logprobs(self, tokens: list[int]) -> tuple[TokenLogprob, ...] | None:
        """The entries of the next `tokens`, in order (called on the event loop as tokens arrive)."""
        if self.params.logprobs is None:
            return None
        rows = torch.stack([self.rows.popleft() for _ in tokens])
        return tuple(token_logprobs(rows, tokens, [self.params.logprobs] * len(tokens), self.decodable))


class RequestControls(_PerRequest[_Controlled]):
    """First in the list, so it sees the raw logits: keeps each registered request's log-softmax row when it asked
    for log-probabilities, then applies its logit bias and penalties (engine/sampling.py) in place."""

    def __init__(self, decodable: int | None) -> None:
        super().__init__()
        self._rows: list[tuple[int, _Controlled]] = []
        self._decodable = decodable  # the alternatives listed are among these ids

    def register(self, request_id: str, params: SamplingParams, prompt_ids: list[int]) -> _Controlled | None:
        if params.logprobs is None and not LogitControls.needed(params):
            return None
        state = _Controlled(params, prompt_ids, self._decodable)
        self._put(request_id, state)
        return state

    def prepare_tensor_args(self, requests_with_new_token: list[Any]) -> torch.Tensor:
        rows: list[tuple[int, _Controlled]] = []
        for row, state, request in self._registered(requests_with_new_token):
            new = state.new_tokens(request)
            if state.controls is not None:
                for token in new:
                    state.controls.accept(token)
            rows.append((row, state))
        self._rows = rows
        return self._no_args(requests_with_new_token)

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


def install_controls(manager: Any, decodable: int | None = None) -> RequestControls:
    """Put `RequestControls` first in a manager's list; call after `install_grammar`."""
    return _install(manager, RequestControls(decodable), first=True)


class Decodable(ContinuousBatchingLogitsProcessor):
    """Before the draw: the ids past what the tokenizer decodes are -inf for every row (`forbid_undecodable`)."""

    supported_kwargs: dict[str, type] = {}  # noqa: RUF012 (declared so by the base class)
    ignored_kwargs: tuple[str, ...] = ()

    def __init__(self, decodable: int) -> None:
        self.decodable = decodable

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.fill_(0)

    def prepare_tensor_args(self, requests_with_new_token: list[Any]) -> torch.Tensor:
        return torch.zeros(len(requests_with_new_token), dtype=torch.int32)

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        forbid_undecodable(scores, self.decodable)
        return scores


def install_decodable(manager: Any, decodable: int) -> Decodable:
    """Put `Decodable` after the others so far (the controls record raw log-probabilities before it); call after
    `install_controls` and before `install_sampling`."""
    return _install(manager, Decodable(decodable), first=False)
