"""`RemoteEngine` (cluster/client.py) over a stand-in for Ray Serve's handle: no cluster, no model.

The stand-in speaks Ray Serve's stream protocol (the replica's name first, then `TokenChunk`s; `cancel()` on the
call) and fails with Ray's own exceptions. What must hold: a consumer that fell behind gets the chunks queued
meanwhile as one (`coalesce`), with every token, log-probability and the finish reason; a replica failure before
the first token sends the sequence again, one after it ends the stream with `EngineError` after the tokens before
it; leaving early cancels the replica's call; the reader task never outlives `generate`; and the board's and the
engine's counts are right whatever happened.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any

import pytest
from ray.exceptions import ActorDiedError, RayTaskError, TaskCancelledError

from qwen_api.admission import Overloaded
from qwen_api.cluster.client import RemoteEngine, ReplicaBoard, ReplicaCounts
from qwen_api.engine.base import ConstraintFailed, EngineDead, EngineError, SamplingParams, TokenChunk, TokenLogprob

END = object()  # sent on a stream: the replica's call returned (as it does after the chunk with a finish reason)
PARAMS = SamplingParams(max_new_tokens=16)


class Stream:
    """One call's stream, fed by the test: the replica's name, then what `send` puts (chunks, exceptions, END).

    As Ray's, `cancel()` reaches the replica later (`ray.cancel`, a round trip away): it fails the reads that start
    after it with `TaskCancelledError`, but does not wake the one waiting now. So only `generate` itself can end a
    reader left waiting on a stream it gave up."""

    def __init__(self, replica: str | None) -> None:
        self.items: asyncio.Queue[Any] = asyncio.Queue()
        self.cancelled = False
        if replica is not None:
            self.items.put_nowait(replica)

    def send(self, *items: Any) -> None:
        for item in items:
            self.items.put_nowait(item)

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> Any:
        if self.cancelled:
            raise TaskCancelledError()
        item = await self.items.get()
        if item is END:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        self.cancelled = True


class Handle:
    """`handle.generate.options(stream=True).remote(prompt_ids, params)`: the next prepared stream."""

    def __init__(self, *streams: Stream) -> None:
        self.streams = list(streams)
        self.calls = 0
        self.generate = self

    def options(self, stream: bool) -> Handle:
        assert stream
        return self

    def remote(self, prompt_ids: list[int], params: SamplingParams) -> Stream:
        self.calls += 1
        return self.streams.pop(0)


def engine_over(*streams: Stream, assign_timeout: float = 30.0) -> tuple[RemoteEngine, ReplicaBoard, Handle]:
    board = ReplicaBoard(ready=2, target=2)
    handle = Handle(*streams)
    return RemoteEngine(handle, 1024, board, assign_timeout=assign_timeout), board, handle


def failed_with(cause: Exception) -> RayTaskError:
    """What a replica's exception is at the front: a `RayTaskError` that is also the cause's class."""
    error: RayTaskError = RayTaskError("EngineReplica.generate", f"Traceback: {cause!r}", cause).as_instanceof_cause()
    return error


def lp(token: int) -> TokenLogprob:
    return TokenLogprob(token, -float(token), ((token, -float(token)),))


async def settle(until: Callable[[], bool] = lambda: False) -> None:
    """Let the other tasks run (the reader, a finaliser's `aclose`) until `until()`, or for a while."""
    for _ in range(50):
        if until():
            return
        await asyncio.sleep(0)


def no_other_task() -> bool:
    return asyncio.all_tasks() == {asyncio.current_task()}


def counts(board: ReplicaBoard) -> dict[str, ReplicaCounts]:
    return board.snapshot()


def idle(engine: RemoteEngine) -> bool:
    stats = engine.stats()
    return (stats.running, stats.waiting, stats.active) == (0, 0, 0)


def test_chunks_queued_behind_a_slow_consumer_come_out_as_one_chunk() -> None:
    """A consumer that waits gets each chunk as it comes; one that fell behind gets all those queued meanwhile in
    one chunk: every token in order, their log-probabilities aligned, and the finish reason."""
    stream = Stream("a")
    engine, board, _ = engine_over(stream)

    async def main() -> None:
        async with aclosing(engine.generate([1, 2], PARAMS)) as chunks:
            pending = asyncio.ensure_future(anext(chunks))
            await settle()
            assert engine.stats().waiting == 1 and counts(board)["a"].waiting == 1  # named, no token yet
            stream.send(TokenChunk([10], logprobs=(lp(10),)))
            assert await pending == TokenChunk([10], logprobs=(lp(10),))
            assert (engine.stats().running, engine.stats().waiting, counts(board)["a"].waiting) == (1, 0, 0)

            # the consumer is busy elsewhere while four chunks arrive
            stream.send(*(TokenChunk([t], logprobs=(lp(t),)) for t in (11, 12, 13)))
            stream.send(TokenChunk([14, 15], "length", (lp(14), lp(15))), END)
            await settle(lambda: stream.items.qsize() <= 1)  # the reader has queued them all (it stops at the end)
            merged = await anext(chunks)
            assert merged == TokenChunk([11, 12, 13, 14, 15], "length", tuple(lp(t) for t in range(11, 16)))
            with pytest.raises(StopAsyncIteration):
                await anext(chunks)
        assert no_other_task()

    asyncio.run(main())
    assert not stream.cancelled  # it finished: nothing to cancel
    assert counts(board) == {"a": ReplicaCounts(served=1)} and idle(engine)


def test_a_chunk_without_logprobs_makes_the_merged_chunk_one_without() -> None:
    """Chunks with log-probabilities and one without, all queued before the first read: one chunk, without any
    (the text layer refuses it, as it would have refused that chunk alone)."""
    stream = Stream("a")
    engine, board, _ = engine_over(stream)

    async def main() -> list[TokenChunk]:
        async with aclosing(engine.generate([1], PARAMS)) as chunks:
            first = anext(chunks)
            stream.send(TokenChunk([1], logprobs=(lp(1),)), TokenChunk([2]), TokenChunk([3], "stop", (lp(3),)), END)
            return [await first] + [c async for c in chunks]

    assert asyncio.run(main()) == [TokenChunk([1, 2, 3], "stop")]
    assert counts(board) == {"a": ReplicaCounts(served=1)} and idle(engine)


@pytest.mark.parametrize("how", ["aclose", "cancel", "garbage"])
def test_a_consumer_that_leaves_early_cancels_the_call_and_leaves_no_task(how: str) -> None:
    """Closed, cancelled while it waits for the next chunk, or dropped unclosed (the loop's finaliser closes it):
    the replica's call is cancelled, and the reader task has ended with the generator."""
    stream = Stream("a")
    engine, board, _ = engine_over(stream)

    async def main() -> None:
        chunks = engine.generate([1, 2], PARAMS)
        first = anext(chunks)
        stream.send(TokenChunk([10]))
        assert await first == TokenChunk([10])
        others = asyncio.all_tasks() - {asyncio.current_task()}  # the reader
        if how == "aclose":
            await chunks.aclose()
        elif how == "cancel":
            waiting = asyncio.ensure_future(anext(chunks))
            await settle()
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
        else:
            del chunks, first  # `first` (the finished `anext`) still held the generator
            gc.collect()
            await settle(lambda: stream.cancelled and no_other_task())
        assert stream.cancelled and all(task.done() for task in others) and no_other_task()

    asyncio.run(main())
    assert counts(board) == {"a": ReplicaCounts()} and idle(engine)


def test_leaving_before_the_first_token_cancels_the_call_and_counts_no_waiting() -> None:
    stream = Stream("a")
    engine, board, _ = engine_over(stream)

    async def main() -> None:
        waiting = asyncio.ensure_future(anext(engine.generate([1, 2], PARAMS)))
        await settle()
        assert engine.stats().waiting == 1 and counts(board)["a"] == ReplicaCounts(running=1, waiting=1)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await settle(no_other_task)
        assert stream.cancelled and no_other_task()

    asyncio.run(main())
    assert counts(board) == {"a": ReplicaCounts()} and idle(engine)


@pytest.mark.parametrize(
    "failure", [ActorDiedError(), failed_with(EngineDead("the engine's worker died"))], ids=["died", "engine-dead"]
)
def test_a_replica_failure_before_the_first_token_sends_the_sequence_again(failure: Exception) -> None:
    """The replica died (or its engine did) with no token out: another call, answered elsewhere, and not lost."""
    first, second = Stream("a"), Stream("b")
    first.send(failure)
    second.send(TokenChunk([7]), TokenChunk([8], "stop"), END)
    engine, board, handle = engine_over(first, second)

    async def main() -> list[int]:
        async with aclosing(engine.generate([1, 2], PARAMS)) as chunks:
            tokens = [t async for chunk in chunks for t in chunk.token_ids]
        assert no_other_task()
        return tokens

    assert asyncio.run(main()) == [7, 8]
    assert handle.calls == 2 and first.cancelled and not second.cancelled
    assert counts(board) == {"a": ReplicaCounts(), "b": ReplicaCounts(served=1)} and idle(engine)


def test_a_second_failure_before_the_first_token_fails_the_sequence() -> None:
    first, second = Stream("a"), Stream("b")
    first.send(ActorDiedError())
    second.send(ActorDiedError())
    engine, board, handle = engine_over(first, second)

    async def main() -> None:
        with pytest.raises(EngineError, match="replica b failed"):
            async with aclosing(engine.generate([1], PARAMS)) as chunks:
                async for _ in chunks:
                    pass
        assert no_other_task()

    asyncio.run(main())
    assert handle.calls == 2  # one retry, not more
    assert counts(board) == {"a": ReplicaCounts(), "b": ReplicaCounts(failed=1)} and idle(engine)


def test_a_failure_after_tokens_ends_the_stream_after_the_tokens_before_it() -> None:
    """The tokens queued before the failure come out (as one chunk), then `EngineError`; no second call."""
    stream = Stream("a")
    engine, board, handle = engine_over(stream)

    async def main() -> None:
        async with aclosing(engine.generate([1, 2], PARAMS)) as chunks:
            first = anext(chunks)
            stream.send(TokenChunk([10]))
            assert await first == TokenChunk([10])
            stream.send(TokenChunk([11]), TokenChunk([12]), ActorDiedError())
            await settle(lambda: stream.items.empty())
            await settle()
            assert await anext(chunks) == TokenChunk([11, 12])
            with pytest.raises(EngineError, match="replica a failed") as info:
                await anext(chunks)
            assert not isinstance(info.value, EngineDead) and isinstance(info.value.__cause__, ActorDiedError)
        assert no_other_task()

    asyncio.run(main())
    assert handle.calls == 1 and stream.cancelled
    assert counts(board) == {"a": ReplicaCounts(failed=1)} and idle(engine)


def test_the_engines_verdicts_keep_their_class_and_are_not_sent_again() -> None:
    """A grammar that failed is a `ConstraintFailed` (a 400), another engine error an `EngineError`: neither is
    the replica's failure, so neither is sent again nor counted as lost."""
    for cause, expected in (
        (ConstraintFailed("the output could not be held to its schema"), ConstraintFailed),
        (EngineError("prompt too long"), EngineError),
    ):
        stream, spare = Stream("a"), Stream("b")
        stream.send(failed_with(cause))
        engine, board, handle = engine_over(stream, spare)

        async def main(engine: RemoteEngine = engine) -> None:
            async with aclosing(engine.generate([1], PARAMS)) as chunks:
                async for _ in chunks:
                    pass

        with pytest.raises(EngineError, match=str(cause)) as info:
            asyncio.run(main())
        assert type(info.value) is expected and handle.calls == 1
        assert counts(board) == {"a": ReplicaCounts()} and idle(engine)


def test_a_stream_that_ends_without_a_finish_reason_fails() -> None:
    stream = Stream("a")
    stream.send(TokenChunk([10]), END)
    engine, board, _ = engine_over(stream)

    async def main() -> list[TokenChunk]:
        got: list[TokenChunk] = []
        with pytest.raises(EngineError, match="replica a ended a sequence without a finish reason"):
            async with aclosing(engine.generate([1], PARAMS)) as chunks:
                async for chunk in chunks:
                    got.append(chunk)
        assert no_other_task()
        return got

    assert asyncio.run(main()) == [TokenChunk([10])]
    assert counts(board) == {"a": ReplicaCounts()} and idle(engine)


def test_a_request_no_replica_takes_in_time_is_overloaded_and_cancelled() -> None:
    """Every replica full (another front on them, or a dead one's replacement loading): a 429 with Retry-After, as
    the front's own admission gives, rather than a 500 after 30 s."""
    stream = Stream(None)  # never named: no replica took it
    engine, board, handle = engine_over(stream, assign_timeout=0.05)

    async def main() -> None:
        with pytest.raises(Overloaded, match=r"no engine replica took the request within 0\.05 s"):
            async with aclosing(engine.generate([1], PARAMS)) as chunks:
                await anext(chunks)
        assert no_other_task()

    asyncio.run(main())
    assert handle.calls == 1 and stream.cancelled
    assert counts(board) == {} and idle(engine)


def test_no_replica_running_is_engine_dead() -> None:
    engine, _, handle = engine_over(Stream("a"))
    engine.board.ready = 0

    async def main(chunks: AsyncGenerator[TokenChunk, None]) -> None:
        await anext(chunks)

    with pytest.raises(EngineDead):
        asyncio.run(main(engine.generate([1], PARAMS)))
    assert handle.calls == 0 and idle(engine)


def test_a_reader_cancelled_from_outside_fails_the_sequence_instead_of_hanging() -> None:
    """Whatever ends the reader task, the consumer waiting for its next chunk is told: here an `EngineError`."""
    stream = Stream("a")
    engine, board, _ = engine_over(stream)

    async def main() -> None:
        async with aclosing(engine.generate([1], PARAMS)) as chunks:
            first = anext(chunks)
            stream.send(TokenChunk([10]))
            assert await first == TokenChunk([10])
            for task in asyncio.all_tasks() - {asyncio.current_task()}:
                task.cancel()
            with pytest.raises(EngineError, match="the stream from replica a was cancelled"):
                await anext(chunks)
        assert no_other_task()

    asyncio.run(main())
    assert stream.cancelled and counts(board) == {"a": ReplicaCounts()} and idle(engine)


def test_a_failed_deploy_says_what_the_replicas_failed_with() -> None:
    """The front's error said only "Failed to update the deployments ['engine']": the replicas' own error (a model
    that cannot be read) was left in Ray's deployment status, where the operator did not see it."""
    from types import SimpleNamespace

    from qwen_api.cluster.deploy import DEPLOYMENT_NAME, _failure

    trace = "The deployment failed to start 3 times in a row.\nTraceback (most recent call last):\n  File ...\n"
    deployment = SimpleNamespace(message=trace + "safetensors_rust.SafetensorError: Error while deserializing\n\n")
    app = SimpleNamespace(
        message="Failed to update the deployments ['engine'].", deployments={DEPLOYMENT_NAME: deployment}
    )
    assert _failure(app) == (
        "Failed to update the deployments ['engine']: safetensors_rust.SafetensorError: Error while deserializing"
    )
    assert _failure(SimpleNamespace(message="gone", deployments={})) == "gone"
