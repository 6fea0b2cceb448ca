"""A fleet of serving instances as the routing policies see it, and the one routing step that
every front end runs: cara-router (HTTP instances) and the Ray Serve request router (replicas).

Each instance publishes a scheduler state document (``GET /v1/scheduler/state`` on cara-serve,
``record_routing_stats`` on a Ray Serve replica; schema in docs/router.md). ``parse_snapshot``
reads one into a ``Snapshot``. ``plan`` turns the snapshots, plus the requests a front end has
sent that a snapshot cannot contain yet, into ``InstanceState``s and asks a policy of router.py
(Algorithm 1 or a baseline) for an order of preference over the instances.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from cara_jax.scheduling.cost_model import KERNELS, CostModel
from cara_jax.scheduling.router import (
    FirstFitRouter,
    InstanceState,
    NoInstanceError,
    RequestInfo,
    Router,
)


class BadStateError(ValueError):
    """An instance's state document does not follow the schema (docs/router.md)."""


class NoCostModelError(NoInstanceError):
    """The policy predicts step latencies and no eligible instance has a cost model."""


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """One parsed scheduler state document."""

    model: str
    served_names: tuple[str, ...]
    kernel: str
    num_slots: int
    free_slots: int
    max_queue: int
    tpot_slo_s: float | None  # the instance's default TPOT SLO (None: 1.5 x the base step)
    cost: CostModel | None
    running: tuple[RequestInfo, ...]
    queued: tuple[RequestInfo, ...]
    adapters: Mapping[str, int]  # adapter name -> its cost rank (what a step pays)
    resident: frozenset[str] = frozenset()  # adapters on the device now (no copy to wait for)

    def rank_of(self, model: str | None) -> int | None:
        """0 for the base model (also when ``model`` is None), the adapter's rank, or None
        when this instance does not serve ``model`` by that name."""
        if model is None or model == self.model or model in self.served_names:
            return 0
        return self.adapters.get(model)

    @property
    def queue_full(self) -> bool:
        return self.max_queue > 0 and len(self.queued) >= self.max_queue


def _num(d: Mapping[str, Any], key: str, kind: type, default: Any = None, minimum=0) -> Any:
    v = d.get(key, default)
    if v is None and default is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise BadStateError(f"`{key}` must be a number, got {v!r}")
    if not math.isfinite(v) or v < minimum:
        raise BadStateError(f"`{key}` must be a finite number >= {minimum}, got {v!r}")
    return kind(v)


def _requests(items: Any, key: str, default_slo: float | None) -> tuple[RequestInfo, ...]:
    """Running or queued entries; an entry without its own SLO has the instance's default."""
    if not isinstance(items, list):
        raise BadStateError(f"`{key}` must be an array")
    out = []
    for e in items:
        if not isinstance(e, dict):
            raise BadStateError(f"`{key}` entries must be objects")
        slo = _num(e, "slo_s", float, None, minimum=1e-9)
        out.append(
            RequestInfo(
                rank=_num(e, "rank", int, 0),
                prompt_tokens=_num(e, "prompt_tokens", int, 0),
                slo_s=default_slo if slo is None else slo,
            )
        )
    return tuple(out)


def parse_snapshot(
    d: Any, cost_of: Callable[[Mapping[str, Any]], CostModel] = CostModel.from_dict
) -> Snapshot:
    """A state document as a ``Snapshot``; ``BadStateError`` if it breaks the schema.
    ``cost_of`` turns the published cost model into a ``CostModel`` (a caching callable)."""
    if not isinstance(d, dict) or d.get("object") != "scheduler_state":
        raise BadStateError("not a scheduler_state object")
    model = d.get("model")
    names = d.get("served_names") or [model]
    if (
        not isinstance(model, str)
        or not isinstance(names, list)
        or not all(isinstance(n, str) for n in names)
    ):
        raise BadStateError("`model` and `served_names` must be strings")
    kernel = d.get("kernel", "bgmv")
    if kernel not in KERNELS:
        raise BadStateError(f"`kernel` must be one of {KERNELS}, got {kernel!r}")
    adapters = d.get("adapters") or {}
    if not isinstance(adapters, dict):
        raise BadStateError("`adapters` must be an object of name -> rank")
    ranks = {}
    for name, rank in adapters.items():
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise BadStateError(f"adapter {name!r}: rank must be an integer >= 0, got {rank!r}")
        ranks[name] = rank
    resident = d.get("resident") or []
    if not isinstance(resident, list) or not all(isinstance(n, str) for n in resident):
        raise BadStateError("`resident` must be an array of adapter names")
    slo = _num(d, "tpot_slo_s", float, None, minimum=1e-9)
    cost = None
    if d.get("cost_model") is not None:
        try:
            cost = cost_of(d["cost_model"])
        except (KeyError, TypeError, ValueError) as e:
            raise BadStateError(f"`cost_model` does not parse: {e!r}") from e
    return Snapshot(
        model=model,
        served_names=tuple(names),
        kernel=kernel,
        num_slots=_num(d, "num_slots", int, 0),
        free_slots=_num(d, "free_slots", int, 0),
        max_queue=_num(d, "max_queue", int, 0),
        tpot_slo_s=slo,
        cost=cost,
        running=_requests(d.get("running", []), "running", slo),
        queued=_requests(d.get("queued", []), "queued", slo),
        adapters=ranks,
        resident=frozenset(resident),
    )


@dataclasses.dataclass
class Member:
    """One instance of a fleet at routing time."""

    snapshot: Snapshot | None  # None: never heard from (not eligible)
    cost: CostModel | None = None  # its own, or one the front end supplies for its kernel
    unreported: Sequence[RequestInfo] = ()  # sent to it, not in its snapshot yet
    up: bool = True
    name: str = ""


@dataclasses.dataclass(frozen=True)
class Plan:
    order: list[int]  # eligible members, most preferred first
    info: RequestInfo


def plan(
    router: Router,
    members: Sequence[Member],
    model: str | None,
    prompt_tokens: int = 0,
    slo_s: float | None = None,
    needs_cost: bool = False,
    exclude: frozenset[int] = frozenset(),
    lora: Sequence[str] = (),
) -> Plan:
    """Route one request: which members may take it, what it is (rank, prompt, SLO), and the
    policy's order of preference.

    Eligible: members that are up, have a snapshot and are not excluded; of those, the ones
    that serve ``model`` by name (all of them when none does: one may load it, or answer 404);
    with ``needs_cost``, only those with a cost model; of those, the ones whose queue is not
    full (all of them when every queue is full: one answers 429). The request's rank is the
    largest the eligible members publish for ``model``; its SLO is ``slo_s``, else the
    members' default where they agree on one. A member's queued requests include its
    ``unreported`` ones. Raises ``NoInstanceError`` (``NoCostModelError``) when nobody is
    eligible.

    ``lora``: the adapters of a request's mixture (its ``lora`` entries; ``model`` is then the
    base model): a member serves it when it serves every one by name, its rank is their
    summed rank (what the instance's step pays) and it is resident where all of them are."""
    names = tuple(lora) or (model,)

    def rank_of(snap) -> int | None:
        ranks = [snap.rank_of(n) for n in names]
        return None if any(r is None for r in ranks) else sum(ranks)

    usable = [
        i for i, m in enumerate(members) if m.up and m.snapshot is not None and i not in exclude
    ]
    if not usable:
        raise NoInstanceError("no instance is reachable")
    knows = [i for i in usable if rank_of(members[i].snapshot) is not None]
    cands = knows or usable
    if needs_cost:
        cands = [i for i in cands if members[i].cost is not None]
        if not cands:
            raise NoCostModelError("no eligible instance has a cost model")
    room = [i for i in cands if not members[i].snapshot.queue_full]
    eligible = set(room or cands)
    ranks = [r for i in sorted(eligible) if (r := rank_of(members[i].snapshot))]
    if slo_s is None:  # the instances' default, where they agree on one
        defaults = {members[i].snapshot.tpot_slo_s for i in eligible}
        slo_s = defaults.pop() if len(defaults) == 1 else None
    info = RequestInfo(max(ranks, default=0), prompt_tokens, slo_s)
    states = []
    for i, m in enumerate(members):
        snap = m.snapshot
        states.append(
            InstanceState(
                # None only where nothing reads it: an ineligible member, or a policy without
                # a cost model
                cost=m.cost,  # type: ignore[arg-type]
                running=snap.running if snap else (),
                queued=(*snap.queued, *m.unreported) if snap else (),
                eligible=i in eligible,
                name=m.name,
                resident=bool(snap and all(n is not None and n in snap.resident
                                           for n in names)),  # fmt: skip
            )
        )
    if isinstance(router, FirstFitRouter):  # "full" = every slot of an instance busy
        slots = [members[i].snapshot.num_slots for i in eligible]
        router.capacity = min((s for s in slots if s > 0), default=router.capacity)
    return Plan(router.order(info, states), info)


__all__ = [
    "BadStateError",
    "Member",
    "NoCostModelError",
    "Plan",
    "Snapshot",
    "parse_snapshot",
    "plan",
]
