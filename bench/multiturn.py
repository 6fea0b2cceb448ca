"""Multi-turn chat over adapters that share a long system prompt: what prefix caching buys.

Conversations start ``--start-interval`` seconds apart; each is served by one adapter (round
robin over ``--adapters``) and has ``--turns`` turns. Every turn's prompt is the chat template
applied to the system prompt and the whole conversation so far, the answers being the text the
system itself generated (decoded, then templated again, as a chat client sends it). A turn is
sent ``--think`` seconds after the previous answer is complete (closed loop), so later turns'
TTFT shows what each system does with a prompt it has mostly seen.

Systems, one after another in one process on the same conversations: cara-jax with prefix
caching, cara-jax without, and HF transformers + PEFT (batched ``generate``-style serving of
whatever turns are due). Writes ``<out>.json`` and ``<out>.md``.

    python -m bench.multiturn [--conversations 16 --turns 4 --adapters 8 --system-tokens 1000]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.lib.report import save_report
from bench.lib.workload import Request
from bench.systems.common import RunOptions, model_config, write_adapters

TOPICS = ["billing", "shipping", "returns", "warranty", "accounts", "privacy", "discounts",
          "installation", "repairs", "upgrades", "gift cards", "delivery windows"]  # fmt: skip
STYLES = ["in two sentences", "with a numbered list", "politely and briefly",
          "citing the policy section", "with one example", "without jargon"]  # fmt: skip


def system_prompt(tok, n_tokens: int) -> str:
    """A support-policy document of about ``n_tokens`` tokens."""
    rules, i = [], 0
    while True:
        rules.append(f"Rule {i + 1}: when a customer asks about {TOPICS[i % len(TOPICS)]}, "
                     f"answer {STYLES[(i * 5) % len(STYLES)]} and mention reference "
                     f"code {1000 + 37 * i}.")  # fmt: skip
        text = "You are the support assistant of Example Corp. " + " ".join(rules)
        if len(tok.encode(text, add_special_tokens=False)) >= n_tokens:
            return text
        i += 1


def user_message(conv: int, turn: int) -> str:
    t = TOPICS[(conv * 3 + turn) % len(TOPICS)]
    return (f"Customer {conv}, message {turn + 1}: I have a question about {t}. "
            f"My order number is {4200 + 17 * conv + turn}. What should I do next, and "
            f"how long will it take?")  # fmt: skip


@dataclasses.dataclass
class Turn:
    conv: int
    turn: int
    adapter: str
    sent: float = 0.0
    prompt_tokens: int = 0
    token_times: list[float] = dataclasses.field(default_factory=list)
    cached_tokens: int | None = None  # reported by cara-jax

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.sent


class Conversations:
    """The closed loop: which turn of which conversation is due when, and its prompt."""

    def __init__(self, tok, args, adapters: list[str]) -> None:
        self.tok, self.args = tok, args
        self.system = system_prompt(tok, args.system_tokens)
        self.msgs = [[{"role": "system", "content": self.system}] for _ in range(args.conversations)]
        self.adapters = [adapters[c % len(adapters)] for c in range(args.conversations)]
        self.due = {c: c * args.start_interval for c in range(args.conversations)}
        self.turn = [0] * args.conversations
        self.done: list[Turn] = []

    def pending(self) -> bool:
        return bool(self.due)

    def next_due(self) -> float:
        return min(self.due.values())

    def take_due(self, now: float) -> list[tuple[Turn, list[int]]]:
        out = []
        for c in sorted(c for c, t in self.due.items() if t <= now):
            del self.due[c]
            self.msgs[c].append({"role": "user", "content": user_message(c, self.turn[c])})
            ids = self.tok.apply_chat_template(self.msgs[c], tokenize=True)
            t = Turn(c, self.turn[c], self.adapters[c], sent=now, prompt_tokens=len(ids))
            out.append((t, ids))
        return out

    def finish(self, t: Turn, answer_ids: list[int], now: float) -> None:
        self.done.append(t)
        c = t.conv
        self.msgs[c].append(
            {"role": "assistant", "content": self.tok.decode(answer_ids, skip_special_tokens=True)}
        )
        self.turn[c] += 1
        if self.turn[c] < self.args.turns:
            self.due[c] = now + self.args.think


def run_cara(args, adapters: dict[str, Path], tok, caching: bool) -> tuple[list[Turn], dict]:
    from bench.systems.cara import CaraSystem
    from cara_jax.sampling_params import SamplingParams

    opts = RunOptions(cold_start="cached", max_num_seqs=args.conversations,
                      max_prefill_seqs=args.max_prefill_seqs, prefix_caching=caching,
                      max_num_batched_tokens=args.max_num_batched_tokens)  # fmt: skip
    sysm = CaraSystem(opts, label="cara-jax" if caching else "cara-jax (no prefix cache)")
    sysm.start(adapters, max_context=args.max_context)
    eng = sysm.engine
    st0 = eng.stats()
    sp = SamplingParams(temperature=0, max_tokens=args.answer_tokens, ignore_eos=True)
    convs = Conversations(tok, args, list(adapters))
    live: dict[str, tuple[Turn, list[int]]] = {}
    t0 = time.perf_counter()
    while convs.pending() or live:
        now = time.perf_counter() - t0
        for t, ids in convs.take_due(now):
            rid = f"c{t.conv}-t{t.turn}"
            eng.add_request(ids, sp, t.adapter, request_id=rid)
            live[rid] = (t, [])
        if not live:
            time.sleep(max(0.0, min(convs.next_due() - now, 0.05)))
            continue
        for out in eng.step():
            t, toks = live[out.request_id]
            now = time.perf_counter() - t0
            if out.token_ids:
                t.token_times += [now] * len(out.token_ids)
                toks += out.token_ids
            if out.finished:
                t.cached_tokens = out.num_cached_tokens
                del live[out.request_id]
                convs.finish(t, toks, now)
    st = eng.stats()
    info = {
        "prefix_cache_queries": st.prefix_cache_queries - st0.prefix_cache_queries,
        "prefix_cache_hits": st.prefix_cache_hits - st0.prefix_cache_hits,
        "prefix_cache_evictions": st.prefix_cache_evictions - st0.prefix_cache_evictions,
        "kv_pages": st.kv_pages_total, "hot_compiles": st.hot_compiles,
        "preemptions": st.preemptions - st0.preemptions,
    }  # fmt: skip
    sysm.close()
    return convs.done, info


def run_hf(args, adapters: dict[str, Path], tok) -> tuple[list[Turn], dict]:
    from bench.systems.hf_peft import HfPeftSystem

    sysm = HfPeftSystem(RunOptions(max_batch=args.conversations))
    sysm.start(adapters, max_context=args.max_context)
    convs = Conversations(tok, args, list(adapters))
    t0 = time.perf_counter()
    while convs.pending():
        now = time.perf_counter() - t0
        due = convs.take_due(now)
        if not due:
            time.sleep(max(0.0, min(convs.next_due() - now, 0.05)))
            continue
        batch = [Request(f"c{t.conv}-t{t.turn}", t.sent, t.adapter, 0, ids, args.answer_tokens)
                 for t, ids in due]  # fmt: skip
        times = [[] for _ in batch]
        toks = [[] for _ in batch]
        sysm._serve(batch, t0, times, toks)
        for (t, _), tt, tk in zip(due, times, toks, strict=True):
            t.token_times = tt
            convs.finish(t, tk, time.perf_counter() - t0)
    sysm.close()
    return convs.done, {}


def summarize(turns: list[Turn]) -> dict:
    def p(xs, q):
        return float(np.percentile(xs, q)) if xs else None

    first = [t.ttft for t in turns if t.turn == 0]
    later = [t.ttft for t in turns if t.turn > 0]
    start = min(t.sent for t in turns)
    end = max(t.token_times[-1] for t in turns)
    out_tokens = sum(len(t.token_times) for t in turns)
    prompt = sum(t.prompt_tokens for t in turns)
    cached = [t.cached_tokens for t in turns if t.cached_tokens is not None]
    return {
        "requests": len(turns),
        "ttft_p50_turn1_s": p(first, 50), "ttft_p50_later_s": p(later, 50),
        "ttft_p90_later_s": p(later, 90),
        "tpot_p50_ms": p([1e3 * (t.token_times[-1] - t.token_times[0]) / (len(t.token_times) - 1)
                          for t in turns if len(t.token_times) > 1], 50),
        "makespan_s": end - start, "output_tokens": out_tokens,
        "tokens_per_s": out_tokens / (end - start), "prompt_tokens": prompt,
        "cached_tokens": sum(cached) if cached else None,
        "ttft_by_turn_p50_s": [p([t.ttft for t in turns if t.turn == k], 50)
                               for k in range(max(t.turn for t in turns) + 1)],
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conversations", type=int, default=16)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--system-tokens", type=int, default=1000)
    ap.add_argument("--answer-tokens", type=int, default=32)
    ap.add_argument("--start-interval", type=float, default=2.0, help="seconds between starts")
    ap.add_argument("--think", type=float, default=1.0, help="seconds before the next turn")
    ap.add_argument("--max-prefill-seqs", type=int, default=2)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--systems", default="cara,cara_nocache,hf")
    ap.add_argument("--out", default="bench/results/multiturn")
    args = ap.parse_args(argv)

    from cara_jax.embedded import default_model_path
    from cara_jax.tokenizer import Tokenizer

    tok = Tokenizer.from_path(default_model_path())
    per_turn = 80 + args.answer_tokens
    args.max_context = args.system_tokens + 40 + args.turns * per_turn
    cfg = model_config()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="cara-multiturn-") as d:
        ranks = {f"chat-{i}": args.rank for i in range(args.adapters)}
        adapters = write_adapters(Path(d), ranks, cfg, seed=11)
        for key in args.systems.split(","):
            t = time.perf_counter()
            if key == "cara":
                turns, info = run_cara(args, adapters, tok, caching=True)
            elif key == "cara_nocache":
                turns, info = run_cara(args, adapters, tok, caching=False)
            elif key == "hf":
                turns, info = run_hf(args, adapters, tok)
            else:
                raise SystemExit(f"unknown system {key!r}")
            results[key] = {**summarize(turns), **info, "wall_s": time.perf_counter() - t}
            r = results[key]
            print(f"{key}: TTFT p50 turn 1 {r['ttft_p50_turn1_s']:.2f} s, turns 2+ "
                  f"{r['ttft_p50_later_s']:.2f} s, {r['tokens_per_s']:.1f} tok/s", flush=True)
    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(terse=True),
                    "processor": platform.machine()},  # fmt: skip
        "args": {k: v for k, v in vars(args).items()},
        "results": results,
    }
    c, n = results.get("cara"), results.get("cara_nocache")
    if c and n:
        report["ratio_ttft_later_cache_vs_nocache"] = c["ttft_p50_later_s"] / n["ttft_p50_later_s"]
        report["ratio_tokens_per_s_cache_vs_nocache"] = c["tokens_per_s"] / n["tokens_per_s"]
        report["hit_rate"] = c["prefix_cache_hits"] / max(c["prefix_cache_queries"], 1)
    save_report(args.out, render(report), report)


def render(rep: dict) -> str:
    a = rep["args"]
    lines = [
        f"# Multi-turn chat: {a['conversations']} conversations x {a['turns']} turns over "
        f"{a['adapters']} adapters (rank {a['rank']}), a {a['system_tokens']}-token system prompt",
        "",
        f"Machine: {rep['machine']['cpus']} CPUs, {rep['machine']['processor']}, no accelerator. "
        f"Answers {a['answer_tokens']} tokens (greedy); conversations start "
        f"{a['start_interval']} s apart; the next turn {a['think']} s after an answer. All "
        "systems in one run, one after another, each on its own answers.",
        "",
        "| system | TTFT p50 turn 1 | TTFT p50 turns 2-4 | TTFT p90 turns 2-4 | TPOT p50 | tok/s |"
        " prompt tokens | cached tokens |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, r in rep["results"].items():
        cached = "" if r.get("cached_tokens") is None else f"{r['cached_tokens']}"
        lines.append(
            f"| {key} | {r['ttft_p50_turn1_s']:.2f} s | {r['ttft_p50_later_s']:.2f} s | "
            f"{r['ttft_p90_later_s']:.2f} s | {r['tpot_p50_ms']:.0f} ms | "
            f"{r['tokens_per_s']:.1f} | {r['prompt_tokens']} | {cached} |"
        )
    if "hit_rate" in rep:
        lines += [
            "",
            f"- Hit rate (cached / looked-up prompt tokens): {rep['hit_rate']:.1%}",
            f"- TTFT p50 of turns 2-4, cache / no cache: "
            f"{rep['ratio_ttft_later_cache_vs_nocache']:.3f}x (target <= 0.3x)",
            f"- tokens/s, cache / no cache: {rep['ratio_tokens_per_s_cache_vs_nocache']:.2f}x "
            "(target: not lower)",
        ]
    for key, r in rep["results"].items():
        by = ", ".join(f"{x:.2f}" for x in r["ttft_by_turn_p50_s"])
        lines.append(f"- {key}: TTFT p50 by turn (s): {by}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
