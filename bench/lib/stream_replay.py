"""Replaying a trace as streaming completions over HTTP: each request sent at its arrival time,
its token times recorded (``RequestResult``), and the server that answered (``X-Cara-Instance``
or ``X-Cara-Replica``); plus an untimed warm-up of every adapter, and one timed stream
(``timed_stream``) for the benches that measure a fixed prompt.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time

import aiohttp

from bench.lib.metrics import RequestResult
from bench.lib.workload import Trace

# the fixed prompt of the benches that time single streams (adapter_cost, many_adapters, ...)
STORY_PROMPT = "Write a long story about a lighthouse keeper and the sea, in plain words."


def body_of(model: str | None, prompt: list[int], max_tokens: int) -> dict:
    return {
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip


async def one_request(
    session: aiohttp.ClientSession, url: str, req, t0: float, extra: dict | None = None
) -> tuple[RequestResult, str | None]:
    """Send one trace request at its arrival time; (result, the instance that served it)."""
    await asyncio.sleep(max(0.0, t0 + req.arrival - time.perf_counter()))
    res = RequestResult(req.id, req.arrival, [], adapter=req.adapter, rank=req.rank,
                        prompt_tokens=len(req.prompt))  # fmt: skip
    instance = None
    try:
        async with session.post(
            url + "/v1/completions",
            json={**body_of(req.adapter, req.prompt, req.max_tokens), **(extra or {})},
        ) as r:
            instance = r.headers.get("X-Cara-Instance") or r.headers.get("X-Cara-Replica")
            if r.status != 200:
                res.ok, res.error = False, f"HTTP {r.status}: {(await r.text())[:200]}"
                return res, instance
            done = False
            async for raw in r.content:
                line = raw.strip()
                if not line.startswith(b"data: "):
                    continue
                if line == b"data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    res.ok, res.error = False, chunk["error"].get("message", "error")[:200]
                    return res, instance
                if any(c.get("text") for c in chunk.get("choices", [])):
                    res.token_times.append(time.perf_counter() - t0)
            if not done:
                res.ok, res.error = False, "stream ended without [DONE]"
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
        res.ok, res.error = False, f"{type(e).__name__}: {e}"
    return res, instance


async def replay(
    url: str, trace: Trace, grace: float, extra=None
) -> tuple[list[RequestResult], list]:
    """Replay ``trace``; ``extra(request)`` adds fields to a request's body (e.g. its SLO)."""
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as s:
        t0 = time.perf_counter()
        tasks = [
            asyncio.create_task(one_request(s, url, r, t0, extra(r) if extra else None))
            for r in trace.requests
        ]
        last = trace.requests[-1].arrival if trace.requests else 0.0
        done, pending = await asyncio.wait(tasks, timeout=last + grace)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    out, where = [], []
    for req, t in zip(trace.requests, tasks, strict=True):
        if t in done and t.exception() is None:
            res, inst = t.result()
        else:
            why = "not finished in the grace period"
            res = RequestResult(req.id, req.arrival, [], False, why, req.adapter, req.rank)
            inst = None
        out.append(res)
        where.append(inst)
    return out, where


async def warm_up(urls: list[str], names: list[str], prompt: list[int]) -> None:
    """One short request per adapter and instance (untimed), two at a time per instance."""
    async with aiohttp.ClientSession() as s:

        async def run(url: str) -> None:
            for i in range(0, len(names), 2):
                bodies = [{**body_of(n, prompt, 4), "stream": False} for n in names[i : i + 2]]
                posts = [s.post(url + "/v1/completions", json=b) for b in bodies]
                for r in await asyncio.gather(*posts):
                    await r.read()
                    r.release()

        await asyncio.gather(*(run(u) for u in urls))


async def timed_stream(
    session, url: str, model: str, max_tokens: int, extra: dict | None = None, *,
    prompt: str = STORY_PROMPT,
) -> dict:  # fmt: skip
    """One greedy streamed completion of ``max_tokens``: TTFT, median TPOT, token count."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, **(extra or {})}  # fmt: skip
    times = []
    t0 = time.perf_counter()
    async with session.post(url + "/v1/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"{model}: HTTP {r.status} {(await r.text())[:300]}")
        async for raw in r.content:
            line = raw.strip()
            if line == b"data: [DONE]":
                break
            if line.startswith(b"data: "):
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(f"{model}: {chunk['error']}")
                if any(c.get("text") for c in chunk.get("choices", [])):
                    times.append(time.perf_counter() - t0)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    return {"ttft": times[0], "tpot": statistics.median(gaps), "tokens": len(times),
            "end": t0 + times[-1], "start": t0}  # fmt: skip
