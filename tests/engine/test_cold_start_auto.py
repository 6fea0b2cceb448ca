"""``cold_start="auto"``: per request, sync or CPU-assisted, from the engine's measured costs."""

from __future__ import annotations

import pytest

from cara_jax.adapters.device_pool import PoolConfig
from cara_jax.engine import Engine, EngineConfig
from cara_jax.engine.cold_start import ColdStartModel
from cara_jax.sampling_params import SamplingParams
from tests.helpers import ADAPTERS, make_peft_adapters

SPECS = {"qv": ADAPTERS["r64_qv"], "all": ADAPTERS["r8"]}
GREEDY = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir, tmp_path_factory):
    return make_peft_adapters(tiny_llama_dir, tmp_path_factory.mktemp("auto"), SPECS)


def test_the_model_prefers_the_cpu_only_when_the_copy_is_slower(tiny):
    m = ColdStartModel(tiny.cfg, link_bytes_per_s=1e9, cpu_flops=1e9, exchange_s=5e-3)
    qv = {"q_proj": 16, "v_proj": 16}
    assert m.exchanges(qv) == tiny.cfg.num_layers  # one round trip per layer: q and v share x
    assert m.exchanges({"q_proj": 8, "o_proj": 8, "down_proj": 8}) == 3 * tiny.cfg.num_layers
    small = m.choose(qv, nbytes=10_000, tokens=16, started=None)
    assert small.mode == "sync" and small.reason == "load_faster"
    big = m.choose(qv, nbytes=500_000_000, tokens=16, started=None)
    assert big.mode == "cpu_assist" and big.reason == "cpu_faster"
    # a long prompt makes the CPU's share larger than the same copy
    assert m.choose(qv, nbytes=500_000_000, tokens=10**7, started=None).mode == "sync"
    assert m.choose(qv, 500_000_000, 16, None, cpu_path=False).reason == "no_cpu_path"
    # waiting for a load costs at least the step in flight: a long step favours the CPU
    assert m.choose(qv, nbytes=10_000, tokens=16, started=None, step_s=1.0).mode == "cpu_assist"
    # measured loads move the bandwidth: a link 100x slower makes the same copy worth assisting
    for _ in range(20):
        m.observe_load(10_000_000, 1.0)
    assert m.bandwidth.value < 2e7
    assert m.choose(qv, nbytes=10_000_000, tokens=16, started=None).mode == "cpu_assist"
    m.observe_cpu(exchanges=30, flops=3e9, seconds=0.5, copy_s=0.03)  # 1 ms a round trip
    assert m.exchange.value == pytest.approx(1e-3) and m.cpu_flops.value == pytest.approx(3e9 / 0.47)


def _engine(loaded, tok, adapters, mode, link):
    cfg = EngineConfig(max_num_seqs=4, max_model_len=64, max_prefill_seqs=2,
                       max_num_batched_tokens=32, token_buckets=(16, 32), kv_cache_memory=2 << 20,
                       cold_start=mode, cpu_workers=1, enable_prefix_caching=False,
                       pool=PoolConfig(max_rank=64, layer_groups=3, emulate_link_gbps=link))  # fmt: skip
    eng = Engine(loaded, tok, cfg)
    for name, path in adapters.items():
        eng.load_adapter(name, path)
    return eng


def _run_cold(eng, reqs):
    """Each request alone, its adapter evicted first; tokens and the engine's records."""
    out = []
    for prompt, name in reqs:
        h = eng.registry.entry(name).content_hash
        if eng.config.cold_start != "cached" and eng.pool.is_resident(h):
            eng.pool.evict(h)
        rid = eng.add_request(prompt, GREEDY, name)
        toks = []
        while eng.has_unfinished():
            toks += [t for o in eng.step() if o.request_id == rid for t in o.token_ids]
        out.append(toks)
    return out, list(eng.finished_requests)[-len(reqs) :]


def test_auto_picks_per_request_and_matches_cached(tiny, smol_tok, adapters):
    reqs = [(list(range(10, 30)), "qv"), (list(range(40, 52)), "all")]
    ref = _engine(tiny, smol_tok, adapters, "cached", None)
    want = [_run_cold(ref, [r])[0][0] for r in reqs]
    ref.close()
    # a slow link (0.2 MB/s: each tiny adapter takes about a second to copy): CPU-assisted
    slow = _engine(tiny, smol_tok, adapters, "auto", 0.0002)
    slow.warmup()
    assert len(slow.runner.programs()) == 2 + 2  # a CPU-assisted twin of the two buckets only
    got, recs = _run_cold(slow, reqs)
    assert got == want
    assert [(r.cold, r.cold_start_mode, r.cold_start_reason) for r in recs] == [
        (True, "cpu_assist", "cpu_faster")] * 2  # fmt: skip
    st = slow.stats()
    assert st.cold_start["choices"] == {"cpu_assist/cpu_faster": 2}
    assert slow.cpu_stats["cara_cpu_assist_prefills_total"] >= 2
    assert st.hot_compiles == 0
    slow.close()
    # a fast link: whichever way each request goes (here the step time, which depends on the
    # machine, can tip it), the mode follows the reason and the tokens are cached mode's
    fast = _engine(tiny, smol_tok, adapters, "auto", 50.0)
    got, recs = _run_cold(fast, reqs)
    assert got == want
    consistent = {("sync", "load_faster"), ("sync", "resident"), ("cpu_assist", "cpu_faster")}
    assert all(r.cold and (r.cold_start_mode, r.cold_start_reason) in consistent for r in recs)
    assert fast.stats().cold_start["loads_observed"] >= 2  # the model learns the link
    fast.close()
