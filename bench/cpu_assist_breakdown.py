"""Timing breakdown of one CPU-assisted prefill, per projection group, beside the cached prefill.

    python -m bench.cpu_assist_breakdown [--prompt-len 128] [--rank 16] [--batch 1]

SmolLM2 float32 with a random all-linear adapter. The adapter's load is held at layer group 0,
so every layer's LoRA delta comes from the CPU workers; the same prompt then runs with the
adapter resident (the ``cached`` ideal). Reports, per group of projections sharing an input:
copy out (device rows -> shared memory, workers woken), wait (fetch blocked on the workers:
CPU work not hidden behind the base GEMMs), copy back (deltas into the step's buffer), and the
whole prefill's time in both modes.
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.lib.report import write_report
from bench.systems.common import compile_progress, kv_cache_bytes
from cara_jax.adapters.device_pool import PoolConfig
from cara_jax.adapters.random_peft import write_random_peft
from cara_jax.embedded import default_model_path
from cara_jax.engine import Engine, EngineConfig
from cara_jax.sampling_params import SamplingParams
from cara_jax.tokenizer import Tokenizer
from cara_jax.weights import load_model


def _prefill_time(eng: Engine, prompts: list[list[int]], adapter: str) -> float:
    sp = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    t0 = time.perf_counter()
    for p in prompts:
        eng.add_request(p, sp, adapter)
    while not eng.finished_requests or len(eng.finished_requests) < len(prompts):
        eng.step()
    eng.finished_requests.clear()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument(
        "--no-warmup",
        action="store_true",
        help="compile lazily: one untimed round first instead of every program",
    )
    args = ap.parse_args(argv)
    path = default_model_path()
    loaded = load_model(path)
    tok = Tokenizer.from_path(path)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, 40000, size=args.prompt_len).tolist() for _ in range(args.batch)]
    max_len = 1 << (args.prompt_len + 1).bit_length()
    seqs = max(2, args.batch)
    # the whole batch's prompts in one step, as one prefill (a budget of batch x prompt tokens),
    # and no smaller step: one program, and its CPU-assisted twin
    budget = max(16, 1 << (args.batch * args.prompt_len - 1).bit_length())
    cfg = EngineConfig(max_num_seqs=seqs, max_model_len=max_len, max_prefill_seqs=args.batch,
                       max_num_batched_tokens=budget, min_token_bucket=budget,
                       cold_start="cpu_assist",
                       cpu_workers=args.workers,
                       kv_cache_memory=kv_cache_bytes(loaded.cfg, loaded.dtype, seqs, max_len),
                       pool=PoolConfig(max_rank=max(16, args.rank)))  # fmt: skip
    eng = Engine(loaded, tok, cfg)
    with tempfile.TemporaryDirectory() as tmp:
        write_random_peft(Path(tmp) / "a", loaded.cfg, args.rank, seed=1)
        eng.load_adapter("a", Path(tmp) / "a")
        h = eng.registry.entry("a").content_hash
        if not args.no_warmup:
            eng.warmup(progress=compile_progress(True, "compiling"))
        cold, warm = [], []
        for i in range(args.repeats + args.no_warmup):
            if eng.pool.is_resident(h):
                eng.pool.evict(h)
            go = threading.Event()
            eng.pool.group_gate = lambda _h, _g, go=go: go.wait(600)
            eng.cpu_timings.clear()
            cold.append(_prefill_time(eng, prompts, "a"))
            timings = list(eng.cpu_timings)
            go.set()
            eng.pool.group_gate = None
            eng.pool.handle_of(h).wait(60)
            warm.append(_prefill_time(eng, prompts, "a"))
            if args.no_warmup and i == 0:  # that round compiled the programs it used
                cold.pop(), warm.pop()
    eng.close()
    by_group: dict[tuple, list] = collections.defaultdict(list)
    for t in timings:
        by_group[t.projs].append(t)
    lines = [
        f"# CPU-assisted prefill breakdown: SmolLM2-135M float32, {args.batch} x {args.prompt_len}"
        f"-token prompt(s), rank {args.rank} on all 7 projections, {args.workers} CPU workers",
        "",
        "Every layer's delta from the CPU (load held at group 0). Per projection group, mean over "
        "the 30 layers of the last repeat, in ms:",
        "",
        "| group | copy out | wait for workers | copy back | submit->fetch span |",
        "|---|---:|---:|---:|---:|",
    ]
    for projs, ts in by_group.items():
        m = lambda f, ts=ts: 1e3 * float(np.mean([f(t) for t in ts]))  # noqa: E731
        lines.append(f"| {'/'.join(p.removesuffix('_proj') for p in projs)} | "
                     f"{m(lambda t: t.copy_out_s):.2f} | {m(lambda t: t.wait_s):.2f} | "
                     f"{m(lambda t: t.copy_back_s):.2f} | {m(lambda t: t.span_s):.2f} |")  # fmt: skip
    c, w = float(np.median(cold)), float(np.median(warm))
    lines += ["", f"Whole request (prefill + 1 token), median of {args.repeats}: cpu_assist "
              f"{c * 1e3:.0f} ms, cached {w * 1e3:.0f} ms, ratio {c / w:.2f}x."]  # fmt: skip
    write_report(args.out, "cpu_assist_breakdown", lines,
                 {"args": vars(args), "cold_s": cold, "cached_s": warm})  # fmt: skip


if __name__ == "__main__":
    main()
