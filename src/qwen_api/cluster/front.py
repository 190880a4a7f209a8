"""The front of `qwen-api serve --ray`: qwen-api's own HTTP server, with its engine on Ray Serve replicas.

The front stays our uvicorn process (the same app, admission, deadlines, SIGTERM drain and exit codes as a
single process) and keeps the tokenizer and the text layer; only token ids cross to the replicas. Loading the
model here means deploying the replicas (or attaching to them) and waiting until they run. Then a monitor asks
Ray Serve every `period` seconds how many replicas run: `/health` is 200 while at least one does and says how
many, admission grows and shrinks with them (each replica takes what one engine takes alone), and the front
exits 1 when the cluster itself is gone, or the replicas' application is (deleted by the front that deployed it, or
by hand), so that a supervisor restarts it. A front refuses replicas that serve another model than its own.
`/metrics` adds the per-replica series of `ReplicaCollector`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from qwen_api.admission import Admission
from qwen_api.api.app import create_app
from qwen_api.api.seed import unhealthy
from qwen_api.cluster.client import RemoteEngine, ReplicaBoard
from qwen_api.engine.loading import ModelSource, sampling_defaults
from qwen_api.runtime import Runtime
from qwen_api.settings import Settings
from qwen_api.textgen import TextGenerator

log = logging.getLogger(__name__)

UNREACHABLE_AFTER = 15.0  # seconds the cluster may not answer before the front gives up and exits 1


class ClusterRuntime(Runtime):
    """A Runtime whose engine is `RemoteEngine`, watched by polling Ray Serve instead of an engine thread."""

    def __init__(self, settings: Settings, source: ModelSource, admission: Admission, period: float = 0.5) -> None:
        super().__init__(self._load_remote, settings.served_model_name or source.name)
        self.settings, self.source, self.admission, self.period = settings, source, admission, period
        self.board = ReplicaBoard()
        self.started_cluster = False
        self.missing_since: float | None = None  # since when the application is gone from the cluster

    @property
    def skip_teardown(self) -> bool:
        # Ray's core worker, still connected to a cluster that is gone, can crash the interpreter's teardown
        # (its atexit shutdown and C++ threads; a SIGSEGV, not exit 1, was seen): the process ends before it.
        return not self.board.reachable

    def _load_remote(self) -> TextGenerator:
        from transformers import AutoTokenizer

        from qwen_api.cluster.deploy import deploy, replica_model, undeploy

        kwargs: dict[str, Any] = {"trust_remote_code": self.settings.trust_remote_code}
        if self.source.gguf_file:
            kwargs["gguf_file"] = self.source.gguf_file
        tokenizer = AutoTokenizer.from_pretrained(self.source.path, **kwargs)
        deployed = deploy(self.settings, self.started_cluster, stopping=lambda: self._closing)
        try:
            info = deployed.handle.info.remote().result(timeout_s=60)
            if info.get("model") != (mine := replica_model(self.settings.model)):  # replicas another front deployed
                raise RuntimeError(
                    f"the engine replicas on this cluster serve {info.get('model')!r}, not {mine!r}: stop the front "
                    "that deployed them, or serve that model here"
                )
            self._poll()
        except BaseException:
            undeploy(deployed)
            raise
        engine = RemoteEngine(
            deployed.handle,
            info["max_context_tokens"],
            self.board,
            on_shutdown=lambda: undeploy(deployed, reachable=self.board.reachable),
            end_token_ids=frozenset(info["end_token_ids"]),
        )
        log.info("%d of %d engine replica(s) running", self.board.ready, self.board.target)
        return TextGenerator(engine, tokenizer, sampling_defaults=sampling_defaults(self.source))

    def _poll(self) -> None:
        """Ask Ray Serve how many replicas run (blocking: called off the event loop)."""
        from ray import serve

        from qwen_api.cluster.deploy import APP_NAME, DEPLOYMENT_NAME

        app = serve.status().applications.get(APP_NAME)
        deployment = app.deployments.get(DEPLOYMENT_NAME) if app else None
        if deployment is None:
            self.board.ready = self.board.target = 0
            self.missing_since = self.missing_since or time.monotonic()
            return
        self.missing_since = None
        states: dict[Any, int] = dict(deployment.replica_states)  # keyed by ReplicaState, a str enum
        self.board.ready = int(states.get("RUNNING", 0))
        self.board.target = int(sum(states.values()))  # running, starting (a replacement, a scale-up) or stopping

    async def _watch(self, period: float = 0.5) -> None:
        last_answer = time.monotonic()
        per_replica = self.settings.admission_capacity()
        while True:
            try:
                async with asyncio.timeout(UNREACHABLE_AFTER / 3):  # a cluster that is gone may never answer
                    await _in_daemon_thread(self._poll)
                last_answer, self.board.reachable = time.monotonic(), True
            except Exception as exc:
                log.warning("Ray Serve did not answer: %r", exc)
                if time.monotonic() - last_answer > UNREACHABLE_AFTER:
                    self.board.reachable = False
                    log.error("the Ray cluster is gone; the front exits so that it can be restarted")
                    self.state = "dead"
                    self._fatal()
                    return
            if self.missing_since is not None and time.monotonic() - self.missing_since > UNREACHABLE_AFTER:
                # deleted (the front that deployed it stopped, or an operator): nothing here will bring it back
                log.error("the engine replicas' application is gone from the cluster; the front exits to be restarted")
                self.state = "dead"
                self._fatal()
                return
            # Each running replica admits what one engine admits alone; none running: 503, not 429.
            self.admission.capacity = per_replica * max(1, self.board.ready)
            await asyncio.sleep(self.period)


def _in_daemon_thread(fn: Callable[[], None]) -> asyncio.Future[None]:
    """`fn()` off the event loop, in a thread of its own that the process does not wait for: a call stuck on a
    cluster that is gone (Ray gives up after a minute) would otherwise hold the front's exit, since the event loop's
    executor threads are joined when it closes."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle(error: BaseException | None) -> None:
        if done.done():  # the caller stopped waiting (its timeout)
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(None)

    def run() -> None:
        error = None
        try:
            fn()
        except BaseException as exc:
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop closed while the call was stuck: nobody waits
            loop.call_soon_threadsafe(settle, error)

    threading.Thread(target=run, name="ray-serve-poll", daemon=True).start()
    return done


class ReplicaCollector(Collector):
    """Per-replica series for /metrics, labelled `replica`, and the deployment's replica counts."""

    def __init__(self, board: ReplicaBoard) -> None:
        self.board = board

    def collect(self) -> Iterator[Any]:
        served = CounterMetricFamily(
            "qwen_api_replica_requests", "Sequences each engine replica served to the end", labels=["replica"]
        )
        failed = CounterMetricFamily(
            "qwen_api_replica_failures", "Sequences lost because their replica failed or died", labels=["replica"]
        )
        running = GaugeMetricFamily(
            "qwen_api_replica_running_sequences", "Sequences each replica holds now", labels=["replica"]
        )
        waiting = GaugeMetricFamily(
            "qwen_api_replica_waiting_sequences", "Of those, sequences with no token yet", labels=["replica"]
        )
        for name, counts in sorted(self.board.snapshot().items()):
            served.add_metric([name], counts.served)
            failed.add_metric([name], counts.failed)
            running.add_metric([name], counts.running)
            waiting.add_metric([name], counts.waiting)
        ready = GaugeMetricFamily("qwen_api_replicas_ready", "Engine replicas Ray Serve reports running")
        ready.add_metric([], self.board.ready)
        target = GaugeMetricFamily("qwen_api_replicas_target", "Engine replicas Ray Serve runs or is starting")
        target.add_metric([], self.board.target)
        yield from (served, failed, running, waiting, ready, target)


def health_router(board: ReplicaBoard) -> APIRouter:
    """`/health` as the seed API answers it, plus how many replicas run; 200 while at least one does."""
    router = APIRouter()

    @router.get("/health", include_in_schema=False)
    async def health(request: Request) -> JSONResponse:
        replicas = {"ready": board.ready, "target": board.target}
        down = unhealthy(request.app.state.runtime, replicas=replicas)
        return down or JSONResponse({"status": "healthy", "replicas": replicas})

    return router


def create_cluster_app(settings: Settings, source: ModelSource) -> tuple[ClusterRuntime, Admission, FastAPI]:
    """The front's runtime, admission and app: `create_app` with the cluster's /health and per-replica metrics."""
    from qwen_api.cluster.deploy import connect

    admission = Admission(settings.admission_capacity())
    runtime = ClusterRuntime(settings, source, admission)
    runtime.started_cluster = connect(settings)
    app = create_app(settings, runtime, admission, routers=[health_router(runtime.board)])
    app.state.metrics.registry.register(ReplicaCollector(runtime.board))
    return runtime, admission, app
