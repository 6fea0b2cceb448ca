"""Per-request adapter mixtures: streams on their own mixtures vs streams on single adapters,
and the same mixtures merged per request, in one run on cara-serve's default engine.

    python -m bench lora_mixtures [--streams 16] [--adapters 8] [--tokens 64] [--repeats 2]

Three ways to serve 16 streams over 8 adapters (ranks 8/16, all seven projections):
- single: each stream on one adapter (two streams per adapter);
- mixture: each stream on its own mixture of 2 of the 8 at its own weights (a request's
  ``lora`` list): computed in the step, every member at its own rank;
- merged: the same 16 mixtures, each merged first into an adapter of its own (PEFT's cat:
  A's concatenated with the weights folded in, B's concatenated), registered and loaded per
  request, then served: what a server without mixtures asks its users to do;
- dora: each stream on one of 8 DoRA adapters (the single adapters' A and B, plus magnitudes):
  what DoRA's output rescale costs a step;
- vocab: each stream on one of 8 adapters that also put LoRA on the embedding and the LM head
  (the single adapters' A and B, plus those): what those rows cost a step.
Each run submits the 16 streams at once (same prompt length, ``--tokens`` greedy tokens each,
EOS ignored) and times until the last finishes; tok/s counts generated tokens. The engine is
built with ``cara-serve``'s defaults; its programs compile before the first timed run.
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
from cara_jax.adapters.random_peft import write_random_peft
from cara_jax.embedded import default_model_path
from cara_jax.engine import Engine
from cara_jax.sampling_params import SamplingParams
from cara_jax.tokenizer import Tokenizer
from cara_jax.weights import load_model
from server.cli import build_parser, engine_config

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def run(engine: Engine, requests: list[dict], tokens: int) -> tuple[float, float]:
    """(generated tokens per second, wall seconds) of ``requests`` submitted at once;
    each is add_request's keyword arguments (adapter or lora) plus an optional ``prepare``
    callable run first (the merge-per-request path: build and register its adapter)."""
    sp = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    t0 = time.perf_counter()
    for r in requests:
        kw = dict(r)
        prep = kw.pop("prepare", None)
        if prep is not None:
            kw["adapter"] = prep()
        engine.add_request(PROMPT, sp, **kw)
    n = 0
    while engine.has_unfinished():
        for out in engine.step():
            n += len(out.token_ids)
    dt = time.perf_counter() - t0
    return n / dt, dt


def merged_tree(engine: Engine, members: list[tuple[str, float]]) -> dict:
    """PEFT's cat of ``members`` as a tree (adapters/trees.py layout): per module, the members'
    A's side by side with their weights folded in, their B's stacked."""
    reg = engine.residency.registry
    adapters = [(reg.resolve(n), w) for n, w in members]
    keys = sorted({k for a, _ in adapters for k in a.modules})
    out: dict = {"layers": {}}
    for layer, proj in keys:
        parts = [(a.modules[(layer, proj)], w) for a, w in adapters if (layer, proj) in a.modules]
        out["layers"].setdefault(layer, {})[proj] = {
            "lora_a": np.concatenate([m.a * np.float32(w) for m, w in parts], axis=1),
            "lora_b": np.concatenate([m.b for m, _ in parts], axis=0),
        }
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--ranks", default="8,16")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="alternate the four ways this often")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    ranks = [int(r) for r in args.ranks.split(",")]
    rng = np.random.default_rng(0)
    path = default_model_path()
    loaded = load_model(path)
    cfg = engine_config(build_parser().parse_args([]))  # cara-serve's defaults
    engine = Engine(loaded, Tokenizer.from_path(path), cfg)
    names = [f"a{i}" for i in range(args.adapters)]
    kernels = loaded.kernels()
    with tempfile.TemporaryDirectory() as tmp:
        for i, n in enumerate(names):
            write_random_peft(Path(tmp) / n, loaded.cfg, ranks[i % len(ranks)], seed=i)
            engine.load_adapter(n, Path(tmp) / n)
            write_random_peft(Path(tmp) / f"d{n}", loaded.cfg, ranks[i % len(ranks)], seed=i,
                              dora_base=kernels)  # fmt: skip
            engine.load_adapter(f"d{n}", Path(tmp) / f"d{n}")
            write_random_peft(Path(tmp) / f"v{n}", loaded.cfg, ranks[i % len(ranks)], seed=i,
                              vocab=True)  # fmt: skip
            engine.load_adapter(f"v{n}", Path(tmp) / f"v{n}")
        t = time.perf_counter()
        engine.warmup()
        compile_s = time.perf_counter() - t
        pairs = [tuple(rng.choice(args.adapters, 2, replace=False)) for _ in range(args.streams)]
        weights = [tuple(np.round(rng.uniform(0.2, 1.2, 2), 2)) for _ in range(args.streams)]
        mixes = [[(names[i], float(w)) for i, w in zip(p, ws, strict=True)]
                 for p, ws in zip(pairs, weights, strict=True)]  # fmt: skip
        counter = iter(range(1 << 30))

        def merge(mix):
            def prepare():
                name = f"merged-{next(counter)}"
                engine.load_adapter(name, weights=merged_tree(engine, mix))
                return name

            return prepare

        ways = {
            "single": [{"adapter": names[i % args.adapters]} for i in range(args.streams)],
            "mixture": [{"lora": m} for m in mixes],
            "merged": [{"prepare": merge(m)} for m in mixes],
            "dora": [{"adapter": f"d{names[i % args.adapters]}"} for i in range(args.streams)],
            "vocab": [{"adapter": f"v{names[i % args.adapters]}"} for i in range(args.streams)],
        }
        run(engine, ways["mixture"], 4)  # first use: the mixtures' slots, members loaded
        run(engine, ways["dora"], 4)  # the DoRA slots' scales computed
        run(engine, ways["vocab"], 4)  # loaded
        rates: dict[str, list[float]] = {k: [] for k in ways}
        walls: dict[str, list[float]] = {k: [] for k in ways}
        for _ in range(args.repeats):
            for k, reqs in ways.items():
                r, dt = run(engine, reqs, args.tokens)
                rates[k].append(r)
                walls[k].append(dt)
        hot = engine.runner.hot_compiles
    engine.close()
    best = {k: max(v) for k, v in rates.items()}
    lines = [
        f"# Adapter mixtures: {args.streams} streams over {args.adapters} adapters "
        f"(ranks {ranks}, all 7 projections)",
        "",
        f"Machine: {platform.machine()} {os.cpu_count()} cores, jax {jax.__version__} "
        f"({jax.devices()[0].platform}); SmolLM2-135M float32; "
        f"{datetime.date.today().isoformat()}. Engine: cara-serve's defaults (no flag set); "
        f"its programs compiled in {compile_s:.0f} s before the timed runs; "
        f"{hot} compiled during them. Each stream: {args.tokens} greedy tokens.",
        "",
        "| way | tok/s (best of runs) | vs single adapters | all runs (tok/s) |",
        "|---|---|---|---|",
    ]
    lines += [f"| {k} | {best[k]:.1f} | {best[k] / best['single']:.2f}x | "
              f"{', '.join(f'{x:.1f}' for x in rates[k])} |" for k in ways]  # fmt: skip
    lines += [
        "",
        "- single: each stream on one adapter, two streams per adapter.",
        "- mixture: each stream on its own mixture of two adapters at its own weights "
        "(`lora` entries), computed in the step at the members' ranks.",
        "- merged: each stream's mixture merged into an adapter of its own first (PEFT's cat), "
        "registered and loaded per request, then served; the merge and load are inside the "
        "timed run.",
        "- dora: each stream on a DoRA adapter (the single adapters' A and B plus magnitudes), "
        "two streams per adapter: the cost of DoRA's per-row output rescale.",
        "- vocab: each stream on an adapter with LoRA on the embedding and the LM head too "
        "(the single adapters' A and B plus those), two streams per adapter.",
        "",
        f"Mixtures: {json.dumps(mixes)}",
    ]
    write_report(args.out, "lora_mixtures", lines,
                 {"rates": rates, "walls": walls, "mixtures": mixes, "compile_s": compile_s,
                  "hot_compiles": hot})  # fmt: skip


if __name__ == "__main__":
    main()
