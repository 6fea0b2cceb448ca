"""Prefill and decode throughput of cara-jax vs HF transformers on SmolLM2 (float32), per batch.

    python -m bench.model_throughput [--batches 1,8,16,32] [--prompt-len 128] [--new-tokens 64]
                                     [--hf/--no-hf] [--out bench/results]

Both sides run the same weights (the embedded SmolLM2-135M GGUF, dequantised to float32) on the
same token ids: B real-text prompts of exactly ``--prompt-len`` tokens, then ``--new-tokens``
greedy decode steps (the first token comes from prefill, as in serving).

cara-jax: the engine's ModelRunner, one per batch size (max_num_seqs = max_prefill_seqs = B and
a token budget of B x prompt tokens, so prefill is one step of B whole-prompt chunks over the
paged KV cache), driven with hand-built scheduled batches. Decode runs B decode rows a step, the
program of the token bucket >= B (each step feeds the token the step before sampled, kept on the
device, so the host launches step t+1 without waiting; the host still builds each step's inputs,
as the engine does). Compile time is excluded: both programs are compiled and run once first.
Decode is timed with block_until_ready on the last step's tokens.

HF: AutoModelForCausalLM in eval + inference_mode, torch.set_num_threads(cores), default (SDPA)
attention. Prefill = one forward over the batch with logits_to_keep=1 (cara also computes logits
at the last position only). Decode = a manual KV-cache greedy loop (DynamicCache, argmax,
``--new-tokens`` single-token forwards after an untimed prefill), not model.generate: it skips
generate's per-step logits processors and stopping checks, so it is HF's fastest eager path.

All cara batches run before all HF batches, so neither side's idle thread pools compete with the
other. Each figure is the median of ``--repeats`` timed runs.

Roofline (decode): the floor of one step over B rows at context c is
    max((WEIGHT_BYTES + kv_bytes(B, c)) / MEM_BW, 2 * PARAMS * B / GEMM_FLOPS)
summed over the timed steps (c = the entries each step actually attends to, without padding);
"fraction" = achieved cara decode tok/s / roofline tok/s.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from bench.lib.report import save_report
from cara_jax.embedded import default_model_path
from cara_jax.engine.batch import ChunkRow, DecodeRow, ScheduledBatch
from cara_jax.engine.runner import ModelRunner, RunnerConfig
from cara_jax.tokenizer import Tokenizer
from cara_jax.weights import load_model

# Roofline constants. MEM_BW and GEMM_FLOPS are this machine class's measured memory bandwidth
# (bytes/s, streaming read) and float32 GEMM rate (FLOP/s, all cores); override them with
# --mem-bw / --gemm-flops on other hardware.
MEM_BW = 26e9
GEMM_FLOPS = 200e9
PARAMS = 134.5e6  # SmolLM2-135M parameters (tied embeddings counted once)
WEIGHT_BYTES = 538e6  # float32 weights, all read once per decode step (lm_head = embedding)

TEXTS = [
    "The history of the printing press begins in the fifteenth century, when Johannes "
    "Gutenberg combined movable metal type, oil-based ink and a wooden screw press into a "
    "system that could produce books faster and more cheaply than any scribe. Within fifty "
    "years, presses had spread to more than two hundred cities across Europe, and the price "
    "of a book fell so far that ordinary merchants could afford small private libraries.",
    "To bake a simple loaf of bread, mix five hundred grams of flour with ten grams of salt, "
    "seven grams of dried yeast and about three hundred and fifty millilitres of warm water. "
    "Knead the dough for ten minutes until it is smooth and elastic, then leave it covered in "
    "a warm place for an hour, or until it has doubled in size, before shaping and baking it.",
    "Photosynthesis is the process by which green plants, algae and some bacteria convert "
    "light energy into chemical energy. Inside the chloroplasts, chlorophyll absorbs sunlight "
    "and uses it to split water molecules, releasing oxygen, while carbon dioxide from the "
    "air is fixed into sugars through a cycle of reactions first described by Melvin Calvin.",
    "The old lighthouse keeper climbed the spiral staircase every evening at dusk. He counted "
    "the steps out of habit, one hundred and twelve of them, and paused at the narrow window "
    "halfway up to watch the fishing boats return to the harbour. On stormy nights he stayed "
    "awake until dawn, trimming the wick and polishing the great lens until it shone.",
    "When you write a function that reads a file, always think about what should happen if the "
    "file does not exist, is empty, or contains data in an unexpected format. Good error "
    "messages tell the user what went wrong and how to fix it; bad ones leave them guessing. "
    "Tests that cover these edge cases save hours of debugging later in a project's life.",
    "The Amazon rainforest covers roughly five and a half million square kilometres across "
    "nine countries, and it is home to an estimated ten percent of all known species on Earth. "
    "Its rivers carry about a fifth of the fresh water that flows into the world's oceans, and "
    "its trees store vast amounts of carbon that would otherwise warm the planet.",
    "Dear hiring manager, I am writing to apply for the position of junior data analyst that "
    "was advertised on your website last week. During my studies I worked with spreadsheets, "
    "databases and statistical software, and I spent a summer helping a local charity make "
    "sense of its donor records. I would welcome the chance to discuss how I could help.",
    "In the final minutes of the match, the home team pressed forward in search of an "
    "equaliser. The crowd rose to its feet as the winger cut inside, beat two defenders and "
    "curled a shot toward the far corner, but the goalkeeper stretched out a hand and pushed "
    "the ball around the post. The referee blew the whistle moments later.",
]


def build_prompts(tok: Tokenizer, n: int, length: int) -> list[list[int]]:
    """n distinct prompts of exactly ``length`` tokens, each a different rotation of TEXTS."""
    out = []
    for i in range(n):
        k = i % len(TEXTS)
        text = " ".join(TEXTS[k:] + TEXTS[:k])
        ids = tok.encode(text)
        skip = (i // len(TEXTS)) * 3  # later rounds start a few tokens in
        while len(ids) < length + skip:
            ids = ids + tok.encode(" " + text)
        out.append(ids[skip : skip + length])
    return out


def machine_info() -> dict:
    cpu = platform.processor()
    if not cpu or cpu in ("x86_64", "aarch64"):
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    return {
        "cpu": cpu or platform.machine(),
        "cpu_count": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "python": platform.python_version(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def roofline(cfg, batch: int, prompt_len: int, new_tokens: int, mem_bw: float, gemm: float):
    """(tok/s, total floor seconds, mean KV bytes per step) of the timed decode steps."""
    kv_per_entry = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4  # K+V, float32
    total, kv_sum = 0.0, 0.0
    for p in range(prompt_len, prompt_len + new_tokens):
        kv = batch * (p + 1) * kv_per_entry
        kv_sum += kv
        total += max((WEIGHT_BYTES + kv) / mem_bw, 2 * PARAMS * batch / gemm)
    return batch * new_tokens / total, total, kv_sum / new_tokens


GREEDY = (0.0, 0, 1.0, 0, 0.0, 0.0, 0.0, 1.0)  # a SamplingRow (engine.batch): temperature 0


def bench_cara(loaded, prompts, new_tokens: int, repeats: int) -> dict:
    b, plen = len(prompts), len(prompts[0])
    bs = 16
    per_seq = -(-(plen + new_tokens + 1) // bs)  # KV pages of one sequence
    cfg = RunnerConfig(
        num_pages=b * per_seq + 1,  # page 0 is reserved
        max_model_len=plen + new_tokens + 1,
        block_size=bs,
        max_num_seqs=b,
        max_num_batched_tokens=max(2, b * plen),  # every prompt whole in one step
        max_prefill_seqs=b,
    )
    runner = ModelRunner(loaded, cfg)
    tables = [list(range(1 + j * per_seq, 1 + (j + 1) * per_seq)) for j in range(b)]
    prefill_batch = ScheduledBatch(
        [],
        [
            ChunkRow(None, j, list(p), 0, tables[j], 0, GREEDY, True, plen)
            for j, p in enumerate(prompts)
        ],
    )
    # decode step t feeds the token sampled by the step before (kept on the device) at position p
    steps = [
        ScheduledBatch([DecodeRow(None, j, p, tables[j], 0, GREEDY) for j in range(b)], [])
        for p in range(plen, plen + new_tokens)
    ]
    pre_prog, dec_prog = runner.program_for(prefill_batch), runner.program_for(steps[0])
    first_at = runner.config.decode_rows(pre_prog.tokens)  # chunk rows' samples follow these

    def prefill():
        return np.asarray(runner.run(prefill_batch).outputs.tokens)[first_at : first_at + b]

    # compile time excluded: both programs compiled, then run once untimed
    runner.compile(pre_prog)
    runner.compile(dec_prog)
    prefill()
    runner.run(steps[0]).outputs.tokens.block_until_ready()
    hot = runner.hot_compiles

    prefill_s, decode_s, tokens = [], [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        first = prefill()
        prefill_s.append(time.perf_counter() - t0)
        out = []
        t0 = time.perf_counter()
        for batch in steps:
            out.append(runner.run(batch).outputs.tokens)
        jax.block_until_ready(out[-1])
        decode_s.append(time.perf_counter() - t0)
        if tokens is None:
            tokens = np.concatenate(
                [first[:, None]] + [np.asarray(t)[:b, None] for t in out], axis=1
            )
    assert runner.hot_compiles == hot, "a timed step compiled"
    return {
        "prefill_s": statistics.median(prefill_s),
        "decode_s": statistics.median(decode_s),
        "tokens": tokens,
    }


def load_hf(path: Path, threads: int):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    return model.eval()


def bench_hf(model, prompts, new_tokens: int, repeats: int) -> dict:
    import torch

    ids = torch.tensor(prompts, dtype=torch.long)
    mask = torch.ones_like(ids)  # prompts are equal length: the padded batch has no padding
    # transformers >= 5.2x renamed past_key_values to cache (argument and output field)
    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"

    def cache_of(out):
        return getattr(out, "cache", None) if cache_kw == "cache" else out.past_key_values

    def prefill():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].argmax(-1), cache_of(out)

    def decode(nxt, cache):
        am, toks = mask, []
        for _ in range(new_tokens):
            am = torch.cat([am, torch.ones_like(am[:, :1])], dim=1)
            out = model(
                input_ids=nxt[:, None], attention_mask=am, use_cache=True, **{cache_kw: cache}
            )
            nxt, cache = out.logits[:, -1].argmax(-1), cache_of(out)
            toks.append(nxt)
        return toks

    prefill_s, decode_s, tokens = [], [], None
    with torch.inference_mode():
        nxt, cache = prefill()  # warm-up (allocator, oneDNN primitives)
        decode(nxt, cache)
        for _ in range(repeats):
            t0 = time.perf_counter()
            nxt, cache = prefill()
            prefill_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            toks = decode(nxt, cache)
            decode_s.append(time.perf_counter() - t0)
            if tokens is None:
                tokens = torch.stack([nxt] + toks, dim=1).numpy()
    return {
        "prefill_s": statistics.median(prefill_s),
        "decode_s": statistics.median(decode_s),
        "tokens": tokens,
    }


def _f(x, fmt="{:,.0f}"):
    return "—" if x is None else fmt.format(x)


def markdown(result: dict) -> str:
    m, a = result["machine"], result["args"]
    lines = [
        "# cara-jax vs HF transformers: SmolLM2-135M float32 throughput",
        "",
        f"- machine: {m['cpu']}, {m['cpu_count']} CPUs ({m['usable_cores']} usable), "
        f"jax {m['jax']} ({m['jax_backend']}), torch {m.get('torch', '—')}, "
        f"transformers {m.get('transformers', '—')}",
        f"- date: {m['date']}",
        f"- prompt {a['prompt_len']} tokens, {a['new_tokens']} greedy decode steps, "
        f"median of {a['repeats']}; roofline: MEM_BW {a['mem_bw']:.3g} B/s, "
        f"GEMM {a['gemm_flops']:.3g} FLOP/s",
        "- HF decode: manual KV-cache greedy loop (DynamicCache), not model.generate"
        if a["hf"]
        else "- HF not measured (--no-hf)",
        "",
        "| batch | cara prefill tok/s | HF prefill tok/s | ratio | cara decode tok/s "
        "| HF decode tok/s | ratio | roofline tok/s | fraction |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['batch']} | {_f(r['cara_prefill_tok_s'])} | {_f(r['hf_prefill_tok_s'])} "
            f"| {_f(r['prefill_ratio'], '{:.2f}')} | {_f(r['cara_decode_tok_s'])} "
            f"| {_f(r['hf_decode_tok_s'])} | {_f(r['decode_ratio'], '{:.2f}')} "
            f"| {_f(r['roofline_tok_s'])} | {_f(r['roofline_fraction'], '{:.0%}')} |"
        )
    agree = [r for r in result["rows"] if r.get("greedy_agreement") is not None]
    if agree:
        lines += [
            "",
            "Greedy token agreement cara vs HF (first generated token / all): "
            + ", ".join(
                f"B={r['batch']}: {r['first_token_agreement']:.0%} / {r['greedy_agreement']:.0%}"
                for r in agree
            ),
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.model_throughput",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--batches", default="1,8,16,32", help="comma-separated batch sizes")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per figure (median)")
    ap.add_argument(
        "--hf",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure HF transformers (default: on)",
    )
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--model", type=Path, default=None, help="GGUF file (default: embedded)")
    ap.add_argument("--mem-bw", type=float, default=MEM_BW, help="roofline bytes/s")
    ap.add_argument("--gemm-flops", type=float, default=GEMM_FLOPS, help="roofline FLOP/s")
    args = ap.parse_args(argv)
    batches = [int(x) for x in args.batches.split(",") if x.strip()]
    path = args.model or default_model_path()
    machine = machine_info()
    threads = machine["usable_cores"]

    loaded = load_model(path)
    tok = Tokenizer.from_gguf(path)
    prompts = build_prompts(tok, max(batches), args.prompt_len)
    hf = None
    if args.hf:
        import torch
        import transformers

        machine.update(
            torch=torch.__version__, transformers=transformers.__version__, torch_threads=threads
        )
        hf = load_hf(path, threads)

    cara_res, hf_res = {}, {}
    bar = tqdm(
        total=len(batches) * (2 if hf is not None else 1), desc="bench", unit="run", file=sys.stderr
    )
    for b in batches:
        bar.set_postfix_str(f"cara B={b}")
        cara_res[b] = bench_cara(loaded, prompts[:b], args.new_tokens, args.repeats)
        bar.update()
    if hf is not None:
        for b in batches:
            bar.set_postfix_str(f"HF B={b}")
            hf_res[b] = bench_hf(hf, prompts[:b], args.new_tokens, args.repeats)
            bar.update()
    bar.close()

    rows = []
    for b in batches:
        c, h = cara_res[b], hf_res.get(b)
        n_prefill, n_decode = b * args.prompt_len, b * args.new_tokens
        roof, floor_s, kv_bytes = roofline(
            loaded.cfg, b, args.prompt_len, args.new_tokens, args.mem_bw, args.gemm_flops
        )
        row = {
            "batch": b,
            "cara_prefill_s": c["prefill_s"],
            "cara_decode_s": c["decode_s"],
            "cara_prefill_tok_s": n_prefill / c["prefill_s"],
            "cara_decode_tok_s": n_decode / c["decode_s"],
            "hf_prefill_s": None,
            "hf_decode_s": None,
            "hf_prefill_tok_s": None,
            "hf_decode_tok_s": None,
            "prefill_ratio": None,
            "decode_ratio": None,
            "first_token_agreement": None,
            "greedy_agreement": None,
            "roofline_tok_s": roof,
            "roofline_step_floor_s": floor_s / args.new_tokens,
            "roofline_mean_kv_bytes_per_step": kv_bytes,
            "roofline_bound": (
                "memory"
                if (WEIGHT_BYTES + kv_bytes) / args.mem_bw >= 2 * PARAMS * b / args.gemm_flops
                else "compute"
            ),
        }
        row["roofline_fraction"] = row["cara_decode_tok_s"] / roof
        if h is not None:
            row.update(
                hf_prefill_s=h["prefill_s"],
                hf_decode_s=h["decode_s"],
                hf_prefill_tok_s=n_prefill / h["prefill_s"],
                hf_decode_tok_s=n_decode / h["decode_s"],
                first_token_agreement=float(np.mean(c["tokens"][:, 0] == h["tokens"][:, 0])),
                greedy_agreement=float(np.mean(c["tokens"] == h["tokens"])),
            )
            row["prefill_ratio"] = row["cara_prefill_tok_s"] / row["hf_prefill_tok_s"]
            row["decode_ratio"] = row["cara_decode_tok_s"] / row["hf_decode_tok_s"]
        rows.append(row)

    result = {
        "machine": machine,
        "args": {
            "batches": batches,
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "hf": args.hf,
            "model": path.name,  # the file name only: results must not carry machine paths
            "mem_bw": args.mem_bw,
            "gemm_flops": args.gemm_flops,
            "params": PARAMS,
            "weight_bytes": WEIGHT_BYTES,
        },
        "rows": rows,
    }
    save_report(args.out / "model_throughput", markdown(result), result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
