"""The router's HTTP handlers: completions and chat (routed and forwarded), /tokenize and
/detokenize (forwarded to an instance that serves the model), /version, the union of the
instances' models, the router's state, health and metrics."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import aiohttp
from aiohttp import web

from server.protocol import ApiError, bad, package_version, read_json_object
from server.router.routing import ROUTER, RouterState
from server.router.state import Instance


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


async def tokenize(request: web.Request) -> web.StreamResponse:
    """/tokenize and /detokenize: answered by an instance serving the body's ``model`` (its
    tokenizer and chat template), the first one up if no model is named."""
    rs = request.app[ROUTER]
    raw = await request.read()
    model = read_json_object(raw).get("model")
    if model is not None and not isinstance(model, str):
        raise bad("`model` must be a string", "model")
    await rs.pool.refresh()
    up = [i for i in rs.pool.instances if i.up]
    serving = [i for i in up if i.snapshot is not None and i.snapshot.rank_of(model) is not None]
    if not up:
        raise ApiError(503, "no cara-serve instance is reachable", type="server_error",
                       code="no_instance")  # fmt: skip
    if model is not None and not serving:
        raise ApiError(404, f"The model `{model}` does not exist.", param="model",
                       code="model_not_found")  # fmt: skip
    inst = (serving or up)[0]
    timeout = aiohttp.ClientTimeout(total=max(5.0, rs.config.state_timeout_s))
    headers = {**rs.pool.headers, "Content-Type": "application/json"}
    try:
        async with rs._session().post(inst.url + request.path, data=raw, headers=headers,
                                      timeout=timeout) as r:  # fmt: skip
            return web.Response(body=await r.read(), status=r.status,
                                content_type="application/json")  # fmt: skip
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
        raise ApiError(503, f"instance {inst.url} could not be reached: {e}",
                       type="server_error", code="instance_unavailable") from e


async def version(request: web.Request) -> web.Response:
    """/version, as cara-serve's."""
    return web.json_response({"version": package_version()})
