"""cara-serve on Ray Serve: N engine replicas behind one OpenAI-compatible ingress.

``cara-serve --replicas N`` (docs/ray_serve.md) deploys one Ray Serve application:

- ``EngineReplica`` (N replicas, each its own process with its own engine, device share and
  adapter tiers) runs the whole cara-serve app on a loopback port of its own and relays each
  call through it, so routes, validation, streaming, errors and metrics are cara-serve's. It
  publishes its scheduler state as Ray Serve routing stats, which ``CaraRequestRouter``
  (router.py: Algorithm 1) reads.
- ``Ingress`` (one replica, Ray Serve's HTTP proxy in front) speaks the same HTTP API: it
  checks the API key, sends generation requests to the replica the router picks (one retry
  on another replica when the first is gone before it answered), relays streams as they
  arrive, and ends a stream whose replica died with an in-band error event and ``[DONE]``.
- ``AdapterBook`` (a small actor) keeps the adapters loaded or unloaded at runtime. A runtime
  load is validated by one replica (cara-serve's own rules: --lora-dir confinement or
  --allow-runtime-lora), then written to the book; every replica applies the book within a
  heartbeat, and a replica that Ray starts to replace a dead one applies it before it takes
  requests. The ingress answers once every live replica has applied it.

Ray is an optional extra (``pip install 'cara-jax[ray]'``); nothing here is imported without
``--replicas``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig

from server.fleet.book import (  # noqa: F401  (FleetConfig re-exported: cli.py builds it here)
    BOOK,
    ENGINE,
    HEARTBEAT_S,
    LIVE_S,
    PASS_HEADERS,
    AdapterBook,
    FleetConfig,
    _book,
)
from server.fleet.ingress import Ingress, build_ingress_app  # noqa: F401

log = logging.getLogger("ray.serve")  # shows in Ray Serve's replica logs
# ---------------------------------------------------------------------------- engine replica


def _pin_process(cpus: set[int]) -> None:
    """Pin every thread of this process (and the ones it starts later) to ``cpus``."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:
            pass


class EngineReplica:
    """One cara-serve engine and app in its own process (a Ray Serve replica)."""

    async def __init__(self, fleet: FleetConfig) -> None:
        ctx = serve.get_replica_context()
        self.replica_id = ctx.replica_id.unique_id
        self.rank = ctx.rank.rank if hasattr(ctx.rank, "rank") else int(ctx.rank or 0)
        if fleet.pin_cpus:
            n = max(1, int(fleet.replica_cpus))
            have = sorted(os.sched_getaffinity(0))
            first = (self.rank * n) % len(have)
            self.cpus = {have[(first + k) % len(have)] for k in range(n)}
            _pin_process(self.cpus)  # before JAX starts its thread pool
        else:
            self.cpus = set(os.sched_getaffinity(0))
        from server.instance.app import BackgroundServer, build_app

        t0 = time.perf_counter()
        self.state = await asyncio.to_thread(fleet.build_state, fleet.engine_args)
        t1 = time.perf_counter()
        fleet.start_warmup(self.state)
        while not self.state.ready and not self.state.start_error:
            await asyncio.sleep(0.1)  # Ray routes nothing here until __init__ returns
        log.info("engine built in %.1fs, programs compiled in %.1fs", t1 - t0,
                 time.perf_counter() - t1)  # fmt: skip
        if self.state.start_error:
            raise RuntimeError(self.state.start_error)
        self.book = _book(fleet.app_name)
        self.applied = 0
        self.errors: dict[str, str] = {}
        version, changes = await self.book.heartbeat.remote(self.replica_id, self._report())
        await asyncio.to_thread(self._apply_sync, version, changes)
        self.server = BackgroundServer(build_app(self.state))  # loopback, a free port
        self._session = None
        self._metrics_at = 0.0
        self._beat: asyncio.Task | None = None
        self._start_heartbeats()
        log.info("replica %s (rank %d) ready on cpus %s", self.replica_id, self.rank,
                 sorted(self.cpus))  # fmt: skip

    # ------------------------------------------------------------ adapters from the book

    def _apply_sync(self, version: int, changes: dict[str, str | None]) -> None:
        engine = self.state.engine
        for name, path in changes.items():
            have = engine.adapters().get(name)
            try:
                if path is None and have is not None:
                    engine.unload_adapter(name)
                elif path is not None and (have is None or have.path != path):
                    engine.load_adapter(name, Path(path))
                self.errors.pop(name, None)
            except Exception as e:  # reported to the book; the ingress says which replica
                self.errors[name] = f"{type(e).__name__}: {e}"
        self.applied = version

    def _report(self, metrics: bytes | None = None) -> dict:
        r = {
            "pid": os.getpid(),
            "rank": self.rank,
            "cpus": sorted(self.cpus),
            "applied": self.applied,
            "errors": dict(self.errors),
            "adapters": sorted(self.state.engine.adapters()),
            "ready": bool(self.state.ready) and self.state.async_engine.is_alive(),
        }
        if metrics is not None:
            r["metrics"] = metrics.decode()
        return r

    async def _heartbeats(self) -> None:
        while True:
            try:
                metrics = None
                if time.time() - self._metrics_at > 2.0:
                    metrics = await asyncio.to_thread(self.state.metrics.render)
                    self._metrics_at = time.time()
                ref = self.book.heartbeat.remote(self.replica_id, self._report(metrics))
                version, changes = await ref
                if version != self.applied:
                    await asyncio.to_thread(self._apply_sync, version, changes)
            except Exception:
                log.exception("heartbeat failed")
            await asyncio.sleep(HEARTBEAT_S)

    def _start_heartbeats(self) -> None:
        if self._beat is None or self._beat.done():
            self._beat = asyncio.get_running_loop().create_task(self._heartbeats())

    # ------------------------------------------------------------ Ray Serve hooks

    async def record_routing_stats(self) -> dict[str, Any]:
        """The scheduler state (docs/router.md) plus when it was taken."""
        from server.instance.state_route import state_document

        self._start_heartbeats()
        doc = await state_document(self.state)
        doc.update(time=time.time(), ready=self.state.ready, replica=self.replica_id)
        return doc

    async def check_health(self) -> None:
        self._start_heartbeats()
        if not self.state.async_engine.is_alive():
            raise RuntimeError("the engine thread stopped")

    # ------------------------------------------------------------ requests

    async def call(
        self, method: str, path: str, headers: dict[str, str], body: bytes, *, route: dict | None
    ) -> AsyncIterator[Any]:
        """Relay one HTTP request through this replica's cara-serve app: first
        ``{"status", "headers"}``, then the body's bytes as they come. ``route`` (model,
        prompt-token estimate, SLO) is read by the request router, which sees only keyword
        arguments (``PendingRequest.kwargs``): hence keyword-only."""
        import aiohttp

        self._start_heartbeats()
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=None)
            )
        async with self._session.request(
            method, self.server.url + path, data=body, headers=headers
        ) as r:
            out = {k: r.headers[k] for k in PASS_HEADERS if k in r.headers}
            yield {"status": r.status, "headers": out, "replica": self.replica_id}
            async for chunk in r.content.iter_any():
                yield chunk

    def pid(self) -> int:
        return os.getpid()


# ---------------------------------------------------------------------------- deploy / run


def build_application(fleet: FleetConfig):
    """The Ray Serve application: ``Ingress`` over ``EngineReplica`` x ``fleet.replicas``."""
    if fleet.router == "power_of_two":
        router_cfg = RequestRouterConfig()  # Ray Serve's default router, as shipped
    else:
        from server.fleet.router import CaraRequestRouter

        router_cfg = RequestRouterConfig(
            request_router_class=CaraRequestRouter,
            request_router_kwargs={
                "policy": fleet.router,
                "avg_response_len": fleet.avg_response_len,
            },
            request_routing_stats_period_s=fleet.stats_period_s,
            request_routing_stats_timeout_s=5.0,
        )
    env = {k: v for k, v in os.environ.items() if k.startswith(("CARA_", "JAX_", "XLA_"))}
    engine = serve.deployment(
        EngineReplica,
        name=ENGINE,
        num_replicas=fleet.replicas,
        max_ongoing_requests=100_000,  # the engine queues (and answers 429 past --max-queue)
        ray_actor_options={"num_cpus": fleet.replica_cpus, "runtime_env": {"env_vars": env}},
        request_router_config=router_cfg,
        health_check_period_s=2.0,
        health_check_timeout_s=30.0,
        graceful_shutdown_timeout_s=fleet.engine_args.drain_timeout,
    )
    ingress = serve.deployment(
        serve.ingress()(Ingress),
        name="Ingress",
        num_replicas=1,
        max_ongoing_requests=100_000,
        ray_actor_options={"num_cpus": 0},
    )
    return ingress.bind(engine.bind(fleet), fleet)


def check_fleet(fleet: FleetConfig) -> None:
    if fleet.router == "rank_aware" and not fleet.engine_args.cost_model:
        raise SystemExit(
            "cara-serve: --ray-router rank_aware needs --cost-model FILE (cara-jax profile), "
            "or pick a baseline router (power_of_two, least_loaded, round_robin)"
        )


def start_fleet(
    fleet: FleetConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    ray_address: str | None = None,
) -> str:
    """Start (or join) Ray, deploy the application, wait until every replica is ready; the
    ingress URL."""
    check_fleet(fleet)
    if not ray.is_initialized():
        if ray_address:
            ray.init(address=ray_address, namespace="serve", log_to_driver=False)
        else:
            ray.init(include_dashboard=False, namespace="serve", log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_application(fleet), name=fleet.app_name, route_prefix="/")
    return f"http://{host}:{port}"


def stop_fleet(fleet: FleetConfig, shutdown_ray: bool = True) -> None:
    try:
        serve.delete(fleet.app_name)
    except Exception:
        log.exception("deleting the application failed")
    try:
        ray.kill(ray.get_actor(f"{BOOK}-{fleet.app_name}", namespace="serve"))
    except ValueError:
        pass
    serve.shutdown()
    if shutdown_ray:
        ray.shutdown()


def run_fleet(fleet: FleetConfig, host: str, port: int, ray_address: str | None) -> int:
    """``cara-serve --replicas N``: serve until Ctrl-C or SIGTERM."""
    url = start_fleet(fleet, host, port, ray_address)
    log.info("serving %d replicas (router %s) on %s", fleet.replicas, fleet.router, url)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("shutting down the fleet")
    stop_fleet(fleet, shutdown_ray=not ray_address)
    return 0
