"""Rank-aware admission inside the engine: the SLO rule, aging, the bounded queue, same tokens.

The cost model here is hand-made (the rule's decisions depend on it, not on this machine's
timing), so every decision is deterministic: decode = 10 ms + 1 ms x |S| + 0.05 ms x |S| x max
rank; base = 10 ms + 1 ms x |S|; default SLO 1.5 x base. Two rank-8 requests fit; adding a
rank-64 one to them does not (22.6 ms > 19.5 ms).
"""

from __future__ import annotations

import pytest

from cara_jax.engine import Engine, EngineConfig
from cara_jax.engine.admission_order import (
    AdmissionOrder,
    AdmissionSettings,
    load_engine_cost_model,
)
from cara_jax.engine.sequence import SeqStatus
from cara_jax.sampling_params import InvalidRequestError, SamplingParams
from cara_jax.scheduling.admission import QueueFullError
from cara_jax.scheduling.cost_model import CostModel, LinearFit
from cara_jax.tokenizer import Tokenizer
from tests.helpers import ALL7, make_peft_adapters

SPECS = {
    "r8a": dict(r=8, lora_alpha=8, target_modules=ALL7),
    "r8b": dict(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "r64": dict(r=64, lora_alpha=64, target_modules=ALL7),
}


def cost_model(kernel: str = "bgmv") -> CostModel:
    return CostModel(
        model="hand-made", device="cpu", dtype="float32", kernel=kernel,
        decode=LinearFit(("work", "batch", "one"), (0.05e-3, 1e-3, 10e-3), 1.0),
        base=LinearFit(("batch", "one"), (1e-3, 10e-3), 1.0),
        prefill=LinearFit(("tokens", "lora_tokens", "one"), (1e-5, 0.0, 1e-3), 1.0),
    )  # fmt: skip


@pytest.fixture(scope="module")
def tok(smollm_path):
    return Tokenizer.from_path(smollm_path)


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir, tmp_path_factory):
    return make_peft_adapters(tiny_llama_dir, tmp_path_factory.mktemp("admission"), SPECS)


def engine(tiny, tok, adapters, admission="slo", max_wait_s=60.0, **kw) -> Engine:
    sched = AdmissionSettings(admission=admission, cost_model=cost_model(), max_wait_s=max_wait_s)
    # cached: every adapter resident, so admission alone decides who runs
    cfg = dict(max_num_seqs=8, max_model_len=96, max_prefill_seqs=4, max_num_batched_tokens=64,
               kv_cache_memory=8 << 20, admission=sched, cold_start="cached",
               lora_strategy="bgmv")  # fmt: skip
    cfg.update(kw)
    eng = Engine(tiny, tok, EngineConfig(**cfg))
    for name, path in adapters.items():
        eng.load_adapter(name, path)
    return eng


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def drain(eng: Engine) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for _ in range(3000):
        if not eng.has_unfinished():
            return out
        for o in eng.step():
            out.setdefault(o.request_id, []).extend(o.token_ids)
    raise AssertionError("the engine did not finish")


def test_rank64_waits_while_rank8_joins(tiny, tok, adapters):
    eng = engine(tiny, tok, adapters)
    a = eng.add_request([5, 6, 7], greedy(30), "r8a")
    eng.step()  # empty instance: the oldest goes whatever it costs
    assert eng.requests[a].status is SeqStatus.RUNNING
    big = eng.add_request([8, 9], greedy(5), "r64")
    small = eng.add_request([10, 11], greedy(5), "r8b")
    eng.step()
    assert eng.requests[small].status is SeqStatus.RUNNING
    assert eng.requests[big].status is SeqStatus.WAITING  # 22.6 ms > 1.5 x 13 ms
    assert eng.admission.stats["cara_admission_deferred_total"] >= 1
    state = eng.scheduler_state()
    assert [q["rank"] for q in state["queued"]] == [64]
    # scheduling counts cost ranks: r8b's rank-8 rows on q/v only are a fraction of r8a's
    r8b = eng.adapters()["r8b"].cost_rank
    assert 1 <= r8b < 8
    assert sorted(r["rank"] for r in state["running"]) == sorted([8, r8b])
    out = drain(eng)  # once the batch empties, the rank-64 request runs: nothing starves
    assert len(out[big]) == 5


def test_aging_admits_a_large_rank(tiny, tok, adapters):
    eng = engine(tiny, tok, adapters, max_wait_s=0.0)
    eng.add_request([5, 6, 7], greedy(30), "r8a")
    eng.step()
    aged = eng.admission.stats["cara_admission_aged_total"]
    big = eng.add_request([8, 9], greedy(5), "r64")
    eng.step()
    assert eng.requests[big].status is SeqStatus.RUNNING
    assert eng.admission.stats["cara_admission_aged_total"] == aged + 1
    drain(eng)


def test_per_request_slo_is_honoured(tiny, tok, adapters):
    eng = engine(tiny, tok, adapters)
    eng.add_request([5, 6, 7], greedy(30), "r8a")
    eng.step()
    # a 12 ms SLO: 2 rows of rank 8 predict 12.8 ms, so this one must wait
    tight = eng.add_request([10, 11], SamplingParams(temperature=0.0, max_tokens=3,
                                                     tpot_slo=0.012), "r8b")  # fmt: skip
    eng.step()
    assert eng.requests[tight].status is SeqStatus.WAITING
    drain(eng)
    with pytest.raises(InvalidRequestError, match="tpot_slo"):
        SamplingParams(tpot_slo=0.0)


def test_admission_never_breaks_a_running_slo(tiny, tok, adapters):
    """Random mixed ranks: after every unforced admission the batch's predicted step is inside
    every member's SLO; and admission order changes no request's greedy tokens."""
    import random

    rng = random.Random(0)
    reqs = [
        ([rng.randrange(3, 400) for _ in range(rng.randrange(2, 12))],
         rng.randrange(2, 14), rng.choice([None, "r8a", "r8b", "r64"]))
        for _ in range(14)
    ]  # fmt: skip
    results = {}
    for admission in ("fifo", "slo"):
        eng = engine(tiny, tok, adapters, admission=admission)
        cost, ids, checked = eng.admission.cost, [], 0
        for prompt, n, adapter in reqs:
            ids.append(eng.add_request(prompt, greedy(n), adapter))
        out: dict[str, list[int]] = {}
        while eng.has_unfinished():
            forced = eng.admission.stats["cara_admission_forced_total"]
            before = {s.request_id for s in eng.running}
            for o in eng.step():
                out.setdefault(o.request_id, []).extend(o.token_ids)
            joined = {s.request_id for s in eng.running} - before
            forced_now = eng.admission.stats["cara_admission_forced_total"] > forced
            if admission == "slo" and joined and not forced_now:
                ranks = [s.rank for s in eng.running]
                bound = 1.5 * cost.base_latency(len(ranks))
                assert cost.decode_latency(ranks) <= bound + 1e-12
                checked += 1
        assert admission == "fifo" or checked > 0  # the rule was exercised
        results[admission] = [out[i] for i in ids]
    assert results["slo"] == results["fifo"]


def test_bounded_queue(tiny, tok, adapters):
    eng = engine(tiny, tok, adapters, admission="fifo", max_queue=2)
    eng.add_request([5], greedy(2))
    eng.add_request([6], greedy(2))
    with pytest.raises(QueueFullError):
        eng.add_request([7], greedy(2))
    drain(eng)
    eng.add_request([7], greedy(2))  # room again once the queue drained
    drain(eng)


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="cost model"):
        AdmissionOrder(AdmissionSettings(admission="slo"), "bgmv")
    with pytest.raises(ValueError, match="admission"):
        AdmissionOrder(AdmissionSettings(admission="sjf"), "bgmv")
    path = tmp_path / "cm.json"
    cost_model("bgmv").save(path)
    assert load_engine_cost_model(path, "bgmv").kernel == "bgmv"
    with pytest.raises(ValueError, match="0 cost models"):
        load_engine_cost_model(path, "mbgmv")


def test_candidates_without_an_engine():
    """Admission alone, on the numbers of the module docstring: FIFO tries every waiting
    request in arrival order; slo skips the rank-64 request and lets the rank-8 one behind it
    join; an empty batch and aging admit whatever the predicted step."""
    from types import SimpleNamespace as NS

    def seq(rank, arrival=0.0, slo=None):
        return NS(rank=rank, arrival=arrival, prompt_ids=[1, 2, 3], params=NS(tpot_slo=slo))

    running, big, small = [seq(8)], seq(64, 0.1), seq(8, 0.2)
    fifo = AdmissionOrder(AdmissionSettings(), "bgmv")
    assert fifo.candidates(running, [big, small], 4, 4) == [big, small]
    slo = AdmissionOrder(AdmissionSettings(admission="slo", cost_model=cost_model(), max_wait_s=60.0),
                    "bgmv")  # fmt: skip
    assert slo.candidates(running, [big, small], 4, 4, now=1.0) == [small]
    assert slo.stats["cara_admission_deferred_total"] == 1  # two could go, one did
    assert slo.candidates([], [big], 4, 4, now=1.0) == [big]  # empty batch: forced
    assert slo.stats["cara_admission_forced_total"] == 1
    assert slo.candidates(running, [big, small], 1, 1, now=1.0) == [small]  # one free row
    # a tight per-request SLO (12 ms < 12.8 ms for two rank-8 rows) keeps even rank 8 out
    assert slo.candidates(running, [seq(8, 0.3, slo=0.012)], 4, 4, now=1.0) == []
    aging = AdmissionOrder(AdmissionSettings(admission="slo", cost_model=cost_model(), max_wait_s=0.5),
                      "bgmv")  # fmt: skip
    assert aging.candidates(running, [big, small], 4, 4, now=1.0) == [big, small]
    assert aging.stats["cara_admission_aged_total"] == 2
