"""From launch to serving: time to healthy (empty and warm compile cache), the first request's
TTFT after healthy, and the number of compiled programs, for ``cara-serve`` on its defaults.

    python -m bench.startup [--baseline-rev REV] [--out bench/results]

Each run starts the server as a new user would (a fresh process, the embedded model, two demo
adapters) with its own compile cache folder: first empty, then the one the first run filled.
``--baseline-rev`` also runs another revision of this repository (checked out into a temporary
git worktree) the same way, so "before" and "after" are measured side by side in one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.lib.report import write_report

ROOT = Path(__file__).resolve().parent.parent
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return 0, ""


def _first_request(url: str, model: str) -> dict:
    """One streamed chat request: TTFT, end-to-end time and the text."""
    body = json.dumps({"model": model, "messages": QUESTION, "max_tokens": 16,
                       "temperature": 0, "stream": True}).encode()  # fmt: skip
    req = urllib.request.Request(url + "/v1/chat/completions", body,
                                 {"Content-Type": "application/json"})  # fmt: skip
    t0 = time.perf_counter()
    ttft, text = None, ""
    with urllib.request.urlopen(req, timeout=900) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
            if delta and ttft is None:
                ttft = time.perf_counter() - t0
            text += delta
    return {"ttft_s": ttft, "e2e_s": time.perf_counter() - t0, "text": text}


def _programs(url: str) -> float | None:
    _, text = _get(url + "/metrics")
    for name in ("cara_compiled_programs", "cara_runner_compiled_variants"):
        m = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
        if m:
            return float(m.group(1))
    return None


def run_once(src: Path, cache: Path, extra: list[str], timeout: float) -> dict:
    """Start cara-serve from ``src`` with compile cache ``cache``; measure; stop it."""
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(src), CARA_JAX_CACHE=str(cache))
    cmd = [sys.executable, "-c", "import sys; from server.cli import main; sys.exit(main())",
           "--port", str(port), "--demo-adapters", "2", "--compile-cache", str(cache / "xla"),
           *extra]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=src, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    out: dict = {"listening_s": None, "healthy_s": None}
    try:
        while time.perf_counter() - t0 < timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {proc.stderr.read()[-2000:]}")
            status, _ = _get(url + "/health", 2)
            if status and out["listening_s"] is None:
                out["listening_s"] = time.perf_counter() - t0
            if status == 200:
                out["healthy_s"] = time.perf_counter() - t0
                break
            time.sleep(0.2)
        else:
            raise RuntimeError(f"not healthy after {timeout:.0f}s")
        out["programs_at_healthy"] = _programs(url)
        out["first"] = _first_request(url, "SmolLM2-135M-Instruct")
        out["second"] = _first_request(url, "demo-0")
        out["programs_after"] = _programs(url)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return out


def measure(src: Path, label: str, extra: list[str], timeout: float) -> dict:
    cache = Path(tempfile.mkdtemp(prefix="startup_cache_"))
    try:
        cold = run_once(src, cache, extra, timeout)
        warm = run_once(src, cache, extra, timeout)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return {"label": label, "cold": cold, "warm": warm}


@contextlib.contextmanager
def worktree(rev: str):
    d = Path(tempfile.mkdtemp(prefix="startup_rev_"))
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(d), rev],
                   check=True, capture_output=True)  # fmt: skip
    try:
        yield d
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(d)],
                       capture_output=True)  # fmt: skip


def _fmt(x, unit="s"):
    return "—" if x is None else f"{x:.1f} {unit}" if unit else f"{x:g}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--baseline-rev", help="also measure this revision (e.g. a commit before)")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    runs = []
    if args.baseline_rev:
        with worktree(args.baseline_rev) as d:
            runs.append(measure(d, f"before ({args.baseline_rev[:10]})", [], args.timeout))
    runs.append(measure(ROOT, "now", [], args.timeout))
    lines = [
        "# Startup: launch to healthy, first request after healthy",
        "",
        f"`cara-serve --demo-adapters 2` on its defaults, SmolLM2-135M float32, "
        f"{platform.machine()} with {os.cpu_count()} CPUs, no accelerator; each run a fresh "
        "process; cold = empty compile cache, warm = the cache the cold run filled.",
        "",
        "| build | cache | listening | healthy | programs at healthy | 1st request TTFT (base) "
        "| 1st request e2e | 2nd request TTFT (demo-0 adapter) | programs after |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        for kind in ("cold", "warm"):
            m = r[kind]
            lines.append(
                f"| {r['label']} | {kind} | {_fmt(m['listening_s'])} | {_fmt(m['healthy_s'])} "
                f"| {_fmt(m['programs_at_healthy'], '')} | {_fmt(m['first']['ttft_s'])} "
                f"| {_fmt(m['first']['e2e_s'])} | {_fmt(m['second']['ttft_s'])} "
                f"| {_fmt(m['programs_after'], '')} |"
            )
    lines += ["", f"First answer (now, warm): {runs[-1]['warm']['first']['text']!r}"]
    write_report(args.out, "startup", lines, {"runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
