"""Routing a new request to one of N instances: CaraServe's Algorithm 1 and baselines.

Each instance publishes an ``InstanceState``: its running and queued requests (rank, prompt
tokens, TPOT SLO) and its cost model, which carries its kernel (BGMV or MBGMV). A router picks
the index of one instance for a request.

Algorithm 1 (``RankAwareRouter``), for request ``req`` and each eligible instance:

    d_prefill = PrefillPerf(queue + req) - PrefillPerf(queue)
    d_decode  = DecodePerf(running + queue + req) - DecodePerf(running + queue)
    cost      = d_prefill / avg_response_len + d_decode
                (+inf if DecodePerf(running + queue + req) breaks the tightest SLO in that batch)
    total     = cost * (len(running) + len(queue))

and the instance with the least ``total`` wins (ties: fewer requests, then the lower index).
The SLO check is the admission rule (admission.py): default SLO = slo_factor x the base
model's step at that batch size, an explicit ``slo_s`` where a request has one, less
``headroom``; with ``count_prefill_stalls`` the predicted TPOT includes the batch's amortised
prefill stalls, like admission with ``avg_response_len``. When every instance would break an SLO, the request goes where the predicted step
exceeds its bound by the smallest factor.

Baselines: ``random`` (seeded), ``round_robin``, ``least_loaded`` (the most idle instance:
fewest running + queued), ``first_fit`` (the first instance, in index order, with fewer than
``capacity`` requests; least loaded when all are full) and ``first_fit_slo`` (the first instance
whose predicted step stays within the SLO: rank-aware feasibility without Algorithm 1's cost).
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Sequence

from cara_jax.scheduling.admission import predicted_tpot
from cara_jax.scheduling.cost_model import DEFAULT_SLO_FACTOR, CostModel

POLICIES = ("rank_aware", "random", "round_robin", "least_loaded", "first_fit", "first_fit_slo")


class NoInstanceError(RuntimeError):
    """No instance can take the request (none serves its model or has room for its adapter)."""


@dataclasses.dataclass(frozen=True)
class RequestInfo:
    rank: int  # adapter rank, 0 = base model
    prompt_tokens: int = 0
    slo_s: float | None = None  # TPOT SLO; None = default (slo_factor x base)


@dataclasses.dataclass(frozen=True)
class BatchSummary:
    """What Algorithm 1 needs of a set of requests, in O(1) space."""

    n: int = 0
    max_rank: int = 0
    sum_rank: int = 0
    min_slo: float = math.inf  # tightest explicit SLO
    any_default: bool = False  # some request uses the default SLO
    prefill_s: float = 0.0  # sum of the requests' solo prefill latencies (stall-aware checks)

    @classmethod
    def of(cls, reqs: Sequence[RequestInfo], cost: CostModel | None = None) -> BatchSummary:
        return cls(
            len(reqs),
            max((r.rank for r in reqs), default=0),
            sum(r.rank for r in reqs),
            min((r.slo_s for r in reqs if r.slo_s is not None), default=math.inf),
            any(r.slo_s is None for r in reqs),
            sum(solo_prefill(cost, r) for r in reqs) if cost is not None else 0.0,
        )

    def plus(self, r: RequestInfo, prefill_s: float = 0.0) -> BatchSummary:
        return BatchSummary(
            self.n + 1,
            max(self.max_rank, r.rank),
            self.sum_rank + r.rank,
            self.min_slo if r.slo_s is None else min(self.min_slo, r.slo_s),
            self.any_default or r.slo_s is None,
            self.prefill_s + prefill_s,
        )


def solo_prefill(cost: CostModel, r: RequestInfo) -> float:
    """Prefill latency of one request alone (what it stalls its batch for)."""
    return cost.prefill_latency([r.prompt_tokens], [r.rank]) if r.prompt_tokens > 0 else 0.0


@dataclasses.dataclass
class InstanceState:
    """What one instance publishes to the router.

    ``summary`` may be given by a caller that keeps running sums (a simulator); otherwise it
    is computed from ``running`` + ``queued`` on first use (publish a fresh state per route).
    """

    cost: CostModel
    running: Sequence[RequestInfo] = ()
    queued: Sequence[RequestInfo] = ()
    eligible: bool = True  # serves the model and has room for the adapter
    name: str = ""
    summary: BatchSummary | None = None
    resident: bool = False  # holds the request's adapter on the device already

    @property
    def load(self) -> int:
        return self.summary.n if self.summary is not None else len(self.running) + len(self.queued)

    def batch(self) -> BatchSummary:
        if self.summary is None:
            self.summary = BatchSummary.of([*self.running, *self.queued], self.cost)
        return self.summary


def slo_bound(
    cost: CostModel, s: BatchSummary, slo_factor: float = DEFAULT_SLO_FACTOR, headroom: float = 0.0
) -> float:
    """The step latency a batch may take: its tightest SLO, less headroom."""
    slo = s.min_slo
    if s.any_default:
        slo = min(slo, cost.default_slo(s.n, slo_factor))
    return (1.0 - headroom) * slo


def slo_ratio(
    cost: CostModel,
    s: BatchSummary,
    slo_factor: float = DEFAULT_SLO_FACTOR,
    headroom: float = 0.0,
    avg_response_len: float | None = None,
) -> float:
    """Predicted TPOT of a batch over its SLO bound (> 1: the batch breaks an SLO).

    Without ``avg_response_len`` the prediction is the decode step (Algorithm 1); with it,
    the steady-state TPOT including prefill stalls, as in admission.predicted_tpot."""
    t = predicted_tpot(cost, s.n, s.max_rank, s.sum_rank, s.prefill_s, avg_response_len)
    return t / slo_bound(cost, s, slo_factor, headroom)


class Router:
    """Picks an instance index for a request; subclasses implement ``_pick``."""

    name = "router"

    def route(self, req: RequestInfo, instances: Sequence[InstanceState]) -> int:
        cands = [i for i, inst in enumerate(instances) if inst.eligible]
        if not cands:
            raise NoInstanceError("no eligible instance for the request")
        return self._pick(req, instances, cands)

    def _pick(self, req: RequestInfo, instances: Sequence[InstanceState], cands: list[int]) -> int:
        raise NotImplementedError

    def order(self, req: RequestInfo, instances: Sequence[InstanceState]) -> list[int]:
        """Every eligible instance, most preferred first: the policy's pick, then the rest
        by load (a front end that cannot reach its first choice tries the next)."""
        first = self.route(req, instances)
        rest = [i for i, inst in enumerate(instances) if inst.eligible and i != first]
        return [first, *sorted(rest, key=lambda i: (instances[i].load, i))]


class RankAwareRouter(Router):
    """Algorithm 1 (see the module docstring)."""

    name = "rank_aware"

    def __init__(
        self,
        avg_response_len: float = 128.0,
        slo_factor: float = DEFAULT_SLO_FACTOR,
        headroom: float = 0.0,
        count_prefill_stalls: bool = False,
    ) -> None:
        self.avg_response_len = avg_response_len
        self.slo_factor = slo_factor
        self.headroom = headroom
        # SLO check on the steady-state TPOT (admission's avg_response_len rule), not the step
        self.count_prefill_stalls = count_prefill_stalls

    def evaluate(
        self, req: RequestInfo, inst: InstanceState, solo: float | None = None
    ) -> tuple[float, float]:
        """(total, predicted TPOT / SLO bound) of sending ``req`` to ``inst`` (``solo``: the
        request's own prefill on this instance's cost model, if already known)."""
        cost = inst.cost
        s = inst.batch()
        stalls = self.avg_response_len if self.count_prefill_stalls else None
        if solo is None:
            solo = solo_prefill(cost, req)
        new = s.plus(req, solo if stalls else 0.0)
        ratio = slo_ratio(cost, new, self.slo_factor, self.headroom, stalls)
        if ratio > 1.0:
            return math.inf, ratio
        after = cost.decode_latency_of(new.n, new.max_rank, new.sum_rank)
        before = cost.decode_latency_of(s.n, s.max_rank, s.sum_rank)
        d_prefill = 0.0
        if req.prompt_tokens and not inst.queued:
            d_prefill = solo
        elif req.prompt_tokens:
            lens = [q.prompt_tokens for q in inst.queued]
            ranks = [q.rank for q in inst.queued]
            d_prefill = cost.prefill_latency([*lens, req.prompt_tokens], [*ranks, req.rank])
            d_prefill -= cost.prefill_latency(lens, ranks)
        c = d_prefill / self.avg_response_len + (after - before)
        return c * s.n, ratio

    def _pick(self, req: RequestInfo, instances: Sequence[InstanceState], cands: list[int]) -> int:
        return self._ranked(req, instances, cands)[0]

    def order(self, req: RequestInfo, instances: Sequence[InstanceState]) -> list[int]:
        """Feasible instances first (those holding the adapter before the others, each group
        by Algorithm 1's total), then the rest by how far they would break the SLO."""
        cands = [i for i, inst in enumerate(instances) if inst.eligible]
        if not cands:
            raise NoInstanceError("no eligible instance for the request")
        return self._ranked(req, instances, cands)

    def _ranked(
        self, req: RequestInfo, instances: Sequence[InstanceState], cands: list[int]
    ) -> list[int]:
        solo: dict[int, float] = {}  # the request's prefill per distinct cost model
        feasible, over = [], []
        for i in cands:
            inst = instances[i]
            if id(inst.cost) not in solo:
                solo[id(inst.cost)] = solo_prefill(inst.cost, req)
            total, ratio = self.evaluate(req, inst, solo[id(inst.cost)])
            if total < math.inf:
                # an instance that already holds the adapter needs no copy (cold start)
                feasible.append((not inst.resident, total, inst.load, i))
            else:
                over.append((ratio, inst.load, i))
        return [k[-1] for k in sorted(feasible)] + [k[-1] for k in sorted(over)]


class RandomRouter(Router):
    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)

    def _pick(self, req, instances, cands) -> int:
        return self.rng.choice(cands)


class RoundRobinRouter(Router):
    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def _pick(self, req, instances, cands) -> int:
        n = len(instances)
        for k in range(n):
            i = (self._next + k) % n
            if instances[i].eligible:
                self._next = i + 1
                return i
        raise NoInstanceError("no eligible instance")  # unreachable: cands is not empty


class LeastLoadedRouter(Router):
    """The most idle instance: fewest running + queued requests (ties: lower index)."""

    name = "least_loaded"

    def _pick(self, req, instances, cands) -> int:
        return min(cands, key=lambda i: (instances[i].load, i))


class FirstFitRouter(Router):
    """The first instance with fewer than ``capacity`` requests (least loaded if none)."""

    name = "first_fit"

    def __init__(self, capacity: int = 32) -> None:
        self.capacity = capacity

    def _pick(self, req, instances, cands) -> int:
        for i in cands:
            if instances[i].load < self.capacity:
                return i
        return min(cands, key=lambda i: (instances[i].load, i))


class FirstFitSloRouter(Router):
    """The first instance whose predicted step with the request stays within the SLO bound
    (rank-aware feasibility, greedy packing); the least violation if none."""

    name = "first_fit_slo"

    def __init__(
        self,
        slo_factor: float = DEFAULT_SLO_FACTOR,
        headroom: float = 0.0,
        avg_response_len: float = 128.0,
        count_prefill_stalls: bool = False,
    ) -> None:
        self.slo_factor = slo_factor
        self.headroom = headroom
        self.avg_response_len = avg_response_len
        self.count_prefill_stalls = count_prefill_stalls

    def _pick(self, req, instances, cands) -> int:
        best: tuple[float, int, int] | None = None
        stalls = self.avg_response_len if self.count_prefill_stalls else None
        for i in cands:
            inst = instances[i]
            new = inst.batch().plus(req, solo_prefill(inst.cost, req) if stalls else 0.0)
            ratio = slo_ratio(inst.cost, new, self.slo_factor, self.headroom, stalls)
            if ratio <= 1.0:
                return i
            if best is None or (ratio, inst.load, i) < best:
                best = (ratio, inst.load, i)
        assert best is not None
        return best[2]


def make_router(policy: str, seed: int = 0, **kw) -> Router:
    """A router by policy name (``POLICIES``); ``kw`` go to the policies that take them."""
    if policy == "rank_aware":
        return RankAwareRouter(
            **_only(kw, "avg_response_len", "slo_factor", "headroom", "count_prefill_stalls")
        )
    if policy == "random":
        return RandomRouter(seed)
    if policy == "round_robin":
        return RoundRobinRouter()
    if policy == "least_loaded":
        return LeastLoadedRouter()
    if policy == "first_fit":
        return FirstFitRouter(**_only(kw, "capacity"))
    if policy == "first_fit_slo":
        return FirstFitSloRouter(
            **_only(kw, "slo_factor", "headroom", "avg_response_len", "count_prefill_stalls")
        )
    raise ValueError(f"unknown routing policy {policy!r}; use one of {POLICIES}")


def _only(kw: dict, *names: str) -> dict:
    return {k: v for k, v in kw.items() if k in names}


__all__ = [
    "POLICIES",
    "BatchSummary",
    "FirstFitRouter",
    "FirstFitSloRouter",
    "InstanceState",
    "LeastLoadedRouter",
    "NoInstanceError",
    "RandomRouter",
    "RankAwareRouter",
    "RequestInfo",
    "RoundRobinRouter",
    "Router",
    "make_router",
    "slo_bound",
    "slo_ratio",
    "solo_prefill",
]
