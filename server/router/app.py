"""`cara-router`: one OpenAI-compatible endpoint in front of N cara-serve instances.

For each completion or chat request the router reads the instances' scheduler states
(state.py), turns them into ``InstanceState``s and lets a routing policy of
cara_jax/scheduling/router.py pick the instance: CaraServe's Algorithm 1 (``rank_aware``) or a
baseline. The body goes to that instance unchanged, and its answer comes back unchanged: JSON
with the instance's status code, errors with their headers (429 keeps Retry-After), and SSE
streams chunk by chunk as they arrive. A client that goes away closes the upstream connection,
which makes the instance cancel the sequence. See docs/router.md.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from cara_jax.scheduling.cost_model import CostModel, load_cost_models
from cara_jax.scheduling.fleet import Member, NoCostModelError, plan
from cara_jax.scheduling.router import POLICIES, NoInstanceError, RequestInfo, make_router
from server.middleware import auth_middleware, error_middleware
from server.protocol import ApiError, bad, error_body, read_json_object
from server.router.estimates import estimate_prompt_tokens, request_slo
from server.router.metrics import RouterMetrics
from server.router.state import Instance, InstancePool, Snapshot, describe_error

log = logging.getLogger("cara_router")
MAX_BODY = 16 << 20
COST_POLICIES = ("rank_aware", "first_fit_slo")  # policies that predict step latencies
# Failures before any byte of an answer: the instance is unreachable, try another one.
UNREACHABLE = (
    aiohttp.ClientOSError,
    aiohttp.ConnectionTimeoutError,
    aiohttp.ServerDisconnectedError,
)
PASS_HEADERS = (
    "Content-Type",
    "Retry-After",
    "WWW-Authenticate",
    "Cache-Control",
    "X-Accel-Buffering",
)


class RouterConfigError(RuntimeError):
    """The router cannot start as configured (message for the operator)."""


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    instances: tuple[str, ...]  # base URLs of the cara-serve instances, e.g. http://host:8000
    policy: str = "rank_aware"
    cost_model: str | None = None  # JSON file, for instances that publish no cost model
    avg_response_len: float = 128.0  # Algorithm 1 amortises a prefill over this many tokens
    headroom: float = 0.0  # fraction of the SLO kept free
    count_prefill_stalls: bool = False  # SLO check on the steady-state TPOT (admission's rule)
    api_key: str | None = None  # required from clients on /v1/*, sent to the instances
    request_timeout_s: float = 600.0  # a whole forwarded request, stream included
    connect_timeout_s: float = 2.0
    state_timeout_s: float = 1.0  # one state fetch
    state_ttl_s: float = 0.05  # how long a fetched state serves routes
    seed: int = 0  # the random policy's

    def __post_init__(self) -> None:
        if not self.instances:
            raise RouterConfigError("give at least one instance URL (--instance)")
        for u in self.instances:
            if not u.startswith(("http://", "https://")):
                raise RouterConfigError(f"instance URL {u!r} must start with http:// or https://")
        if len({u.rstrip("/") for u in self.instances}) != len(self.instances):
            raise RouterConfigError("an instance URL is given twice")
        if self.policy not in POLICIES:
            raise RouterConfigError(f"unknown policy {self.policy!r}; use one of {POLICIES}")
        if self.avg_response_len <= 0 or not 0 <= self.headroom < 1:
            raise RouterConfigError("need avg_response_len > 0 and 0 <= headroom < 1")


# ---------------------------------------------------------------------------- the router


def load_router_cost_models(path: str | Path) -> list[CostModel]:
    try:
        models = list(load_cost_models(path).values())
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RouterConfigError(f"cannot read cost model file {path}: {e}") from e
    if not models:
        raise RouterConfigError(f"cost model file {path} holds no model")
    return models


class RouterState:
    """What the handlers share: config, instances, the policy, the HTTP client, metrics."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.costs = load_router_cost_models(config.cost_model) if config.cost_model else []
        self.session: aiohttp.ClientSession | None = None
        self.pool = InstancePool(
            config.instances,
            lambda: self._session(),
            headers=self._auth(None),
            timeout_s=config.state_timeout_s,
            ttl_s=config.state_ttl_s,
            on_change=self._on_change,
        )
        self.metrics = RouterMetrics(self.pool.instances)
        self.router = make_router(
            config.policy,
            seed=config.seed,
            avg_response_len=config.avg_response_len,
            headroom=config.headroom,
            count_prefill_stalls=config.count_prefill_stalls,
        )
        self.decisions = 0
        self.recent: collections.deque[dict] = collections.deque(maxlen=20)
        self.started = time.time()

    @property
    def needs_cost(self) -> bool:
        return self.config.policy in COST_POLICIES

    def _session(self) -> aiohttp.ClientSession:
        if self.session is None:
            raise RuntimeError("the router's HTTP client is not started")
        return self.session

    def _on_change(self, inst: Instance) -> None:
        self.metrics.up.labels(inst.url).set(1 if inst.up else 0)

    def _auth(self, request: web.Request | None) -> dict[str, str]:
        """The router's key if it has one, else whatever the client sent."""
        if self.config.api_key:
            return {"Authorization": f"Bearer {self.config.api_key}"}
        got = request.headers.get("Authorization") if request is not None else None
        return {"Authorization": got} if got else {}

    def cost_for(self, snap: Snapshot) -> CostModel | None:
        """The instance's own cost model, else the router's for its kernel (one whose model
        is among the instance's names if the file has several)."""
        if snap.cost is not None:
            return snap.cost
        same = [c for c in self.costs if c.kernel == snap.kernel]
        named = [c for c in same if c.model == snap.model or c.model in snap.served_names]
        return (named or same or [None])[0]

    def plan(
        self, model: str | None, body: Mapping[str, Any], exclude: frozenset[int] = frozenset()
    ) -> tuple[Instance, RequestInfo]:
        """Pick the instance for a request: the shared routing step (fleet.plan)."""
        insts = self.pool.instances
        members = [
            Member(
                i.snapshot,
                self.cost_for(i.snapshot) if i.snapshot else None,
                i.unreported() if i.snapshot else (),
                up=i.up,
                name=i.url,
            )
            for i in insts
        ]
        try:
            p = plan(
                self.router,
                members,
                model,
                estimate_prompt_tokens(body),
                request_slo(body),
                needs_cost=self.needs_cost,
                exclude=exclude,
            )
        except NoCostModelError as e:
            raise ApiError(
                503,
                f"routing policy {self.config.policy} needs a cost model, and neither the "
                "instances nor the router have one (start cara-router with --cost-model)",
                type="server_error",
                code="no_cost_model",
            ) from e
        except NoInstanceError as e:
            raise ApiError(
                503, "no cara-serve instance is reachable", type="server_error", code="no_instance"
            ) from e
        return insts[p.order[0]], p.info

    async def forward(
        self, request: web.Request, inst: Instance, info: RequestInfo, raw: bytes
    ) -> web.StreamResponse | None:
        """Send the body to ``inst`` and relay its answer; None if it cannot be reached."""
        key = self.pool.begin(inst, info)
        self.metrics.requests.labels(inst.url, self.config.policy).inc()
        headers = {"Content-Type": "application/json", **self._auth(request)}
        timeout = aiohttp.ClientTimeout(
            total=self.config.request_timeout_s, sock_connect=self.config.connect_timeout_s
        )
        up: aiohttp.ClientResponse | None = None
        try:
            try:
                up = await self._session().post(
                    inst.url + request.path, data=raw, headers=headers, timeout=timeout
                )
            except UNREACHABLE as e:
                self.pool.mark_down(inst, describe_error(e))
                return None
            except asyncio.TimeoutError as e:
                raise _gateway_timeout(inst) from e
            out_headers = {k: up.headers[k] for k in PASS_HEADERS if k in up.headers}
            out_headers["X-Cara-Instance"] = inst.url
            if up.headers.get("Content-Type", "").startswith("text/event-stream"):
                return await _relay_stream(request, up, out_headers, inst)
            try:
                data = await up.read()
            except asyncio.TimeoutError as e:
                raise _gateway_timeout(inst) from e
            except aiohttp.ClientError as e:
                raise ApiError(
                    502,
                    f"instance {inst.url} failed mid-answer: {describe_error(e)}",
                    type="server_error",
                    code="upstream_error",
                ) from e
            if up.status >= 400 and not _is_error_body(data):
                data = json.dumps(
                    error_body(
                        data.decode(errors="replace")[:500] or up.reason or "error",
                        "server_error",
                        code=str(up.status),
                    )
                ).encode()
                out_headers["Content-Type"] = "application/json"
            up.release()
            return web.Response(body=data, status=up.status, headers=out_headers)
        finally:
            if up is not None:
                up.close()  # no-op after release; otherwise drops the connection (cancels)
            self.pool.end(inst, key)


def _gateway_timeout(inst: Instance) -> ApiError:
    return ApiError(
        504,
        f"instance {inst.url} did not answer in time",
        type="server_error",
        code="upstream_timeout",
    )


def _is_error_body(data: bytes) -> bool:
    try:
        doc = json.loads(data)
    except ValueError:
        return False
    return isinstance(doc, dict) and isinstance(doc.get("error"), dict)


async def _relay_stream(
    request: web.Request, up: aiohttp.ClientResponse, headers: dict[str, str], inst: Instance
) -> web.StreamResponse:
    """Relay an SSE stream as its bytes arrive (never buffered to the end)."""
    resp = web.StreamResponse(status=up.status, headers=headers)
    await resp.prepare(request)
    while True:
        try:
            data = await up.content.readany()
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:  # the instance failed
            log.warning("stream from %s broke: %s", inst.url, describe_error(e))
            msg = f"instance {inst.url} failed mid-stream: {describe_error(e)}"
            event = json.dumps(error_body(msg, "server_error", code="upstream_error"))
            try:
                await resp.write(f"data: {event}\n\ndata: [DONE]\n\n".encode())
            except (ConnectionError, aiohttp.ClientError):
                pass
            return resp
        if not data:
            break
        try:
            await resp.write(data)
        except (ConnectionError, aiohttp.ClientError):  # the client went away
            log.debug("client of a stream from %s disconnected", inst.url)
            up.close()  # the instance sees the disconnect and cancels the sequence
            return resp
    await resp.write_eof()
    return resp


# ---------------------------------------------------------------------------- handlers

ROUTER: web.AppKey[RouterState] = web.AppKey("cara_router")


async def generate(request: web.Request) -> web.StreamResponse:
    rs = request.app[ROUTER]
    raw = await request.read()
    body = read_json_object(raw)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("`model` must be a string", "model")
    t0 = time.perf_counter()
    await rs.pool.refresh()
    inst, info = rs.plan(model, body)
    rs.metrics.route.observe(time.perf_counter() - t0)
    rs.decisions += 1
    rs.recent.append(
        {"model": model, "rank": info.rank, "prompt_tokens": info.prompt_tokens,
         "slo_s": info.slo_s, "instance": inst.url,
         "route_ms": round(1e3 * (time.perf_counter() - t0), 3)}
    )  # fmt: skip
    resp = await rs.forward(request, inst, info, raw)
    tried = [inst.url]
    if resp is None:  # unreachable: the next best, once
        try:
            inst, info = rs.plan(model, body, exclude=frozenset({inst.index}))
        except ApiError:
            pass
        else:
            rs.metrics.fallbacks.inc()
            tried.append(inst.url)
            resp = await rs.forward(request, inst, info, raw)
    if resp is None:
        raise ApiError(
            503,
            f"no instance could be reached (tried {', '.join(tried)})",
            type="server_error",
            code="instance_unavailable",
        )
    return resp


async def _get_json(rs: RouterState, inst: Instance, path: str) -> Any:
    timeout = aiohttp.ClientTimeout(total=max(5.0, rs.config.state_timeout_s))
    try:
        async with rs._session().get(
            inst.url + path, headers=rs.pool.headers, timeout=timeout
        ) as r:
            if r.status != 200:
                return None
            return await r.json(content_type=None)
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
        return None


async def _model_cards(rs: RouterState) -> list[dict]:
    """The union of the instances' /v1/models, deduplicated by id (first instance wins)."""
    docs = await asyncio.gather(*(_get_json(rs, i, "/v1/models") for i in rs.pool.instances))
    if all(d is None for d in docs):
        raise ApiError(
            503, "no cara-serve instance is reachable", type="server_error", code="no_instance"
        )
    seen: dict[str, dict] = {}
    for doc in docs:
        data = doc.get("data") if isinstance(doc, dict) else None
        for card in data if isinstance(data, list) else []:
            if isinstance(card, dict) and isinstance(card.get("id"), str):
                seen.setdefault(card["id"], card)
    return list(seen.values())


async def list_models(request: web.Request) -> web.Response:
    cards = await _model_cards(request.app[ROUTER])
    return web.json_response({"object": "list", "data": cards})


async def get_model(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    for card in await _model_cards(request.app[ROUTER]):
        if card["id"] == name:
            return web.json_response(card)
    raise ApiError(
        404, f"The model `{name}` does not exist.", param="model", code="model_not_found"
    )


def _instance_view(rs: RouterState, inst: Instance, now: float) -> dict:
    snap = inst.snapshot
    view: dict[str, Any] = {
        "url": inst.url,
        "up": inst.up,
        "error": inst.error,
        "state_age_s": None if math.isinf(inst.checked_at) else round(now - inst.checked_at, 3),
        "forwarded": inst.forwarded,
        "in_flight": len(inst.open),
        "unreported": len(inst.unreported()),
    }
    if snap is not None:
        cost = rs.cost_for(snap)
        view |= {
            "model": snap.model,
            "kernel": snap.kernel,
            "num_slots": snap.num_slots,
            "free_slots": snap.free_slots,
            "running": len(snap.running),
            "queued": len(snap.queued),
            "adapters": len(snap.adapters),
            "tpot_slo_s": snap.tpot_slo_s,
            "cost_model": None
            if cost is None
            else {"source": "instance" if snap.cost is not None else "router", "key": cost.key},
        }
    return view


async def router_state(request: web.Request) -> web.Response:
    rs = request.app[ROUTER]
    await rs.pool.refresh()
    now = asyncio.get_running_loop().time()
    return web.json_response(
        {
            "object": "router_state",
            "policy": rs.config.policy,
            "decisions": rs.decisions,
            "instances": [_instance_view(rs, i, now) for i in rs.pool.instances],
            "recent_decisions": list(rs.recent),
        }
    )


async def health(request: web.Request) -> web.Response:
    rs = request.app[ROUTER]
    await rs.pool.refresh()
    up = sum(i.up for i in rs.pool.instances)
    body = {
        "status": "ok" if up else "unavailable",
        "policy": rs.config.policy,
        "instances_up": up,
        "instances": [{"url": i.url, "up": i.up, "error": i.error} for i in rs.pool.instances],
    }
    return web.json_response(body, status=200 if up else 503)


async def metrics(request: web.Request) -> web.Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    data = request.app[ROUTER].metrics.render()
    return web.Response(body=data, headers={"Content-Type": CONTENT_TYPE_LATEST})


# ---------------------------------------------------------------------------- the app


def _count(request: web.Request, endpoint: str, status: str) -> None:
    request.app[ROUTER].metrics.http.labels(endpoint, status).inc()


def _api_key(request: web.Request) -> str | None:
    return request.app[ROUTER].config.api_key


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
    middlewares = [error_middleware(_count, "internal router error"), auth_middleware(_api_key)]
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY)
    app[ROUTER] = RouterState(config)
    app.router.add_post("/v1/completions", generate)
    app.router.add_post("/v1/chat/completions", generate)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", get_model)
    app.router.add_get("/v1/router/state", router_state)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.on_startup.append(_start)
    app.on_cleanup.append(_stop)
    return app
