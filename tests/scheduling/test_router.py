"""Rank-aware routing (Algorithm 1 of the notes) and the baseline routers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cara_jax.scheduling import (
    FirstFitRouter,
    FirstFitSloRouter,
    InstanceState,
    LeastLoadedRouter,
    NoInstanceError,
    RandomRouter,
    RankAwareRouter,
    RequestInfo,
    RoundRobinRouter,
    make_router,
    synthetic_gpu_cost_model,
)
from tests.helpers import MS, linear_model


def state(cost, running_ranks=(), queued=(), eligible=True, slo=None):
    return InstanceState(
        cost,
        [RequestInfo(r, slo_s=slo) for r in running_ranks],
        [RequestInfo(r, p, slo) for r, p in queued],
        eligible,
    )


def algorithm1_total(cost, running, queued, req, avg_len, slo_bound):
    """Algorithm 1 of the notes, written out independently."""
    allr = [*running, *[r for r, _ in queued]]
    lens, ranks = [p for _, p in queued], [r for r, _ in queued]
    d_prefill = cost.prefill_latency([*lens, req.prompt_tokens], [*ranks, req.rank])
    d_prefill -= cost.prefill_latency(lens, ranks)
    new = cost.decode_latency([*allr, req.rank])
    if new > slo_bound:
        return math.inf
    d_decode = new - cost.decode_latency(allr)
    return (d_prefill / avg_len + d_decode) * len(allr)


def test_rank_aware_matches_algorithm1_on_hand_made_states():
    cost = linear_model("bgmv", a_ms=0.004, b_ms=30.0, base_ms=30.0)  # default SLO = 45 ms
    insts = [
        ([64] * 10, [(8, 200)]),  # max rank already 64
        ([8] * 6, []),  # a rank-64 request would pad these to 64
        ([16] * 20, [(16, 50), (32, 500)]),
        ([64] * 60, []),  # breaks the SLO with one more
    ]
    req = RequestInfo(64, prompt_tokens=120)
    router = RankAwareRouter(avg_response_len=100)
    states = [state(cost, r, q) for r, q in insts]
    totals = [
        algorithm1_total(cost, r, q, req, 100, 1.5 * 30 * MS) for r, q in insts
    ]  # fmt: skip
    assert math.isinf(totals[3])
    for st, t in zip(states, totals, strict=True):
        got = router.evaluate(req, st)[0]
        assert got == pytest.approx(t) or (math.isinf(got) and math.isinf(t))
    assert router.route(req, states) == int(np.argmin(totals)) == 0
    # a rank-8 request: instance 1 (all rank 8) now adds no padding
    small = RequestInfo(8, prompt_tokens=120)
    totals8 = [algorithm1_total(cost, r, q, small, 100, 45 * MS) for r, q in insts]
    assert router.route(small, states) == int(np.argmin(totals8)) == 1


def test_notes_example_bgmv_and_mbgmv_send_the_same_request_to_different_instances():
    """Instance A: 24 requests at rank 32; B: 16 at rank 64; a new rank-64 request, 36 ms SLO.

    BGMV pads A's batch to rank 64 (25 x 64 rows): A breaks the SLO, B does not -> B.
    MBGMV adds 64 rank rows anywhere; B, the slower batch, breaks the SLO -> A.
    """
    bgmv = linear_model("bgmv", a_ms=0.004, b_ms=31.5)  # 34.6 / 35.6 ms now
    mbgmv = linear_model("mbgmv", a_ms=0.0025, b_ms=33.3)  # 35.2 / 35.9 ms now
    req = RequestInfo(64, slo_s=36 * MS)
    router = RankAwareRouter()
    for cost, want in ((bgmv, 1), (mbgmv, 0)):
        a = state(cost, [32] * 24, slo=36 * MS)
        b = state(cost, [64] * 16, slo=36 * MS)
        ta, tb = router.evaluate(req, a)[0], router.evaluate(req, b)[0]
        assert (math.isinf(ta), math.isinf(tb)) == ((True, False) if want == 1 else (False, True))
        assert router.route(req, [a, b]) == want
    # the same with the paper-calibrated synthetic models: under BGMV both instances would break
    # the SLO (A by 15%, B by 1%), so the request goes where it breaks it least, B
    for kernel, want in (("bgmv", 1), ("mbgmv", 0)):
        cost = synthetic_gpu_cost_model(kernel)
        a = state(cost, [32] * 24, slo=36 * MS)
        b = state(cost, [64] * 16, slo=36 * MS)
        assert router.route(req, [a, b]) == want


def test_rank_aware_skips_ineligible_and_raises_without_candidates():
    cost = synthetic_gpu_cost_model("bgmv")
    states = [state(cost, [], eligible=False), state(cost, [8] * 3)]
    assert RankAwareRouter().route(RequestInfo(8), states) == 1
    with pytest.raises(NoInstanceError):
        RankAwareRouter().route(RequestInfo(8), [state(cost, eligible=False)])


def test_baselines_behave_as_named():
    cost = synthetic_gpu_cost_model("bgmv")
    loads = [5, 2, 7, 2]
    states = [state(cost, [64] * n) for n in loads]
    req = RequestInfo(64)
    assert LeastLoadedRouter().route(req, states) == 1  # fewest requests, lower index on ties
    rr = RoundRobinRouter()
    assert [rr.route(req, states) for _ in range(6)] == [0, 1, 2, 3, 0, 1]
    states[2].eligible = False
    assert [rr.route(req, states) for _ in range(3)] == [3, 0, 1]
    picks = [RandomRouter(seed=3).route(req, states) for _ in range(3)]
    assert len(set(picks)) == 1  # same seed, same first choice
    r = RandomRouter(seed=0)
    chosen = {r.route(req, states) for _ in range(200)}
    assert chosen == {0, 1, 3}  # every eligible instance, never the ineligible one
    states[2].eligible = True
    assert FirstFitRouter(capacity=6).route(req, states) == 0  # 5 < 6
    assert FirstFitRouter(capacity=5).route(req, states) == 1  # first with room
    assert FirstFitRouter(capacity=1).route(req, states) == 1  # all full: least loaded
    # SLO-aware first fit: the first instance whose batch stays within the SLO
    slo_states = [state(cost, [64] * 30), state(cost, [8] * 4), state(cost, [])]
    assert FirstFitSloRouter().route(req, slo_states) == 1
    for name in ("rank_aware", "random", "round_robin", "least_loaded", "first_fit"):
        assert make_router(name).name == name
    with pytest.raises(ValueError):
        make_router("nope")


def test_a_mixture_routes_by_its_members():
    """A request's ``lora`` mixture (model = the base): only instances serving every member
    are candidates, its rank is the members' summed rank, and it counts as resident only
    where all of them are."""
    from cara_jax.scheduling.fleet import Member, Snapshot, plan
    from server.router.estimates import lora_names

    def snap(adapters, resident):
        return Snapshot("base", (), "mbgmv", 8, 8, 0, None, None, (), (), adapters,
                        frozenset(resident))  # fmt: skip

    members = [Member(snap({"a": 8}, {"a"}), name="only-a"),
               Member(snap({"a": 8, "b": 16}, {"a"}), name="a-and-b")]  # fmt: skip
    body = {"model": "base", "lora": [{"name": "a", "scale": 0.5}, {"name": "b"}]}
    assert lora_names(body) == ("a", "b")
    assert lora_names({"lora": "a"}) == () and lora_names({}) == ()
    p = plan(make_router("least_loaded"), members, "base", lora=lora_names(body))
    assert p.info.rank == 24
    assert p.order == [1]  # the other instance does not serve b
    p = plan(make_router("least_loaded"), members, "a")  # a plain adapter: both serve it
    assert p.info.rank == 8 and sorted(p.order) == [0, 1]
