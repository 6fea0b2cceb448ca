"""End-to-end sections of the GPU check: cold-start TTFT by mode and multi-adapter decode throughput.

Both run the real ``Engine`` on a Llama-2-7B-shaped model with random weights (no download):
hidden 4096, intermediate 11008, 32 heads, 32 KV heads, vocab 32000, bfloat16. Only
``CARA_GPU_CHECK_LAYERS`` of the 32 layers are built (default 8): every program is compiled
per engine and layer count, and at full depth the compiles and the adapter files (640 MB per
rank-64 adapter) do not fit one call beside the kernel checks. Per-layer costs (prefill, adapter
bytes, CPU deltas) scale together, so TTFT ratios keep their meaning; absolute tok/s is higher than
at 32 layers, and host overheads weigh more. Each row records the depth it ran.

- ``cold_start``: requests whose adapter is not on the device (each its own adapter, ranks 16 and
  64 on all seven projections), one at a time and in a small burst, in each cold-start mode;
  median TTFT per mode and the ratios to ``cached`` (adapters pinned on the device, the ideal).
- ``e2e_throughput``: 16 concurrent requests over 16 adapters (``cached``), bgmv and mbgmv decode,
  beside the base model serving the same batch without adapters.

The programs a run uses (one per token bucket the cases reach) are compiled before anything is
timed, once per section where engines share a shape (compiled executables take every buffer as an
argument, so engines of equal runner/pool shapes and LoRA strategy can share them); an untimed
pass of every case then runs first. Rows note any compile that still happened while timing
(should be 0). ``--smoke`` runs tiny shapes and smaller batches on any backend
(about a minute on 2 CPU cores, most of it compiling).
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bench.gpu_ctx import Ctx
from bench.lora_decode import write_peft_adapter
from bench.systems.common import kv_cache_bytes
from cara_jax.adapters.device_pool import PoolConfig, PoolFullError
from cara_jax.config import ModelConfig
from cara_jax.engine import Engine, EngineConfig, RequestRecord
from cara_jax.engine.runner import Program, bucket
from cara_jax.sampling_params import SamplingParams
from cara_jax.tokenizer import Tokenizer
from cara_jax.weights import LoadedModel, build_model

LAYERS_ENV = "CARA_GPU_CHECK_LAYERS"
FULL_LAYERS = 32
DEFAULT_LAYERS = 8
RANKS = (16, 64)
GOAL = "cpu_assist <= 1.10x cached, far below sync"
MODES = ("cached", "cpu_assist", "sync")  # cached first: the baseline of every ratio
RUN_TIMEOUT_S = 600.0  # one served batch that takes longer than this is a hang, not a result
GRACE_S = 60.0  # a batch still running this long after the deadline is aborted (the call's limit)


# ------------------------------------------------------------------------------ shared setup


def model_config(smoke: bool) -> ModelConfig:
    if smoke:
        return ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=176, num_layers=2,
                           num_heads=4, num_kv_heads=4, head_dim=16,
                           max_position_embeddings=4096, name="tiny-random")  # fmt: skip
    layers = int(os.environ.get(LAYERS_ENV, DEFAULT_LAYERS))
    if not 1 <= layers <= FULL_LAYERS:
        raise ValueError(f"{LAYERS_ENV}={layers}: expected 1-{FULL_LAYERS}")
    return ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_layers=layers, num_heads=32, num_kv_heads=32, head_dim=128,
                       max_position_embeddings=4096, name="llama-2-7b-shaped-random")  # fmt: skip


def _layers_label(cfg: ModelConfig, smoke: bool) -> str:
    return f"{cfg.num_layers}" if smoke else f"{cfg.num_layers}/{FULL_LAYERS}"


def _dtype(smoke: bool) -> jnp.dtype:
    return jnp.dtype(jnp.float32 if smoke or jax.default_backend() != "gpu" else jnp.bfloat16)


_MODELS: dict[tuple, LoadedModel] = {}


def random_model(cfg: ModelConfig, dtype: jnp.dtype, seed: int = 0) -> LoadedModel:
    """Random weights: kernels N(0, 1/fan_in), embeddings N(0, 1), norms 1. Built once per
    (config, dtype); generated on the device unless tiny (7B in numpy would take minutes)."""
    key = (cfg, jnp.dtype(dtype).name, seed)
    if key in _MODELS:
        return _MODELS[key]
    from flax import nnx

    from cara_jax.model import Llama

    abstract = nnx.eval_shape(lambda: Llama(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    _, state = nnx.split(abstract)
    on_host = cfg.num_params() < 50_000_000  # tiny: numpy, no per-shape compiles
    rng, np_rng = jax.random.key(seed), np.random.default_rng(seed)
    flat = {}
    leaves = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(state))
    for i, (path, leaf) in enumerate(leaves):
        name = ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        shape = leaf.shape
        if len(shape) == 1:
            flat[name] = np.ones(shape, np.float32)
            continue
        scale = 1.0 if name == "embed_tokens" else shape[0] ** -0.5
        if on_host:
            flat[name] = (np_rng.standard_normal(shape, np.float32) * scale).astype(np.float32)
        else:
            w = jax.random.normal(jax.random.fold_in(rng, i), shape, dtype)
            flat[name] = w * jnp.asarray(scale, dtype)
    loaded = build_model(cfg, flat, dtype)
    _MODELS[key] = loaded
    return loaded


def id_tokenizer(vocab: int) -> Tokenizer:
    """A word-level tokenizer over ids ("t0".."tN"): prompts are token ids, so only the engine's
    streaming detokenization uses it (a real per-token host cost, like a BPE's)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models

    return Tokenizer(Backend(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0")))


class AdapterSet:
    """Random PEFT adapters (all seven projections) written once per model config, shared by the
    sections; ``names(rank, n)`` writes what is missing. Removed when the process exits."""

    _sets: dict[ModelConfig, AdapterSet] = {}

    def __init__(self, cfg: ModelConfig) -> None:
        self.cfg = cfg
        self._tmp = tempfile.TemporaryDirectory(prefix="cara-gpu-check-")
        self.paths: dict[str, Path] = {}
        self.ranks: dict[str, int] = {}

    @classmethod
    def for_config(cls, cfg: ModelConfig) -> AdapterSet:
        if cfg not in cls._sets:
            cls._sets[cfg] = cls(cfg)
        return cls._sets[cfg]

    def names(self, rank: int, n: int) -> list[str]:
        out = [f"r{rank}_{i}" for i in range(n)]
        for i, name in enumerate(out):
            if name not in self.paths:
                path = Path(self._tmp.name) / name
                write_peft_adapter(path, self.cfg, rank, seed=1000 * rank + i)
                self.paths[name], self.ranks[name] = path, rank
        return out

    def nbytes(self, names: list[str]) -> int:
        return sum((self.paths[n] / "adapter_model.safetensors").stat().st_size for n in names)


def pool_config(cfg: ModelConfig, dtype: jnp.dtype, ranks: list[int]) -> PoolConfig:
    """Room for every listed adapter at once (``cached`` pins them all)."""
    per_row = sum(i + o for i, o in cfg.projection_shapes().values()) * cfg.num_layers
    rows = sum(ranks) + max(RANKS) + 1
    return PoolConfig(budget_bytes=rows * per_row * jnp.dtype(dtype).itemsize,
                      max_adapters=len(ranks) + 4, max_rank=max(RANKS))  # fmt: skip


@dataclasses.dataclass
class CompiledSteps:
    """A runner's compiled programs, kept after its engine is closed so a later engine of the
    same runner and pool shapes and LoRA strategy reuses them: compiled steps take params, cache,
    state and the LoRA pool as arguments, so nothing in them belongs to one engine (the runner
    keeps them in its executable table)."""

    key: tuple
    table: dict

    @staticmethod
    def _key(eng: Engine) -> tuple:
        r = eng.runner
        shape = dataclasses.replace(r.config, cpu_assist=False)
        return (shape, eng.pool.config, id(r.params[0]), r.lora_strategy)

    @classmethod
    def of(cls, eng: Engine) -> CompiledSteps:
        return cls(cls._key(eng), dict(getattr(eng.runner, "_exe", {})))

    def give(self, eng: Engine) -> int:
        """Hand ``eng`` these programs if its shapes and LoRA strategy match (every program
        carries the LoRA ops of its strategy; the base model runs the same programs)."""
        table = getattr(eng.runner, "_exe", None)
        if self._key(eng) != self.key or not isinstance(table, dict):
            return 0
        cpu = eng.runner.config.cpu_assist  # CPU-assisted programs only where they can run
        picked = {p: exe for p, exe in self.table.items() if cpu or not p.cpu}
        table.update(picked)
        return len(picked)


def _past(ctx: Ctx) -> bool:
    return time.perf_counter() > ctx.deadline


def serve(eng: Engine, requests: list[tuple[list[int], str | None]], sp: SamplingParams,
          tag: str, until: float = float("inf")) -> list[RequestRecord]:  # fmt: skip
    """Add the requests at once, step until all are done; their records, in request order.
    Past ``until`` (perf_counter) or RUN_TIMEOUT_S, abort them: a hang, not a result."""
    ids = [eng.add_request(p, sp, a, request_id=f"{tag}{i}") for i, (p, a) in enumerate(requests)]
    t_end = min(time.perf_counter() + RUN_TIMEOUT_S, until)
    while eng.has_unfinished():
        eng.step()
        if time.perf_counter() > t_end:
            for rid in ids:
                eng.abort(rid)
            raise TimeoutError(f"requests {tag}* not done in time (engine hung?)")
    recs = {r.request_id: r for r in eng.finished_requests if r.request_id.startswith(tag)}
    return [recs[rid] for rid in ids]


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=length).tolist() for _ in range(n)]


def _compile(eng: Engine, programs: list[Program]) -> None:
    for p in programs:
        eng.runner.compile(p)


def _programs(eng: Engine, tokens: list[int], cpu_tokens: list[int] = ()) -> list[Program]:
    """The engine's programs of the token buckets that steps of ``tokens`` tokens run, and the
    CPU-assisted programs of ``cpu_tokens`` (where the engine has them)."""
    tb = eng.runner.config.token_buckets
    want = {bucket(min(n, tb[-1]), tb) for n in tokens}
    want_cpu = {bucket(min(n, tb[-1]), tb) for n in cpu_tokens}
    return [p for p in eng.runner.programs() if p.tokens in (want_cpu if p.cpu else want)]


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _needs_gpu(ctx: Ctx) -> list[dict] | None:
    if ctx.smoke or jax.default_backend() == "gpu":
        return None
    return [{"note": "skipped: 7B shapes need a GPU (--smoke runs tiny shapes anywhere)"}]


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


def register(section: Callable) -> None:
    """Register both sections with gpu_check's ``section`` decorator (once per registry: when
    gpu_check runs as ``__main__`` its registry is not the imported module's)."""
    if id(section) in _REGISTERED:
        return
    _REGISTERED.add(id(section))
    section("cold_start", "Cold-start TTFT by mode (Llama-7B shapes, random weights)")(
        cold_start_section
    )
    section("e2e_throughput", "Decode throughput: 16 concurrent requests over 16 adapters")(
        e2e_throughput_section
    )
    section("lora_step", "Engine LoRA step on Pallas vs jnp: 16 decode rows over 14 adapters")(
        lora_step_section
    )


_REGISTERED: set[int] = set()
