"""Bucketed shapes: after warm-up, random lengths and batch sizes compile nothing new."""

from __future__ import annotations

import numpy as np
import pytest
from cara_jax.runner import ModelRunner, PromptTooLongError, RunnerConfig, bucket

from cara_jax.generate import generate_tokens


def test_bucket():
    assert bucket(1, (1, 2, 4)) == 1 and bucket(3, (1, 2, 4)) == 4
    with pytest.raises(ValueError):
        bucket(5, (1, 2, 4))


def test_compile_count_flat_after_warmup(tiny):
    cfg = RunnerConfig(
        num_slots=4, max_len=64, max_prefill_batch=4, min_prefill_bucket=16, min_kv_bucket=32
    )
    runner = ModelRunner(tiny, cfg)
    rng = np.random.default_rng(0)

    def workload(seed):
        r = np.random.default_rng(seed)
        for _ in range(6):
            n = int(r.integers(1, 5))
            prompts = [r.integers(3, 500, size=int(r.integers(1, 40))).tolist() for _ in range(n)]
            generate_tokens(runner, prompts, int(r.integers(1, 20)))

    # warm-up: touch every bucket once (all prefill batch x length, decode rows x kv length)
    for b in cfg.prefill_batch_buckets:
        for t in cfg.prefill_len_buckets:
            n_tok = min(t, cfg.max_len - 1)
            generate_tokens(runner, [rng.integers(3, 500, size=n_tok).tolist()] * b, 1)
    for rows in cfg.decode_row_buckets:
        for kv in cfg.kv_len_buckets:
            generate_tokens(runner, [[5] * (kv - 2)] * rows, 2)
    warm = runner.compiled_count()
    workload(1)
    workload(2)
    assert runner.compiled_count() == warm


def test_prompt_too_long(tiny):
    runner = ModelRunner(tiny, RunnerConfig(num_slots=1, max_len=32))
    with pytest.raises(PromptTooLongError):
        generate_tokens(runner, [[5] * 32], 4)
    with pytest.raises(PromptTooLongError):
        generate_tokens(runner, [[]], 4)
    # the runner still works afterwards
    assert len(generate_tokens(runner, [[5] * 8], 4)[0].token_ids) == 4


def test_one_row_decode_updates_cache_in_place(smollm):
    """A one-row decode step must not copy the donated KV cache.

    XLA simplifies a one-index scatter into a dynamic-update-slice, which XLA:CPU executed by
    copying every layer's cache (16x slower decode at 16 x 2048). Checked on the compiled
    executable's scratch memory, not on time: one row may not need more than two rows do.
    """
    from cara_jax.runner import Variant

    cfg = RunnerConfig(num_slots=8, max_len=512, max_prefill_batch=2, min_kv_bucket=32)
    runner = ModelRunner(smollm, cfg)
    kv = cfg.kv_len_buckets[0]
    one = runner.compile(Variant("decode", 1, kv, 0)).memory_analysis().temp_size_in_bytes
    two = runner.compile(Variant("decode", 2, kv, 0)).memory_analysis().temp_size_in_bytes
    assert one <= two


def test_warmup_stops_before_the_memory_map_limit(tiny, monkeypatch):
    """Near vm.max_map_count, warm-up keeps the covering variants and skips the rest; steps
    then run on a covering variant instead of letting LLVM abort the process."""
    import cara_jax.runner as runner_mod
    from cara_jax.runner import CompileBudgetError, Variant, map_count

    if map_count() is None:
        pytest.skip("no /proc on this system")
    cfg = RunnerConfig(num_slots=4, max_len=64, max_prefill_batch=2, min_kv_bucket=32)
    runner = ModelRunner(tiny, cfg)
    monkeypatch.setattr(runner_mod, "max_map_count", lambda: map_count() + 100)
    runner.warmup()
    assert set(runner._exe) == set(runner.covering_variants())
    assert runner.skipped_compiles == len(runner.variants()) - 2
    with pytest.raises(CompileBudgetError, match="max_map_count"):
        runner.compile(Variant("decode", 1, cfg.kv_len_buckets[0], 0))
    toks = generate_tokens(runner, [[5, 6, 7]], 3)
    assert len(toks[0].token_ids) == 3 and runner.fallbacks > 0 and runner.hot_compiles == 0
