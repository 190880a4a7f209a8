"""An engine in its own process (`--engine-process`): its worker's Python never waits for the server's GIL.

In one process, the engine's worker thread and the event loop share one GIL. At many streams the event loop's
per-token work (text, SSE, the socket) holds it for milliseconds a step, and the worker, whose host work between
GPU launches is Python too, waits for it: on an H200 a served decode step at 64 streams took 12.6 ms beside a
5.1 ms forward pass (README, GPU figures). vLLM and SGLang run their engines in a process of their own for
this reason; so does this module, behind the same `Engine` contract, so the text and HTTP layers do not change.

The child builds the whole `TextGenerator` with the usual loader and sends back the tokenizer, the sampling
defaults and the context size; the parent builds its own `TextGenerator` on a `ProcessEngine` and that tokenizer.
One duplex pipe carries, parent to child, ("start", id, prompt, params, grammar) and ("cancel", id); child to
parent, one message per child event-loop turn: every chunk produced since the last (after a decode step, that is
every running sequence's token at once), the engine's stats, and the batch sizes of the steps run. A grammar
crosses as its text and is compiled again in the child, against the child's tokenizer (and cache).

The parent reads in a thread and hands each event loop its chunks with one `call_soon_threadsafe`. A child
that exits fails every running sequence with `EngineDead` and makes the engine unhealthy, so the server exits
to be restarted, as when an in-process worker dies. The child exits when the pipe closes (the server is gone).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import signal
import threading
from collections import deque
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing, suppress
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from qwen_api.engine.base import EngineDead, EngineError, EngineStats, SamplingParams, TokenChunk, relay

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from qwen_api.textgen import TextGenerator

log = logging.getLogger(__name__)

STATS_PERIOD_S = 0.25  # an idle child still reports its stats this often


class ProcessEngine:
    """An `Engine` whose sequences run in a child process that built the real engine with `load()`."""

    def __init__(self, load: Callable[[], TextGenerator], start_timeout: float | None = None) -> None:
        """Start the child and wait for its model (`load` must pickle: a module-level function or a partial of
        one). Raises what the child's loading raised, as an `EngineError` naming it."""
        context = multiprocessing.get_context("spawn")  # no fork of a process that holds threads or CUDA
        self._conn, child_end = context.Pipe(duplex=True)
        level = logging.getLogger().getEffectiveLevel()  # the child logs at the server's level
        self._process = context.Process(
            target=_child_main, args=(child_end, load, level), name="qwen-api-engine", daemon=True
        )
        self._process.start()
        child_end.close()
        if start_timeout is not None and not self._conn.poll(start_timeout):
            self._process.kill()
            raise EngineError(f"the engine process did not load its model within {start_timeout:.0f} s")
        try:
            kind, *rest = self._conn.recv()
        except EOFError:
            self._process.join(5)
            raise EngineError(f"the engine process exited while loading (exit code {self._process.exitcode})") from None
        if kind == "failed":
            self._process.join(5)
            raise EngineError(f"the engine process failed to load the model: {rest[0]}")
        self.max_context_tokens, self.tokenizer, self.sampling_defaults = rest
        self.on_step: Callable[[int], None] | None = None
        self._send_lock = threading.Lock()
        self._ids = itertools.count()
        self._sequences: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue[TokenChunk | BaseException]]] = {}
        self._stats = EngineStats(running=0, waiting=0, active=0, steps=0, peak_batch_size=0)
        self._fatal: str | None = None
        self._closing = False
        self._reader = threading.Thread(target=self._read, name="engine-process-reader", daemon=True)
        self._reader.start()

    # ------------------------------------------------------------------------------------ the contract
    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncGenerator[TokenChunk, None]:
        if not self.is_healthy():
            raise EngineDead(f"the engine process is not running: {self._fatal}")
        grammar = None
        if params.constraint is not None:
            grammar = getattr(params.constraint, "grammar", None)
            if not isinstance(grammar, str):
                raise EngineError("this constraint cannot be sent to the engine process (it has no grammar text)")
            params = replace(params, constraint=None)
        rid = next(self._ids)
        out: asyncio.Queue[TokenChunk | BaseException] = asyncio.Queue()
        self._sequences[rid] = (asyncio.get_running_loop(), out)
        try:
            self._send(("start", rid, list(prompt_ids), params, grammar))
            async with aclosing(relay(out, self._death, lambda: self._cancel(rid))) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            self._sequences.pop(rid, None)

    def is_healthy(self) -> bool:
        return self._fatal is None and self._process.is_alive()

    def stats(self) -> EngineStats:
        # Running is counted here, where sequences start and end; the rest is the child's latest report.
        return replace(self._stats, running=len(self._sequences))

    def shutdown(self) -> None:
        self._closing = True
        with suppress(EngineError):
            self._send(("stop",))
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(timeout=5)
        self._conn.close()

    # ------------------------------------------------------------------------------------ the pipe
    def _send(self, message: tuple[Any, ...]) -> None:
        try:
            with self._send_lock:
                self._conn.send(message)
        except (OSError, ValueError) as exc:  # the child is gone (a closed or broken pipe)
            if not self._closing:
                raise EngineDead(f"the engine process is gone: {exc}") from exc

    def _cancel(self, rid: int) -> None:
        with suppress(EngineError):  # a dead child has dropped the sequence already
            self._send(("cancel", rid))

    def _death(self) -> str | None:
        return None if self.is_healthy() else f"the engine process died: {self._fatal or 'it exited'}"

    def _read(self) -> None:
        while True:
            try:
                _, items, stats, steps = self._conn.recv()
            except (EOFError, OSError):
                break
            self._stats = stats
            if self.on_step is not None:
                for size in steps:
                    self.on_step(size)
            by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Any], Any]]] = {}
            for rid, item in items:
                if (entry := self._sequences.get(rid)) is not None:
                    if isinstance(item, tuple):  # ("error", dead, message)
                        item = (EngineDead if item[1] else EngineError)(item[2])
                    by_loop.setdefault(entry[0], []).append((entry[1], item))
            for loop, deliveries in by_loop.items():
                loop.call_soon_threadsafe(_deliver, deliveries)
        self._process.join(timeout=5)
        self._fatal = f"the engine process exited (exit code {self._process.exitcode})"
        if not self._closing:
            log.error("%s", self._fatal)
        dead = EngineDead(self._fatal)
        for loop, out in list(self._sequences.values()):
            loop.call_soon_threadsafe(out.put_nowait, dead)


def _deliver(deliveries: list[tuple[asyncio.Queue[Any], Any]]) -> None:
    for out, item in deliveries:
        out.put_nowait(item)


# ---------------------------------------------------------------------------------------- the child
def _child_main(conn: Connection, load: Callable[[], TextGenerator], log_level: int) -> None:
    # The server decides when the engine stops: a Ctrl-C or a SIGTERM sent to the whole process group (systemd does)
    # must let it drain its requests first. The child exits on "stop" or when the server's end of the pipe closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s [engine process] %(message)s")
    try:
        generator = load()
    except BaseException as exc:  # reported to the parent, which fails its load with it
        log.exception("loading the model failed")
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    engine = generator.engine
    conn.send(("ready", engine.max_context_tokens, generator.tokenizer, generator.sampling_defaults))
    try:
        asyncio.run(_Child(conn, generator).serve())
    finally:
        engine.shutdown()


class _Child:
    """The child's event loop: runs each sequence on the real engine and batches what it yields into messages."""

    def __init__(self, conn: Connection, generator: TextGenerator) -> None:
        self.conn, self.generator, self.engine = conn, generator, generator.engine
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.outbox: list[tuple[int, Any]] = []
        self.steps: deque[int] = deque()
        self.engine.on_step = self.steps.append  # the engine's thread appends; only this loop pops
        self.reported: EngineStats | None = None
        self.stopped = asyncio.Event()

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        threading.Thread(target=self._receive, args=(loop,), name="engine-process-receiver", daemon=True).start()
        reporter = asyncio.create_task(self._report_stats())
        await self.stopped.wait()
        reporter.cancel()
        for task in self.tasks.values():
            task.cancel()

    def _receive(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):  # the server is gone: stop
                message = ("stop",)
            loop.call_soon_threadsafe(self._handle, message)
            if message[0] == "stop":
                return

    def _handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "start":
            _, rid, prompt, params, grammar = message
            self.tasks[rid] = asyncio.create_task(self._run(rid, prompt, params, grammar))
        elif kind == "cancel":
            if (task := self.tasks.get(message[1])) is not None:
                task.cancel()
        else:
            self.stopped.set()

    async def _run(self, rid: int, prompt: list[int], params: SamplingParams, grammar: str | None) -> None:
        try:
            if grammar is not None:
                params = replace(params, constraint=await self.generator.grammars.compile(grammar))
            async with aclosing(self.engine.generate(prompt, params)) as chunks:
                async for chunk in chunks:
                    self._post(rid, chunk)
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # the sequence fails alone, in the parent, with this
            self._post(rid, ("error", isinstance(exc, EngineDead), str(exc) or type(exc).__name__))
        finally:
            self.tasks.pop(rid, None)

    def _post(self, rid: int, item: Any) -> None:
        if not self.outbox:
            asyncio.get_running_loop().call_soon(self._flush)  # after every sequence this turn has woken
        self.outbox.append((rid, item))

    def _flush(self) -> None:
        items, self.outbox = self.outbox, []
        steps = [self.steps.popleft() for _ in range(len(self.steps))]
        self.reported = self.engine.stats()
        try:
            self.conn.send(("out", items, self.reported, steps))
        except (OSError, ValueError):  # the server is gone
            self.stopped.set()
        except Exception:  # a chunk that will not pickle: fail its sequences rather than leave them waiting
            log.exception("could not send %d chunks to the server", len(items))
            failed = {rid for rid, _ in items}
            self.conn.send(
                (
                    "out",
                    [(rid, ("error", False, "the engine process could not send a chunk")) for rid in failed],
                    self.reported,
                    steps,
                )
            )
            for rid in failed:
                if (task := self.tasks.get(rid)) is not None:
                    task.cancel()

    async def _report_stats(self) -> None:
        while True:
            await asyncio.sleep(STATS_PERIOD_S)
            if not self.outbox and (self.steps or self.engine.stats() != self.reported):
                self._flush()
