"""One engine replica: a Ray Serve deployment whose every replica holds one engine and its model.

A replica loads the engine `--engine` names (the same as a single process would: llama.cpp for GGUF on the
CPU, transformers otherwise; one GPU each where there are GPUs) and serves the engine contract over Ray:
`generate(prompt_ids, params)` streams first the replica's name (the request has reached it and not another),
then the engine's `TokenChunk`s. Closing the stream at the front cancels this call, which closes the engine's
stream and so cancels the sequence within a step. `check_health` fails once the engine's worker has died, and
Ray Serve then replaces the replica. A grammar (structured outputs, tool calls) arrives as its text and the key
of the vocabulary it was compiled for; the replica builds its own llguidance tokenizer for its model once, off the
event loop, before the first such sequence. Nothing here knows HTTP or text.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

from qwen_api.engine.base import Engine, EngineError, EngineStats, SamplingParams, TokenChunk
from qwen_api.engine.loading import ModelSource, pick_device, resolve_model
from qwen_api.runtime import choose_engine, default_loader, eos_token_ids
from qwen_api.settings import Settings
from qwen_api.structured.grammar import Constraint, GrammarCompiler, GrammarError

log = logging.getLogger(__name__)


def load_engine(settings: Settings, source: ModelSource, threads: int | None) -> tuple[Engine, Any]:
    """The engine a single process would load, with llama.cpp held to the `threads` CPUs Ray gave this replica,
    and the model's tokenizer."""
    device = pick_device(settings.device)
    if threads and source.gguf_file and choose_engine(settings.engine, source, device) == "llamacpp":
        # default_loader gives llama.cpp every core of the machine; replicas sharing a machine would then fight
        # for them (its threads wait for the slowest at every step), so each gets its own share.
        from transformers import AutoTokenizer

        from qwen_api.engine.llamacpp_engine import LlamaCppEngine

        tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
        engine = LlamaCppEngine(
            Path(source.path) / source.gguf_file,
            eos_token_ids(tokenizer),
            max_batch_size=settings.max_batch_size,
            kv_cache_tokens=settings.kv_cache_tokens,
            n_threads=threads,
            prefix_cache=settings.prefix_cache,
        )
        return engine, tokenizer
    generator = default_loader(settings, source)()
    return generator.engine, generator.tokenizer


def _unnice() -> None:
    """Run this thread, and the engine threads it starts, at normal priority.

    Ray starts workers at niceness 15 (`RAY_worker_niceness`), meant for background tasks: a replica is the
    node's main work, and at 15 anything else on the machine (the front, other processes) would preempt its
    decode steps. Linux niceness is per thread and inherited by new threads, so this runs before the engine starts
    its threads. Raising priority needs CAP_SYS_NICE (root, most containers); without it the replica stays nice.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 0)
    except OSError as exc:
        log.warning("replica runs at Ray's worker niceness (%s); start Ray with RAY_worker_niceness=0 to avoid it", exc)


class EngineReplica:
    """The deployment's class: Ray Serve constructs one per replica (see `deploy.engine_app`)."""

    def __init__(self, settings: dict[str, Any], threads: int | None = None) -> None:
        from ray import serve

        self.settings = Settings(**settings)
        logging.basicConfig(level=self.settings.log_level.upper())
        self.name = serve.get_replica_context().replica_id.unique_id
        _unnice()
        self.engine, tokenizer = load_engine(self.settings, resolve_model(self.settings.model), threads)
        self.grammars = GrammarCompiler(tokenizer)  # the constraints' tokenizer on this side, built when first needed
        self.served = 0
        self._loop_unniced = False
        log.info("replica %s (pid %d) ready: %d threads", self.name, os.getpid(), threads or 0)

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncGenerator[str | TokenChunk, None]:
        if not self._loop_unniced:  # the event loop's thread relays every token: normal priority too
            self._loop_unniced = True
            _unnice()
        yield self.name
        if isinstance(params.constraint, Constraint):  # compiled here once per grammar, not in each engine step
            try:
                params = dataclasses.replace(params, constraint=await self.grammars.adopt(params.constraint))
            except GrammarError as exc:
                raise EngineError(str(exc)) from None
        tokens = self.engine.generate(prompt_ids, params)
        try:
            async for chunk in tokens:
                yield chunk
                if chunk.finish_reason is not None:
                    self.served += 1
        finally:
            await tokens.aclose()  # a cancelled call cancels the sequence here

    def info(self) -> dict[str, Any]:
        return {
            "replica": self.name,
            "pid": os.getpid(),
            "max_context_tokens": self.engine.max_context_tokens,
            "model": self.settings.model,  # what a front attaching to these replicas checks against its own
            "end_token_ids": sorted(self.engine.end_token_ids),
        }

    def stats(self) -> tuple[str, int, EngineStats]:
        return self.name, self.served, self.engine.stats()

    def check_health(self) -> None:
        if not self.engine.is_healthy():
            raise RuntimeError(f"the engine of replica {self.name} has died")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
