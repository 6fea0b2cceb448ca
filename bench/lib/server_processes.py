"""Server subprocesses of a bench run (cara-serve instances, cara-router): free ports, starting
and stopping them (``Processes``), waiting until one is healthy or all are idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[2]  # the checkout whose server a bench starts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Processes:
    """Subprocesses started by this run; ``stop`` ends them (newest first) whatever happens."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[tuple[str, subprocess.Popen, Any]] = []

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "w")  # noqa: SIM115 (closed in stop)
        # own session: a terminal's Ctrl-C reaches only this script, which stops them in order
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append((name, proc, log))
        return proc

    def stop(self, proc: subprocess.Popen | None = None, timeout: float = 30.0) -> None:
        """Stop ``proc`` (default: all of them, newest first: the routers before instances)."""
        for entry in reversed(list(self.procs)):
            _, p, log = entry
            if proc is not None and p is not proc:
                continue
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            log.close()
            self.procs.remove(entry)

    def tail(self, name: str, lines: int = 15) -> str:
        path = self.log_dir / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


async def wait_healthy(url: str, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.perf_counter() + timeout
    async with aiohttp.ClientSession() as s:
        while time.perf_counter() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with code {proc.returncode}")
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with s.get(url + "/health", timeout=aiohttp.ClientTimeout(total=5)) as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.5)
    raise RuntimeError(f"{what} did not become healthy within {timeout:.0f} s")


async def get_json(url: str) -> Any:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        if r.status != 200:
            return None
        return await r.json(content_type=None)


async def wait_idle(urls: list[str], timeout: float = 300.0) -> bool:
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        hs = await asyncio.gather(*(get_json(u + "/health") for u in urls))
        if all(h and h.get("running") == 0 and h.get("waiting") == 0 for h in hs):
            return True
        await asyncio.sleep(0.5)
    return False


def start_server(work: Path, lora_dir: Path, extra: list[str], name: str, src: Path = ROOT):
    """``cara-serve --lora-dir`` from checkout ``src`` on a free port, once healthy: (procs, url)."""
    port = free_port()
    procs = Processes(work)
    boot = f"import sys; sys.path.insert(0, {str(src)!r}); from server.cli import main; sys.exit(main())"
    cmd = [sys.executable, "-c", boot,
           "--port", str(port), "--lora-dir", str(lora_dir), *extra]  # fmt: skip
    proc = procs.start(name, cmd)
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    try:
        asyncio.run(wait_healthy(url, proc, 1200, "cara-serve"))
    except BaseException:
        print(procs.tail(name, 40), file=sys.stderr)
        procs.stop()
        raise
    print(f"  {name}: healthy after {time.perf_counter() - t0:.0f} s", flush=True)
    return procs, url
