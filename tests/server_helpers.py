"""Shared pieces of the server tests: a real server on loopback and small HTTP helpers.

Each test module wraps ``start_server`` in its own module-scoped fixture, so a module's tests
share one server (the real SmolLM2 with two demo adapters, real PEFT files).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
from pathlib import Path

import aiohttp
import openai

from cara_jax.sampling_params import SamplingParams
from server.cli import (
    COMPILE_CACHE_KEYS,
    build_parser,
    build_state,
    engine_config,
    start_warmup,
)
from server.instance.app import BackgroundServer, ServerState, build_app

CHAT = [{"role": "user", "content": "What is the capital of France?"}]

# The engine geometry of every SmolLM2 engine in the tests: the servers', the model parity
# test's and the CPU-assist tests' (``smol_engine_config``). Their step programs are then the
# same, so a fresh clone compiles the 64-token step (and its CPU-assisted twin) once; the
# persistent compile cache serves every later engine.
SMOL_FLAGS = ("--max-num-seqs", "8", "--max-model-len", "128", "--max-prefill-seqs", "4",
              "--max-num-batched-tokens", "64", "--token-buckets", "64",
              "--kv-cache-memory", "16M", "--max-lora-rank", "32", "--device-lora-bytes", "128M")


def smol_engine_config(flags=SMOL_FLAGS, **replace):
    """The EngineConfig ``cara-serve`` builds from ``flags``, with fields replaced."""
    cfg = engine_config(build_parser().parse_args(list(flags)))
    return dataclasses.replace(cfg, **replace)


@dataclasses.dataclass
class Srv:
    url: str
    state: ServerState
    lora_dir: Path
    base: str

    def client(self, **kw) -> openai.OpenAI:
        kw.setdefault("api_key", "unused")
        return openai.OpenAI(base_url=self.url + "/v1", max_retries=0, timeout=120, **kw)


def start_server(tmp_path_factory):
    """A module's server (wrap with ``pytest.fixture(scope="module")``): real SmolLM2, two
    demo adapters, an adapter folder, a small queue; stopped when the module is done."""
    import jax

    lora_dir = tmp_path_factory.mktemp("lora_dir")
    cache = Path(os.environ["CARA_JAX_CACHE"]) / "xla"
    before = {k: getattr(jax.config, k) for k in COMPILE_CACHE_KEYS}
    # --cold-start sync: the default (auto) adds CPU-assist worker processes to every server
    # module; auto is tested on the engine (tests/engine/test_cold_start_auto.py)
    args = build_parser().parse_args(
        ["--demo-adapters", "2", *SMOL_FLAGS, "--cold-start", "sync", "--lora-dir", str(lora_dir),
         "--max-queue", "64", "--drain-timeout", "10", "--compile-cache", str(cache)]
    )  # fmt: skip
    state = build_state(args)
    # One program (a 64-token step) runs every step these tests make; the server compiles it
    # before it reports ready (start_warmup), as a real start does.
    start_warmup(state)
    server = BackgroundServer(build_app(state))
    wait_ready(server.url)
    yield Srv(server.url, state, lora_dir, state.base_name)
    server.stop()
    for k, v in before.items():  # the compile cache was for this module only
        jax.config.update(k, v)


def wait_ready(url: str, timeout: float = 600.0) -> None:
    """Poll /health until the server is ready (every program compiled)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        status, _ = get(url + "/health")
        if status == 200:
            return
        time.sleep(0.2)
    raise AssertionError(f"{url} not ready after {timeout:.0f}s")


def side_app(srv: Srv, **config) -> BackgroundServer:
    """Another app on the same engine with a different config (it does not own the engine)."""
    cfg = dataclasses.replace(srv.state.config, **config)
    return BackgroundServer(build_app(ServerState(srv.state.async_engine, cfg, owns_engine=False)))


def py_generate(srv: Srv, prompt, params: SamplingParams, adapter: str | None = None):
    """The Python API on the same engine: (text, token count, finish reason)."""

    async def run():
        text, n, reason = "", 0, None
        async for out in srv.state.async_engine.generate(prompt, params, adapter):
            text, n, reason = text + out.text, n + len(out.token_ids), out.finish_reason
        return text, n, reason

    return asyncio.run(run())


def wait_idle(srv: Srv, timeout: float = 20.0) -> None:
    eng = srv.state.engine
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not eng.running and not eng.waiting and srv.state.async_engine.num_active() == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"engine not idle: running={eng.running} waiting={list(eng.waiting)}")


def post(url: str, body, headers: dict | None = None) -> tuple[int, dict, dict]:
    async def run():
        async with aiohttp.ClientSession() as s:
            data = body if isinstance(body, (bytes, str)) else json.dumps(body)
            async with s.post(url, data=data, headers=headers or {}) as r:
                return r.status, dict(r.headers), await r.json(content_type=None)

    return asyncio.run(run())


def get(url: str, headers: dict | None = None) -> tuple[int, str]:
    async def run():
        async with aiohttp.ClientSession() as s, s.get(url, headers=headers or {}) as r:
            return r.status, await r.text()

    return asyncio.run(run())


def assert_error(body: dict, code: str | None = None) -> None:
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
