"""Joining or starting the Ray cluster, and deploying the engine replicas on it with Ray Serve.

`connect` joins the cluster `--ray-address` names, or starts a local one (no dashboard, no usage stats: it
never reaches the internet). `engine_app` describes the deployment from the settings: `--replicas N`, or an
autoscaling range `--min-replicas/--max-replicas` that scales on ongoing requests per replica (a replica whose
batch is full asks for another); each replica may hold `max-batch-size + max-waiting-sequences` sequences,
as one engine does alone; one GPU each where the cluster has GPUs, else an equal share of the cluster's CPUs;
routed by `PrefixAffinityRouter`. `deploy` runs it with Serve's HTTP proxy off (the front is qwen-api's own
server), or attaches to the application when one is already deployed (KubeRay deploys it from
`app_builder`, see deploy/kuberay-rayservice.yaml).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen_api.engine.loading import DEMO_ALIAS
from qwen_api.settings import Settings

log = logging.getLogger(__name__)

APP_NAME = "qwen-api"
DEPLOYMENT_NAME = "engine"
ROUTER_CLASS = "qwen_api.cluster.router:PrefixAffinityRouter"


@dataclass(frozen=True)
class Deployed:
    """What the front holds on to: the handle, and what it must undo when it stops."""

    handle: Any  # ray.serve.handle.DeploymentHandle
    deployed_here: bool  # the front deployed the application, so it deletes it when it stops
    started_cluster: bool  # the front started a local cluster, so it stops it too


def connect(settings: Settings) -> bool:
    """Join `--ray-address`, or start a local cluster; True when this process started it.

    Call it on the main thread before the server starts: Ray's crash handler also takes SIGTERM (and aborts the
    process, exit 134, while the server drains), and the server's own handlers, installed after it, win.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not settings.ray_address:
        # A local cluster stays on the loopback interface (Ray's single-machine mode; on Linux it would otherwise
        # listen on the machine's address): nothing outside this machine needs to reach it. Set before `import ray`.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_worker_niceness", "0")  # replicas are the main work here (see replica._unnice)
    import ray

    if ray.is_initialized():
        return False
    if settings.ray_address:
        check_reachable(settings.ray_address)
        ray.init(address=settings.ray_address, logging_level=logging.WARNING)
        return False
    ray.init(include_dashboard=False, logging_level=logging.WARNING)
    return True


# HTTP/2's client connection preface and an empty SETTINGS frame: a gRPC server (Ray's GCS) answers with its own
# SETTINGS frame before any call, so before any authentication
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
_SETTINGS = 4


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail now, with the address in the message, when nothing listens at a `HOST:PORT` address, or something that
    is no gRPC server (a web server, the dashboard's port): `ray.init` would wait for it without end (and the front
    never opens its port, nor stops on SIGTERM). Without TLS (`RAY_USE_TLS`), the port must answer HTTP/2's
    preface with a SETTINGS frame, as Ray's GCS does. `auto` and `ray://` addresses are Ray's to resolve."""
    host, _, port = address.rpartition(":")
    if address == "auto" or "://" in address or not host or not port.isdigit():
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as conn:
            if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
                return  # a TLS handshake comes first: the preface would be refused by a Ray cluster too
            conn.sendall(_HTTP2_PREFACE)
            head = b""
            while len(head) < 9 and (more := conn.recv(9 - len(head))):
                head += more
    except OSError as exc:
        raise RuntimeError(f"cannot reach the Ray cluster at --ray-address {address}: {exc}") from None
    if len(head) < 9 or head[3] != _SETTINGS:
        raise RuntimeError(
            f"--ray-address {address} answers, but not as a Ray cluster (its GCS speaks gRPC): give the head "
            "node's GCS port (6379 unless `ray start --port` said otherwise), not its dashboard's or another service's"
        )


def check_fits(settings: Settings, cluster: dict[str, float], local: bool) -> None:
    """Refuse replicas that a cluster this front started itself can never place (nothing will add nodes to it):
    Ray Serve would wait for them without end. On a cluster it joined, an autoscaler may add nodes: a warning."""
    most = settings.max_replicas or settings.replicas
    options, _ = replica_resources(settings, cluster)
    kind = "GPU" if "num_gpus" in options else "CPU"
    need, have = most * int(options.get("num_gpus", options.get("num_cpus", 1))), int(cluster.get(kind, 0))
    if need <= have:
        return
    message = f"{most} replica(s) need {need} {kind}(s) and the cluster has {have}"
    if local:
        advice = "ask for fewer replicas (--replicas, --max-replicas)" if have else f"it has no {kind}: --device cpu"
        raise RuntimeError(f"{message}: {advice}")
    log.warning("%s: the rest wait until the cluster grows", message)


def replica_resources(settings: Settings, cluster: dict[str, float]) -> tuple[dict[str, Any], int | None]:
    """Ray actor options for one replica, and the CPU threads its engine may use (None: the engine's choice)."""
    most = settings.max_replicas or settings.replicas
    if settings.device.startswith("cuda") or (settings.device == "auto" and cluster.get("GPU", 0) >= 1):
        return {"num_gpus": 1, "num_cpus": 1}, None
    cpus = max(1, int(cluster.get("CPU", 1)) // most)
    return {"num_cpus": cpus}, cpus


def scaling(settings: Settings) -> dict[str, Any]:
    """`num_replicas`, or an autoscaling range when either bound is given."""
    if settings.min_replicas is None and settings.max_replicas is None:
        return {"num_replicas": settings.replicas}
    low = settings.min_replicas or 1
    high = max(settings.max_replicas or low, low)
    return {
        "autoscaling_config": {
            "min_replicas": low,
            "max_replicas": high,
            "initial_replicas": max(low, min(settings.replicas, high)),
            # A replica whose batch is full is busy enough: requests past it wait for a slot.
            "target_ongoing_requests": settings.max_batch_size,
            "upscale_delay_s": 5,
            "downscale_delay_s": 60,
        }
    }


def engine_app(settings: Settings, cluster: dict[str, float]) -> Any:
    """The engine deployment, bound to its settings: a Ray Serve application."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from qwen_api.cluster.replica import EngineReplica

    actor_options, threads = replica_resources(settings, cluster)
    # serve.deployment(cls) returns a Deployment; Ray's stubs type only its decorator form.
    deployment = serve.deployment(EngineReplica).options(  # type: ignore[attr-defined]
        name=DEPLOYMENT_NAME,
        ray_actor_options=actor_options,
        max_ongoing_requests=settings.admission_capacity(),
        health_check_period_s=2,
        health_check_timeout_s=30,
        graceful_shutdown_timeout_s=max(settings.drain_timeout, 1),
        max_constructor_retry_count=3,
        logging_config={"log_level": settings.log_level.upper(), "enable_access_log": False},
        request_router_config=RequestRouterConfig(
            request_router_class=ROUTER_CLASS,  # type: ignore[arg-type]  # an import path, as Ray's docs use
            request_router_kwargs={"slots": settings.max_batch_size, "block": 16, "imbalance": 2},
        ),
        **scaling(settings),
    )
    payload = settings.model_dump(mode="json", exclude={"api_key", "cors_allow_origins"})
    payload["model"] = replica_model(settings.model)
    return deployment.bind(payload, threads)


def replica_model(model: str) -> str:
    """`--model` as the replicas must read it: a local path made absolute (replicas run in the Ray worker's working
    directory, not the front's, where a relative path would name nothing, or a hub id), else as given."""
    path = Path(model).expanduser()
    return str(path.resolve()) if model != DEMO_ALIAS and path.exists() else model


def app_builder(args: dict[str, Any]) -> Any:
    """For Serve config files (KubeRay's `serveConfigV2`): `args` are settings, as `qwen-api serve` takes them."""
    import ray

    return engine_app(Settings(**args), ray.cluster_resources())


def deploy(settings: Settings, started: bool, stopping: Callable[[], bool] = lambda: False) -> Deployed:
    """Deploy the engine replicas (or attach to those already deployed) and wait until they run, or `stopping()`."""
    import ray
    from ray import serve

    existing = serve.status().applications.get(APP_NAME)
    if existing is not None:
        if existing.status == "DEPLOY_FAILED":  # a str enum: nothing serves there, and waiting on it cannot help
            raise RuntimeError(
                f"the Ray Serve application {APP_NAME!r} on this cluster failed to deploy ({_failure(existing)}); "
                f"delete it (`serve.delete({APP_NAME!r})`) or let whatever deployed it fix it, then start again"
            )
        log.info("attaching to the Ray Serve application %r already deployed", APP_NAME)
    else:
        cluster = ray.cluster_resources()
        check_fits(settings, cluster, local=started)
        serve.start(proxy_location="Disabled")
        log.info("deploying the engine replicas on Ray (%s)", cluster)
        try:
            # Serve's own wait (serve.run) cannot be stopped: a SIGTERM while replicas wait for resources would
            # wait with it. So deploy without waiting, and wait here, where `stopping` can end it.
            serve._run(engine_app(settings, cluster), name=APP_NAME, route_prefix=None, _blocking=False)
            _wait_running(stopping)
        except BaseException:
            # left behind, the failed application would be what the next front attaches to, and waits on in vain
            serve.delete(APP_NAME)
            raise
    handle = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=APP_NAME)
    return Deployed(handle, deployed_here=existing is None, started_cluster=started)


def _wait_running(stopping: Callable[[], bool], period: float = 0.5, report_every: float = 30.0) -> None:
    """Until the application runs: an error if it failed to deploy, or once `stopping()` (a SIGTERM during the load);
    what it waits for is logged now and then (replicas waiting for resources, a model loading)."""
    from ray import serve

    reported = time.monotonic()
    while True:
        app = serve.status().applications.get(APP_NAME)
        if app is None:
            raise RuntimeError(f"the Ray Serve application {APP_NAME!r} was deleted while it started")
        if app.status == "RUNNING":  # a str enum
            return
        if app.status == "DEPLOY_FAILED":
            raise RuntimeError(f"the Ray Serve application {APP_NAME!r} failed to deploy: {_failure(app)}")
        if stopping():
            raise RuntimeError("stopped while the engine replicas were starting")
        if time.monotonic() - reported > report_every:
            reported = time.monotonic()
            log.warning("still waiting for the engine replicas (%s): %s", app.status, app.message)
        time.sleep(period)


def undeploy(deployed: Deployed, reachable: bool = True) -> None:
    """Delete what the front deployed (its replicas drain), stop what it started, and disconnect; nothing when the
    cluster is gone (not `reachable`): every call to it would wait for it in vain (a minute, then Ray ends the
    process itself)."""
    import ray
    from ray import serve

    if not reachable:
        log.warning("the Ray cluster is gone: nothing to delete there")
        return
    try:
        if deployed.deployed_here:
            serve.delete(APP_NAME)
        if deployed.started_cluster:
            serve.shutdown()
    finally:
        ray.shutdown()


def _failure(app: Any) -> str:
    """Why an application failed to deploy: its own message says only which deployment failed ("Failed to update
    the deployments ['engine']"); the deployment's holds the replicas' error, whose last line says what it was (a
    model that cannot be read, a missing file)."""
    deployment = app.deployments.get(DEPLOYMENT_NAME)
    lines = [line.strip() for line in str(getattr(deployment, "message", "") or "").splitlines() if line.strip()]
    return f"{str(app.message).rstrip('.')}: {lines[-1]}" if lines else str(app.message)
