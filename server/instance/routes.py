"""HTTP handlers: OpenAI completions and chat (streaming or not; a request in flight is a
``Generation``, generation.py), models, adapters, health, metrics."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from aiohttp import web

from server.instance.generation import Generation
from server.instance.openapi import openapi_spec
from server.instance.request_parsing import parse_chat, parse_completion
from server.instance.state import STATE, AppState
from server.instance.state_route import add_state_route
from server.instance.tokenize_routes import add_tokenize_routes
from server.protocol import ApiError, package_version, read_json_object

log = logging.getLogger(__name__)
_BIG_BODY = 64 << 10  # tokenize bodies larger than this off the event loop


async def _read_body(request: web.Request) -> dict:
    return read_json_object(await request.read())


async def _generate(request: web.Request, kind: str) -> web.StreamResponse:
    arrival = time.perf_counter()
    state = request.app[STATE]
    if state.draining:
        raise ApiError(
            503, "the server is shutting down", type="server_error", code="shutting_down"
        )
    if not state.ready:
        raise ApiError(
            503, "the server is starting (compiling its programs); retry shortly",
            type="server_error", code="starting", headers={"Retry-After": "5"},
        )  # fmt: skip
    raw = await request.read()
    body = read_json_object(raw)
    parse = parse_completion if kind == "completion" else parse_chat
    args = (body, state.tokenizer, state.max_len, state.vocab)
    if kind == "chat":
        args += (state.config.tool_call_parser,)
    req = await asyncio.to_thread(parse, *args) if len(raw) > _BIG_BODY else parse(*args)
    adapter = await state.adapters.resolve_model(req.model)
    lora = await state.adapters.resolve_lora(body.get("lora"), adapter)
    if state.async_engine.num_waiting() >= state.config.max_queue:
        state.metrics.rejected.inc()
        raise ApiError(
            429,
            f"the server's queue is full ({state.config.max_queue} waiting); retry later",
            type="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": str(state.config.retry_after_s)},
        )
    gen = Generation(state, req, adapter, arrival, request.headers.get("X-Request-Id"), lora)
    state.active += 1
    try:
        await gen.submit()
        return await (gen.stream(request) if req.stream else gen.collect())
    finally:
        gen.cancel()
        state.active -= 1


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "completion")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "chat")


# ---------------------------------------------------------------------------- models, adapters


def _model_card(state: AppState, name: str) -> dict | None:
    card = {
        "object": "model",
        "created": state.created,
        "owned_by": "cara-jax",
        "max_model_len": state.max_len,
        "permission": [],
    }
    if state.adapters.is_base(name):
        return {"id": name, **card, "root": state.config.model_root, "parent": None}
    e = state.adapters.registered().get(name)
    if e is None:
        return None
    root = e.path or None  # None: loaded from memory (Python API), no folder
    return {"id": name, **card, "root": root, "parent": state.base_name, "rank": e.max_rank}


async def list_models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    names = [state.base_name, *sorted(state.adapters.registered())]
    return web.json_response({"object": "list", "data": [_model_card(state, n) for n in names]})


async def get_model(request: web.Request) -> web.Response:
    state = request.app[STATE]
    name = request.match_info["model"]
    card = _model_card(state, name)
    if card is None:
        raise ApiError(
            404, f"The model `{name}` does not exist.", param="model", code="model_not_found"
        )
    return web.json_response(card)


def _runtime_lora_allowed(state: AppState) -> None:
    """Runtime adapter loads read files the server process can read: refused unless
    --lora-dir confines them or --allow-runtime-lora allows them (vLLM's rule)."""
    if not state.config.runtime_lora:
        raise ApiError(
            403,
            "runtime LoRA loading and unloading is disabled: start the server with --lora-dir "
            "DIR (loads confined to DIR) or --allow-runtime-lora",
            type="permission_error",
            code="runtime_lora_disabled",
        )


async def load_lora_adapter(request: web.Request) -> web.Response:
    state = request.app[STATE]
    _runtime_lora_allowed(state)
    body = await _read_body(request)
    name = state.adapters.check_name(body.get("lora_name"))
    raw = body.get("lora_path")
    if not isinstance(raw, str) or not raw:
        raise ApiError(
            400, "`lora_path` must be a non-empty string", param="lora_path", code="invalid_value"
        )
    if state.lora_dir is not None:
        try:
            path = state.lora_dir.resolve(raw, param="lora_path", allow_absolute=True)
        except ApiError as e:
            if e.status != 404:
                raise
            raise ApiError(
                400,
                f"cannot load adapter {name!r}: no adapter folder {raw!r} in the adapter folder",
                param="lora_path",
                code="invalid_adapter",
            ) from e
    else:
        path = Path(raw).expanduser()
    entry = await state.adapters.load(name, path)
    return web.json_response(
        {
            "object": "lora_adapter",
            "id": name,
            "root": entry.path or None,
            "parent": state.base_name,
            "rank": entry.max_rank,
            "content_hash": entry.content_hash,
            "message": f"Success: LoRA adapter '{name}' added successfully.",
        }
    )


async def unload_lora_adapter(request: web.Request) -> web.Response:
    state = request.app[STATE]
    _runtime_lora_allowed(state)
    body = await _read_body(request)
    name = state.adapters.check_name(body.get("lora_name"))
    await state.adapters.unload(name)
    return web.json_response(
        {
            "object": "lora_adapter",
            "id": name,
            "message": f"Success: LoRA adapter '{name}' removed successfully.",
        }
    )


# ---------------------------------------------------------------------------- operations


async def version(request: web.Request) -> web.Response:
    """vLLM's /version: the server's package version."""
    return web.json_response({"version": package_version()})


async def health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    ae = state.async_engine
    status = "ok"
    stats = await asyncio.to_thread(state.engine.stats)
    if state.draining:
        status = "draining"
    elif not ae.is_alive():
        status = "engine stopped"
    elif state.start_error:
        status = "failed to start"
    elif not state.ready:
        status = "starting"
    body = {
        "status": status,
        "compiled_programs": stats.compiled_programs,
        "programs": stats.programs_total,
        "kv_cache_usage": round(stats.kv_usage, 4),
        "model": state.base_name,
        "running": ae.snapshot.running,
        "waiting": ae.num_waiting(),
        "adapters": len(state.adapters.registered()),
        "cold_start": state.engine.config.cold_start,
        "lora_kernel": state.engine.config.lora_strategy,
        "cost_model": state.config.cost_model,
        "tpot_slo_s": state.config.tpot_slo_s,
        "engine_step_errors": ae.step_errors,
    }
    return web.json_response(body, status=200 if status == "ok" else 503)


async def metrics(request: web.Request) -> web.Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    state = request.app[STATE]
    data = await asyncio.to_thread(state.metrics.render)  # the pool lock may be busy briefly
    return web.Response(body=data, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_spec(request.app[STATE]))


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", get_model)
    app.router.add_post("/v1/load_lora_adapter", load_lora_adapter)
    app.router.add_post("/v1/unload_lora_adapter", unload_lora_adapter)
    app.router.add_get("/health", health)
    app.router.add_get("/version", version)
    add_tokenize_routes(app)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
    add_state_route(app)
