"""The token-budget step: paged attention, chunked prefill, KV pages, preemption."""

from __future__ import annotations

import numpy as np
import pytest

from cara_jax.engine import Engine, EngineConfig
from cara_jax.engine.batch import ChunkRow, ScheduledBatch
from cara_jax.sampling_params import SamplingParams
from cara_jax.scoring import full_logits

IDLE = (0.0, 0, 1.0, 0, 0.0, 0.0, 0.0, 1.0)


def _engine(loaded, tok, **kw):
    cfg = dict(max_num_seqs=8, max_model_len=256, max_prefill_seqs=2, max_num_batched_tokens=64,
               kv_cache_memory=4 << 20)  # fmt: skip
    cfg.update(kw)
    return Engine(loaded, tok, EngineConfig(**cfg))


def _run(eng, requests):
    ids = [eng.add_request(p, sp) for p, sp in requests]
    got = {i: [] for i in ids}
    reasons = {}
    steps = 0
    while eng.has_unfinished():
        for o in eng.step():
            got[o.request_id] += o.token_ids
            if o.finished:
                reasons[o.request_id] = o.finish_reason
        steps += 1
        assert steps < 5000
    return [got[i] for i in ids], [reasons[i] for i in ids]


def test_engine_with_the_pallas_attention_kernel_matches_the_reference(tiny, smol_tok):
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    reqs = [([5, 6, 7, 8, 9, 10, 11, 12, 13], sp), ([40, 41, 42], sp)]
    kw = dict(max_model_len=64, max_num_batched_tokens=16, token_buckets=(16,))
    ref = _engine(tiny, smol_tok, **kw)
    want = _run(ref, reqs)[0]
    ref.close()
    pk = _engine(tiny, smol_tok, attention_backend="pallas_interpret", **kw)
    assert _run(pk, reqs)[0] == want
    pk.close()


def _chunk_logits(eng, ids, chunk):
    """Run a prompt through the runner in chunks of ``chunk`` tokens; logits of its last token."""
    r = eng.runner
    key = "probe"
    assert eng.blocks.grow(key, len(ids))
    table = eng.blocks.table(key)
    start, out = 0, None
    while start < len(ids):
        toks = ids[start : start + chunk]
        final = start + len(toks) == len(ids)
        row = ChunkRow(None, 0, toks, start, table, 0, IDLE, final, len(ids))
        res = r.run(ScheduledBatch([], [row]))
        out = np.asarray(res.logits)[r.config.decode_rows(res.program.tokens)]
        start += len(toks)
    eng.blocks.free(key)
    return out


@pytest.mark.slow  # CI time; chunked prefill vs PEFT stays fast in adapters/test_multi_lora_parity.py
def test_chunked_prefill_equals_whole_prefill(smollm, smol_tok):
    eng = _engine(smollm, smol_tok, max_num_batched_tokens=64, token_buckets=(64,))
    ids = smol_tok.apply_chat_template(
        [{"role": "user", "content": "Explain in detail why the sky is blue, please."}],
        tokenize=True,
    )
    assert len(ids) > 40
    whole = _chunk_logits(eng, ids, 64)
    ref = np.asarray(full_logits(smollm, np.array([ids])))[0, -1]
    assert np.max(np.abs(whole - ref)) / np.max(np.abs(ref)) <= 1e-5
    for chunk in (7, 16, 33):
        part = _chunk_logits(eng, ids, chunk)
        assert np.max(np.abs(part - whole)) / np.max(np.abs(whole)) <= 1e-5, chunk
    # through the engine: a budget of 8 tokens spans the prompt over several steps
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    big, _ = _run(eng, [(ids, sp)])
    eng.close()
    small = _engine(smollm, smol_tok, max_num_batched_tokens=8)
    got, _ = _run(small, [(ids, sp)])
    assert got == big
    assert max(s.prefill_tokens for s in small.steps) <= 8
    small.close()


def test_long_prompt_beside_short_ones_and_decode_keeps_going(tiny, smol_tok):
    """A prompt of most of the context prefills in chunks while short requests decode."""
    rng = np.random.default_rng(3)
    eng = _engine(tiny, smol_tok, max_model_len=512, max_num_batched_tokens=32,
                  kv_cache_memory=None)  # fmt: skip
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    short = [(rng.integers(3, 500, size=10).tolist(), sp) for _ in range(8)]
    long = (rng.integers(3, 500, size=400).tolist(), sp)
    together, reasons = _run(eng, [*short[:4], long, *short[4:]])
    assert reasons == ["length"] * 9
    mixed = [s for s in eng.steps if s.batch_size and s.prefill_tokens]
    assert mixed  # decode tokens rode along with prompt chunks
    # alone, the long prompt and a short one give the same tokens (batching invariance at large
    # is test_engine's test_batching_changes_no_result)
    assert _run(eng, [long])[0][0] == together[4]
    assert _run(eng, [short[0]])[0][0] == together[0]
    eng.close()


def test_preemption_under_a_small_kv_budget_loses_nothing(tiny, smol_tok):
    rng = np.random.default_rng(5)
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    reqs = [(rng.integers(3, 500, size=int(rng.integers(10, 30))).tolist(), sp) for _ in range(6)]
    # 12 pages of 16 tokens: room for about three of the six requests at once, and for any one
    # alone (at most 70 tokens), so the same engine (one program) gives the reference outputs
    per_page = 16 * 2 * tiny.cfg.num_layers * tiny.cfg.num_kv_heads * tiny.cfg.head_dim * 4
    tight = _engine(tiny, smol_tok, kv_cache_memory=13 * per_page, max_model_len=128,
                    token_buckets=(64,))  # fmt: skip
    alone = [_run(tight, [r])[0][0] for r in reqs]
    assert tight.scheduler.preemptions == 0
    got, reasons = _run(tight, reqs)
    assert tight.scheduler.preemptions > 0
    assert got == alone and reasons == ["length"] * 6
    assert tight.blocks.num_free == tight.blocks.num_pages - 1
    assert sum(r.preemptions for r in tight.finished_requests) == tight.scheduler.preemptions
    tight.close()
