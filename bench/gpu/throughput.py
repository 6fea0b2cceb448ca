"""The ``e2e_throughput`` section of the GPU check: 16 concurrent requests over 16 adapters
(``cached``), bgmv and mbgmv decode, beside the base model serving the same batch without
adapters. See bench/gpu/sections.py.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
import traceback

import jax.numpy as jnp

from bench.gpu.ctx import Ctx
from bench.gpu.engine_setup import (
    GRACE_S,
    RANKS,
    AdapterSet,
    CompiledSteps,
    _compile,
    _dtype,
    _layers_label,
    _needs_gpu,
    _past,
    _pow2,
    _programs,
    _prompts,
    id_tokenizer,
    model_config,
    pool_config,
    random_model,
    serve,
)
from bench.systems.common import kv_cache_bytes
from cara_jax.adapters.device_pool import PoolConfig
from cara_jax.engine import Engine, EngineConfig, RequestRecord
from cara_jax.engine.runner import Program
from cara_jax.sampling_params import SamplingParams

# -------------------------------------------------------------------------------- throughput


@dataclasses.dataclass(frozen=True)
class ThroughputPlan:
    requests: int = 16  # one adapter each, ranks 16 and 64 alternating
    prompt_len: int = 128
    new_tokens: int = 128


def throughput_plan(smoke: bool) -> ThroughputPlan:
    return ThroughputPlan(requests=8, prompt_len=32, new_tokens=32) if smoke else ThroughputPlan()


def _rates(recs: list[RequestRecord], t0: float) -> dict:
    first = min(r.token_times[0] for r in recs)
    last = max(r.token_times[-1] for r in recs)
    tokens = sum(len(r.token_times) for r in recs)
    tpots = [r.tpot for r in recs if r.tpot is not None]
    return {
        "tok/s": round(tokens / (last - t0), 1),
        "decode_tok/s": round((tokens - len(recs)) / max(last - first, 1e-9), 1),
        "TPOT_ms": round(statistics.median(tpots) * 1e3, 2) if tpots else None,
        "TTFT_ms": round(statistics.median(r.ttft for r in recs) * 1e3, 1),
    }


def _throughput_engine(loaded, tok, strategy: str, plan: ThroughputPlan, pool: PoolConfig,
                       host_bytes: int) -> Engine:  # fmt: skip
    max_len = plan.prompt_len + plan.new_tokens + 16
    # the batch's prompts fit one step whole (budget: requests x prompt tokens), as one prefill
    cfg = EngineConfig(max_num_seqs=plan.requests, max_model_len=max_len,
                       max_prefill_seqs=plan.requests,
                       max_num_batched_tokens=_pow2(plan.requests * plan.prompt_len),
                       kv_cache_memory=kv_cache_bytes(loaded.cfg, loaded.dtype, plan.requests,
                                                      max_len),
                       cold_start="cached", lora_strategy=strategy, pool=pool,
                       host_budget_bytes=host_bytes)  # fmt: skip
    return Engine(loaded, tok, cfg)


def _throughput_programs(eng: Engine, plan: ThroughputPlan) -> list[Program]:
    """The batch's prefill step and its decode steps (the base model runs the same programs;
    the LoRA rank bucket is chosen inside each program, per step)."""
    return _programs(eng, [plan.requests * plan.prompt_len, plan.requests])


def _timed_batch(eng: Engine, batch, sp: SamplingParams, tag: str,
                 until: float) -> tuple[dict, bool, int]:  # fmt: skip
    eng.finished_requests.clear()
    hot = eng.runner.hot_compiles
    t0 = time.perf_counter()
    recs = serve(eng, batch, sp, tag, until)
    ok = all(r.finish_reason == "length" and len(r.token_times) == sp.max_tokens for r in recs)
    return _rates(recs, t0), ok, eng.runner.hot_compiles - hot


def e2e_throughput_section(ctx: Ctx) -> list[dict]:
    if (skip := _needs_gpu(ctx)) is not None:
        return skip
    cfg = model_config(ctx.smoke)
    dtype = _dtype(ctx.smoke)
    plan = throughput_plan(ctx.smoke)
    loaded = random_model(cfg, dtype)
    tok = id_tokenizer(cfg.vocab_size)
    adapters = AdapterSet.for_config(cfg)
    half = (plan.requests + 1) // 2
    by_rank = {r: adapters.names(r, half) for r in RANKS}
    names = [by_rank[RANKS[i % 2]][i // 2] for i in range(plan.requests)]
    pool = pool_config(cfg, dtype, [adapters.ranks[n] for n in names])
    host_bytes = max(EngineConfig.host_budget_bytes, 2 * adapters.nbytes(names))
    prompts = _prompts(plan.requests, plan.prompt_len, cfg.vocab_size, seed=23)
    sp = SamplingParams(temperature=0, max_tokens=plan.new_tokens, ignore_eos=True)
    warm_sp = dataclasses.replace(sp, max_tokens=2)
    base_batch = [(p, None) for p in prompts]
    lora_batch = list(zip(prompts, names, strict=True))
    common = {"requests": plan.requests, "prompt": plan.prompt_len, "new_tokens": plan.new_tokens,
              "layers": _layers_label(cfg, ctx.smoke), "dtype": jnp.dtype(dtype).name}  # fmt: skip
    until = ctx.deadline + GRACE_S
    rows: list[dict] = []
    shared: list[CompiledSteps] = []
    for strategy in ("bgmv", "mbgmv"):
        configs = (["base"] if strategy == "bgmv" else []) + [strategy]
        if _past(ctx):
            rows += [{"config": c, **common, "note": "skipped: time budget"} for c in configs]
            continue
        eng = None
        try:
            eng = _throughput_engine(loaded, tok, strategy, plan, pool, host_bytes)
            for n in names:
                eng.load_adapter(n, adapters.paths[n])
            for steps in shared:  # another strategy's programs do not fit this engine
                steps.give(eng)
            _compile(eng, _throughput_programs(eng, plan))
            shared.append(CompiledSteps.of(eng))
            for c in configs:  # untimed pass of the same batch: first use of every path
                serve(eng, base_batch if c == "base" else lora_batch, warm_sp, f"w{c}-", until)
            for c in configs:
                if _past(ctx):
                    rows.append({"config": c, **common, "note": "skipped: time budget"})
                    continue
                batch = base_batch if c == "base" else lora_batch
                rates, ok, hot = _timed_batch(eng, batch, sp, f"{c}-", until)
                row = {"config": c, **common,
                       "adapters": 0 if c == "base" else len(set(names)),
                       "ranks": "-" if c == "base" else "/".join(map(str, RANKS)), **rates}  # fmt: skip
                row["note"] = f"{hot} compiles while timed" if hot else ""
                row["ok"] = ok
                rows.append(row)
                print(row, flush=True)
        except Exception as e:
            traceback.print_exc()
            done = {r["config"] for r in rows}
            rows += [{"config": c, **common, "ok": False,
                      "error": f"{type(e).__name__}: {str(e)[:200]}"}
                     for c in configs if c not in done]  # fmt: skip
        finally:
            if eng is not None:
                eng.close()
    base = next((r for r in rows if r["config"] == "base" and "decode_tok/s" in r), None)
    for r in rows:
        if base is not None and "decode_tok/s" in r:
            r["vs_base"] = f"{r['decode_tok/s'] / base['decode_tok/s']:.2f}x"
    return rows
