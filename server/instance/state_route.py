"""GET /v1/scheduler/state: what this instance publishes to a router (docs/router.md).

A router runs CaraServe's Algorithm 1 over its instances: it needs each one's running and queued
requests with their LoRA ranks and SLOs, its kernel's cost model, and the adapters it serves by
name (with their ranks, so a request's rank is known before it is routed).
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from server.instance.state import STATE, AppState


def _state_document(state: AppState, live: dict) -> dict:
    engine = state.engine
    sched = engine.admission
    cost = None
    if sched.cost is not None:
        cost = {k: v for k, v in sched.cost.to_dict().items() if k != "samples"}
    registered = state.adapters.registered()
    predicted = None
    if sched.cost is not None and live["running"]:
        predicted = sched.cost.decode_latency([r["rank"] for r in live["running"]])
    return {
        "object": "scheduler_state",
        "model": state.base_name,
        "served_names": list(state.config.served_names),
        "kernel": engine.config.lora_strategy,
        "admission": sched.config.admission,
        "num_slots": engine.config.max_num_seqs,  # name kept for routers of older versions
        "max_num_seqs": engine.config.max_num_seqs,
        "max_queue": state.config.max_queue,
        "tpot_slo_s": sched.config.tpot_slo,
        "cost_model": cost,
        "adapters": {name: e.cost_rank for name, e in registered.items()},  # routing ranks
        "resident": sorted(engine.resident_adapters()),
        "predicted_tpot_s": predicted,  # the cost model's decode step for the running batch
        **live,
    }


async def state_document(state: AppState) -> dict:
    """The document (the engine lock may be held for a step: read it off the event loop)."""
    return _state_document(state, await asyncio.to_thread(state.engine.scheduler_state))


async def scheduler_state(request: web.Request) -> web.Response:
    return web.json_response(await state_document(request.app[STATE]))


def add_state_route(app: web.Application) -> None:
    app.router.add_get("/v1/scheduler/state", scheduler_state)
