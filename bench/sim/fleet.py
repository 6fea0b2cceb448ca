"""The routing simulator's event loop (bench/simulate.py): ``Instance`` (continuous batching with
admission, one step at a time, step latencies from the cost model), ``simulate`` (one policy over
a scenario) and ``summarize`` (SLO attainment, TPOT, TTFT).
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from bench.sim.workload import Scenario, SimRequest, make_requests
from cara_jax.scheduling.admission import AdmissionConfig, AdmissionPolicy
from cara_jax.scheduling.cost_model import CostModel
from cara_jax.scheduling.router import BatchSummary, InstanceState, make_router, solo_prefill


class Instance:
    """One serving instance: continuous batching, admission each step."""

    def __init__(self, idx: int, cost: CostModel, sc: Scenario) -> None:
        self.idx = idx
        self.cost = cost
        self.sc = sc
        self.policy = AdmissionPolicy(cost, AdmissionConfig(
            slo_factor=sc.slo_factor, headroom=sc.headroom, max_wait_s=sc.max_wait_s,
            max_queue=sc.max_queue, avg_response_len=sc.output_len.mean,
        ))  # fmt: skip
        self.running: list[SimRequest] = []
        self.queue: list[SimRequest] = []
        self.busy = False
        self.rank_count: dict[int, int] = {}
        self.n = self.total = 0
        self.prefill_s = 0.0
        # what the router sees: running + queued
        self.state = InstanceState(cost, self.running, self.queue, name=str(idx))
        self._refresh()

    def _refresh(self) -> None:
        mx = max((r for r, c in self.rank_count.items() if c), default=0)
        slo = self.sc.slo_s
        self.state.summary = BatchSummary(
            self.n,
            mx,
            self.total,
            math.inf if slo is None else slo,
            slo is None and self.n > 0,
            self.prefill_s,
        )

    def add(self, req: SimRequest) -> None:
        self.queue.append(req)
        self.n += 1
        self.total += req.rank
        self.prefill_s += solo_prefill(self.cost, req)
        self.rank_count[req.rank] = self.rank_count.get(req.rank, 0) + 1
        self._refresh()

    def remove(self, req: SimRequest) -> None:
        self.n -= 1
        self.total -= req.rank
        self.prefill_s = max(0.0, self.prefill_s - solo_prefill(self.cost, req)) if self.n else 0.0
        self.rank_count[req.rank] -= 1
        self._refresh()

    def start_step(self, now: float) -> tuple[float, list[SimRequest], list[SimRequest]] | None:
        """Admit and launch one step; (duration, decoding, admitted) or None when idle."""
        admitted: list[SimRequest] = []
        if self.queue:
            d = self.policy.select(
                self.running, self.queue, self.sc.max_batch - len(self.running), now,
                self.sc.max_prefill,
            )  # fmt: skip
            if d.admitted:
                aged = set(d.aged)
                for i in d.admitted:
                    r = self.queue[i]
                    r.admitted, r.aged = now, i in aged
                    admitted.append(r)
                taken = set(d.admitted)
                self.queue[:] = [r for i, r in enumerate(self.queue) if i not in taken]
        decoding = list(self.running)
        if not decoding and not admitted:
            return None
        ranks = [r.rank for r in decoding]
        dur = self.cost.decode_latency(ranks) if decoding else 0.0
        if admitted:
            dur += self.cost.prefill_latency(
                [r.prompt_tokens for r in admitted], [r.rank for r in admitted]
            )
        return dur, decoding, admitted

    def end_step(self, now: float, decoding: list[SimRequest], admitted: list[SimRequest]):
        """Deliver the step's tokens; returns the requests that finished."""
        finished = []
        base = self.cost.base_latency(len(decoding)) if decoding else 0.0
        for r in decoding:
            r.tokens += 1
            r.steps += 1
            r.base_sum += base
            if r.tokens >= r.output:
                r.done = now
                finished.append(r)
        for r in admitted:
            r.first, r.tokens = now, 1
            if r.output <= 1:
                r.done = now
                finished.append(r)
        if finished:
            gone = {id(r) for r in finished}
            self.running[:] = [r for r in self.running if id(r) not in gone]
            for r in finished:
                self.remove(r)
        self.running.extend(r for r in admitted if r.done is None)
        return finished


def simulate(sc: Scenario, cost: CostModel, policy: str, requests: list[SimRequest] | None = None
             ) -> dict[str, Any]:  # fmt: skip
    """Run one policy over the scenario; returns the metrics of ``summarize``."""
    reqs = make_requests(sc) if requests is None else requests
    insts = [Instance(i, cost, sc) for i in range(sc.instances)]
    states = [inst.state for inst in insts]
    router = make_router(
        policy, seed=sc.seed, avg_response_len=sc.output_len.mean, slo_factor=sc.slo_factor,
        headroom=sc.headroom, capacity=sc.max_batch, count_prefill_stalls=True,
    )  # fmt: skip
    events: list[tuple[float, int, int, Any]] = []  # (time, seq, kind, payload)
    seq = 0
    for r in reqs:
        events.append((r.arrival, seq, 0, r))
        seq += 1
    heapq.heapify(events)
    end = sc.duration_s + sc.drain_s
    t0 = time.perf_counter()
    while events:
        now, _, kind, payload = heapq.heappop(events)
        if now > end:
            break
        if kind == 0:  # arrival
            r = payload
            i = router.route(r, states)
            inst = insts[i]
            r.instance = i
            if len(inst.queue) >= sc.max_queue:
                r.rejected = True
                continue
            inst.add(r)
            if inst.busy:
                continue
        else:  # step end
            inst, decoding, admitted = payload
            inst.end_step(now, decoding, admitted)
        step = inst.start_step(now)
        inst.busy = step is not None
        if step is not None:
            dur, decoding, admitted = step
            heapq.heappush(events, (now + dur, seq, 1, (inst, decoding, admitted)))
            seq += 1
    out = summarize(reqs, sc)
    out["wall_s"] = round(time.perf_counter() - t0, 2)
    return out


def summarize(reqs: Sequence[SimRequest], sc: Scenario) -> dict[str, Any]:
    """SLO attainment, TPOT and TTFT of the counted requests."""
    counted = [r for r in reqs if r.arrival >= sc.warmup_s]
    ok = 0
    tpots, ttfts = [], []
    for r in counted:
        if r.rejected or r.done is None:
            continue
        ttfts.append(r.first - r.arrival)
        if r.tokens <= 1:
            ok += 1
            continue
        tpot = (r.done - r.first) / (r.tokens - 1)
        tpots.append(tpot)
        slo = r.slo_s if r.slo_s is not None else sc.slo_factor * r.base_sum / max(r.steps, 1)
        ok += tpot <= slo * (1 + 1e-9)
    n = max(len(counted), 1)
    pct = lambda a, q: float(np.percentile(a, q)) * 1e3 if a else math.nan  # noqa: E731
    return {
        "requests": len(counted),
        "slo_attainment": ok / n,
        "mean_tpot_ms": float(np.mean(tpots)) * 1e3 if tpots else math.nan,
        "p99_tpot_ms": pct(tpots, 99),
        "mean_ttft_ms": float(np.mean(ttfts)) * 1e3 if ttfts else math.nan,
        "p99_ttft_ms": pct(ttfts, 99),
        "rejected": sum(r.rejected for r in counted) / n,
        "aged": sum(r.aged for r in counted) / n,  # admitted by aging, whatever the SLO
        "unfinished": sum(r.done is None and not r.rejected for r in counted) / n,
    }
