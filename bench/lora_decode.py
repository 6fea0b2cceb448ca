"""Decode throughput with 16 distinct adapters vs base-only, bgmv vs mbgmv, in one run.

    python -m bench.lora_decode [--batch 16] [--steps 32] [--ranks 8,16,32,64] [--out bench/results]

Adapters are written as PEFT folders (adapter_config.json + adapter_model.safetensors with
PEFT's key names) with random weights, targeting all seven projections.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from bench.lib.report import write_report
from cara_jax.adapters.device_pool import DevicePool, PoolConfig
from cara_jax.adapters.random_peft import write_random_peft
from cara_jax.adapters.store import AdapterRegistry
from cara_jax.config import PROJECTIONS
from cara_jax.embedded import default_model_path
from cara_jax.engine.runner import ModelRunner, RunnerConfig
from cara_jax.weights import load_model

MEM_BW = 26e9  # bytes/s, measured memory read bandwidth of the 2-core development machine
GEMM_RATE = 200e9  # FLOP/s, measured float32 GEMM rate of the same machine
PROJS = list(PROJECTIONS)


def chain_rate(loaded, batch: int, steps: int) -> float:
    """Tokens/s of the model's bare GEMM chain at ``batch`` rows: every projection of every
    layer and the LM head, unrolled in one jit, with nothing else (no attention, norms, LoRA,
    sampling): the floor a decode step of that batch stands on with XLA's GEMMs."""
    import jax.numpy as jnp

    model = loaded.model()
    lay = model.layers  # every layer's parameters, stacked
    layers = [
        [getattr(getattr(lay, blk), p).kernel[...][i] for blk, p in
         (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"),
          ("self_attn", "o_proj"), ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))]
        for i in range(loaded.cfg.num_layers)
    ]  # fmt: skip
    head = model.embed_tokens[...]

    @jax.jit
    def chain(h, layers, head):
        for wq, wk, wv, wo, wg, wu, wd in layers:
            q, k, v = h @ wq, h @ wk, h @ wv
            h = h + (q + jnp.tile(k + v, q.shape[-1] // k.shape[-1])) @ wo
            h = h + ((h @ wg) * (h @ wu)) @ wd
        return h @ head.T

    h = jnp.ones((batch, loaded.cfg.hidden_size), jnp.float32) * 0.01
    chain(h, layers, head).block_until_ready()
    t = time.perf_counter()
    for _ in range(steps):
        out = chain(h, layers, head)
    out.block_until_ready()
    return batch * steps / (time.perf_counter() - t)


def decode_rate(runner: ModelRunner, steps: int, prompt_len: int, slots: list[int]) -> float:
    """Decode tokens per second over ``steps`` steps of ``len(slots)`` rows (contexts growing
    from ``prompt_len``); the step's program is compiled and run once untimed first."""
    # one decode row per slot, each over its own KV pages, at contexts prompt_len, prompt_len+1..
    batches = [runner.synthetic_batch(slots, ctx=prompt_len + k) for k in range(steps + 1)]
    runner.compile(runner.program_for(batches[0]))
    hot = runner.hot_compiles
    with runner.pool.lock:  # the pool's arrays are the step's arguments
        np.asarray(runner.time_step(batches[0]))  # warm
        t = time.perf_counter()
        for b in batches[1:]:
            toks = runner.time_step(b)
        toks.block_until_ready()
        dt = time.perf_counter() - t
    assert runner.hot_compiles == hot, "a timed step compiled"
    return len(slots) * steps / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--ranks", default="8,16,32,64")
    ap.add_argument("--targets", choices=["qkvo", "all"], default="all",
                    help="projections the adapters target (the serving bench uses qkvo)")
    ap.add_argument("--repeats", type=int, default=2, help="alternate the configs this many times")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]
    loaded = load_model(default_model_path())
    cfg = loaded.cfg
    adapter_ranks = [ranks[i % len(ranks)] for i in range(args.batch)]
    with tempfile.TemporaryDirectory() as tmp:
        reg = AdapterRegistry(cfg)
        for i, r in enumerate(adapter_ranks):
            projs = PROJS if args.targets == "all" else PROJS[:4]
            write_random_peft(Path(tmp) / f"a{i}", cfg, r, seed=i, targets=projs)
            reg.register(f"a{i}", Path(tmp) / f"a{i}")
        adapter_bytes = sum(reg.resolve(f"a{i}").nbytes for i in range(args.batch))
        pool = DevicePool(
            cfg, PoolConfig(budget_bytes=int(adapter_bytes * 1.3), max_rank=max(ranks),
                            projections=tuple(projs))
        )
        slots = []
        for i in range(args.batch):
            a = reg.resolve(f"a{i}")
            pool.acquire(a).wait()
            slots.append(pool.slot_of(a.content_hash))
    # one program per runner: the token bucket of a step of ``batch`` decode rows. One LoRA rank
    # bucket, the pool's max rank: the batch holds every rank, so a step picks that one anyway
    # (and DevicePool.flat_index, mbgmv's tables, fails for a bucket below a rank in the batch)
    max_len = 1 << (args.prompt_len + args.steps + 1).bit_length()
    pages_per_seq = -(-(args.prompt_len + args.steps + 1) // 16)
    rc = RunnerConfig(num_pages=args.batch * pages_per_seq + 1, max_model_len=max_len,
                      max_num_seqs=args.batch, max_num_batched_tokens=max(2, args.batch),
                      max_prefill_seqs=1)  # fmt: skip
    runners = {s: ModelRunner(loaded, rc, pool=pool, lora_strategy=s) for s in ("bgmv", "mbgmv")}
    base = [0] * args.batch  # slot 0: no adapter (the program skips the LoRA ops)
    rates: dict[str, list[float]] = {"chain": [], "base": [], "bgmv": [], "mbgmv": []}
    for _ in range(args.repeats):
        rates["chain"].append(chain_rate(loaded, args.batch, args.steps))
        rates["base"].append(decode_rate(runners["bgmv"], args.steps, args.prompt_len, base))
        for s in ("bgmv", "mbgmv"):
            rates[s].append(decode_rate(runners[s], args.steps, args.prompt_len, slots))
    best = {k: max(v) for k, v in rates.items()}
    base_bytes = cfg.num_params() * 4
    kv = 2 * cfg.kv_size * 4 * cfg.num_layers * (args.prompt_len + args.steps // 2) * args.batch
    flops_tok = 2 * cfg.num_params()
    lora_flops_tok = 2 * adapter_bytes / 4 / args.batch
    roof = {}
    for k in best:
        if k == "chain":
            continue
        extra = 0 if k == "base" else adapter_bytes
        extra_fl = 0 if k == "base" else lora_flops_tok * args.batch
        t_step = max(
            (base_bytes + extra + kv) / MEM_BW, (flops_tok * args.batch + extra_fl) / GEMM_RATE
        )
        roof[k] = args.batch / t_step
    rows = [
        (k, best[k], roof[k], best[k] / roof[k], best[k] / best["base"], best["chain"] / best[k])
        for k in ("base", "bgmv", "mbgmv")
    ]
    lines = [
        f"# LoRA decode throughput, batch {args.batch}, {args.batch} distinct adapters "
        f"(ranks {sorted(set(adapter_ranks))}, "
        f"{'all 7 projections' if args.targets == 'all' else 'q, k, v, o'})",
        "",
        f"Machine: {platform.machine()} {os.cpu_count()} cores, jax {jax.__version__} "
        f"({jax.devices()[0].platform}); SmolLM2-135M float32; "
        f"{datetime.date.today().isoformat()}. Adapter bytes in the batch: {adapter_bytes / 1e6:.1f} MB "
        f"(base weights {base_bytes / 1e6:.0f} MB).",
        "",
        f"Bare GEMM chain (projections + LM head only, same batch, same process): "
        f"{best['chain']:.1f} tok/s = {1e3 * args.batch / best['chain']:.1f} ms per step.",
        "",
        "| config | decode tok/s | step ms | roofline tok/s | fraction of roofline "
        "| vs base-only | step / bare chain |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {k} | {r:.1f} | {1e3 * args.batch / r:.1f} | {rf:.1f} | {fr:.0%} | {rel:.2f}x "
              f"| {ch:.2f}x |" for k, r, rf, fr, rel, ch in rows]  # fmt: skip
    lines += [
        "",
        f"All runs (tok/s): {json.dumps({k: [round(x, 1) for x in v] for k, v in rates.items()})}",
    ]
    write_report(
        args.out,
        "lora_decode",
        lines,
        {"rates": rates, "roofline": roof, "adapter_bytes": adapter_bytes},
    )
    pool.close()


if __name__ == "__main__":
    main()
