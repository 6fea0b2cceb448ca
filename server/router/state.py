"""The router's view of its instances: each one's ``/v1/scheduler/state``, fetched, parsed and
cached, plus the requests the router forwarded that the instance has not reported yet.

Why a cache: every request needs fresh loads, but a burst of requests must not become a burst
of state fetches, so one fetch serves every route for ``ttl_s`` (50 ms) and concurrent routes
share the fetch in flight. An instance that fails a fetch is down (not eligible) and is retried
at most every ``down_retry_s``, so a hung instance cannot add its timeout to every request.

Why the in-flight account: a state is a snapshot. Requests routed after the fetch that produced
it are not in it, so routes inside one cache period would all see the same idle instance and
all go there. Each request the router forwards is therefore kept as *unreported* on its instance
while it was routed after the start of the fetch that produced the current snapshot (an
approximation: a request forwarded just before a fetch but not yet registered by the instance
is counted by neither), and it is counted as queued there.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp

from cara_jax.scheduling.cost_model import CostModel
from cara_jax.scheduling.fleet import BadStateError, Snapshot, parse_snapshot
from cara_jax.scheduling.router import RequestInfo

log = logging.getLogger("cara_router")
STATE_PATH = "/v1/scheduler/state"
__all__ = ["BadStateError", "Instance", "InstancePool", "Snapshot", "parse_snapshot"]


@dataclasses.dataclass
class _Forwarded:
    info: RequestInfo
    routed_at: float


class Instance:
    """One upstream cara-serve: its last snapshot, reachability, and forwarded requests."""

    def __init__(self, url: str, index: int) -> None:
        self.url = url.rstrip("/")
        self.index = index
        self.snapshot: Snapshot | None = None
        self.snapshot_started = -math.inf  # loop time the fetch behind `snapshot` started
        self.checked_at = -math.inf  # loop time of the last completed fetch (ok or not)
        self.up = False
        self.error: str | None = "not contacted yet"
        self.forwarded = 0  # requests sent here, ever
        self.open: dict[int, _Forwarded] = {}  # forwarded and not finished
        self._fetch: asyncio.Task | None = None
        self._cost_src: Mapping[str, Any] | None = None
        self._cost: CostModel | None = None

    def unreported(self) -> list[RequestInfo]:
        """Forwarded requests the current snapshot cannot contain (routed after its fetch)."""
        return [f.info for f in self.open.values() if f.routed_at >= self.snapshot_started]

    def cost_of(self, d: Mapping[str, Any]) -> CostModel:
        """The published cost model, parsed once while the instance publishes the same one."""
        if self._cost is None or d != self._cost_src:
            self._cost, self._cost_src = CostModel.from_dict(d), d
        return self._cost


class InstancePool:
    """Every instance, in a fixed order (the router's indices), and their cached states."""

    def __init__(
        self,
        urls: list[str] | tuple[str, ...],
        session: Callable[[], aiohttp.ClientSession],
        headers: Mapping[str, str] | None = None,
        timeout_s: float = 1.0,
        ttl_s: float = 0.05,
        down_retry_s: float = 1.0,
        on_change: Callable[[Instance], None] | None = None,
    ) -> None:
        self.instances = [Instance(u, i) for i, u in enumerate(urls)]
        self._session = session
        self.headers = dict(headers or {})
        self.timeout_s = timeout_s
        self.ttl_s = ttl_s
        self.down_retry_s = down_retry_s
        self.on_change = on_change or (lambda inst: None)
        self._ids = itertools.count()

    async def refresh(self, force: bool = False) -> None:
        """Bring every instance's state up to date (at most ``ttl_s`` old), concurrently."""
        now = asyncio.get_running_loop().time()
        waits = []
        for inst in self.instances:
            age = now - inst.checked_at
            if not force and age < (self.ttl_s if inst.up else self.down_retry_s):
                continue
            if inst._fetch is None or inst._fetch.done():
                inst._fetch = asyncio.ensure_future(self._fetch(inst))
            waits.append(inst._fetch)
        if waits:
            # shield: a cancelled route (client gone) must not cancel a fetch others await
            await asyncio.gather(*(asyncio.shield(w) for w in waits))

    async def _fetch(self, inst: Instance) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        try:
            async with self._session().get(
                inst.url + STATE_PATH, headers=self.headers, timeout=timeout
            ) as r:
                if r.status != 200:
                    raise BadStateError(f"HTTP {r.status} from {STATE_PATH}")
                doc = await r.json(content_type=None)
            snap = parse_snapshot(doc, inst.cost_of)
        except Exception as e:  # refused, timed out, not JSON, off-schema: not eligible
            self.mark_down(inst, describe_error(e))
        else:
            inst.snapshot, inst.snapshot_started = snap, started
            if not inst.up:
                log.info("instance %s is up (%s, %s)", inst.url, snap.model, snap.kernel)
            inst.up, inst.error = True, None
            self.on_change(inst)
        inst.checked_at = loop.time()

    def mark_down(self, inst: Instance, why: str) -> None:
        if inst.up or inst.error != why:
            log.warning("instance %s is not eligible: %s", inst.url, why)
        inst.up, inst.error = False, why
        inst.checked_at = asyncio.get_running_loop().time()
        self.on_change(inst)

    def begin(self, inst: Instance, info: RequestInfo) -> int:
        """Account a request forwarded to ``inst``; ``end`` it when it finishes."""
        key = next(self._ids)
        inst.open[key] = _Forwarded(info, asyncio.get_running_loop().time())
        inst.forwarded += 1
        return key

    @staticmethod
    def end(inst: Instance, key: int) -> None:
        inst.open.pop(key, None)


def describe_error(e: BaseException) -> str:
    if isinstance(e, asyncio.TimeoutError):
        return "state fetch timed out"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
