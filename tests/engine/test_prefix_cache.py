"""Prefix caching: KV blocks shared by content, never across adapters or adapter versions."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from cara_jax.adapters.device_pool import PoolConfig
from cara_jax.engine import Engine, EngineConfig
from cara_jax.sampling_params import SamplingParams
from tests.helpers import ADAPTERS, make_peft_adapters

BS = 8
SPECS = {k: ADAPTERS[k] for k in ("r8", "r16_alpha", "r32_rslora")}
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3)


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir, tmp_path_factory):
    return make_peft_adapters(tiny_llama_dir, tmp_path_factory.mktemp("pc_adapters"), SPECS)


def _engine(loaded, tok, adapters, caching=True, **kw):
    cfg = dict(max_num_seqs=8, max_model_len=128, max_prefill_seqs=4, max_num_batched_tokens=64,
               token_buckets=(16, 64), block_size=BS, kv_cache_memory=2 << 20,
               enable_prefix_caching=caching, pool=PoolConfig(max_rank=32))  # fmt: skip
    cfg.update(kw)
    eng = Engine(loaded, tok, EngineConfig(**cfg))
    for name, path in adapters.items():
        eng.load_adapter(name, path)
    return eng


def _run(eng, reqs):
    """Run requests together; per request: tokens, chosen log-probs, cached prompt tokens."""
    ids = [eng.add_request(p, sp, a) for p, sp, a in reqs]
    out = {i: ([], [], 0) for i in ids}
    n = 0
    while eng.has_unfinished():
        for o in eng.step():
            toks, lps, _ = out[o.request_id]
            toks += o.token_ids
            lps += [d["logprob"] for d in o.logprobs or []]
            out[o.request_id] = (toks, lps, o.num_cached_tokens)
        n += 1
        assert n < 5000
    return [out[i] for i in ids]


def _same(a, b):
    """Same greedy tokens and log-probs within 1e-5."""
    assert [x[0] for x in a] == [x[0] for x in b]
    for (_, la, _), (_, lb, _) in zip(a, b, strict=True):
        np.testing.assert_allclose(la, lb, atol=1e-5, rtol=0)


def test_cache_gives_the_same_tokens_and_logprobs_for_mixed_adapter_batches(
    tiny, smol_tok, adapters
):
    rng = np.random.default_rng(0)
    shared = rng.integers(3, 500, size=21).tolist()  # 2 full blocks and 5 tokens of a third
    first = [(shared + [7], GREEDY, "r8"), (shared + [8], GREEDY, None),
             (shared + [9, 10], GREEDY, "r16_alpha")]  # fmt: skip
    # the common prefix ends mid-block: the partial third block is computed again
    second = [(shared + rng.integers(3, 500, size=5).tolist(), GREEDY, a)
              for a in ("r8", None, "r16_alpha", "r32_rslora")]  # fmt: skip
    second.append(first[0])  # the same prompt again: all but its last block's tokens
    on, off = _engine(tiny, smol_tok, adapters), _engine(tiny, smol_tok, adapters, caching=False)
    a1, a2 = _run(on, first), _run(on, second)
    b1, b2 = _run(off, first), _run(off, second)
    _same(a1, b1)
    _same(a2, b2)
    assert [x[2] for x in a1] == [0, 0, 0]
    assert [x[2] for x in a2] == [16, 16, 16, 0, 16]  # r32_rslora never saw the prefix
    assert [x[2] for x in b2] == [0] * 5
    # a second turn: the prompt is the first turn's prompt, its answer and a new message, so
    # blocks holding generated tokens are hits too
    # (the last answer token is never fed back, so its block is not complete: 10 tokens here)
    ten = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=3)
    turn1 = [(second[0][0], ten, "r8")]
    t1 = _run(on, turn1)
    _same(t1, _run(off, turn1))
    turn2 = [(turn1[0][0] + t1[0][0] + [11, 12, 13], GREEDY, "r8")]
    got, want = _run(on, turn2), _run(off, turn2)
    _same(got, want)
    assert got[0][2] == 32 > len(turn1[0][0])  # blocks 0-3: the prompt's 26 tokens and 6 answers
    st = on.stats()
    assert st.prefix_cache_hits == sum(x[2] for x in a2 + t1 + got)
    assert st.prefix_cache_hits_by_adapter["r8"] == 16 + 16 + t1[0][2] + got[0][2]
    assert st.prefix_cache_queries == sum(len(p) for p, _, _ in first + second + turn1 + turn2)
    assert off.stats().prefix_cache_hits == 0 and not off.stats().prefix_caching
    on.close()
    off.close()


def test_no_hit_across_adapters_and_a_reloaded_name_starts_afresh(tiny, smol_tok, adapters):
    prompt = list(range(100, 133))  # 4 full blocks and one token
    on = _engine(tiny, smol_tok, adapters)
    off = _engine(tiny, smol_tok, adapters, caching=False)
    got = [_run(on, [(prompt, GREEDY, a)])[0] for a in ("r8", "r16_alpha", None, "r8")]
    assert [g[2] for g in got] == [0, 0, 0, 32]
    want = [_run(off, [(prompt, GREEDY, a)])[0] for a in ("r8", "r16_alpha", None)]
    _same(got[:3], want)
    assert got[0][0] != got[1][0]  # the adapters do differ on this prompt
    # the name r8 now holds new weights (r32_rslora's, never run): no hit, and their answer
    on.load_adapter("r8", adapters["r32_rslora"])
    again = _run(on, [(prompt, GREEDY, "r8")])
    assert again[0][2] == 0
    _same(again, _run(off, [(prompt, GREEDY, "r32_rslora")]))
    assert _run(on, [(prompt, GREEDY, "r8")])[0][2] == 32  # and now its own blocks hit
    # the cache is keyed by content, not name: r16_alpha's weights under a new name hit
    on.load_adapter("copy", adapters["r16_alpha"])
    assert _run(on, [(prompt, GREEDY, "copy")])[0][2] == 32
    on.close()
    off.close()


def test_eviction_under_a_small_kv_budget_loses_nothing(tiny, smol_tok, adapters):
    rng = np.random.default_rng(1)
    prefixes = [rng.integers(3, 500, size=n).tolist() for n in (24, 40, 17)]
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    combos = [(prefixes[0], None), (prefixes[1], "r8"), (prefixes[2], "r16_alpha")]

    def req(k):
        prefix, name = combos[k % 3]
        return prefix + rng.integers(3, 500, size=3).tolist(), sp, name

    # each wave repeats the previous wave's last conversation and brings a new one, beside a
    # long r32_rslora prompt that pushes cached blocks out
    waves = [[req(w), req(w), req(w + 1),
              (rng.integers(3, 500, size=60).tolist(), sp, "r32_rslora")] for w in range(5)]
    roomy = _engine(tiny, smol_tok, adapters, caching=False)
    want = [_run(roomy, w) for w in waves]
    roomy.close()
    per_page = BS * 2 * tiny.cfg.num_layers * tiny.cfg.num_kv_heads * tiny.cfg.head_dim * 4
    tight = _engine(tiny, smol_tok, adapters, kv_cache_memory=25 * per_page)
    got = [_run(tight, w) for w in waves]
    assert [[x[0] for x in w] for w in got] == [[x[0] for x in w] for w in want]
    st = tight.stats()
    assert st.prefix_cache_evictions > 0 and st.prefix_cache_hits > 0
    assert st.kv_pages_free == st.kv_pages_total - 1  # every page is back (cached or not)
    tight.close()


def test_penalties_skip_the_lookup_and_still_match(tiny, smol_tok, adapters):
    prompt = list(range(200, 230))
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, repetition_penalty=1.3,
                        presence_penalty=0.5)  # fmt: skip
    on = _engine(tiny, smol_tok, adapters)
    off = _engine(tiny, smol_tok, adapters, caching=False)
    _run(on, [(prompt, GREEDY, None)])  # its blocks are cached now
    got = _run(on, [(prompt, sp, None)])
    assert got[0][2] == 0
    assert got[0][0] == _run(off, [(prompt, sp, None)])[0][0]
    on.close()
    off.close()


class _Gate:
    """Holds every adapter load at the start of layer group ``at`` until released."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.go = threading.Event()
        self.reached = threading.Event()

    def __call__(self, content_hash: str, group: int) -> None:
        if group >= self.at:
            self.reached.set()
            assert self.go.wait(120)


def test_cpu_assist_computes_deltas_only_for_the_uncached_suffix(tiny, smol_tok, adapters):
    one = {"r8": adapters["r8"]}
    eng = _engine(tiny, smol_tok, one, cold_start="cpu_assist", cpu_workers=1,
                  pool=PoolConfig(max_rank=32, layer_groups=3))  # fmt: skip
    ref = _engine(tiny, smol_tok, one, caching=False, cold_start="cached")
    prefix = list(range(300, 340))  # 5 blocks
    reqs = [(prefix + [5, 6, 7], GREEDY, "r8"), (prefix + [9, 10], GREEDY, "r8")]
    h = eng.registry.entry("r8").content_hash
    try:
        for i, req in enumerate(reqs):
            if eng.pool.is_resident(h):
                eng.pool.evict(h)
            gate = _Gate(1)
            eng.pool.group_gate = gate
            before = eng.cpu_stats["cara_cpu_assist_tokens_total"]
            threading.Timer(1.0, gate.go.set).start()  # the load finishes a second later
            got = _run(eng, [req])
            cpu_tokens = eng.cpu_stats["cara_cpu_assist_tokens_total"] - before
            assert got[0][2] == (0 if i == 0 else 40)
            assert cpu_tokens == len(req[0]) - got[0][2]  # the suffix only
            _same(got, _run(ref, [req]))
    finally:
        eng.close()
        ref.close()
