"""The fleet's HTTP API (one replica behind Ray Serve's proxy): API key, routing to the replica
the router picks (one retry on another when the first is gone), streams relayed as they arrive,
metrics merged from the replicas."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator

from server.fleet.book import FleetConfig, _book
from server.protocol import ApiError, bad, check_api_key, error_body, read_json_object
from server.router.estimates import estimate_prompt_tokens, lora_names, request_slo

log = logging.getLogger("ray.serve")


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
            "lora": list(lora_names(body)),
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
