"""Training many adapters at once: one step over 8 adapters x 4 sequences vs 8 one-adapter steps.

Both sides run the same jitted train step (value_and_grad of the summed NLL through the dense
forward, then optax Adam) over the embedded SmolLM2 in float32 with new rank-16 adapters on
q/k/v/o (PEFT's init, B = 0); the grouped side gives each of its 32 rows one of 8 adapters (one
LoraSet), the other side runs 8 steps of 4 rows, each on its own one-adapter set. Same tokens
in total, random token ids of a fixed length; tokens/s side by side, median of the timed
repeats after one untimed (compiling) run of each.

    python -m bench.lora_training [--seq-len 32] [--repeats 3] [--out bench/results/lora_training]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bench.lib.report import save_report
from cara_jax.adapters.lora_set import LoraSet
from cara_jax.dense import sequence_nll
from cara_jax.embedded import default_model_path
from cara_jax.weights import load_model

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def make_step(loaded, lora_set: LoraSet, opt):
    @jax.jit
    def step(params, state, tokens, slots):
        def loss(p):
            mask = jnp.ones((tokens.shape[0], tokens.shape[1] - 1))
            return jnp.sum(sequence_nll(loaded, tokens, mask, lora_set.hook(p, slots)))

        value, grads = jax.value_and_grad(loss)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    return step


def run(seq_len: int, repeats: int, adapters: int = 8, per_adapter: int = 4, rank: int = 16):
    loaded = load_model(default_model_path())
    opt = optax.adam(1e-3)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, loaded.cfg.vocab_size, (adapters * per_adapter, seq_len), np.int32)
    slots = np.repeat(np.arange(1, adapters + 1), per_adapter).astype(np.int32)
    key = jax.random.key(0)

    grouped_set, gp = LoraSet.init(loaded.cfg, adapters, rank, TARGETS, key)
    gstate = opt.init(gp)
    gstep = make_step(loaded, grouped_set, opt)
    one_set, _ = LoraSet.init(loaded.cfg, 1, rank, TARGETS, key)
    singles = [LoraSet.init(loaded.cfg, 1, rank, TARGETS, jax.random.fold_in(key, k))[1]
               for k in range(adapters)]  # fmt: skip
    sstates = [opt.init(p) for p in singles]
    sstep = make_step(loaded, one_set, opt)
    ones = np.ones(per_adapter, np.int32)

    def grouped():
        nonlocal gp, gstate
        gp, gstate, v = gstep(gp, gstate, tokens, slots)
        return v

    def one_at_a_time():
        v = None
        for k in range(adapters):
            rows = tokens[k * per_adapter : (k + 1) * per_adapter]
            singles[k], sstates[k], v = sstep(singles[k], sstates[k], rows, ones)
        return v

    times: dict[str, list[float]] = {"grouped": [], "one_at_a_time": []}
    compile_s = {}
    for name, fn in (("grouped", grouped), ("one_at_a_time", one_at_a_time)):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        compile_s[name] = time.perf_counter() - t0
    for _ in range(repeats):  # interleaved, so drift on a noisy machine hits both
        for name, fn in (("grouped", grouped), ("one_at_a_time", one_at_a_time)):
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t0)
    n_tok = tokens.size
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "model": "SmolLM2-135M-Instruct", "dtype": "float32", "adapters": adapters,
        "sequences_per_adapter": per_adapter, "seq_len": seq_len, "rank": rank,
        "targets": list(TARGETS), "tokens_per_round": int(n_tok), "repeats": repeats,
        "seconds": times, "first_run_s": compile_s,
        "tok_per_s": {k: n_tok / v for k, v in med.items()},
        "ratio": med["one_at_a_time"] / med["grouped"], "device": str(jax.devices()[0]),
    }  # fmt: skip


def report(d: dict) -> list[str]:
    tps = d["tok_per_s"]
    return [
        "# Training many adapters at once",
        "",
        f"{d['model']} ({d['dtype']}) on `{d['device']}`; {d['adapters']} new rank-{d['rank']} "
        f"adapters on {'/'.join(p.split('_')[0] for p in d['targets'])}; "
        f"{d['sequences_per_adapter']} sequences of {d['seq_len']} tokens each; one train step "
        "= value_and_grad of the summed NLL through the dense forward + Adam. Median of "
        f"{d['repeats']} interleaved repeats after one untimed run each "
        "(`python -m bench.lora_training`).",
        "",
        "| step | tokens per round | s per round (median) | tok/s | first run (compile), s |",
        "|---|---|---|---|---|",
        f"| 1 grouped step, {d['adapters']} adapters x {d['sequences_per_adapter']} sequences | "
        f"{d['tokens_per_round']} | {statistics.median(d['seconds']['grouped']):.2f} | "
        f"{tps['grouped']:.0f} | {d['first_run_s']['grouped']:.1f} |",
        f"| {d['adapters']} one-adapter steps of {d['sequences_per_adapter']} sequences | "
        f"{d['tokens_per_round']} | {statistics.median(d['seconds']['one_at_a_time']):.2f} | "
        f"{tps['one_at_a_time']:.0f} | {d['first_run_s']['one_at_a_time']:.1f} |",
        "",
        f"Grouped / one at a time: **{d['ratio']:.2f}x** tokens/s.",
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/results/lora_training")
    a = ap.parse_args(argv)
    d = run(a.seq_len, a.repeats)
    save_report(a.out, "\n".join(report(d)), d)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
