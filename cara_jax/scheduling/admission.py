"""SLO-aware admission: which waiting requests join the next step.

Why: every request in a decode batch pays the batch's step latency, and with multi-LoRA kernels
that latency depends on the ranks in the batch (BGMV: |S| x max rank, MBGMV: sum of ranks). A
rank-64 request admitted into a batch of rank-8 requests can push all of them past their
time-per-output-token (TPOT) SLO, so admission predicts the step with the cost model first.

Interface (pure: no clock, no engine state; the engine calls it once per step):

    policy = AdmissionPolicy(cost_model, AdmissionConfig(max_wait_s=2.0, max_queue=1024))
    decision = policy.select(running, waiting, free_slots=n_free, now=t, max_new=8)
    for i in decision.admitted: ...        # indices into ``waiting``, prefill in this order

- ``running``: one ``RunningInfo(rank, slo_s)`` per request in the decode batch;
- ``waiting``: ``WaitingInfo(key, rank, arrival, slo_s, prompt_tokens)``, any order;
- ``slo_s``: the request's TPOT SLO in seconds, or None for the default, ``slo_factor`` (1.5)
  x the base model's step latency at the batch size the step will have;
- rank 0 = base model (no adapter).

The rule, for a batch B (running plus those admitted so far) and a candidate c:
    decode(B + c)  <=  (1 - headroom) * min SLO(B + c)
where decode comes from the cost model and min SLO is over every request of B + c, so no
running request is pushed past its SLO either. With ``avg_response_len`` set, the left side is
the steady-state TPOT instead: decode(B + c) + sum over B + c of prefill(request) /
avg_response_len. Every request's prefill stalls the whole batch once in a lifetime of about
avg_response_len steps, so in a batch of S requests each token waits for S such stalls spread
over that many steps (``predicted_tpot``). Candidates are tried oldest first; one that
does not fit is skipped (a smaller rank behind it may fit). Two exceptions admit a request
whatever its predicted step: *aging* (a request that has waited ``max_wait_s`` or more goes
first, oldest first, so a large rank never starves) and an *empty instance* (with nothing
running and nothing admitted, the oldest request goes: waiting cannot make its step faster).
Both are reported in ``AdmissionDecision.forced`` (aging alone in ``aged``). The queue itself is bounded: the engine
raises ``QueueFullError`` beyond ``max_queue`` waiting requests (the server answers 429).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable, Sequence
from typing import TypeVar

from cara_jax.scheduling.cost_model import DEFAULT_SLO_FACTOR, CostModel

T = TypeVar("T")


class QueueFullError(RuntimeError):
    """The waiting queue is at capacity: reject the request (HTTP 429)."""

    def __init__(self, capacity: int) -> None:
        super().__init__(f"the waiting queue is full ({capacity} requests); retry later")
        self.capacity = capacity


@dataclasses.dataclass(frozen=True)
class RunningInfo:
    """A request in the decode batch."""

    rank: int
    slo_s: float | None = None  # TPOT SLO; None = the default (slo_factor x base)
    prompt_tokens: int = 0  # only read with AdmissionConfig.avg_response_len


@dataclasses.dataclass(frozen=True)
class WaitingInfo:
    """A request in the waiting queue."""

    key: Hashable  # the caller's id of the request
    rank: int
    arrival: float  # seconds, same clock as ``now``
    slo_s: float | None = None
    prompt_tokens: int = 0


@dataclasses.dataclass(frozen=True)
class AdmissionConfig:
    slo_factor: float = DEFAULT_SLO_FACTOR  # default SLO = factor x base-model step latency
    headroom: float = 0.0  # fraction of the SLO kept free (prefill stalls, prediction error)
    max_wait_s: float = 2.0  # aging bound: older requests are admitted whatever their rank
    max_queue: int = 1024  # waiting requests a simulated instance holds (bench/simulate.py)
    # count prefill stalls in the predicted TPOT, amortised over this many output tokens
    # (None: decode latency only)
    avg_response_len: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.headroom < 1.0:
            raise ValueError("headroom must be in [0, 1)")
        if self.max_queue < 1:
            raise ValueError("max_queue must be at least 1")


@dataclasses.dataclass
class AdmissionDecision:
    admitted: list[int]  # indices into ``waiting``, in prefill order
    forced: list[int]  # the admitted ones let in by aging or an empty instance
    predicted_step_s: float  # predicted TPOT of running + admitted (see predicted_tpot)
    bound_s: float  # tightest SLO of that batch after headroom (inf for an empty batch)
    aged: list[int] = dataclasses.field(default_factory=list)  # forced by aging alone


class AdmissionPolicy:
    """Decides admissions from a cost model; see the module docstring for the rule."""

    def __init__(self, cost: CostModel, config: AdmissionConfig | None = None) -> None:
        self.cost = cost
        self.config = config or AdmissionConfig()
        self._prefill_cache: dict[tuple[int, int], float] = {}

    def bound(self, batch: int, min_explicit_slo: float, any_default: bool) -> float:
        """The step latency a batch of ``batch`` rows may take (after headroom)."""
        slo = min_explicit_slo
        if any_default:
            slo = min(slo, self.cost.default_slo(batch, self.config.slo_factor))
        return (1.0 - self.config.headroom) * slo

    def fits(
        self,
        ranks: Sequence[int],
        slos: Sequence[float | None],
        prompt_tokens: Sequence[int] | None = None,
    ) -> bool:
        """Whether a batch of ``ranks`` (their ``slos``, ``prompt_tokens``) meets the rule."""
        explicit = min((s for s in slos if s is not None), default=math.inf)
        bound = self.bound(len(ranks), explicit, any(s is None for s in slos))
        stall = sum(
            self.prefill_cost(p, r)
            for p, r in zip(prompt_tokens or [0] * len(ranks), ranks, strict=True)
        )
        return self.predict(len(ranks), max(ranks, default=0), sum(ranks), stall) <= bound

    def prefill_cost(self, prompt_tokens: int, rank: int) -> float:
        """One request's prefill alone (0 unless avg_response_len is set); cached."""
        if not self.config.avg_response_len or prompt_tokens <= 0:
            return 0.0
        key = (prompt_tokens, rank)
        t = self._prefill_cache.get(key)
        if t is None:
            t = self._prefill_cache[key] = self.cost.prefill_latency([prompt_tokens], [rank])
        return t

    def predict(self, n: int, max_rank: int, sum_rank: int, prefill_sum: float = 0.0) -> float:
        """Predicted TPOT of a batch: its decode step, plus its prefill stalls amortised
        (``prefill_sum`` = the sum of its requests' ``prefill_cost``)."""
        return predicted_tpot(
            self.cost, n, max_rank, sum_rank, prefill_sum, self.config.avg_response_len
        )

    def select(
        self,
        running: Sequence[RunningInfo],
        waiting: Sequence[WaitingInfo],
        free_slots: int,
        now: float,
        max_new: int | None = None,
    ) -> AdmissionDecision:
        """Choose the waiting requests that join the next step (at most ``free_slots`` and
        ``max_new``)."""
        cap = min(free_slots, len(waiting) if max_new is None else max_new)
        n = len(running)
        mx = max((r.rank for r in running), default=0)
        total = sum(r.rank for r in running)
        explicit = min((r.slo_s for r in running if r.slo_s is not None), default=math.inf)
        any_default = any(r.slo_s is None for r in running)
        stall = 0.0
        if self.config.avg_response_len:
            stall = sum(self.prefill_cost(getattr(r, "prompt_tokens", 0), r.rank) for r in running)
        order = sorted(range(len(waiting)), key=lambda i: waiting[i].arrival)
        admitted: list[int] = []
        taken: set[int] = set()
        forced: list[int] = []
        aged: list[int] = []

        def take(i: int) -> None:
            nonlocal n, mx, total, explicit, any_default, stall
            w = waiting[i]
            admitted.append(i)
            taken.add(i)
            stall += self.prefill_cost(w.prompt_tokens, w.rank)
            n, mx, total = n + 1, max(mx, w.rank), total + w.rank
            if w.slo_s is None:
                any_default = True
            else:
                explicit = min(explicit, w.slo_s)

        # aging first, oldest first, whatever the predicted step
        for i in order:
            if len(admitted) >= cap:
                break
            if now - waiting[i].arrival >= self.config.max_wait_s:
                take(i)
                forced.append(i)
                aged.append(i)
        # then the rest, oldest first, each only if the whole batch stays within its SLOs
        # per SLO value: the smallest (rank, prompt tokens) that did not fit this batch
        failed: dict[float | None, tuple[int, int]] = {}
        for i in order:
            if len(admitted) >= cap:
                break
            if i in taken:
                continue
            w = waiting[i]
            if n == 0:  # empty instance: the oldest request goes
                take(i)
                forced.append(i)
                continue
            f = failed.get(w.slo_s)
            if f is not None and w.rank >= f[0] and w.prompt_tokens >= f[1]:
                continue  # a no larger request of the same SLO already failed in this batch
            b = self.bound(
                n + 1,
                explicit if w.slo_s is None else min(explicit, w.slo_s),
                any_default or w.slo_s is None,
            )
            t = self.predict(
                n + 1, max(mx, w.rank), total + w.rank,
                stall + self.prefill_cost(w.prompt_tokens, w.rank),
            )  # fmt: skip
            if t <= b:
                take(i)
                failed.clear()  # the batch changed: check the candidates after it afresh
            elif f is None or (w.rank, w.prompt_tokens) < f:
                failed[w.slo_s] = (w.rank, w.prompt_tokens)
        step = self.predict(n, mx, total, stall)
        bound = self.bound(n, explicit, any_default) if n else math.inf
        return AdmissionDecision(admitted, forced, step, bound, aged)


def predicted_tpot(
    cost: CostModel,
    n: int,
    max_rank: int,
    sum_rank: int,
    prefill_sum: float = 0.0,
    avg_response_len: float | None = None,
) -> float:
    """Decode step latency of a batch, plus (with ``avg_response_len``) its requests' prefill
    stalls amortised over their lifetime: the steady-state time per output token."""
    t = cost.decode_latency_of(n, max_rank, sum_rank)
    if avg_response_len:
        t += prefill_sum / avg_response_len
    return t
