"""KV capacity of the paged cache, in the memory the old slot cache reserved (8 x 512 tokens).

    python -m bench.capacity [--out bench/results]

1. 32 concurrent 100-token requests (68-token prompts, 32 new tokens): do they all run at once?
2. A 3,000-token prompt beside 8 short requests: everything finishes; how the short ones decode
   while the long prompt is prefilled in chunks.
3. A KV budget too small for the load (a quarter of what it needs): preemption finishes every
   request with the greedy output it has alone.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import numpy as np

from bench.lib.report import write_report
from cara_jax.embedded import default_model_path
from cara_jax.engine import Engine, EngineConfig
from cara_jax.kv_cache import bytes_per_token
from cara_jax.sampling_params import SamplingParams
from cara_jax.tokenizer import Tokenizer
from cara_jax.weights import load_model

OLD_TOKENS = 8 * 512  # the old server default: 8 slots x 512 tokens, reserved up front


def run(eng: Engine, reqs: list[tuple[list[int], SamplingParams]]) -> dict:
    t0 = time.perf_counter()
    ids = [eng.add_request(p, sp) for p, sp in reqs]
    toks = {i: [] for i in ids}
    peak = 0
    while eng.has_unfinished():
        for o in eng.step():
            toks[o.request_id] += o.token_ids
        peak = max(peak, len(eng.running))
    recs = {r.request_id: r for r in eng.finished_requests if r.request_id in toks}
    return {
        "tokens": [toks[i] for i in ids],
        "peak_running": peak,
        "seconds": time.perf_counter() - t0,
        "ttft": [recs[i].ttft for i in ids],
        "tpot": [recs[i].tpot for i in ids],
        "preemptions": sum(recs[i].preemptions for i in ids),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    path = default_model_path()
    loaded, tok = load_model(path), Tokenizer.from_path(path)
    kv = OLD_TOKENS * bytes_per_token(loaded.cfg, loaded.dtype) + 16 * bytes_per_token(
        loaded.cfg, loaded.dtype
    )  # + page 0, which is reserved
    rng = np.random.default_rng(0)
    greedy = lambda n: SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)  # noqa: E731
    eng = Engine(loaded, tok, EngineConfig(kv_cache_memory=kv))
    eng.warmup()
    out: dict = {"kv_cache_bytes": eng.runner.cache.nbytes(), "kv_tokens": eng.blocks.capacity_tokens,
                 "max_model_len": eng.max_len}  # fmt: skip

    # 1. 32 concurrent 100-token requests
    reqs = [(rng.integers(100, 40000, size=68).tolist(), greedy(32)) for _ in range(32)]
    r1 = run(eng, reqs)
    out["concurrent"] = {k: r1[k] for k in ("peak_running", "seconds", "preemptions")}

    # 2. a 3,000-token prompt beside 8 short ones
    long = (rng.integers(100, 40000, size=3000).tolist(), greedy(16))
    short = [(rng.integers(100, 40000, size=64).tolist(), greedy(32)) for _ in range(8)]
    r2 = run(eng, [short[0], long, *short[1:]])
    out["long_prompt"] = {
        "long_ttft_s": r2["ttft"][1], "short_ttft_s": [r2["ttft"][0], *r2["ttft"][2:]],
        "short_tpot_s": [r2["tpot"][0], *r2["tpot"][2:]], "preemptions": r2["preemptions"],
        "finished": sum(len(t) > 0 for t in r2["tokens"]),
    }  # fmt: skip
    mixed = [s for s in eng.steps if s.batch_size and s.prefill_tokens]
    out["long_prompt"]["steps_mixing_decode_and_chunk"] = len(mixed)
    hot = eng.runner.hot_compiles
    eng.close()

    # 3. a quarter of the memory the load needs: preemption, same greedy tokens as alone
    reqs3 = [(rng.integers(100, 40000, size=int(rng.integers(40, 120))).tolist(), greedy(48))
             for _ in range(16)]  # fmt: skip
    need = sum(len(p) + 48 for p, _ in reqs3)
    small = Engine(loaded, tok, EngineConfig(
        kv_cache_memory=(need // 4) * bytes_per_token(loaded.cfg, loaded.dtype),
        max_model_len=512,
    ))  # fmt: skip
    small.warmup()
    r3 = run(small, reqs3)
    alone = [run(small, [r])["tokens"][0] for r in reqs3]
    out["preemption"] = {
        "kv_tokens": small.blocks.capacity_tokens, "tokens_needed": need,
        "preemptions": small.scheduler.preemptions,
        "finished": sum(len(t) == 48 for t in r3["tokens"]),
        "same_as_alone": sum(a == b for a, b in zip(alone, r3["tokens"], strict=True)),
    }  # fmt: skip
    hot += small.runner.hot_compiles
    small.close()
    out["hot_compiles"] = hot

    c, lp, pr = out["concurrent"], out["long_prompt"], out["preemption"]
    lines = [
        "# KV capacity in the old default's memory (8 x 512 tokens)",
        "",
        f"SmolLM2-135M float32, {platform.machine()} with {os.cpu_count()} CPUs, jax "
        f"{jax.__version__} on {jax.devices()[0].platform}. KV cache "
        f"{out['kv_cache_bytes'] / 2**20:.0f} MiB = {out['kv_tokens']} tokens in 16-token pages; "
        f"max_model_len {out['max_model_len']} (the old default: 8 slots of 512).",
        "",
        "| case | result |",
        "|---|---|",
        f"| 32 concurrent 100-token requests | {c['peak_running']} ran at once, "
        f"{c['preemptions']} preemptions, all done in {c['seconds']:.1f} s |",
        f"| 3,000-token prompt beside 8 short ones | {lp['finished']}/9 finished; long TTFT "
        f"{lp['long_ttft_s']:.1f} s; short TPOT p50 {np.median(lp['short_tpot_s']) * 1e3:.0f} ms; "
        f"{lp['steps_mixing_decode_and_chunk']} steps decoded beside a prompt chunk |",
        f"| KV for a quarter of the load ({pr['kv_tokens']} of {pr['tokens_needed']} tokens) "
        f"| {pr['preemptions']} preemptions; {pr['finished']}/16 finished; "
        f"{pr['same_as_alone']}/16 with the greedy output they have alone |",
        "",
        f"Programs compiled while serving: {out['hot_compiles']}.",
    ]
    write_report(args.out, "capacity", lines, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
