"""What constrained rows cost the others: 16 streams, 0 / 4 / 16 of them JSON-schema constrained.

Against ``cara-serve`` on its defaults (flags, if any, in the report), SmolLM2-135M float32, the
base model, greedy, EOS ignored. A constrained stream asks for an array of at least 200
integers (``structured_outputs.json``), so it stays constrained for all its tokens. Reported per
mix, side by side in one server process: tok/s and TPOT p50 of the unconstrained streams, TPOT
p50 of the constrained ones (they decode every other step: cara_jax/structured.py), and the
host time per mask (``cara_structured_mask_seconds`` / ``cara_structured_masks``). Goal: 4
constrained rows cost the other 12 at most 10% tok/s.

    python -m bench.structured_outputs [--tokens 64] [--repeats 2] [-- SERVER FLAGS]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from bench.lib.report import save_report
from bench.lib.server_processes import start_server
from bench.lib.stream_replay import timed_stream

ROOT = Path(__file__).resolve().parents[1]
BASE = "SmolLM2-135M-Instruct"
SCHEMA = {"type": "array", "items": {"type": "integer"}, "minItems": 200}
MIXES = (0, 4, 16)
STREAMS = 16


async def metric(session, url: str, name: str) -> float:
    async with session.get(url + "/metrics") as r:
        text = await r.text()
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "_total "):
            return float(line.split()[-1])
    return 0.0


async def mix(session, url: str, constrained: int, tokens: int) -> dict:
    extra = {"structured_outputs": {"json": SCHEMA}}
    masks0 = await metric(session, url, "cara_structured_masks")
    secs0 = await metric(session, url, "cara_structured_mask_seconds")
    t0 = time.perf_counter()
    res = await asyncio.gather(*(
        timed_stream(session, url, BASE, tokens, extra if i < constrained else None)
        for i in range(STREAMS)
    ))  # fmt: skip
    free, cons = res[constrained:], res[:constrained]
    masks = await metric(session, url, "cara_structured_masks") - masks0
    secs = await metric(session, url, "cara_structured_mask_seconds") - secs0
    out = {"constrained": constrained, "wall": max(r["end"] for r in res) - t0,
           "mask_ms": secs / masks * 1e3 if masks else None, "masks": masks}  # fmt: skip
    if free:
        wall = max(r["end"] for r in free) - t0
        out["free_tok_s"] = sum(r["tokens"] for r in free) / wall
        out["free_tpot_p50"] = statistics.median(r["tpot"] for r in free)
    if cons:
        out["cons_tpot_p50"] = statistics.median(r["tpot"] for r in cons)
        out["cons_tokens"] = statistics.median(r["tokens"] for r in cons)
    return out


async def measure(url: str, tokens: int, repeats: int) -> list[dict]:
    timeout = aiohttp.ClientTimeout(total=1800)
    runs = []
    async with aiohttp.ClientSession(timeout=timeout) as s:
        await mix(s, url, 4, 8)  # warm: the first grammar builds the grammar engine's tokenizer
        for _ in range(repeats):  # the mixes interleaved, so drift hits all alike
            for k in MIXES:
                r = await mix(s, url, k, tokens)
                print(f"  {k:2d} constrained: {r}", flush=True)
                runs.append(r)
    return runs


def summarize(runs: list[dict]) -> dict[int, dict]:
    out = {}
    for k in MIXES:
        rows = [r for r in runs if r["constrained"] == k]
        med = {}
        for key in ("free_tok_s", "free_tpot_p50", "cons_tpot_p50", "mask_ms", "cons_tokens"):
            vals = [r[key] for r in rows if r.get(key) is not None]
            med[key] = statistics.median(vals) if vals else None
        out[k] = med
    return out


def report(args, summary: dict[int, dict]) -> str:
    flags = " ".join(args.server_flags) or "none (defaults)"
    base = summary[0]["free_tok_s"]
    lines = ["# Structured outputs: what constrained rows cost the others", "",
             f"`python -m bench.structured_outputs`; server flags: {flags}. SmolLM2-135M float32, "
             f"base model, {STREAMS} concurrent streams of {args.tokens} greedy tokens (EOS "
             "ignored); a constrained stream's schema is an array of >= 200 integers. Medians "
             f"over {args.repeats} interleaved passes in one server process.", "",
             "| constrained of 16 | unconstrained tok/s | per stream vs 0 constrained | "
             "unconstrained TPOT "
             "p50 ms | constrained TPOT p50 ms | mask ms (host, per row per step) |",
             "|---:|---:|---:|---:|---:|---:|"]  # fmt: skip

    def f(v, scale=1.0, d=1):
        return "–" if v is None else f"{v * scale:.{d}f}"

    for k in MIXES:
        m = summary[k]
        per = None if m["free_tok_s"] is None else m["free_tok_s"] / (STREAMS - k)
        ratio = "–" if per is None else f"{per / (base / STREAMS):.2f}x"
        lines.append(f"| {k} | {f(m['free_tok_s'])} | {ratio} | {f(m['free_tpot_p50'], 1e3, 0)} "
                     f"| {f(m['cons_tpot_p50'], 1e3, 0)} | {f(m['mask_ms'], 1, 3)} |")  # fmt: skip
    lines += ["", "Goal: with 4 constrained, each of the other 12 keeps >= 0.90x the tok/s a "
              "stream gets when none is constrained (the ratio column)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--src", type=Path, default=ROOT, help="checkout whose server to run")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/structured_outputs")
    ap.add_argument("server_flags", nargs="*", help="flags passed to cara-serve (after --)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="structured_") as tmp:
        work = Path(tmp)
        (work / "lora").mkdir()
        procs, url = start_server(work, work / "lora", args.server_flags, "structured",
                                  args.src.resolve())  # fmt: skip
        try:
            runs = asyncio.run(measure(url, args.tokens, args.repeats))
        finally:
            procs.stop()
    summary = summarize(runs)
    save_report(args.out, report(args, summary), {"runs": runs, "summary": summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
