"""`cara-router`'s configuration (``RouterConfig``) and the cost model file it may be given."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from cara_jax.scheduling.cost_model import CostModel, load_cost_models
from cara_jax.scheduling.router import POLICIES


class RouterConfigError(RuntimeError):
    """The router cannot start as configured (message for the operator)."""


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    instances: tuple[str, ...]  # base URLs of the cara-serve instances, e.g. http://host:8000
    policy: str = "rank_aware"
    cost_model: str | None = None  # JSON file, for instances that publish no cost model
    avg_response_len: float = 128.0  # Algorithm 1 amortises a prefill over this many tokens
    headroom: float = 0.0  # fraction of the SLO kept free
    count_prefill_stalls: bool = False  # SLO check on the steady-state TPOT (admission's rule)
    api_key: str | None = None  # required from clients on /v1/*, sent to the instances
    request_timeout_s: float = 600.0  # a whole forwarded request, stream included
    connect_timeout_s: float = 2.0
    state_timeout_s: float = 1.0  # one state fetch
    state_ttl_s: float = 0.05  # how long a fetched state serves routes
    seed: int = 0  # the random policy's
    allowed_origins: tuple[str, ...] = ()  # browser origins allowed to call it (CORS), as cara-serve

    def __post_init__(self) -> None:
        if not self.instances:
            raise RouterConfigError("give at least one instance URL (--instance)")
        for u in self.instances:
            if not u.startswith(("http://", "https://")):
                raise RouterConfigError(f"instance URL {u!r} must start with http:// or https://")
        if len({u.rstrip("/") for u in self.instances}) != len(self.instances):
            raise RouterConfigError("an instance URL is given twice")
        if self.policy not in POLICIES:
            raise RouterConfigError(f"unknown policy {self.policy!r}; use one of {POLICIES}")
        if self.avg_response_len <= 0 or not 0 <= self.headroom < 1:
            raise RouterConfigError("need avg_response_len > 0 and 0 <= headroom < 1")


def load_router_cost_models(path: str | Path) -> list[CostModel]:
    try:
        models = list(load_cost_models(path).values())
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RouterConfigError(f"cannot read cost model file {path}: {e}") from e
    if not models:
        raise RouterConfigError(f"cost model file {path} holds no model")
    return models
