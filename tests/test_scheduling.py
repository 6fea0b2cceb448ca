"""Rank-aware scheduling: cost-model fits, Algorithm 1 routing, baselines, admission, simulator,
and the profiler as a real process (slow)."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cara_jax.scheduling import (
    AdmissionConfig,
    AdmissionPolicy,
    Buckets,
    CostModel,
    FirstFitRouter,
    FirstFitSloRouter,
    InstanceState,
    LeastLoadedRouter,
    LinearFit,
    NoInstanceError,
    RandomRouter,
    RankAwareRouter,
    RequestInfo,
    RoundRobinRouter,
    RunningInfo,
    WaitingInfo,
    fit_cost_model,
    fit_linear,
    load_cost_models,
    make_router,
    synthetic_gpu_cost_model,
)

REPO = Path(__file__).resolve().parent.parent
MS = 1e-3


def linear_model(kernel: str, a_ms: float, b_ms: float, base_ms: float = 24.0, c_ms: float = 0.0,
                 prefill=(0.05, 0.0, 10.0)) -> CostModel:  # fmt: skip
    """A cost model with given coefficients (ms): decode = a*work + c*|S| + b, base flat."""
    return CostModel(
        "m", "dev", "float32", kernel,
        decode=LinearFit(("work", "batch", "one"), (a_ms * MS, c_ms * MS, b_ms * MS)),
        base=LinearFit(("batch", "one"), (0.0, base_ms * MS)),
        prefill=LinearFit(("tokens", "lora_tokens", "one"), tuple(x * MS for x in prefill)),
    )  # fmt: skip


def synthetic_samples(rng, kernel, a, b, c=0.0, noise=0.01, base=(0.02, 0.5)):
    """Decode samples over batches x ranks (uniform and mixed), base and prefill samples."""
    out = []
    ranks = (8, 16, 32, 64)
    for s in (4, 8, 16, 32):
        mixes = [[r] * s for r in ranks] + [[ranks[i % 4] for i in range(s)], [8] * (s - 1) + [64]]
        for rs in mixes:
            work = s * max(rs) if kernel == "bgmv" else sum(rs)
            y = (a * work + c * s + b) * (1 + noise * rng.standard_normal())
            out.append({"kind": "decode", "kernel": kernel, "ranks": rs, "latency_s": y})
        y = (base[0] * s + base[1]) * (1 + noise * rng.standard_normal())
        out.append({"kind": "decode", "kernel": None, "ranks": [0] * s, "latency_s": y})
    for n in (32, 64, 128, 256, 512):
        for r in (0, 8, 64):
            y = (0.002 * n + 1e-5 * n * r + 0.01) * (1 + noise * rng.standard_normal())
            out.append({"kind": "prefill", "lengths": [n], "ranks": [r], "latency_s": y})
    return out


# ---------------------------------------------------------------------- cost model


@pytest.mark.parametrize("kernel", ["bgmv", "mbgmv"])
def test_fit_recovers_paper_form_coefficients(kernel):
    rng = np.random.default_rng(0)
    a, b = 4e-6, 0.03
    cm = fit_cost_model(synthetic_samples(rng, kernel, a, b), kernel, "m", "dev", "float32")
    assert cm.decode.features == ("work", "one")  # |S| adds nothing: not chosen
    assert cm.decode.get("work") == pytest.approx(a, rel=0.05)
    assert cm.decode.get("one") == pytest.approx(b, rel=0.05)
    assert cm.decode.r2 > 0.95
    assert cm.base.get("batch") == pytest.approx(0.02, rel=0.05)
    assert cm.prefill.get("tokens") == pytest.approx(0.002, rel=0.05)
    assert cm.prefill.get("lora_tokens") == pytest.approx(1e-5, rel=0.1)
    assert cm.prefill.r2 > 0.95
    assert "decode:work+one" in cm.alternatives


def test_fit_adds_batch_term_when_it_clearly_helps():
    rng = np.random.default_rng(1)
    a, b, c = 2e-5, 0.03, 4e-3  # a CPU-like base cost growing with the batch
    samples = synthetic_samples(rng, "bgmv", a, b, c, noise=0.005)
    cm = fit_cost_model(samples, "bgmv", "m", "dev", "float32")
    assert cm.decode.features == ("work", "batch", "one")
    assert cm.decode.get("batch") == pytest.approx(c, rel=0.1)
    assert cm.decode.get("work") == pytest.approx(a, rel=0.1)
    assert cm.decode.r2 > cm.alternatives["decode:work+one"].r2 + 0.01


def test_fit_linear_reports_r2_and_drops_negative_slopes():
    xs = [{"x": float(i), "z": float(i % 3), "one": 1.0} for i in range(20)]
    y = [2.0 * x["x"] + 1.0 for x in xs]
    fit = fit_linear(xs, y, ("x", "one"))
    assert fit.r2 == pytest.approx(1.0)
    assert fit.coef == pytest.approx((2.0, 1.0))
    y2 = [2.0 * x["x"] - 0.5 * x["z"] + 1.0 for x in xs]
    fit2 = fit_linear(xs, y2, ("x", "z", "one"))
    assert "z" not in fit2.features and fit2.r2 < 1.0
    assert fit_linear(xs, y2, ("x", "z", "one"), nonneg=False).get("z") == pytest.approx(-0.5)


def test_buckets_pad_the_features():
    cm = linear_model("bgmv", a_ms=1.0, b_ms=0.0)
    cm.buckets = Buckets(rows=(1, 2, 4, 8), rank=(16, 64), total_rank=(64, 256))
    # 3 rows of rank 8 run as 4 rows x rank 16
    assert cm.decode_latency([8, 8, 8]) == pytest.approx(4 * 16 * MS)
    mb = linear_model("mbgmv", a_ms=1.0, b_ms=0.0)
    mb.buckets = cm.buckets
    assert mb.decode_latency([8, 8, 8]) == pytest.approx(64 * MS)  # sum 24 -> bucket 64
    assert mb.decode_latency([0, 0]) == pytest.approx(24 * MS)  # no adapter: the base model


def test_json_round_trip_keyed_by_model_device_dtype_kernel(tmp_path):
    path = tmp_path / "cm.json"
    b, m = synthetic_gpu_cost_model("bgmv"), synthetic_gpu_cost_model("mbgmv")
    b.save(path)
    m.save(path)
    models = load_cost_models(path)
    assert set(models) == {b.key, m.key}
    again = CostModel.load(path, kernel="mbgmv")
    batch = [8, 16, 64, 32] * 5
    assert again.decode_latency(batch) == m.decode_latency(batch)
    assert again.prefill_latency([100, 30], [8, 64]) == m.prefill_latency([100, 30], [8, 64])
    with pytest.raises(KeyError):
        CostModel.load(path)  # two models match
    assert json.loads(path.read_text())["format"].startswith("cara-jax-cost-models")


# ---------------------------------------------------------------------- router


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


# ---------------------------------------------------------------------- admission


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


# ---------------------------------------------------------------------- simulator


def test_simulator_is_deterministic_and_ranks_matter():
    from bench.simulate import Lengths, Scenario, simulate

    sc = Scenario(instances=6, rate=40.0, duration_s=8.0, warmup_s=1.0, adapters=200,
                  output_len=Lengths(48, 0.6, 4, 256), seed=7)  # fmt: skip
    cost = synthetic_gpu_cost_model("bgmv")
    a = simulate(sc, cost, "rank_aware")
    b = simulate(sc, cost, "rank_aware")
    a.pop("wall_s"), b.pop("wall_s")
    assert a == b and a["requests"] > 200
    assert 0.0 <= a["slo_attainment"] <= 1.0
    for policy in ("random", "least_loaded", "first_fit"):
        m = simulate(sc, cost, policy)
        assert m["requests"] == a["requests"]
        # BGMV pads to the batch's max rank: grouping ranks (Algorithm 1) keeps more in the SLO
        assert m["slo_attainment"] < a["slo_attainment"]


def test_simulator_cli_writes_table(tmp_path):
    from bench.simulate import main

    argv = ["--synthetic", "--instances", "4", "--rate", "20", "--duration", "4",
            "--adapters", "50", "--kernels", "bgmv", "--policies", "rank_aware,least_loaded",
            "--sweep", "10,30", "--out", str(tmp_path), "--stem", "sim"]  # fmt: skip
    assert main(argv) == 0
    md = (tmp_path / "sim.md").read_text()
    assert "| bgmv | 30 | least_loaded |" in md
    data = json.loads((tmp_path / "sim.json").read_text())
    assert len(data["rows"]) == 4


def test_simulator_defaults_to_a_measured_cost_model(tmp_path):
    """Without --synthetic or --cost-model the simulator runs on a profile of real steps."""
    from bench.simulate import MEASURED, main, measured_cost_model

    path = measured_cost_model()
    assert (REPO / path).is_file() and Path(path).name in {f.name for f in MEASURED}
    argv = ["--instances", "2", "--rate", "2", "--duration", "4", "--adapters", "20",
            "--kernels", "bgmv", "--policies", "rank_aware", "--max-batch", "8",
            "--out", str(tmp_path), "--stem", "sim"]  # fmt: skip
    assert main(argv) == 0
    data = json.loads((tmp_path / "sim.json").read_text())
    assert "synthetic" not in data["cost_models"]["bgmv"]
    assert data["rows"][0]["requests"] > 0


# ---------------------------------------------------------------------- profiler


def test_profile_subcommand_help():
    out = subprocess.run([sys.executable, "-m", "cara_jax.cli", "profile", "--help"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0 and "--quick" in out.stdout


@pytest.mark.slow
def test_profile_quick_runs_as_a_real_process(tmp_path):
    """About 2 minutes on a 2-core CPU: compiling three step programs dominates."""
    out_file = tmp_path / "cm.json"
    out = subprocess.run(
        [sys.executable, "-m", "cara_jax.cli", "profile", "--quick", "--no-progress",
         "--out", str(out_file)],
        capture_output=True, text=True, timeout=1200, cwd=REPO, env=dict(os.environ),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "R^2" in out.stdout
    models = load_cost_models(out_file)
    assert {m.kernel for m in models.values()} == {"bgmv", "mbgmv"}
    for m in models.values():
        assert m.device and m.dtype == "float32" and m.samples
        assert m.decode_latency([8, 64]) > 0 and m.prefill_latency([32], [64]) > 0
        assert not math.isnan(m.decode.r2)
