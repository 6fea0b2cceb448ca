"""Python API in vLLM's shape: ``LLM`` for batch generation, ``AsyncEngine`` for streaming."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import jax.numpy as jnp

from cara_jax.embedded import default_model_path
from cara_jax.engine import Engine, EngineConfig
from cara_jax.sampling_params import SamplingParams
from cara_jax.sequence import RequestOutput
from cara_jax.tokenizer import Tokenizer
from cara_jax.weights import load_model


@dataclasses.dataclass
class CompletionOutput:
    text: str
    token_ids: list[int]
    finish_reason: str | None


def build_engine(
    model: str | Path | None = None,
    adapters: dict[str, str | Path] | None = None,
    dtype: str = "float32",
    **config,
) -> Engine:
    path = Path(model) if model else default_model_path()
    loaded = load_model(path, dtype={"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype])
    engine = Engine(loaded, Tokenizer.from_path(path), EngineConfig(**config))
    for name, p in (adapters or {}).items():
        engine.load_adapter(name, p)
    return engine


class LLM:
    """Offline batch generation: ``LLM(adapters={...}).generate(prompts, params, adapter=...)``."""

    def __init__(self, model: str | Path | None = None, adapters: dict | None = None, **config):
        self.engine = build_engine(model, adapters, **config)

    def generate(
        self,
        prompts: str | list[str] | list[list[int]],
        sampling_params: SamplingParams | None = None,
        adapter: str | list[str | None] | None = None,
    ) -> list[CompletionOutput]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        adapters = adapter if isinstance(adapter, list) else [adapter] * len(prompts)
        ids = [
            self.engine.add_request(p, sampling_params, a)
            for p, a in zip(prompts, adapters, strict=True)
        ]
        results = {i: CompletionOutput("", [], None) for i in ids}
        while self.engine.has_unfinished():
            for out in self.engine.step():
                r = results.get(out.request_id)
                if r is None:
                    continue
                r.text += out.text
                r.token_ids += out.token_ids
                if out.finished:
                    r.finish_reason = out.finish_reason
        return [results[i] for i in ids]

    def chat(self, messages: list[dict], sampling_params=None, adapter=None) -> CompletionOutput:
        ids = self.engine.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True
        )
        return self.generate([ids], sampling_params, adapter)[0]


class AsyncEngine:
    """Runs the engine loop in a background thread; ``generate`` streams deltas."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="cara-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_model(cls, model=None, adapters=None, **config) -> AsyncEngine:
        return cls(build_engine(model, adapters, **config))

    def _loop(self) -> None:
        while not self._stop:
            if not self.engine.has_unfinished():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            for out in self.engine.step():
                q = self._queues.get(out.request_id)
                if q is not None:
                    q[0].call_soon_threadsafe(q[1].put_nowait, out)

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        adapter: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield deltas until the final one; leaving early cancels the request."""
        queue: asyncio.Queue = asyncio.Queue()
        rid = self.engine.add_request(prompt, params, adapter)
        self._queues[rid] = (asyncio.get_running_loop(), queue)
        self._wake.set()
        try:
            while True:
                out = await queue.get()
                yield out
                if out.finished:
                    return
        finally:
            self._queues.pop(rid, None)
            self.engine.abort(rid)

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)
        self.engine.close()
