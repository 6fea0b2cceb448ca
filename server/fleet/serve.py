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

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig

from server.protocol import ApiError, bad, check_api_key, error_body, read_json_object
from server.router.estimates import estimate_prompt_tokens, request_slo

log = logging.getLogger("ray.serve")  # shows in Ray Serve's replica logs
ENGINE = "EngineReplica"
BOOK = "cara-adapter-book"
HEARTBEAT_S = 0.5
LIVE_S = 5.0  # a replica heard from this recently is live
PASS_HEADERS = ("Content-Type", "Retry-After", "WWW-Authenticate", "Cache-Control",
                "X-Accel-Buffering")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class FleetConfig:
    """What ``cara-serve --replicas`` deploys (the engine flags travel as ``engine_args``)."""

    engine_args: argparse.Namespace
    # (engine_args) -> a ServerState, and (state) -> start compiling: cara-serve's own
    # (server/cli.py build_state, start_warmup), passed in by reference
    build_state: Callable[[argparse.Namespace], Any]
    start_warmup: Callable[[Any], Any]
    replicas: int = 2
    router: str = "rank_aware"  # rank_aware | least_loaded | round_robin | power_of_two
    avg_response_len: float = 128.0
    replica_cpus: float = 1.0
    pin_cpus: bool = False
    api_key: str | None = None
    stats_period_s: float = 0.2  # how often Ray's controller collects routing stats
    request_timeout_s: float = 600.0
    app_name: str = "cara"


# ---------------------------------------------------------------------------- adapter book


@ray.remote(num_cpus=0)
class AdapterBook:
    """Runtime adapter changes (name -> resolved path, or None: unloaded) and what each
    replica has applied; replicas report here every heartbeat."""

    def __init__(self) -> None:
        self.version = 0
        self.changes: dict[str, str | None] = {}
        self.replicas: dict[str, dict] = {}

    def change(self, name: str, path: str | None) -> int:
        self.version += 1
        self.changes[name] = path
        return self.version

    def heartbeat(self, replica: str, report: dict) -> tuple[int, dict[str, str | None]]:
        report["seen"] = time.time()
        if "metrics" not in report and replica in self.replicas:  # sent every few beats
            report["metrics"] = self.replicas[replica].get("metrics")
        self.replicas[replica] = report
        return self.version, dict(self.changes)

    def forget(self, replica: str) -> None:
        self.replicas.pop(replica, None)

    def state(self) -> tuple[int, dict[str, dict]]:
        now = time.time()
        live = {k: v for k, v in self.replicas.items() if now - v["seen"] < LIVE_S}
        for k in [k for k, v in self.replicas.items() if now - v["seen"] > 60]:
            del self.replicas[k]
        return self.version, live


def _book(app_name: str):
    return AdapterBook.options(
        name=f"{BOOK}-{app_name}", namespace="serve", get_if_exists=True, lifetime="detached"
    ).remote()


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
        from server.app import BackgroundServer, build_app

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
        from server.instance_state import state_document

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


# ---------------------------------------------------------------------------- ingress


def _merge_metrics(texts: dict[str, str]):
    """A collector of the replicas' metric families, each sample labelled with its replica."""
    from prometheus_client.core import Metric
    from prometheus_client.parser import text_string_to_metric_families
    from prometheus_client.registry import Collector

    class Merged(Collector):
        def collect(self):
            fams: dict[str, Metric] = {}
            for rid, text in sorted(texts.items()):
                for fam in text_string_to_metric_families(text):
                    f = fams.get(fam.name)
                    if f is None:
                        f = fams[fam.name] = Metric(fam.name, fam.documentation, fam.type)
                    for s in fam.samples:
                        f.add_sample(s.name, {**s.labels, "replica": rid}, s.value, s.timestamp)
            yield from fams.values()

    return Merged()


class Ingress:
    """The fleet's HTTP API (served by Ray Serve's proxy)."""

    def __init__(self, engine, fleet: FleetConfig) -> None:
        from prometheus_client import CollectorRegistry, Counter

        self.engine = engine
        self.fleet = fleet
        self.book = _book(fleet.app_name)
        self.registry = CollectorRegistry()
        self.http = Counter(
            "cara_ingress_http_requests",
            "HTTP requests at the fleet's ingress by endpoint and status code",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.retries = Counter(
            "cara_ingress_retries",
            "Requests sent to a second replica because the first was gone",
            registry=self.registry,
        )

    def __serve_build_asgi_app__(self):
        return build_ingress_app(self)

    # ------------------------------------------------------------ relaying

    async def relay(
        self, method: str, path: str, headers: dict[str, str], body: bytes, route: dict | None
    ):
        """(head, rest of the stream) from a replica; one retry on another replica when the
        first is gone before it answered."""
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        gone = (ActorDiedError, ActorUnavailableError, RayActorError)
        for attempt in range(2):
            gen = self.engine.options(stream=True).call.remote(method, path, headers, body, route=route)
            try:
                head = await gen.__anext__()
            except gone as e:
                gen.cancel()
                if attempt == 0:
                    self.retries.inc()
                    log.warning("replica gone before answering (%s); trying another", e)
                    continue
                raise ApiError(
                    503,
                    "no engine replica could take the request (a replica died); retry shortly",
                    type="server_error",
                    code="replica_unavailable",
                    headers={"Retry-After": "1"},
                ) from e
            return head, gen
        raise AssertionError("unreachable")

    async def wait_applied(self, version: int, name: str, timeout_s: float = 120.0) -> None:
        """Until every live replica has applied the book's ``version``."""
        deadline = time.time() + timeout_s
        while True:
            _, live = await self.book.state.remote()
            behind = [r for r, v in live.items() if v["applied"] < version]
            failed = {r: v["errors"][name] for r, v in live.items() if name in v["errors"]}
            if failed:
                raise ApiError(
                    500,
                    f"adapter {name!r} failed on replicas: "
                    + "; ".join(f"{r}: {e}" for r, e in failed.items()),
                    type="server_error",
                    code="replica_adapter_error",
                )
            if not behind:
                return
            if time.time() > deadline:
                raise ApiError(
                    504,
                    f"replicas {', '.join(behind)} did not apply the change in {timeout_s:.0f}s",
                    type="server_error",
                    code="replica_timeout",
                )
            await asyncio.sleep(0.1)


def build_ingress_app(ing: Ingress):
    """The Starlette app of the ingress (same routes as cara-serve)."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    def error(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    def endpoint(path_pattern: str, fn):
        async def handle(request: Request) -> Response:
            try:
                check_api_key(
                    request.url.path, request.headers.get("Authorization", ""), ing.fleet.api_key
                )
                resp = await fn(request)
            except ApiError as e:
                resp = error(e)
            except asyncio.CancelledError:
                ing.http.labels(path_pattern, "499").inc()
                raise
            except Exception:
                log.exception("unhandled error in %s %s", request.method, request.url.path)
                resp = error(
                    ApiError(500, "internal server error (logged on the ingress)",
                             type="server_error", code="internal_error")
                )  # fmt: skip
            ing.http.labels(path_pattern, str(resp.status_code)).inc()
            return resp

        return handle

    def forward_headers(request: Request) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        if "authorization" in request.headers:
            h["Authorization"] = request.headers["authorization"]
        return h

    async def relay(request: Request, route: dict | None = None) -> Response:
        raw = await request.body()
        head, gen = await ing.relay(
            request.method, request.url.path, forward_headers(request), raw, route
        )
        headers = dict(head["headers"])
        headers["X-Cara-Replica"] = head["replica"]
        if not headers.get("Content-Type", "").startswith("text/event-stream"):
            chunks = []
            try:
                async for c in gen:
                    chunks.append(c)
            except Exception as e:  # the replica died mid-answer
                raise ApiError(
                    502,
                    f"the engine replica failed mid-answer: {type(e).__name__}",
                    type="server_error",
                    code="replica_failed",
                ) from e
            return Response(b"".join(chunks), status_code=head["status"], headers=headers)

        async def stream() -> AsyncIterator[bytes]:
            done = False
            try:
                async for c in gen:
                    yield c
                done = True
            except asyncio.CancelledError:
                raise
            except Exception as e:  # headers are sent: end the stream in-band, never hang
                log.warning("stream from replica %s broke: %s", head["replica"], e)
                msg = f"the engine replica failed mid-stream ({type(e).__name__}); retry"
                event = json.dumps(error_body(msg, "server_error", code="replica_failed"))
                yield f"data: {event}\n\ndata: [DONE]\n\n".encode()
                done = True
            finally:
                if not done:
                    gen.cancel()  # the client left: the replica cancels the sequence

        return StreamingResponse(stream(), status_code=head["status"], headers=headers)

    async def generate(request: Request) -> Response:
        raw = await request.body()
        body = read_json_object(raw)
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise bad("`model` must be a string", "model")
        route = {
            "model": model,
            "prompt_tokens": estimate_prompt_tokens(body),
            "slo_s": request_slo(body),
        }
        return await relay(request, route)

    async def adapter_change(request: Request) -> Response:
        """Validate on one replica (its own rules), then every live replica applies it."""
        resp = await relay(request)
        if resp.status_code != 200:
            return resp
        doc = json.loads(resp.body)
        load = request.url.path.endswith("/load_lora_adapter")
        version = await ing.book.change.remote(doc["id"], doc["root"] if load else None)
        await ing.wait_applied(version, doc["id"])
        return resp

    async def health(request: Request) -> Response:
        _, live = await ing.book.state.remote()
        replicas = [
            {"replica": r, "pid": v["pid"], "rank": v["rank"], "cpus": v["cpus"],
             "ready": v["ready"], "adapters": v["adapters"],
             "age_s": round(time.time() - v["seen"], 3)}
            for r, v in sorted(live.items())
        ]  # fmt: skip
        up = sum(1 for r in replicas if r["ready"])
        body = {
            "status": "ok" if up else "unavailable",
            "replicas_up": up,
            "replicas_wanted": ing.fleet.replicas,
            "router": ing.fleet.router,
            "replicas": replicas,
        }
        return JSONResponse(body, status_code=200 if up else 503)

    async def metrics(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
        from prometheus_client.core import GaugeMetricFamily
        from prometheus_client.registry import Collector

        _, live = await ing.book.state.remote()
        texts = {r: v["metrics"] for r, v in live.items() if v.get("metrics")}

        class Fleet(Collector):
            def collect(self):
                g = GaugeMetricFamily("cara_ray_replicas_up", "Engine replicas live and ready")
                g.add_metric([], sum(1 for v in live.values() if v["ready"]))
                yield g

        merged = CollectorRegistry()
        merged.register(_merge_metrics(texts))
        merged.register(Fleet())
        data = generate_latest(ing.registry) + generate_latest(merged)
        return Response(data, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def not_found(request: Request, exc: HTTPException) -> Response:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        msg = (
            f"no route {request.method} {request.url.path}"
            if exc.status_code == 404
            else exc.detail
        )
        ing.http.labels("unmatched", str(exc.status_code)).inc()
        return JSONResponse(
            error_body(msg, kind, code=str(exc.status_code)),
            status_code=exc.status_code,
            headers=exc.headers,
        )

    routes = [
        ("/v1/completions", generate, ["POST"]),
        ("/v1/chat/completions", generate, ["POST"]),
        ("/v1/models", relay, ["GET"]),
        ("/v1/models/{model:path}", relay, ["GET"]),
        ("/v1/load_lora_adapter", adapter_change, ["POST"]),
        ("/v1/unload_lora_adapter", adapter_change, ["POST"]),
        ("/v1/scheduler/state", relay, ["GET"]),
        ("/openapi.json", relay, ["GET"]),
        ("/health", health, ["GET"]),
        ("/metrics", metrics, ["GET"]),
    ]
    return Starlette(
        routes=[Route(p, endpoint(p, fn), methods=m) for p, fn, m in routes],
        exception_handlers={HTTPException: not_found},
    )


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
