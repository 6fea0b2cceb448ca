"""`cara-router`: one OpenAI-compatible endpoint in front of N cara-serve instances.

For each completion or chat request the router reads the instances' scheduler states
(state.py), turns them into ``InstanceState``s and lets a routing policy of
cara_jax/scheduling/router.py pick the instance: CaraServe's Algorithm 1 (``rank_aware``) or a
baseline. The body goes to that instance unchanged, and its answer comes back unchanged: JSON
with the instance's status code, errors with their headers (429 keeps Retry-After), and SSE
streams chunk by chunk as they arrive. A client that goes away closes the upstream connection,
which makes the instance cancel the sequence. See docs/router.md.

Parts: config.py (``RouterConfig``), routing.py (``RouterState``: picking and forwarding),
relay.py (relaying answers and streams), handlers.py (the HTTP handlers), this module (the app).
"""

from __future__ import annotations

import logging

import aiohttp
from aiohttp import web

from server.middleware import (
    auth_middleware,
    cors_headers,
    cors_middleware,
    echo_request_id,
    error_middleware,
)
from server.router.config import RouterConfig, RouterConfigError
from server.router.handlers import (
    generate,
    get_model,
    health,
    list_models,
    metrics,
    router_state,
    tokenize,
    version,
)
from server.router.routing import ROUTER, RouterState

log = logging.getLogger("cara_router")
MAX_BODY = 16 << 20


# ---------------------------------------------------------------------------- the app


def _count(request: web.Request, endpoint: str, status: str) -> None:
    request.app[ROUTER].metrics.http.labels(endpoint, status).inc()


def _api_key(request: web.Request) -> str | None:
    return request.app[ROUTER].config.api_key


def _origins(request: web.Request) -> tuple[str, ...]:
    return request.app[ROUTER].config.allowed_origins


async def _start(app: web.Application) -> None:
    rs = app[ROUTER]
    rs.session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=None)
    )
    await rs.pool.refresh(force=True)
    up = [i for i in rs.pool.instances if i.up]
    if not up:
        log.warning("no instance is reachable yet; routing starts when one is")
    elif rs.needs_cost and not any(rs.cost_for(i.snapshot) for i in up):
        await rs.session.close()
        raise RouterConfigError(
            f"policy {rs.config.policy} needs a cost model: no instance publishes one in "
            f"/v1/scheduler/state and the router has none for their kernel; start the instances "
            "or the router with --cost-model FILE, or use a policy without one "
            "(round_robin, least_loaded, first_fit, random)"
        )


async def _stop(app: web.Application) -> None:
    rs = app[ROUTER]
    if rs.session is not None:
        await rs.session.close()


def build_router_app(config: RouterConfig) -> web.Application:
    middlewares = [cors_middleware(_origins), error_middleware(_count, "internal router error"),
                   auth_middleware(_api_key)]  # fmt: skip
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY)
    app.on_response_prepare.append(echo_request_id)
    app.on_response_prepare.append(cors_headers(_origins))
    app[ROUTER] = RouterState(config)
    app.router.add_post("/v1/completions", generate)
    app.router.add_post("/v1/chat/completions", generate)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", get_model)
    app.router.add_get("/v1/router/state", router_state)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", tokenize)
    app.router.add_get("/version", version)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.on_startup.append(_start)
    app.on_cleanup.append(_stop)
    return app
