"""End-to-end serving under Poisson arrivals over 16 adapters: cara-jax engine vs HF+PEFT.

    python -m bench.engine_poisson [--requests 48] [--rate 2.0] [--adapters 16] [--new-tokens 32]

One seeded trace (arrival times, prompt token ids, adapter per request) is replayed by both
systems in the same run. Greedy decoding, fixed output length (ignore EOS) so both produce the
same number of tokens.
- cara-jax: the continuous-batching Engine (sync cold start: adapters start on the host).
- HF+PEFT, served as users do it: take every arrived request (up to --max-batch), run one
  mixed-adapter batch (PeftModel with adapter_names, left padding, KV cache, token by token so
  each token's time is recorded), then take the next batch. Requests arriving meanwhile wait.
Metrics: throughput (generated tok/s over the makespan), TTFT and TPOT p50/p99.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from bench.lora_decode import write_peft_adapter
from bench.report import write_report
from cara_jax.embedded import default_model_path
from cara_jax.engine import Engine, EngineConfig
from cara_jax.sampling_params import SamplingParams
from cara_jax.tokenizer import Tokenizer
from cara_jax.weights import load_model


def make_trace(n: int, rate: float, n_adapters: int, seed: int, vocab: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    t = np.cumsum(rng.exponential(1.0 / rate, size=n))
    return [
        {"arrival": float(t[i]), "adapter": f"a{int(rng.integers(n_adapters))}",
         "prompt": rng.integers(100, vocab - 100, size=int(rng.integers(32, 129))).tolist()}
        for i in range(n)
    ]  # fmt: skip


def _stats(ttft: list[float], tpot: list[float], tokens: int, makespan: float) -> dict:
    p = lambda v, q: float(np.percentile(v, q)) if v else float("nan")  # noqa: E731
    return {
        "throughput_tok_s": tokens / makespan, "makespan_s": makespan,
        "ttft_p50": p(ttft, 50), "ttft_p99": p(ttft, 99), "tpot_p50": p(tpot, 50), "tpot_p99": p(tpot, 99),
    }  # fmt: skip


def run_cara(trace, adapter_dirs, new_tokens: int, num_slots: int, warmups: int = 2) -> dict:
    path = default_model_path()
    eng = Engine(load_model(path), Tokenizer.from_path(path),
                 EngineConfig(num_slots=num_slots, max_len=256, max_prefill_batch=8))  # fmt: skip
    for name, d in adapter_dirs.items():
        eng.load_adapter(name, d)
    sp = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)

    def replay(tag: str):
        times: dict[str, list[float]] = {}
        arrive: dict[str, float] = {}
        t0 = time.perf_counter()
        i = 0
        while i < len(trace) or eng.has_unfinished():
            now = time.perf_counter() - t0
            while i < len(trace) and trace[i]["arrival"] <= now:
                rid = eng.add_request(
                    trace[i]["prompt"], sp, trace[i]["adapter"], request_id=f"{tag}{i}"
                )
                arrive[rid], times[rid] = trace[i]["arrival"], []
                i += 1
            if not eng.has_unfinished():
                time.sleep(min(0.01, max(0.0, trace[i]["arrival"] - now)))
                continue
            for out in eng.step():
                if out.token_ids and out.request_id in times:
                    times[out.request_id] += [time.perf_counter() - t0] * len(out.token_ids)
        return times, arrive, time.perf_counter() - t0

    # Warm-up as a server does at start: compile every step variant, then one untimed replay
    # (first-use host costs); the timed replay reports any compile it still needed.
    t_w = time.perf_counter()
    eng.warmup(progress=True)
    warmup_s = time.perf_counter() - t_w
    for w in range(warmups):
        replay(f"w{w}-")
    compiled = eng.runner.compiled_count()
    times, arrive, makespan = replay("r")
    new_compiles = eng.runner.compiled_count() - compiled
    eng.close()
    ttft = [v[0] - arrive[k] for k, v in times.items()]
    tpot = [(v[-1] - v[0]) / (len(v) - 1) for v in times.values() if len(v) > 1]
    res = _stats(ttft, tpot, sum(len(v) for v in times.values()), makespan)
    res["compiles_during_timed_run"] = new_compiles
    res["warmup_s"] = warmup_s
    res["variants"] = compiled
    return res


def run_hf(trace, adapter_dirs, new_tokens: int, max_batch: int) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, DynamicCache

    torch.set_num_threads(os.cpu_count() or 1)
    path = default_model_path()
    base = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    names = list(adapter_dirs)
    model = PeftModel.from_pretrained(base, adapter_dirs[names[0]], adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(adapter_dirs[n], adapter_name=n)
    model.eval()

    def serve(batch: list[dict], t0: float, times: list[list[float]]) -> None:
        width = max(len(r["prompt"]) for r in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, r in enumerate(batch):  # left padding
            ids[j, width - len(r["prompt"]) :] = torch.tensor(r["prompt"])
            mask[j, width - len(r["prompt"]) :] = 1
        an = [r["adapter"] for r in batch]
        cache = DynamicCache()
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                        adapter_names=an, use_cache=True, logits_to_keep=1)  # fmt: skip
            for step in range(new_tokens):
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
                now = time.perf_counter() - t0
                for t in times:
                    t.append(now)
                if step == new_tokens - 1:
                    break
                mask = torch.cat([mask, torch.ones_like(tok)], dim=1)
                pos = pos[:, -1:] + 1
                out = model(input_ids=tok, attention_mask=mask, position_ids=pos,
                            past_key_values=cache, adapter_names=an, use_cache=True)  # fmt: skip

    serve(trace[:2], time.perf_counter(), [[], []])  # warm-up
    t0 = time.perf_counter()
    i, ttft, tpot, tokens = 0, [], [], 0
    while i < len(trace):
        now = time.perf_counter() - t0
        if trace[i]["arrival"] > now:
            time.sleep(trace[i]["arrival"] - now)
            continue
        batch = []
        while (
            i < len(trace)
            and trace[i]["arrival"] <= time.perf_counter() - t0
            and len(batch) < max_batch
        ):
            batch.append(trace[i])
            i += 1
        times = [[] for _ in batch]
        serve(batch, t0, times)
        for r, v in zip(batch, times, strict=True):
            ttft.append(v[0] - r["arrival"])
            tpot.append((v[-1] - v[0]) / (len(v) - 1))
            tokens += len(v)
    return _stats(ttft, tpot, tokens, time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--rate", type=float, default=2.0, help="mean arrivals per second")
    ap.add_argument("--adapters", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--num-slots", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmups", type=int, default=1, help="untimed cara-jax replays first")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    cfg = load_model(default_model_path()).cfg
    trace = make_trace(args.requests, args.rate, args.adapters, args.seed, cfg.vocab_size)
    ranks = [8, 16, 32, 64]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {}
        for k in range(args.adapters):
            dirs[f"a{k}"] = Path(tmp) / f"a{k}"
            write_peft_adapter(dirs[f"a{k}"], cfg, ranks[k % 4], seed=k)
        results["cara-jax"] = run_cara(trace, dirs, args.new_tokens, args.num_slots, args.warmups)
        if not args.no_hf:
            results["HF+PEFT"] = run_hf(trace, dirs, args.new_tokens, args.num_slots)
    lines = [
        f"# Poisson serving: {args.requests} requests at {args.rate}/s over {args.adapters} adapters "
        f"(ranks 8-64, all 7 projections), prompts 32-128 tokens, {args.new_tokens} greedy tokens",
        "",
        f"Machine: {platform.machine()} {os.cpu_count()} cores, jax {jax.__version__}; SmolLM2-135M float32; "
        f"{datetime.date.today().isoformat()}",
        "",
        "| system | tok/s | TTFT p50 s | TTFT p99 s | TPOT p50 ms | TPOT p99 ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    if "compiles_during_timed_run" in results.get("cara-jax", {}):
        c = results["cara-jax"]
        lines.insert(3, f"cara-jax warm-up compiled {c['variants']} step variants in {c['warmup_s']:.0f} s; "
                        f"the timed replay compiled {c['compiles_during_timed_run']} more.\n")  # fmt: skip
    for name, r in results.items():
        lines.append(f"| {name} | {r['throughput_tok_s']:.1f} | {r['ttft_p50']:.2f} | {r['ttft_p99']:.2f} | "
                     f"{r['tpot_p50'] * 1e3:.0f} | {r['tpot_p99'] * 1e3:.0f} |")  # fmt: skip
    if "HF+PEFT" in results:
        c, h = results["cara-jax"], results["HF+PEFT"]
        lines += ["", f"Ratios (cara-jax / HF+PEFT, same run): throughput {c['throughput_tok_s'] / h['throughput_tok_s']:.2f}x, "
                  f"TTFT p50 {h['ttft_p50'] / c['ttft_p50']:.2f}x lower, TPOT p50 {h['tpot_p50'] / c['tpot_p50']:.2f}x lower"]  # fmt: skip
    write_report(args.out, "engine_poisson", lines, {"args": vars(args), "results": results})


if __name__ == "__main__":
    main()
