"""Profile decode and prefill step latency on this device and fit the scheduling cost models.

    cara-jax profile --out cost_model.json [--quick] [--model PATH] [--kernels bgmv,mbgmv]

Why: admission and routing (cara_jax/scheduling) predict a step's latency from the ranks in the
batch, and the coefficients belong to one device, model, dtype and kernel, so they are measured
where the server runs. This builds a real Engine (random PEFT adapters of each rank written to a
temporary folder and pinned on the device) and times engine steps on its runner
(``synthetic_batch`` / ``time_step``, one runner per kernel): decode steps over a grid of batch
size x rank mix x kernel (each row on an adapter of its rank, plus base-model steps) and
prefill steps (one whole-prompt chunk per prompt length x rank). Each step is timed to its
tokens (``block_until_ready``) in interleaved rounds after a warm-up call; the models of
cost_model.py are fitted on the minimum (``--stat``) of the repeats and saved.

A step program is keyed by its token bucket only (the LoRA loops' trip counts are data at run
time), so the grid compiles one program per (kernel, token bucket) it touches, up front: the
full grid about six (decode buckets, prefill 32/128/256, the second kernel's decode buckets),
``--quick`` three; a program takes about 15-35 s to compile on a 2-core CPU
(``--compile-cache`` keeps them for a rerun). ``--refit FILE`` refits the samples a file
already holds.

Caveats: decode runs at one KV length (the cost model ignores context length) and the rows of a
synthetic batch share their KV pages; a batch reuses ``--adapters-per-rank`` distinct adapters
per rank (rows beyond that share adapters). The recorded ``Buckets`` are the engine's: decode
rows and prefill tokens pad to the token buckets, ranks to multiples of 16; MBGMV's summed
rank rounds up to a multiple of 32 (the engine's loop blocks).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cara_jax.adapters.random_peft import write_random_peft
from cara_jax.config import PROJECTIONS

QUICK = {"batches": "2", "ranks": "8,64", "prefill_lens": "32", "prefill_ranks": "0,64"}
FULL = {"batches": "4,8,16", "ranks": "8,16,32,64", "prefill_lens": "32,128,256",
        "prefill_ranks": "0,8,16,32,64"}  # fmt: skip
PROJS = PROJECTIONS


def rank_mixes(batch: int, ranks: list[int]) -> dict[str, list[int]]:
    """Rank mixes of one batch size: uniform per rank, all ranks cycled, one large among small.
    The last two separate the kernels: max rank is the largest, the sum is not."""
    lo, hi = min(ranks), max(ranks)
    mixes = {f"uniform{r}": [r] * batch for r in ranks}
    if len(ranks) > 1:
        mixes["cycle"] = [ranks[i % len(ranks)] for i in range(batch)]
        if batch > 1:
            mixes["one_large"] = [lo] * (batch - 1) + [hi]
    return mixes


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call, waiting for its device result."""
    w, c = time.perf_counter(), time.process_time()
    fn().block_until_ready()
    return time.perf_counter() - w, time.process_time() - c


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cara-jax profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--out", required=True, help="cost-model JSON (merged if it exists)")
    p.add_argument("--quick", action="store_true", help="a tiny grid (tests, smoke runs)")
    p.add_argument("--model", help="GGUF file or HF folder (default: embedded SmolLM2)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--kernels", default="bgmv,mbgmv")
    p.add_argument("--batches", help=f"decode batch sizes (default {FULL['batches']})")
    p.add_argument("--ranks", help=f"adapter ranks (default {FULL['ranks']})")
    p.add_argument("--prefill-lens", help=f"prompt lengths (default {FULL['prefill_lens']})")
    p.add_argument("--prefill-ranks", help=f"default {FULL['prefill_ranks']} (0 = no adapter)")
    p.add_argument("--min-token-bucket", type=int,
                   help="smallest step program in tokens (default: EngineConfig's)")  # fmt: skip
    p.add_argument("--adapters-per-rank", type=int, help="distinct adapters per rank (default 4)")
    p.add_argument("--kv-position", type=int, default=100, help="decode position (KV length)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per point (compiles)")
    p.add_argument("--repeats", type=int, default=9, help="timing rounds over the whole grid")
    p.add_argument(
        "--stat",
        choices=["median", "min"],
        default="min",
        help="statistic of the repeats to fit (default min: other processes only ever add "
        "time, so on a shared machine the median follows their load; both are stored)",
    )
    p.add_argument("--refit", metavar="FILE", help="refit the samples stored in FILE, no profiling")
    p.add_argument("--compile-cache", help="persistent XLA compilation cache folder (reruns)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.refit:
        return refit(args)
    grid = QUICK if args.quick else FULL
    batches = _ints(args.batches or grid["batches"])
    ranks = sorted(set(_ints(args.ranks or grid["ranks"])))
    prefill_lens = _ints(args.prefill_lens or grid["prefill_lens"])
    prefill_ranks = _ints(args.prefill_ranks or grid["prefill_ranks"])
    kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    per_rank = args.adapters_per_rank or (1 if args.quick else 4)
    if args.quick:
        args.repeats, args.warmup = min(args.repeats, 3), min(args.warmup, 1)
    if not set(prefill_ranks) <= {0, *ranks}:
        raise SystemExit("--prefill-ranks must be 0 or among --ranks")

    import jax
    import jax.numpy as jnp

    from cara_jax.adapters.device_pool import PoolConfig
    from cara_jax.embedded import DEFAULT_MODEL_ID, default_model_path
    from cara_jax.engine import Engine, EngineConfig
    from cara_jax.engine.runner import ModelRunner
    from cara_jax.kv_cache import bytes_per_token
    from cara_jax.scheduling.cost_model import Buckets
    from cara_jax.tokenizer import Tokenizer
    from cara_jax.weights import DTYPES, load_model

    t_start = time.perf_counter()
    if args.compile_cache:
        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    defaults = EngineConfig()
    min_bucket = args.min_token_bucket or defaults.min_token_bucket
    # the token budget: the smallest power-of-two multiple of the smallest bucket that holds the
    # largest step of the grid, so every step is one whole program (buckets min_bucket * 2^k)
    budget = min_bucket
    while budget < max(*batches, *prefill_lens):
        budget *= 2
    max_len = max(256, 2 * max(prefill_lens), args.kv_position + 2)
    max_len = 1 << (max_len - 1).bit_length()
    model_path = Path(args.model) if args.model else default_model_path()
    dtype = DTYPES[args.dtype]
    loaded = load_model(model_path, dtype=dtype)
    cfg = loaded.cfg
    # a device pool sized for exactly the profile's adapters
    shapes = cfg.projection_shapes()
    row_bytes = sum(sum(shapes[p]) for p in PROJS) * cfg.num_layers * jnp.dtype(dtype).itemsize
    pool = PoolConfig(
        budget_bytes=(per_rank * sum(ranks) + 1) * row_bytes, max_rank=max(ranks),
        max_adapters=per_rank * len(ranks) + 1,
    )  # fmt: skip
    # KV pages for the largest decode batch at its context and the longest prompt, and at least
    # one whole max_len sequence (synthetic batches reuse pages; only their count matters)
    bs = defaults.block_size
    pages = max(batches) * -(-(args.kv_position + 1) // bs) + -(-max(prefill_lens) // bs)
    pages = max(pages, -(-max_len // bs)) + 1
    engine = Engine(
        loaded, Tokenizer.from_path(model_path),
        EngineConfig(max_num_seqs=max(max(batches), defaults.max_num_seqs), max_model_len=max_len,
                     max_num_batched_tokens=budget, min_token_bucket=min_bucket,
                     kv_cache_memory=pages * bs * bytes_per_token(cfg, dtype), cold_start="cached",
                     lora_strategy=kernels[0], pool=pool),
    )  # fmt: skip
    slots: dict[int, list[int]] = {}
    with tempfile.TemporaryDirectory(prefix="cara-profile-") as tmp:
        for r in ranks:
            for k in range(per_rank):
                name = f"r{r}-{k}"
                write_random_peft(Path(tmp) / name, cfg, r, seed=1000 * r + k)
                entry = engine.load_adapter(name, Path(tmp) / name)
                slots.setdefault(r, []).append(engine.pool.slot_of(entry.content_hash))
    # one runner per kernel (the strategy is compiled in); they share parameters and the pool
    runners = {kernels[0]: engine.runner}
    for k in kernels[1:]:
        runners[k] = ModelRunner(engine.loaded, engine.runner.config, engine.pool, k)

    def slot_list(batch_ranks: list[int]) -> list[int]:
        used: dict[int, int] = {}
        out = []
        for r in batch_ranks:
            out.append(slots[r][used.get(r, 0) % per_rank] if r else 0)
            used[r] = used.get(r, 0) + 1
        return out

    tasks: list[dict[str, Any]] = []
    for b in batches:
        tasks.append({"kind": "decode", "kernel": None, "mix": "base", "ranks": [0] * b})
        for k in kernels:
            for mix, rs in rank_mixes(b, ranks).items():
                tasks.append({"kind": "decode", "kernel": k, "mix": mix, "ranks": rs})
    for n_tok in prefill_lens:
        for r in prefill_ranks:
            tasks.append({"kind": "prefill", "lengths": [n_tok], "ranks": [r]})

    def make_batch(task: dict[str, Any]) -> tuple[ModelRunner, Any]:
        ad = slot_list(task["ranks"])
        if task["kind"] == "decode":
            runner = runners[task["kernel"] or kernels[0]]
            return runner, runner.synthetic_batch(ad, ctx=args.kv_position)
        runner = runners[kernels[0]]
        return runner, runner.synthetic_batch([], task["lengths"], prompt_slots=ad)

    def make_call(runner: ModelRunner, batch) -> Callable[[], Any]:
        def call():
            with engine.pool.lock:  # a dispatch reads the pool's tables
                return runner.time_step(batch)

        return call

    batches_of = [make_batch(t) for t in tasks]
    calls = [make_call(r, b) for r, b in batches_of]
    rng = np.random.default_rng(0)

    # Compile the grid's programs first (a token bucket per runner, ``compile_threads`` at a
    # time), then warm every point, then time in rounds, each round visiting every point once
    # in a fresh random order: on a shared machine a busy spell then inflates one sample of
    # many points instead of all samples of a few.
    programs = list(dict.fromkeys((r, r.program_for(b)) for r, b in batches_of))
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=len(programs), desc="compiling steps", unit="program", file=sys.stderr)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, engine.config.compile_threads)) as ex:
        for _ in ex.map(lambda rp: rp[0].compile(rp[1]), programs):
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
        total = len(tasks) * (args.warmup + args.repeats)
        bar = tqdm(total=total, desc="profiling steps", unit="step", file=sys.stderr)
    wall: list[list[float]] = [[] for _ in tasks]
    cpu: list[list[float]] = [[] for _ in tasks]
    for task, fn in zip(tasks, calls, strict=True):
        if bar is not None:
            bar.set_postfix_str(f"warm-up {task['kind']} {task.get('kernel') or ''} "
                                f"{task.get('mix') or task['lengths']}")  # fmt: skip
        for _ in range(args.warmup):
            timed(fn)
            if bar is not None:
                bar.update()
    for k in range(args.repeats):
        if bar is not None:
            bar.set_postfix_str(f"round {k + 1}/{args.repeats}")
        for i in rng.permutation(len(tasks)):
            w, c = timed(calls[i])
            wall[i].append(w)
            cpu[i].append(c)
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    pick = {"median": statistics.median, "min": min}[args.stat]
    samples = [
        {**task, "latency_s": pick(w), "median_s": statistics.median(w), "min_s": min(w),
         "times_s": w, "cpu_s": c}
        for task, w, c in zip(tasks, wall, cpu, strict=True)
    ]  # fmt: skip

    c = engine.runner.config
    buckets = Buckets(
        rows=tuple(sorted({c.decode_rows(t) for t in c.token_buckets})),
        rank=engine.runner.rank_buckets(), total_rank=engine.runner.total_rank_buckets(),
        prefill_len=c.token_buckets,
        prefill_batch=c.max_prefill_seqs,
    )  # fmt: skip
    model_name = DEFAULT_MODEL_ID if args.model is None else Path(args.model).stem
    device = jax.devices()[0].device_kind
    meta = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "jax": jax.__version__, "backend": jax.default_backend(),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "grid": {"batches": batches, "ranks": ranks, "prefill_lens": prefill_lens,
                 "prefill_ranks": prefill_ranks, "adapters_per_rank": per_rank,
                 "kv_position": args.kv_position, "warmup": args.warmup,
                 "repeats": args.repeats, "stat": args.stat, "quick": args.quick},
        "engine": {"token_buckets": list(c.token_buckets), "max_num_seqs": c.max_num_seqs,
                   "max_prefill_seqs": c.max_prefill_seqs,
                   "compile_seconds": round(sum(r.compile_seconds for r in runners.values()), 1),
                   "hot_compiles": sum(r.hot_compiles for r in runners.values())},
        "profile_seconds": round(time.perf_counter() - t_start, 1),
    }  # fmt: skip
    fit_and_save(samples, kernels, model_name, device, args.dtype, buckets, meta, args.stat,
                 args.out)  # fmt: skip
    print(f"saved {args.out} ({meta['profile_seconds']:.0f} s)")
    engine.close()
    return 0


def fit_and_save(
    samples: list[dict[str, Any]],
    kernels: list[str],
    model: str,
    device: str,
    dtype: str,
    buckets,
    meta: dict[str, Any],
    stat: str,
    out: str,
) -> None:
    """Fit each kernel's models on the ``stat`` of the repeats, save them, print R^2.

    The R^2 of the other statistic go into ``meta["r2_by_stat"]`` for the record: on a busy
    machine the median follows the other processes' load, the minimum the step's own cost."""
    from cara_jax.scheduling.cost_model import fit_cost_model

    def with_stat(st: str) -> list[dict[str, Any]]:
        return [{**x, "latency_s": x[f"{st}_s"]} for x in samples]

    for k in kernels:
        r2 = {}
        for st in ("median", "min"):
            cm = fit_cost_model(with_stat(st), k, model, device, dtype, buckets, meta)
            r2[st] = {"decode": cm.decode.r2, "base": cm.base.r2, "prefill": cm.prefill.r2}
        cm = fit_cost_model(with_stat(stat), k, model, device, dtype, buckets,
                            {**meta, "stat": stat, "r2_by_stat": r2})  # fmt: skip
        cm.save(out)
        paper = cm.alternatives.get("decode:work+one")
        print(
            f"{cm.key}: decode R^2 {cm.decode.r2:.3f} ({'+'.join(cm.decode.features)}"
            f"{'' if paper is None else f'; paper form a*X+b: {paper.r2:.3f}'}), "
            f"base R^2 {cm.base.r2:.3f}, prefill R^2 {cm.prefill.r2:.3f} "
            f"({'+'.join(cm.prefill.features)}); fitted on the {stat} of the repeats"
        )
        print("  " + describe(cm))


def refit(args: argparse.Namespace) -> int:
    """Refit the samples stored in a cost-model file (another --stat, a changed fit rule)."""
    from cara_jax.scheduling.cost_model import load_cost_models

    kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    models = [m for m in load_cost_models(args.refit).values() if m.kernel in kernels]
    if args.model is not None:
        models = [m for m in models if m.model == Path(args.model).stem]
    if not models:
        raise SystemExit(f"{args.refit} holds no model for kernels {kernels}")
    seen: dict[str, dict[str, Any]] = {}
    for m in models:
        for x in m.samples:
            seen.setdefault(json.dumps(x, sort_keys=True), x)
    src = models[0]
    meta = {**src.meta, "refit_of": Path(args.refit).name}
    fit_and_save(list(seen.values()), [m.kernel for m in models], src.model, src.device,
                 src.dtype, src.buckets, meta, args.stat, args.out)  # fmt: skip
    return 0


def describe(cm) -> str:
    """One line of coefficients in milliseconds."""

    def fmt(fit) -> str:
        return ", ".join(f"{f}={c * 1e3:.4g}" for f, c in zip(fit.features, fit.coef, strict=True))

    return f"decode [{fmt(cm.decode)}] base [{fmt(cm.base)}] prefill [{fmt(cm.prefill)}] (ms)"


if __name__ == "__main__":
    raise SystemExit(main())
