"""Many adapters on disk, and first requests on never-seen adapters, on the default server.

Two sections, each against ``cara-serve --lora-dir DIR`` on its defaults (flags, if any, are in
the report), SmolLM2-135M float32, random PEFT adapters on q/k/v/o:

- ``zipf``: one seeded Poisson trace whose adapter ids follow a Zipf law, replayed twice: over
  8 adapters, then over 1,000 adapters in the folder (ranks 8/16/32). S-LoRA's question: does
  serving many adapters cost the requests anything beyond their loads? Reported side by side:
  TPOT p50, TTFT p50, tok/s, requests answered.
- ``first``: while 8 streams decode on warm adapters, one request on a never-seen adapter of
  each rank 8..256 (its first use loads it from disk), then the same request again (warm):
  TTFT of both, and the compiles the server counted after it said healthy.

    python -m bench.many_adapters [--section zipf,first] [--rate 0.5] [--requests 80]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np

from bench.lib.report import save_report
from bench.lib.server_processes import start_server
from bench.lib.stream_replay import timed_stream
from bench.systems.common import TARGET_SETS, adapter_seed, model_config
from cara_jax.adapters.random_peft import write_random_peft

ROOT = Path(__file__).resolve().parents[1]
FIRST_RANKS = (8, 16, 32, 64, 128, 256)


async def hot_compiles(session, url: str) -> float:
    async with session.get(url + "/metrics") as r:
        text = await r.text()
    for line in text.splitlines():
        if line.startswith("cara_runner_hot_compiles"):
            return float(line.split()[-1])
    return float("nan")


# ---------------------------------------------------------------------------- zipf


def zipf_trace(n_adapters: int, requests: int, rate: float, alpha: float, seed: int):
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1 / rate, requests))
    w = 1.0 / np.arange(1, n_adapters + 1) ** alpha
    ids = rng.choice(n_adapters, size=requests, p=w / w.sum())
    return list(zip(arrivals.tolist(), ids.tolist(), strict=True))


async def replay(url: str, trace, names: list[str], tokens: int) -> dict:
    timeout = aiohttp.ClientTimeout(total=1800)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        await timed_stream(s, url, "SmolLM2-135M-Instruct", 4)  # first request: untimed
        before = await hot_compiles(s, url)
        t0 = time.perf_counter()

        async def one(at: float, i: int):
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            try:
                return await timed_stream(s, url, names[i], tokens)
            except (RuntimeError, aiohttp.ClientError, asyncio.TimeoutError) as e:
                return {"error": str(e)[:200]}

        res = await asyncio.gather(*(one(at, i) for at, i in trace))
        after = await hot_compiles(s, url)
    ok = [r for r in res if "error" not in r]
    wall = max(r["end"] for r in ok) - t0 if ok else float("nan")
    return {
        "requests": len(res), "answered": len(ok), "errors": [r["error"] for r in res if "error" in r],
        "distinct": len({i for _, i in trace}), "tok_s": sum(r["tokens"] for r in ok) / wall,
        "tpot_p50": statistics.median(r["tpot"] for r in ok),
        "ttft_p50": statistics.median(r["ttft"] for r in ok), "hot_compiles": after - before,
    }  # fmt: skip


def section_zipf(args, work: Path) -> dict:
    cfg = model_config()
    out = {}
    for n in (8, 1000):
        lora_dir = work / f"zipf{n}"
        names = [f"z{n}-{i}" for i in range(n)]
        ranks = [(8, 16, 32)[i % 3] for i in range(n)]
        t0 = time.perf_counter()
        for name, r in zip(names, ranks, strict=True):
            write_random_peft(lora_dir / name, cfg, r, adapter_seed(name), TARGET_SETS["qkvo"])
        print(f"  wrote {n} adapters in {time.perf_counter() - t0:.0f} s", flush=True)
        trace = zipf_trace(n, args.requests, args.rate, args.alpha, args.seed)
        procs, url = start_server(work, lora_dir, args.server_flags, f"zipf{n}", args.src.resolve())
        try:
            out[n] = asyncio.run(replay(url, trace, names, args.tokens))
        finally:
            procs.stop()
        print(f"  {n} adapters: {json.dumps(out[n])}", flush=True)
    return out


# ---------------------------------------------------------------------------- first


async def first_requests(
    url: str, warm: list[str], cold: dict[int, list[str]], tokens: int
) -> dict:
    timeout = aiohttp.ClientTimeout(total=1800)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        for m in warm:
            await timed_stream(s, url, m, 4)
        before = await hot_compiles(s, url)
        rows = {}
        for r, names in cold.items():
            firsts, warms = [], []
            for name in names:  # a never-seen adapter each time
                background = [asyncio.create_task(timed_stream(s, url, m, tokens)) for m in warm]
                await asyncio.sleep(3.0)  # the 8 streams are decoding
                first = await timed_stream(s, url, name, 8)
                again = await timed_stream(s, url, name, 8)
                await asyncio.gather(*background)
                firsts.append(first["ttft"])
                warms.append(again["ttft"])
            rows[r] = {"first_ttft": statistics.median(firsts),
                       "warm_ttft": statistics.median(warms),
                       "first_ttfts": firsts, "warm_ttfts": warms}  # fmt: skip
            print(f"  rank {r}: first {firsts}, warm {warms}", flush=True)
        after = await hot_compiles(s, url)
    return {"ranks": rows, "hot_compiles": after - before, "repeats": len(names)}


def section_first(args, work: Path) -> dict:
    cfg = model_config()
    lora_dir = work / "first"
    warm = [f"w{i}" for i in range(8)]
    for i, name in enumerate(warm):
        write_random_peft(lora_dir / name, cfg, (8, 16, 32)[i % 3], adapter_seed(name),
                          TARGET_SETS["qkvo"])  # fmt: skip
    cold = {r: [f"cold-r{r}-{k}" for k in range(args.first_repeats)] for r in FIRST_RANKS}
    for r, names in cold.items():
        for name in names:
            write_random_peft(lora_dir / name, cfg, r, adapter_seed(name), TARGET_SETS["qkvo"])
    procs, url = start_server(work, lora_dir, args.server_flags, "first", args.src.resolve())
    try:
        return asyncio.run(first_requests(url, warm, cold, args.background_tokens))
    finally:
        procs.stop()


# ---------------------------------------------------------------------------- report


def report(args, data: dict) -> str:
    flags = " ".join(args.server_flags) or "none (defaults)"
    lines = ["# Many adapters and first requests on the default server", "",
             f"`python -m bench.many_adapters`; server flags: {flags}. SmolLM2-135M float32, "
             "random PEFT adapters on q/k/v/o, 2-core CPU.", ""]  # fmt: skip
    z = data.get("zipf")
    if z:
        a, b = z["8"], z["1000"]
        lines += [
            "## Zipf trace over 8 vs 1,000 adapters on disk", "",
            f"{args.requests} requests, Poisson {args.rate:g} req/s, Zipf alpha {args.alpha:g}, "
            f"{args.tokens} greedy tokens each (ignore_eos), ranks 8/16/32, seed {args.seed}; the "
            "same arrival times in both runs, each run its own server process.", "",
            "| adapters in --lora-dir | distinct used | answered | TPOT p50 ms | TTFT p50 s | tok/s "
            "| hot compiles |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for n, r in (("8", a), ("1000", b)):
            lines.append(f"| {n} | {r['distinct']} | {r['answered']}/{r['requests']} "
                         f"| {r['tpot_p50'] * 1e3:.0f} | {r['ttft_p50']:.2f} | {r['tok_s']:.1f} "
                         f"| {r['hot_compiles']:.0f} |")  # fmt: skip
        lines += ["", f"1,000 vs 8: TPOT p50 {b['tpot_p50'] / a['tpot_p50']:.2f}x (target <= 1.3x), "
                  f"TTFT p50 {b['ttft_p50'] / a['ttft_p50']:.2f}x (target <= 2x), tok/s "
                  f"{b['tok_s'] / a['tok_s']:.2f}x.", ""]  # fmt: skip
    f = data.get("first")
    if f:
        lines += ["## First request on a never-seen adapter while 8 streams decode", "",
                  "Each adapter's first request loads it from --lora-dir (parse, convert, copy); "
                  "the second is the same request once it is resident. Medians over "
                  f"{f.get('repeats', 1)} never-seen adapters per rank.", "",
                  "| rank | first TTFT s | warm TTFT s | ratio |", "|---:|---:|---:|---:|"]  # fmt: skip
        for r, v in f["ranks"].items():
            lines.append(f"| {r} | {v['first_ttft']:.2f} | {v['warm_ttft']:.2f} "
                         f"| {v['first_ttft'] / v['warm_ttft']:.2f}x |")  # fmt: skip
        lines += ["", f"Compiles counted after healthy (`cara_runner_hot_compiles`, adapter "
                  f"writes included): {f['hot_compiles']:.0f}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--section", default="zipf,first")
    ap.add_argument("--rate", type=float, default=0.5)
    ap.add_argument("--requests", type=int, default=80)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--background-tokens", type=int, default=160)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--first-repeats", type=int, default=3,
                    help="never-seen adapters per rank in the first section (medians reported)")
    ap.add_argument("--src", type=Path, default=ROOT, help="checkout whose server to run")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/many_adapters")
    ap.add_argument("server_flags", nargs="*", help="flags passed to cara-serve (after --)")
    args = ap.parse_args(argv)
    path = args.out.with_suffix(".json")
    data = json.loads(path.read_text()) if path.exists() else {}
    with tempfile.TemporaryDirectory(prefix="many_adapters_") as tmp:
        work = Path(tmp)
        sections = args.section.split(",")
        if "zipf" in sections:
            data["zipf"] = {str(k): v for k, v in section_zipf(args, work).items()}
        if "first" in sections:
            data["first"] = section_first(args, work)
            data["first"]["ranks"] = {str(k): v for k, v in data["first"]["ranks"].items()}
    save_report(args.out, report(args, data), data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
