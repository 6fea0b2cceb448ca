"""What an adapter costs on the default server: base vs adapter TPOT and tok/s, beside the bytes bound.

Starts ``cara-serve --lora-dir DIR`` with its defaults (no tuning flag), writes random PEFT
adapters into DIR (loaded by name on their first request, as a user's would be), warms each one,
then measures in one process's run, side by side:

- 1 stream, 48 greedy tokens: base model vs a rank-8 q/k/v/o adapter (TPOT p50);
- 8 streams: base vs 8 distinct adapters (ranks 8/16/32, q/k/v/o), tok/s;
- 16 streams: base vs 16 distinct adapters (ranks 8-64, q/k/v/o), tok/s.

Each LoRA figure sits next to its bytes bound, (base + distinct adapters' bytes) / base: the
ratio a step that reads every byte it needs once, and nothing more, would keep.

    python -m bench.adapter_cost [--src DIR] [--label now] [--out bench/results/adapter_cost]

``--src`` runs another checkout's server (e.g. a worktree of an earlier commit) for a
before/after; the report merges runs by label.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from bench.lib.report import save_report
from bench.lib.server_processes import Processes, free_port, wait_healthy
from bench.lib.stream_replay import STORY_PROMPT as PROMPT  # noqa: F401  (its report names it)
from bench.lib.stream_replay import timed_stream
from bench.systems.common import TARGET_SETS, model_config, write_adapters

ROOT = Path(__file__).resolve().parents[1]
BASE = "SmolLM2-135M-Instruct"
RANKS_8 = [8, 16, 32, 8, 16, 32, 8, 16]
RANKS_16 = [8, 16, 32, 64] * 4


def adapter_bytes(rank: int, cfg, targets=TARGET_SETS["qkvo"]) -> int:
    shapes = cfg.projection_shapes()
    return rank * sum(sum(shapes[p]) for p in targets) * cfg.num_layers * 4


def base_bytes(cfg) -> int:
    h, m, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    per_layer = h * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * h + 3 * h * m + 2 * h
    return 4 * (layers * per_layer + cfg.vocab_size * h + h)


async def concurrent(session, url: str, models: list[str], max_tokens: int) -> dict:
    t0 = time.perf_counter()
    res = await asyncio.gather(*(timed_stream(session, url, m, max_tokens) for m in models))
    wall = max(r["end"] for r in res) - t0
    return {"tok_s": sum(r["tokens"] for r in res) / wall,
            "tpot_p50": statistics.median(r["tpot"] for r in res), "wall": wall}  # fmt: skip


async def measure(url: str, names8: list[str], names16: list[str], tokens: int, repeats: int):
    out: dict = {}
    timeout = aiohttp.ClientTimeout(total=1800)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        for m in [BASE, *names8, *names16]:  # first use of each adapter: its load, untimed
            await timed_stream(s, url, m, 4)
        await concurrent(s, url, [BASE] * 8, 8)
        for k in range(repeats):  # base and LoRA interleaved, so drift hits both alike
            one_b = await timed_stream(s, url, BASE, tokens)
            one_a = await timed_stream(s, url, names8[0], tokens)
            c8b = await concurrent(s, url, [BASE] * 8, tokens)
            c8a = await concurrent(s, url, names8, tokens)
            c16b = await concurrent(s, url, [BASE] * 16, tokens)
            c16a = await concurrent(s, url, names16, tokens)
            for key, v in dict(one_base=one_b, one_lora=one_a, c8_base=c8b, c8_lora=c8a,
                               c16_base=c16b, c16_lora=c16a).items():  # fmt: skip
                out.setdefault(key, []).append(v)
            print(f"  pass {k + 1}: 1 stream {one_b['tpot'] * 1e3:.0f}/{one_a['tpot'] * 1e3:.0f} "
                  f"ms, 8 {c8b['tok_s']:.1f}/{c8a['tok_s']:.1f}, 16 {c16b['tok_s']:.1f}/"
                  f"{c16a['tok_s']:.1f} tok/s", flush=True)  # fmt: skip
        async with s.get(url + "/metrics") as r:
            metrics = await r.text()
    hot = [ln for ln in metrics.splitlines() if ln.startswith("cara_runner_hot_compiles")]
    out["hot_compiles"] = hot[0].split()[-1] if hot else None
    return out


def run(src: Path, label: str, tokens: int, repeats: int, extra: list[str]) -> dict:
    cfg = model_config()
    work = Path(tempfile.mkdtemp(prefix="adapter_cost_"))
    lora_dir = work / "loras"
    names8 = [f"a8-{i}-r{r}" for i, r in enumerate(RANKS_8)]
    names16 = [f"a16-{i}-r{r}" for i, r in enumerate(RANKS_16)]
    ranks = {**dict(zip(names8, RANKS_8, strict=True)), **dict(zip(names16, RANKS_16, strict=True))}
    write_adapters(lora_dir, ranks, cfg, TARGET_SETS["qkvo"])
    port = free_port()
    procs = Processes(work)
    boot = f"import sys; sys.path.insert(0, {str(src)!r}); from server.cli import main; sys.exit(main())"
    cmd = [sys.executable, "-c", boot, "--port", str(port), "--lora-dir", str(lora_dir), *extra]
    url = f"http://127.0.0.1:{port}"
    try:
        proc = procs.start("server", cmd)
        t0 = time.perf_counter()
        asyncio.run(wait_healthy(url, proc, 1200, "cara-serve"))
        healthy = time.perf_counter() - t0
        print(f"[{label}] healthy after {healthy:.0f} s", flush=True)
        data = asyncio.run(measure(url, names8, names16, tokens, repeats))
    except BaseException:
        print(procs.tail("server", 40), file=sys.stderr)
        raise
    finally:
        procs.stop()
    bb = base_bytes(cfg)
    bound = {
        "one": (bb + adapter_bytes(8, cfg)) / bb,
        "c8": (bb + sum(adapter_bytes(r, cfg) for r in RANKS_8)) / bb,
        "c16": (bb + sum(adapter_bytes(r, cfg) for r in RANKS_16)) / bb,
    }
    med = lambda xs, k: statistics.median(x[k] for x in xs)  # noqa: E731
    return {
        "label": label, "extra_flags": extra, "healthy_s": healthy, "tokens": tokens,
        "repeats": repeats, "bound": bound, "hot_compiles": data.pop("hot_compiles"),
        "one_base_tpot": med(data["one_base"], "tpot"), "one_lora_tpot": med(data["one_lora"], "tpot"),
        "c8_base": med(data["c8_base"], "tok_s"), "c8_lora": med(data["c8_lora"], "tok_s"),
        "c16_base": med(data["c16_base"], "tok_s"), "c16_lora": med(data["c16_lora"], "tok_s"),
        "c16_lora_tpot": med(data["c16_lora"], "tpot_p50"), "raw": data,
    }  # fmt: skip


def report(runs: list[dict]) -> str:
    lines = [
        "# What an adapter costs on the default server",
        "",
        "`python -m bench.adapter_cost`: `cara-serve --lora-dir DIR` on its defaults (flags, if "
        "any, in the table), SmolLM2-135M float32, random PEFT adapters on q/k/v/o loaded by "
        "name on first use and warmed; 48 greedy tokens per stream (ignore_eos). Base and LoRA "
        "passes interleaved in one server process; medians over the passes. Bytes bound: "
        "(base + the distinct adapters' bytes) / base.",
        "",
        "| build | flags | 1 stream TPOT base / rank-8 ms | ratio (bound) | 8 streams base / 8 "
        "adapters tok/s | ratio (bound) | 16 streams base / 16 adapters tok/s | ratio (bound) "
        "| hot compiles |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        b = r["bound"]
        lines.append(
            f"| {r['label']} | {' '.join(r['extra_flags']) or 'defaults'} "
            f"| {r['one_base_tpot'] * 1e3:.0f} / {r['one_lora_tpot'] * 1e3:.0f} "
            f"| {r['one_lora_tpot'] / r['one_base_tpot']:.2f}x ({b['one']:.3f}x) "
            f"| {r['c8_base']:.1f} / {r['c8_lora']:.1f} "
            f"| {r['c8_lora'] / r['c8_base']:.2f}x ({1 / b['c8']:.2f}x) "
            f"| {r['c16_base']:.1f} / {r['c16_lora']:.1f} "
            f"| {r['c16_lora'] / r['c16_base']:.2f}x ({1 / b['c16']:.2f}x) | {r['hot_compiles']} |"
        )
    lines += ["", "Targets on the 2-core CPU: 1 stream <= 1.15x base TPOT; 8 over 8 >= 0.80x "
              "base tok/s; 16 over 16 >= 0.60x. The bound column of the throughput ratios is "
              "base / (base + adapters), the best a step bound by its bytes could keep.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=ROOT, help="checkout whose server to run")
    ap.add_argument("--label", default="now")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/adapter_cost")
    ap.add_argument("server_flags", nargs="*", help="flags passed to cara-serve (after --)")
    args = ap.parse_args(argv)
    res = run(args.src.resolve(), args.label, args.tokens, args.repeats, args.server_flags)
    path = args.out.with_suffix(".json")
    runs = json.loads(path.read_text()) if path.exists() else []
    runs = [r for r in runs if r["label"] != args.label] + [res]
    save_report(args.out, report(runs), runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
