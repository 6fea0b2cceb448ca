"""Load test: many concurrent streaming clients against `cara-serve` over loopback.

    python -m bench.load_test --clients 200 --duration 60

Starts the server as a subprocess on the embedded model with demo adapters. Each client loops
for ``--duration`` seconds: a streaming chat or completions request (alternating) on the base
model or an adapter (round-robin), then the next. Requests still running at the end may finish
within ``--grace`` seconds. A request is *hung* if no byte arrives for ``--hang-timeout`` seconds
(queued streams get SSE keep-alive comments, so silence means a stuck server) or it has not
finished by the end of the grace period; the target is zero. Reports completed, failed,
rejected (429), hung, TTFT percentiles, throughput, the server's RSS at the end, and whether the
engine drained to idle. Writes bench/results/load_test.md and .json.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np

from bench.lib.report import write_report
from bench.lib.serve_flags import engine_flags
from bench.systems.common import kv_cache_bytes, model_config
from server.cli import byte_size

RESULTS = Path(__file__).parent / "results"
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Name three primary colors.",
    "How many legs does a spider have?",
    "Give me a word that rhymes with cat.",
]
PROMPTS = ["The capital of France is", "def add(a, b):", "Once upon a time", "1, 2, 3,"]


@dataclasses.dataclass
class Outcome:
    kind: str  # completed | failed | rejected | hung
    ttft: float | None = None
    e2e: float | None = None
    tokens: int = 0
    why: str = ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> dict[str, float]:
    """Resident and peak resident memory of a process (Linux /proc)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, val = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(val.split()[0]) / 1024
    except OSError:
        pass
    return out


async def one_request(session, url: str, i: int, models: list[str], args) -> Outcome:
    model = models[i % len(models)]
    body: dict = {
        "model": model,
        "stream": True,
        "max_tokens": random.randint(8, args.max_tokens),
        "temperature": 0.7,
        "stream_options": {"include_usage": True},
    }
    if i % 2:
        body["messages"] = [{"role": "user", "content": random.choice(QUESTIONS)}]
        path = "/v1/chat/completions"
    else:
        body["prompt"] = random.choice(PROMPTS)
        path = "/v1/completions"
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    try:
        async with session.post(url + path, json=body) as r:
            if r.status == 429:
                await r.read()
                return Outcome("rejected")
            if r.status != 200:
                return Outcome("failed", why=f"HTTP {r.status}: {(await r.text())[:200]}")
            while True:
                try:
                    line = await asyncio.wait_for(r.content.readline(), args.hang_timeout)
                except asyncio.TimeoutError:
                    return Outcome("hung", why=f"no byte for {args.hang_timeout}s")
                if not line:
                    return Outcome("failed", why="stream ended without [DONE]")
                line = line.strip()
                if not line.startswith(b"data: "):
                    continue  # blank separators and keep-alive comments
                data = line[6:]
                if data == b"[DONE]":
                    return Outcome("completed", ttft, time.perf_counter() - t0, tokens)
                chunk = json.loads(data)
                if "error" in chunk:
                    return Outcome("failed", why=chunk["error"]["message"][:200])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                for c in chunk.get("choices", []):
                    piece = c.get("text") or (c.get("delta") or {}).get("content")
                    if piece and ttft is None:
                        ttft = time.perf_counter() - t0
    except (aiohttp.ClientError, OSError) as e:
        return Outcome("failed", why=f"{type(e).__name__}: {e}")


async def client(session, url, cid: int, models, args, deadline: float, out: list) -> None:
    i = cid
    while time.perf_counter() < deadline:
        o = await one_request(session, url, i, models, args)
        out.append(o)
        i += args.clients
        if o.kind == "rejected":
            await asyncio.sleep(1.0)  # Retry-After


async def run_clients(url: str, models: list[str], args) -> tuple[list[Outcome], float]:
    out: list[Outcome] = []
    conn = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None)
    t0 = time.perf_counter()
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as s:
        deadline = t0 + args.duration
        tasks = [
            asyncio.create_task(client(s, url, c, models, args, deadline, out))
            for c in range(args.clients)
        ]
        done, pending = await asyncio.wait(tasks, timeout=args.duration + args.grace)
        for t in pending:  # still running after the grace period: hung by definition
            t.cancel()
            out.append(Outcome("hung", why="not finished by the end of the grace period"))
        for t in done:
            if t.exception() is not None:
                out.append(Outcome("failed", why=repr(t.exception())))
    return out, time.perf_counter() - t0


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


async def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.perf_counter() + timeout
    async with aiohttp.ClientSession() as s:
        while time.perf_counter() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited with {proc.returncode}")
            try:
                async with s.get(url + "/health") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.5)
    raise SystemExit("the server did not come up in time")


async def fetch_json(url: str) -> dict:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return await r.json()


async def engine_idle(url: str, timeout: float = 30.0) -> dict:
    deadline = time.perf_counter() + timeout
    h = {}
    while time.perf_counter() < deadline:
        h = await fetch_json(url + "/health")
        if h.get("running") == 0 and h.get("waiting") == 0:
            break
        await asyncio.sleep(0.2)
    return h


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of new requests")
    ap.add_argument(
        "--grace",
        type=float,
        default=240.0,
        help="seconds after the duration for requests in flight to finish",
    )
    ap.add_argument("--hang-timeout", type=float, default=30.0)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=4, help="demo adapters (plus the base)")
    ap.add_argument(
        "--num-slots", "--max-num-seqs", dest="max_num_seqs", type=int, default=16,
        help="sequences running at once",
    )  # fmt: skip
    ap.add_argument("--max-len", "--max-model-len", dest="max_model_len", type=int, default=128)
    ap.add_argument(
        "--max-prefill-batch", "--max-prefill-seqs", dest="max_prefill_seqs", type=int,
        default=2, help="prompts that advance one chunk each per step",
    )  # fmt: skip
    ap.add_argument("--max-num-batched-tokens", type=int, help="token budget of one step")
    ap.add_argument(
        "--kv-cache-memory", type=byte_size,
        help="paged KV cache bytes (512M, 2G; default: every sequence's full context)",
    )  # fmt: skip
    ap.add_argument("--max-queue", type=int, default=1024)
    ap.add_argument("--warmup", default="full", help="the server's --warmup")
    ap.add_argument("--startup-timeout", type=float, default=900.0)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    random.seed(0)

    if args.kv_cache_memory is None:  # what the old slot cache took: every context in full
        args.kv_cache_memory = kv_cache_bytes(
            model_config(), np.float32, args.max_num_seqs, args.max_model_len
        )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable,
        "-m",
        "server.cli",
        "--port",
        str(port),
        "--demo-adapters",
        str(args.adapters),
        *engine_flags(
            warmup=args.warmup,
            max_num_seqs=args.max_num_seqs,
            max_model_len=args.max_model_len,
            max_prefill_seqs=args.max_prefill_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            kv_cache_memory=args.kv_cache_memory,
        ),
        "--max-lora-rank",
        "16",
        "--max-queue",
        str(args.max_queue),
        "--log-level",
        "warning",
    ]
    log_path = Path(tempfile.mkdtemp(prefix="cara-load-")) / "server.log"
    t_start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            asyncio.run(wait_ready(url, proc, args.startup_timeout))
            startup = time.perf_counter() - t_start
            rss_start = rss_mb(proc.pid)
            models = [m["id"] for m in asyncio.run(fetch_json(url + "/v1/models"))["data"]]
            outcomes, wall = asyncio.run(run_clients(url, models, args))
            health = asyncio.run(engine_idle(url))
            rss_end = rss_mb(proc.pid)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    failures = [o.why for o in outcomes if o.kind in ("failed", "hung")]
    server_log = log_path.read_text(errors="replace").splitlines()[-20:]
    shutil.rmtree(log_path.parent, ignore_errors=True)

    count = {
        k: sum(o.kind == k for o in outcomes) for k in ("completed", "failed", "rejected", "hung")
    }
    done = [o for o in outcomes if o.kind == "completed"]
    ttfts = [o.ttft for o in done if o.ttft is not None]
    tokens = sum(o.tokens for o in done)
    data = {
        "args": {k: v for k, v in vars(args).items() if k != "out"},  # no machine paths
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
        "startup_s": round(startup, 1),
        "wall_s": round(wall, 1),
        **count,
        "ttft_p50_s": pct(ttfts, 50),
        "ttft_p99_s": pct(ttfts, 99),
        "e2e_p99_s": pct([o.e2e for o in done], 99),
        "completed_per_s": len(done) / wall,
        "tokens_per_s": tokens / wall,
        "server_rss_mb_start": rss_start.get("VmRSS"),
        "server_rss_mb_end": rss_end.get("VmRSS"),
        "server_rss_mb_peak": rss_end.get("VmHWM"),
        "engine_idle_after": health.get("running") == 0 and health.get("waiting") == 0,
        "server_exit_code": proc.returncode,
        "failure_samples": failures[:10],
        "server_log_tail": server_log if failures or proc.returncode else [],
    }

    def f(x, spec=".2f"):
        return "n/a" if x is None else format(x, spec)

    lines = [
        f"# Load test: {args.clients} streaming clients for {args.duration:.0f} s over loopback",
        "",
        f"Machine: {data['machine']}; {data['date']}. Server: embedded SmolLM2-135M float32, "
        f"{args.adapters} demo adapters + base (round-robin), {args.max_num_seqs} sequences at "
        f"once, max_model_len {args.max_model_len}, KV cache "
        f"{args.kv_cache_memory / 2**20:.0f} MiB, warm-up `{args.warmup}`; requests alternate "
        f"chat/completions, 8-{args.max_tokens} new tokens, temperature 0.7. Startup "
        f"{data['startup_s']} s.",
        "",
        "| completed | failed | rejected (429) | hung | TTFT p50 s | TTFT p99 s | e2e p99 s "
        "| req/s | tok/s | server RSS end MB (peak) | engine idle after |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        f"| {count['completed']} | {count['failed']} | {count['rejected']} | {count['hung']} "
        f"| {f(data['ttft_p50_s'])} | {f(data['ttft_p99_s'])} | {f(data['e2e_p99_s'])} "
        f"| {data['completed_per_s']:.2f} | {data['tokens_per_s']:.1f} "
        f"| {f(data['server_rss_mb_end'], '.0f')} ({f(data['server_rss_mb_peak'], '.0f')}) "
        f"| {'yes' if data['engine_idle_after'] else 'NO'} |",
        "",
        f"Hung = no byte for {args.hang_timeout:.0f} s (queued streams get SSE keep-alive "
        f"comments) or not finished {args.grace:.0f} s after the end. TTFT includes the wait "
        f"for a sequence row ({args.clients} clients, {args.max_num_seqs} rows) and for "
        f"admission ({args.max_prefill_seqs} prompts advance per step); on a CPU the numbers "
        "measure robustness, not speed.",
    ]
    if failures:
        lines += ["", "Failure samples:", *[f"- {w}" for w in failures[:10]]]
    write_report(args.out, "load_test", lines, data)
    if count["hung"] or count["failed"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
