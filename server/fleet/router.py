"""Algorithm 1 as a Ray Serve request router (``ray.serve.request_router.RequestRouter``).

Every engine replica publishes its scheduler state as routing stats (``record_routing_stats``:
running and queued requests with their ranks and SLOs, its cost model, the adapters it serves
and the ones resident on its device, the predicted TPOT of its batch). For each request the
router turns the candidates' stats into a fleet and runs the same routing step as cara-router
(``cara_jax.scheduling.fleet.plan``): CaraServe's Algorithm 1, or the least-loaded or
round-robin baseline. Ray's default power-of-two router is the fourth choice (the deployment
then uses Ray's own class). The answer is a list of ranks, one replica each, best first.

Routing stats are polled by Ray's controller, so they are up to a period old; requests this
router sent after a replica computed its stats are added to that replica's queue, as
cara-router does with its snapshots. The request's model, prompt-token estimate and SLO come in
the call's ``route`` keyword (server/fleet/serve.py); the adapter's rank comes from the stats.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from cara_jax.scheduling.cost_model import CostModel
from cara_jax.scheduling.fleet import BadStateError, Member, Snapshot, parse_snapshot, plan
from cara_jax.scheduling.router import NoInstanceError, RequestInfo, Router, make_router

log = logging.getLogger("cara_ray_router")
POLICIES = ("rank_aware", "least_loaded", "round_robin")  # power_of_two: Ray's own router
COST_POLICIES = ("rank_aware",)


def member(
    snap: Snapshot | None,
    stats: Mapping[str, Any],
    sent: list[tuple[float, RequestInfo]],
    name: str = "",
) -> Member:
    """One replica for ``plan``: its parsed routing stats, and as unreported the requests sent
    to it (``(time sent, info)``) at or after the time its stats were taken."""
    if snap is None:
        return Member(None, up=False, name=name)
    since = float(stats.get("time", 0.0))
    return Member(snap, snap.cost, [info for t, info in sent if t >= since], name=name)


class CaraRequestRouter(RequestRouter):
    """Routes each request by a cara-jax policy over the replicas' routing stats."""

    def initialize_state(self, policy: str = "rank_aware", avg_response_len: float = 128.0):
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; use one of {POLICIES}")
        self.policy = policy
        self.router: Router = make_router(policy, avg_response_len=avg_response_len)
        self._planned: dict[str, RequestInfo] = {}  # internal request id -> what it is
        self._open: dict[str, tuple[ReplicaID, float, RequestInfo]] = {}  # sent, not done
        self._snaps: dict[ReplicaID, tuple[Mapping[str, Any], Snapshot]] = {}
        self._costs: dict[str, CostModel] = {}
        self.decisions = 0

    # ------------------------------------------------------------------ stats

    def _cost_of(self, d: Mapping[str, Any]) -> CostModel:
        key = repr(sorted(d.items()))
        if key not in self._costs:
            self._costs[key] = CostModel.from_dict(d)
        return self._costs[key]

    def _snapshot(self, r: RunningReplica) -> Snapshot | None:
        stats = r.routing_stats or {}
        cached = self._snaps.get(r.replica_id)
        if cached is not None and cached[0] is stats:
            return cached[1]
        if stats.get("object") != "scheduler_state" or not stats.get("ready", False):
            return None
        try:
            snap = parse_snapshot(stats, self._cost_of)
        except BadStateError as e:
            log.warning("replica %s publishes bad routing stats: %s", r.replica_id, e)
            return None
        self._snaps[r.replica_id] = (stats, snap)
        return snap

    def _member(self, r: RunningReplica) -> Member:
        sent = [(t, info) for rid, t, info in self._open.values() if rid == r.replica_id]
        return member(self._snapshot(r), r.routing_stats or {}, sent, r.replica_id.unique_id)

    # ------------------------------------------------------------------ routing

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True
        if not candidate_replicas:
            return []
        route = (pending_request.kwargs.get("route") if pending_request else None) or {}
        members = [self._member(r) for r in candidate_replicas]
        try:
            p = plan(
                self.router,
                members,
                route.get("model"),
                int(route.get("prompt_tokens") or 0),
                route.get("slo_s"),
                needs_cost=self.policy in COST_POLICIES,
                lora=tuple(route.get("lora") or ()),
            )
        except NoInstanceError:
            # no stats yet (replicas just started) or none usable: Ray picks among them all
            return [list(candidate_replicas)]
        if pending_request is not None and route:
            if len(self._planned) > 10_000:  # planned and never sent (cancelled while routing)
                self._planned.clear()
            self._planned[pending_request.metadata.internal_request_id] = p.info
        self.decisions += 1
        return [[candidate_replicas[i]] for i in p.order]

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any
    ) -> None:
        rid = pending_request.metadata.internal_request_id
        info = self._planned.pop(rid, None)
        if info is not None:
            now = time.time()
            self._open[rid] = (replica_id, now, info)
            if len(self._open) > 10_000:  # completions not reported: keep the last 10 minutes
                self._open = {k: v for k, v in self._open.items() if now - v[1] < 600}

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self._open.pop(internal_request_id, None)
        self._planned.pop(internal_request_id, None)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._snaps.pop(replica_id, None)
        for rid in [k for k, v in self._open.items() if v[0] == replica_id]:
            del self._open[rid]
