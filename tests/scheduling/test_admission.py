"""SLO-aware admission: never past the SLO, rank-aware, FIFO among fits, aging."""

from __future__ import annotations

import random

import pytest

from cara_jax.scheduling import (
    AdmissionConfig,
    AdmissionPolicy,
    Buckets,
    CostModel,
    LinearFit,
    RunningInfo,
    WaitingInfo,
)
from tests.helpers import MS, linear_model


def random_model(rng: random.Random) -> CostModel:
    kernel = rng.choice(["bgmv", "mbgmv"])
    cm = linear_model(kernel, a_ms=rng.uniform(0.001, 0.02), b_ms=rng.uniform(20, 35),
                      base_ms=rng.uniform(15, 30), c_ms=rng.uniform(0, 0.5))  # fmt: skip
    cm.base = LinearFit(("batch", "one"), (rng.uniform(0, 0.5) * MS, cm.base.get("one")))
    if rng.random() < 0.5:
        cm.buckets = Buckets(
            rows=(1, 2, 4, 8, 16, 32, 64), rank=(16, 64), total_rank=(64, 256, 1024)
        )
    return cm


@pytest.mark.parametrize("stalls", [False, True])
def test_admission_never_admits_past_the_slo(stalls):
    rng = random.Random(42 + stalls)
    for _ in range(400):
        cost = random_model(rng)
        policy = AdmissionPolicy(cost, AdmissionConfig(
            max_wait_s=10.0, headroom=rng.choice([0.0, 0.1]),
            avg_response_len=rng.choice([64, 256]) if stalls else None,
        ))  # fmt: skip

        def slo():
            return None if rng.random() < 0.6 else rng.uniform(25, 60) * MS

        running = [RunningInfo(rng.choice([0, 8, 16, 32, 64]), slo(), rng.randint(1, 500))
                   for _ in range(rng.randint(1, 40))]  # fmt: skip
        waiting = [WaitingInfo(i, rng.choice([0, 8, 16, 32, 64]), rng.uniform(0, 5), slo(),
                               rng.randint(1, 500)) for i in range(rng.randint(0, 30))]  # fmt: skip
        free = rng.randint(0, 24)
        d = policy.select(running, waiting, free_slots=free, now=5.0, max_new=rng.randint(1, 16))
        assert not d.forced  # nothing waited 10 s, and the instance is busy
        assert len(d.admitted) <= free and len(set(d.admitted)) == len(d.admitted)
        if not d.admitted:
            continue
        batch = [*running, *(waiting[i] for i in d.admitted)]
        assert policy.fits([r.rank for r in batch], [r.slo_s for r in batch],
                           [r.prompt_tokens for r in batch])  # fmt: skip
        assert d.predicted_step_s <= d.bound_s + 1e-12


def test_admission_is_rank_aware_and_fifo_among_fits():
    cost = linear_model("bgmv", a_ms=0.01, b_ms=30.0, base_ms=30.0)  # SLO 45 ms
    policy = AdmissionPolicy(cost, AdmissionConfig(max_wait_s=5.0))
    running = [RunningInfo(8)] * 20  # 20 x 8 -> 31.6 ms
    waiting = [WaitingInfo("big", 64, 0.0), WaitingInfo("s1", 8, 0.1), WaitingInfo("s2", 16, 0.2)]
    d = policy.select(running, waiting, free_slots=8, now=1.0)
    assert d.admitted == [0, 1, 2]  # 23 x 64 rows: 44.7 ms, all fit, oldest first
    running = [RunningInfo(8)] * 30  # 31 x 64 rows: 49.8 ms, the big one does not fit
    d = policy.select(running, waiting, free_slots=8, now=1.0)
    assert d.admitted == [1, 2]  # the small ones overtake it
    assert not d.forced


def test_aging_admits_a_starved_request_first():
    cost = linear_model("bgmv", a_ms=0.01, b_ms=30.0, base_ms=30.0)
    policy = AdmissionPolicy(cost, AdmissionConfig(max_wait_s=2.0))
    running = [RunningInfo(8)] * 30
    waiting = [WaitingInfo("s", 8, 2.5), WaitingInfo("big", 64, 0.0)]
    d = policy.select(running, waiting, free_slots=4, now=1.0)
    assert d.admitted == [0]  # big does not fit and has waited 1 s only
    d = policy.select(running, waiting, free_slots=4, now=2.5)
    assert d.admitted[0] == 1 and d.forced == d.aged == [1]  # waited 2.5 s: first, any rank
    assert d.predicted_step_s > d.bound_s  # it did break the SLO: that is the price of aging
    assert 0 not in d.admitted  # after it, the small one no longer fits
    d = policy.select(running, waiting, free_slots=1, now=2.5, max_new=1)
    assert d.admitted == [1]


def test_empty_instance_takes_the_oldest_request():
    cost = linear_model("bgmv", a_ms=1.0, b_ms=30.0, base_ms=10.0)  # rank 64 alone breaks it
    policy = AdmissionPolicy(cost)
    d = policy.select([], [WaitingInfo("b", 8, 0.5), WaitingInfo("a", 64, 0.1)], 4, now=0.6)
    assert d.admitted[0] == 1 and d.forced == [1] and d.aged == []
