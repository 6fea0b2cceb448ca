"""The ``lora_step`` section of the GPU check: the engine's step layout on the Pallas kernels vs
the jnp references (logits agreement, step time beside the base-only step).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax
import numpy as np

from bench.gpu.ctx import Ctx
from bench.gpu.engine_setup import (
    RANKS,
    AdapterSet,
    _dtype,
    _needs_gpu,
    model_config,
    pool_config,
    random_model,
)

# -------------------------------------------------------------------------------- LoRA step


def _median_s(fn: Callable[[], jax.Array], repeats: int) -> float:
    fn().block_until_ready()
    ts = []
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        fn().block_until_ready()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def lora_step_section(ctx: Ctx) -> list[dict]:
    """The engine's step layout on the Pallas kernels vs the jnp references: one decode step of
    16 rows over 14 adapters (ranks RANKS, all projections, two base rows) and one prefill chunk, per
    strategy: logits agreement, and step time next to the base-only step (what the adapters
    cost when each runs at its own rank on its own projections)."""
    if (skip := _needs_gpu(ctx)) is not None:
        return skip
    from cara_jax.engine.runner import ModelRunner, RunnerConfig

    cfg = model_config(ctx.smoke)
    dtype = _dtype(ctx.smoke)
    loaded = random_model(cfg, dtype)
    adapters = AdapterSet.for_config(cfg)
    names = [n for r in RANKS for n in adapters.names(r, 7)]
    pool_cfg = pool_config(cfg, dtype, [adapters.ranks[n] for n in names])
    from cara_jax.adapters.device_pool import DevicePool
    from cara_jax.adapters.store import AdapterRegistry

    reg = AdapterRegistry(cfg)
    pool = DevicePool(cfg, pool_cfg, dtype=dtype)
    slots = []
    for n in names:
        reg.register(n, adapters.paths[n])
        a = reg.resolve(n)
        pool.acquire(a).wait(600)
        slots.append(pool.slot_of(a.content_hash))
    dec = slots[:7] + [0] + slots[7:] + [0]  # 16 rows, two of them base
    pallas = "pallas_interpret" if ctx.interpret else "pallas"
    rc = RunnerConfig(num_pages=16 * 9 + 1, max_model_len=256, max_num_seqs=16,
                      max_num_batched_tokens=32, max_prefill_seqs=1, buckets=(32,))  # fmt: skip
    rows: list[dict] = []
    try:
        base = ModelRunner(loaded, rc, pool=pool)
        for strategy in ("mbgmv", "bgmv"):
            out, secs = {}, {}
            for backend in ("jnp", pallas):
                r = ModelRunner(loaded, rc, pool=pool, lora_strategy=strategy, lora_backend=backend)
                batch = r.synthetic_batch(dec, [8], ctx=120, prompt_slots=[slots[3]])
                with pool.lock:
                    out[backend] = np.asarray(r.run(batch).logits, np.float32)
                    secs[backend] = _median_s(lambda r=r, b=batch: r.run(b).outputs.tokens,
                                              ctx.repeats)  # fmt: skip
            with pool.lock:
                bb = base.synthetic_batch([0] * 16, [8], ctx=120)
                t_base = _median_s(lambda bb=bb: base.run(bb).outputs.tokens, ctx.repeats)
            err = float(np.abs(out[pallas] - out["jnp"]).max() / np.abs(out["jnp"]).max())
            rows.append({"strategy": strategy, "rel_err": f"{err:.1e}", "ok": err <= 2e-2,
                         "jnp_ms": round(secs["jnp"] * 1e3, 2),
                         "pallas_ms": round(secs[pallas] * 1e3, 2),
                         "base_only_ms": round(t_base * 1e3, 2),
                         "pallas_vs_base": f"{secs[pallas] / t_base:.2f}x"})  # fmt: skip
    finally:
        pool.close()
    return rows
