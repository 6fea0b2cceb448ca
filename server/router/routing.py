"""What the router's handlers share (``RouterState``): config, instances, the routing policy,
the HTTP client and metrics; ``plan`` picks the instance for a request, ``forward`` sends the body
there and relays the answer."""

from __future__ import annotations

import asyncio
import collections
import json
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
from aiohttp import web

from cara_jax.scheduling.cost_model import CostModel
from cara_jax.scheduling.fleet import Member, NoCostModelError, plan
from cara_jax.scheduling.router import NoInstanceError, RequestInfo, make_router
from server.protocol import ApiError, error_body
from server.router.config import RouterConfig, load_router_cost_models
from server.router.estimates import estimate_prompt_tokens, lora_names, request_slo
from server.router.metrics import RouterMetrics
from server.router.relay import (
    PASS_HEADERS,
    UNREACHABLE,
    _gateway_timeout,
    _is_error_body,
    _relay_stream,
)
from server.router.state import Instance, InstancePool, Snapshot, describe_error

COST_POLICIES = ("rank_aware", "first_fit_slo")  # policies that predict step latencies


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
                lora=lora_names(body),
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


ROUTER: web.AppKey[RouterState] = web.AppKey("cara_router")
