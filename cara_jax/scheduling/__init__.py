"""Rank-aware scheduling: the profiled cost model, SLO-aware admission and the router.

- ``cost_model``: decode and prefill latency as linear models of the batch's LoRA work (max rank
  for BGMV, summed rank for MBGMV), fitted by least squares on profiled steps (see profiler.py).
- ``admission``: which waiting requests join the next step without breaking a TPOT SLO.
- ``router``: Algorithm 1 of CaraServe over N instances, plus baseline policies.

See docs/scheduling.md.
"""

from cara_jax.scheduling.admission import (
    AdmissionConfig,
    AdmissionDecision,
    AdmissionPolicy,
    QueueFullError,
    RunningInfo,
    WaitingInfo,
)
from cara_jax.scheduling.cost_model import (
    Buckets,
    CostModel,
    LinearFit,
    fit_cost_model,
    fit_linear,
    load_cost_models,
    synthetic_gpu_cost_model,
)
from cara_jax.scheduling.router import (
    POLICIES,
    BatchSummary,
    FirstFitRouter,
    FirstFitSloRouter,
    InstanceState,
    LeastLoadedRouter,
    NoInstanceError,
    RandomRouter,
    RankAwareRouter,
    RequestInfo,
    RoundRobinRouter,
    Router,
    make_router,
)

__all__ = [
    "POLICIES",
    "AdmissionConfig",
    "AdmissionDecision",
    "AdmissionPolicy",
    "BatchSummary",
    "Buckets",
    "CostModel",
    "FirstFitRouter",
    "FirstFitSloRouter",
    "InstanceState",
    "LeastLoadedRouter",
    "LinearFit",
    "NoInstanceError",
    "QueueFullError",
    "RandomRouter",
    "RankAwareRouter",
    "RequestInfo",
    "RoundRobinRouter",
    "Router",
    "RunningInfo",
    "WaitingInfo",
    "fit_cost_model",
    "fit_linear",
    "load_cost_models",
    "make_router",
    "synthetic_gpu_cost_model",
]
