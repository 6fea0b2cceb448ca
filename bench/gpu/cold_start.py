"""The ``cold_start`` section of the GPU check: TTFT of requests whose adapter is not on the
device (each its own adapter, ranks 16 and 64 on all seven projections), one at a time and in a
small burst, in each cold-start mode; median TTFT per mode and the ratios to ``cached``
(adapters pinned on the device, the ideal). See bench/gpu/sections.py.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import traceback

import jax.numpy as jnp

from bench.gpu.ctx import Ctx
from bench.gpu.engine_setup import (
    GRACE_S,
    RANKS,
    RUN_TIMEOUT_S,
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
from cara_jax.adapters.device_pool import PoolConfig, PoolFullError
from cara_jax.engine import Engine, EngineConfig, RequestRecord
from cara_jax.engine.runner import Program
from cara_jax.sampling_params import SamplingParams

GOAL = "cpu_assist <= 1.10x cached, far below sync"
MODES = ("cached", "cpu_assist", "sync")  # cached first: the baseline of every ratio


# -------------------------------------------------------------------------------- cold start


@dataclasses.dataclass(frozen=True)
class ColdPlan:
    prompt_len: int = 256
    sequential: int = 3  # requests one at a time (idle engine, previous load finished), per rank
    burst: int = 4  # requests added at once, per rank

    @property
    def cases(self) -> list[tuple[str, int]]:
        return [(kind, r) for kind in ("one at a time", f"burst of {self.burst}") for r in RANKS]


def cold_plan(smoke: bool) -> ColdPlan:
    return ColdPlan(prompt_len=64, sequential=2, burst=2) if smoke else ColdPlan()


def _settle(eng: Engine) -> None:
    """Let background loads finish and the engine drop the CPU workers' copies of loaded adapters,
    so the next request meets an idle engine."""
    for h in eng.pool.resident():
        handle = eng.pool.handle_of(h)
        if handle is not None:
            handle.wait(RUN_TIMEOUT_S)
    eng.step()  # nothing to run: only drops loaded adapters from the CPU workers


def _make_cold(eng: Engine) -> None:
    _settle(eng)
    if eng.config.cold_start == "cached":
        return  # pinned: the baseline where no adapter is ever cold
    for h in eng.pool.resident():
        try:
            eng.pool.evict(h)
        except PoolFullError:
            pass


def _cold_case(eng: Engine, plan: ColdPlan, kind: str, names: list[str], prompts, tag: str,
               until: float) -> list[RequestRecord]:  # fmt: skip
    sp = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    _make_cold(eng)
    if kind == "one at a time":
        recs = []
        for i, name in enumerate(names[: plan.sequential]):
            _settle(eng)
            recs += serve(eng, [(prompts[i], name)], sp, f"{tag}s{i}-", until)
        return recs
    batch = list(zip(prompts[: plan.burst], names[: plan.burst], strict=True))
    return serve(eng, batch, sp, tag, until)


def _cold_engine(loaded, tok, mode: str, plan: ColdPlan, pool: PoolConfig, host_bytes: int,
                 workers: int) -> Engine:  # fmt: skip
    max_len = plan.prompt_len + 16
    # a burst's prompts fit one step whole (budget: burst x prompt tokens), as one prefill
    cfg = EngineConfig(max_num_seqs=plan.burst, max_model_len=max_len,
                       max_prefill_seqs=plan.burst,
                       max_num_batched_tokens=_pow2(plan.burst * plan.prompt_len),
                       kv_cache_memory=kv_cache_bytes(loaded.cfg, loaded.dtype, plan.burst, max_len),
                       cold_start=mode, cpu_workers=workers, pool=pool,
                       host_budget_bytes=host_bytes)  # fmt: skip
    return Engine(loaded, tok, cfg)


def _cold_programs(eng: Engine, plan: ColdPlan) -> list[Program]:
    """The steps the cases run: 1 to ``burst`` whole prompts (prefill, CPU-assisted too), and
    1 to ``burst`` decode rows."""
    prefill = [k * plan.prompt_len for k in range(1, plan.burst + 1)]
    return _programs(eng, prefill + list(range(1, plan.burst + 1)), prefill)


@dataclasses.dataclass
class _CaseResult:
    ttft: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # mode -> seconds
    status: dict[str, str] = dataclasses.field(default_factory=dict)  # mode -> why no number
    cold: list[bool] = dataclasses.field(default_factory=list)  # non-cached modes' records
    cpu_prefills: int = 0
    cpu_fallbacks: int = 0
    hot_compiles: int = 0


def _cold_mode(ctx: Ctx, mode: str, loaded, tok, plan: ColdPlan, adapters: AdapterSet,
               names: dict[int, list[str]], prompts, results: dict, shared: list[CompiledSteps],
               pool: PoolConfig, host_bytes: int, workers: int) -> None:  # fmt: skip
    eng = _cold_engine(loaded, tok, mode, plan, pool, host_bytes, workers)
    try:
        for rank_names in names.values():
            for n in rank_names:
                eng.load_adapter(n, adapters.paths[n])
        for steps in shared:
            steps.give(eng)
        _compile(eng, _cold_programs(eng, plan))
        shared.append(CompiledSteps.of(eng))
        # untimed: one burst and one single request (first use of every host path and shape)
        until = ctx.deadline + GRACE_S
        burst = f"burst of {plan.burst}"
        _cold_case(eng, plan, burst, names[max(RANKS)], prompts, f"{mode}-w-", until)
        _cold_case(eng, plan, "one at a time", names[min(RANKS)], prompts, f"{mode}-w1-", until)
        for kind, rank in plan.cases:
            res: _CaseResult = results[(kind, rank)]
            if _past(ctx):
                res.status[mode] = "skipped: time budget"
                continue
            hot = eng.runner.hot_compiles
            cpu0 = dict(eng.cpu_stats)
            tag = f"{mode}-{kind[0]}{rank}-"
            recs = _cold_case(eng, plan, kind, names[rank], prompts, tag, until)
            res.hot_compiles += eng.runner.hot_compiles - hot
            if any(r.finish_reason != "length" or r.ttft is None for r in recs):
                res.status[mode] = "error: " + ",".join(str(r.finish_reason) for r in recs)
                continue
            res.ttft[mode] = [r.ttft for r in recs]
            if mode != "cached":
                res.cold += [r.cold for r in recs]
            if mode == "cpu_assist":
                st, pre = eng.cpu_stats, "cara_cpu_assist_"
                res.cpu_prefills += st[pre + "prefills_total"] - cpu0[pre + "prefills_total"]
                res.cpu_fallbacks += st[pre + "fallbacks_total"] - cpu0[pre + "fallbacks_total"]
    finally:
        eng.close()


def _ms(xs: list[float] | None) -> float | None:
    return None if not xs else round(statistics.median(xs) * 1e3, 1)


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def cold_start_section(ctx: Ctx) -> list[dict]:
    if (skip := _needs_gpu(ctx)) is not None:
        return skip
    cfg = model_config(ctx.smoke)
    dtype = _dtype(ctx.smoke)
    plan = cold_plan(ctx.smoke)
    n_per_rank = max(plan.sequential, plan.burst)
    loaded = random_model(cfg, dtype)
    tok = id_tokenizer(cfg.vocab_size)
    adapters = AdapterSet.for_config(cfg)
    names = {r: adapters.names(r, n_per_rank) for r in RANKS}
    all_names = [n for ns in names.values() for n in ns]
    pool = pool_config(cfg, dtype, [adapters.ranks[n] for n in all_names])
    host_bytes = max(EngineConfig.host_budget_bytes, 2 * adapters.nbytes(all_names))
    workers = 1 if ctx.smoke else max(1, min(8, (os.cpu_count() or 2) // 2))
    prompts = _prompts(n_per_rank, plan.prompt_len, cfg.vocab_size, seed=11)
    results = {case: _CaseResult() for case in plan.cases}
    shared: list[CompiledSteps] = []  # compiled by earlier modes' engines
    for mode in MODES:
        if _past(ctx):
            for res in results.values():
                res.status.setdefault(mode, "skipped: time budget")
            continue
        try:
            _cold_mode(ctx, mode, loaded, tok, plan, adapters, names, prompts, results, shared,
                       pool, host_bytes, workers)  # fmt: skip
        except Exception as e:  # one broken mode must not hide the others
            traceback.print_exc()
            for res in results.values():
                res.status.setdefault(mode, f"error: {type(e).__name__}: {str(e)[:160]}")
    rows = []
    for (kind, rank), res in results.items():
        ms = {m: _ms(res.ttft.get(m)) for m in MODES}
        cell = {m: ms[m] if ms[m] is not None else res.status.get(m, "-") for m in MODES}
        ca, ca_ratio = ms["cpu_assist"], _ratio(ms["cpu_assist"], ms["cached"])
        met = "-"
        if ca is not None and ms["cached"] and ms["sync"] is not None:
            met = "met" if ca <= 1.10 * ms["cached"] and ca < ms["sync"] else "missed"
        notes = [f"cold {sum(res.cold)}/{len(res.cold)}"]
        if "cpu_assist" in res.ttft:
            notes.append(f"cpu-assisted {res.cpu_prefills}, fallbacks {res.cpu_fallbacks}")
        if res.hot_compiles:
            notes.append(f"{res.hot_compiles} compiles while timed")
        rows.append({
            "case": kind, "rank": rank, "requests": plan.sequential if kind == "one at a time" else plan.burst,
            "prompt": plan.prompt_len, "layers": _layers_label(cfg, ctx.smoke), "dtype": jnp.dtype(dtype).name,
            "cached_ms": cell["cached"], "cpu_assist_ms": cell["cpu_assist"], "sync_ms": cell["sync"],
            "cpu_assist/cached": ca_ratio, "sync/cached": _ratio(ms["sync"], ms["cached"]),
            "goal": f"{met} ({GOAL})", "notes": "; ".join(notes),
            "ok": not any(s.startswith("error") for s in res.status.values()),
        })  # fmt: skip
        print(rows[-1], flush=True)
    if rows:
        rows[0]["notes"] += f"; CPU workers: {workers}; TTFT: median over the case's requests"
    return rows
