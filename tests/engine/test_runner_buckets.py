"""Token buckets and programs: one compiled program per step size, nothing new after warm-up."""

from __future__ import annotations

import numpy as np
import pytest

from cara_jax.engine import Engine, EngineConfig, PromptTooLongError
from cara_jax.engine.batch import DecodeRow, ScheduledBatch
from cara_jax.engine.runner import ModelRunner, Program, RunnerConfig, bucket, pow2_buckets
from cara_jax.generate import generate_tokens
from cara_jax.sampling_params import InvalidRequestError
from cara_jax.tokenizer import Tokenizer

IDLE = (0.0, 0, 1.0, 0, 0.0, 0.0, 0.0, 1.0)


@pytest.fixture(scope="module")
def tok(smollm_path):
    return Tokenizer.from_path(smollm_path)


def _engine(loaded, tok, **kw) -> Engine:
    cfg = dict(max_num_seqs=4, max_model_len=64, max_prefill_seqs=2, max_num_batched_tokens=32,
               kv_cache_memory=4 << 20)  # fmt: skip
    cfg.update(kw)
    return Engine(loaded, tok, EngineConfig(**cfg))


def test_bucket():
    assert bucket(1, (1, 2, 4)) == 1 and bucket(3, (1, 2, 4)) == 4 and bucket(4, (1, 2, 4)) == 4
    with pytest.raises(ValueError):
        bucket(5, (1, 2, 4))
    assert pow2_buckets(2, 64) == (2, 4, 8, 16, 32, 64)
    assert pow2_buckets(2, 48) == (2, 4, 8, 16, 32, 48)  # the budget is always the largest
    assert pow2_buckets(8, 8) == (8,)


def test_token_buckets():
    def cfg(**kw):
        return RunnerConfig(num_pages=8, max_model_len=64, **kw)

    assert cfg(max_num_batched_tokens=64).token_buckets == (2, 4, 8, 16, 32, 64)
    assert cfg(max_num_batched_tokens=64, min_token_bucket=16).token_buckets == (16, 32, 64)
    assert cfg(max_num_batched_tokens=100).token_buckets == (2, 4, 8, 16, 32, 64, 100)
    assert cfg(max_num_batched_tokens=4, min_token_bucket=16).token_buckets == (4,)
    # explicit buckets: sorted, deduplicated, capped by the budget, which is always the last
    explicit = cfg(max_num_batched_tokens=64, buckets=(32, 8, 8, 200, 64))
    assert explicit.token_buckets == (8, 32, 64)
    assert cfg(max_num_batched_tokens=64, buckets=(64,)).token_buckets == (64,)
    # the engine passes its fields through
    assert EngineConfig().min_token_bucket >= 2  # a one-token step is not a program of its own


def test_programs_one_per_token_bucket(tiny):
    from cara_jax.adapters.device_pool import DevicePool, PoolConfig

    rc = RunnerConfig(num_pages=8, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32,
                      buckets=(4, 16))  # fmt: skip
    assert rc.token_buckets == (4, 16, 32)
    base = ModelRunner(tiny, rc)
    assert base.programs() == [Program(4, False), Program(16, False), Program(32, False)]
    assert base.rank_buckets() == ()
    pool = DevicePool(tiny.cfg, PoolConfig(budget_bytes=4 << 20, max_rank=64))
    try:
        lora = ModelRunner(tiny, rc, pool=pool)
        assert lora.programs() == [Program(t, True) for t in (4, 16, 32)]
        # a step runs each adapter at its own rank: ranks round up to RANK_BLOCK (bgmv rows,
        # prefill chunks), summed ranks to ENTRY_BLOCK (mbgmv), all inside each program
        assert lora.rank_buckets() == (16, 32, 48, 64)
        assert lora.total_rank_buckets()[:3] == (32, 64, 96)
        assert lora.total_rank_buckets()[-1] == 4 * 64
        import dataclasses

        cpu = ModelRunner(tiny, dataclasses.replace(rc, cpu_assist=True), pool=pool)
        assert cpu.programs() == [
            *(Program(t, True) for t in (4, 16, 32)), *(Program(t, True, True) for t in (4, 16, 32))
        ]  # fmt: skip
        # a step runs on the smallest program that holds its tokens
        for n, want in ((1, 4), (4, 4), (5, 16), (16, 16), (17, 32), (32, 32)):
            batch = lora.synthetic_batch([0] * min(n, 4), [n - 4] if n > 4 else [], ctx=8)
            assert batch.num_tokens == n
            assert lora.program_for(batch) == Program(want, True)
            assert lora.program_for(batch, cpu=True) == Program(want, True, True)
        assert not lora.is_ready() and lora.compiled_count() == 0
    finally:
        pool.close()
    with pytest.raises(ValueError, match="lora_strategy"):
        ModelRunner(tiny, rc, lora_strategy="nope")


def test_compile_count_flat_after_warmup(tiny, tok):
    """After warm-up (every program, nothing else), random prompt lengths, batch sizes and
    output lengths compile nothing new; each step ran on the smallest bucket of its tokens."""
    eng = _engine(tiny, tok, token_buckets=(4, 16))
    buckets = eng.runner.config.token_buckets
    assert buckets == (4, 16, 32)
    assert eng.stats().programs_total == len(buckets) and not eng.stats().ready
    eng.warmup()
    warm = eng.runner.compiled_count()
    assert warm == len(eng.runner.programs()) == len(buckets) and eng.stats().ready

    def workload(seed):
        r = np.random.default_rng(seed)
        for _ in range(4):
            n = int(r.integers(1, 7))  # more prompts than rows: some wait their turn
            prompts = [r.integers(3, 500, size=int(r.integers(1, 50))).tolist() for _ in range(n)]
            outs = generate_tokens(eng, prompts, int(r.integers(1, 12)), stop_ids=frozenset())
            assert all(o.finish_reason == "length" for o in outs)

    workload(1)
    workload(2)
    assert eng.runner.compiled_count() == warm
    assert eng.runner.hot_compiles == 0
    assert {s.program[0] for s in eng.steps} == set(buckets)  # every program was used
    for s in eng.steps:
        assert s.program[0] == bucket(s.num_tokens, buckets), s
    assert eng.blocks.num_free == eng.blocks.num_pages - 1  # every KV page back
    eng.close()


def test_prompt_too_long(tiny, tok):
    eng = _engine(tiny, tok, max_model_len=32)
    with pytest.raises(PromptTooLongError):
        eng.add_request([5] * 32)  # no room for a generated token
    with pytest.raises(PromptTooLongError):
        generate_tokens(eng, [[5] * 8, [5] * 40], 4)  # checked before anything is queued
    with pytest.raises(InvalidRequestError, match="empty"):
        eng.add_request([])
    assert not eng.has_unfinished()
    # the engine still works afterwards; a prompt of max_model_len - 1 gets one token
    outs = generate_tokens(eng, [[5] * 8, [5] * 31], 4, stop_ids=frozenset())
    assert [len(o.token_ids) for o in outs] == [4, 1]
    assert [o.finish_reason for o in outs] == ["length", "length"]
    eng.close()
    # a KV cache smaller than the context lowers max_model_len to what it holds
    per_page = 16 * 2 * tiny.cfg.num_layers * tiny.cfg.num_kv_heads * tiny.cfg.head_dim * 4
    small = _engine(tiny, tok, max_model_len=64, kv_cache_memory=3 * per_page)  # 2 usable pages
    assert small.max_len == 32
    with pytest.raises(PromptTooLongError):
        small.add_request([5] * 40)
    small.close()


def test_one_row_decode_updates_cache_in_place(tiny, tok):
    """A one-row decode step writes its K/V into the donated cache without copying it.

    XLA used to simplify a one-index scatter into a dynamic-update-slice that XLA:CPU executed
    by copying every layer's cache (16x slower decode at 16 x 2048); the smallest program has
    two token slots (min_token_bucket). Checked on the compiled program's scratch memory (less
    than one layer's K array: no layer was copied) and on the buffers (the step's cache is the
    donated one, not a new allocation).
    """
    eng = _engine(tiny, tok, max_num_seqs=8, max_model_len=512, max_num_batched_tokens=8,
                  kv_cache_memory=64 << 20, min_token_bucket=2)  # fmt: skip
    r = eng.runner
    assert r.config.token_buckets[0] == 2
    layer = r.cache.k.nbytes // r.cache.k.shape[0]
    assert layer >= 8 << 20  # large enough that a copy of one layer dominates the scratch
    batch = ScheduledBatch([DecodeRow(None, 0, 5, [1], 0, IDLE)], [])
    p = r.program_for(batch)
    assert p.tokens == 2
    assert r.compile(p).memory_analysis().temp_size_in_bytes < layer
    before = [a.unsafe_buffer_pointer() for a in (r.cache.k, r.cache.v)]
    old = r.cache.k
    for _ in range(2):
        res = r.run(batch)
        np.asarray(res.outputs.tokens)
    assert [a.unsafe_buffer_pointer() for a in (r.cache.k, r.cache.v)] == before
    assert old.is_deleted()  # donated to the step
    assert r.hot_compiles == 0
    eng.close()
