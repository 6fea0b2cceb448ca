"""Python API in vLLM's shape: ``LLM`` for batch generation, ``AsyncEngine`` for streaming."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from cara_jax.embedded import default_model_path
from cara_jax.engine import Engine, EngineConfig
from cara_jax.engine.sequence import RequestOutput
from cara_jax.sampling_params import InvalidRequestError, SamplingParams
from cara_jax.tokenizer import Tokenizer
from cara_jax.weights import DTYPES, load_model

log = logging.getLogger(__name__)


@dataclasses.dataclass
class CompletionOutput:
    text: str
    token_ids: list[int]
    finish_reason: str | None
    # per new token {"token_id", "logprob", "top": [(id, logprob)]} when params.logprobs is set
    logprobs: list[dict] | None = None
    # [None, then per prompt token {"token_id", "logprob", "rank", "top"}] (prompt_logprobs)
    prompt_logprobs: list[dict | None] | None = None


@dataclasses.dataclass
class ScoreOutput:
    """A continuation's tokens and the log-prob of each given the prompt and those before it."""

    token_ids: list[int]
    logprobs: list[float]

    @property
    def total(self) -> float:
        return float(sum(self.logprobs))


def build_engine(
    model: str | Path | None = None,
    adapters: dict[str, str | Path] | None = None,
    dtype: str = "float32",
    **config,
) -> Engine:
    path = Path(model) if model else default_model_path()
    loaded = load_model(path, dtype=DTYPES[dtype])
    engine = Engine(loaded, Tokenizer.from_path(path), EngineConfig(**config))
    for name, p in (adapters or {}).items():
        engine.load_adapter(name, p)
    return engine


class LLM:
    """Offline batch generation: ``LLM(adapters={...}).generate(prompts, params, adapter=...)``."""

    def __init__(self, model: str | Path | None = None, adapters: dict | None = None, **config):
        self.engine = build_engine(model, adapters, **config)

    @classmethod
    def from_engine(cls, engine: Engine) -> LLM:
        """An ``LLM`` over an engine built elsewhere (its adapters, its configuration)."""
        llm = cls.__new__(cls)
        llm.engine = engine
        return llm

    def load_adapter(self, name: str, path=None, *, weights=None, alpha=None, path_map=None):
        """Register (or replace) ``name`` from a PEFT folder or from weights in memory (a pytree
        of LoRA factors or a LoraAdapter, see Engine.load_adapter)."""
        return self.engine.load_adapter(name, path, weights=weights, alpha=alpha,
                                        path_map=path_map)  # fmt: skip

    def generate(
        self,
        prompts: str | list[str] | list[list[int]],
        sampling_params: SamplingParams | None = None,
        adapter: str | list | None = None,
        lora=None,
    ) -> list[CompletionOutput]:
        """``adapter``: a name for every prompt, or a list with one entry per prompt (a name,
        None, or a mixture given as a list of (name, scale)); ``lora``: one mixture for every
        prompt (adapters/mixture.py)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        adapters = adapter if isinstance(adapter, list) else [adapter] * len(prompts)
        ids = [
            self.engine.add_request(p, sampling_params, lora=a)
            if isinstance(a, (list, tuple))
            else self.engine.add_request(p, sampling_params, a, lora=lora)
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
                if out.logprobs is not None:
                    r.logprobs = (r.logprobs or []) + out.logprobs
                if out.prompt_logprobs is not None:
                    r.prompt_logprobs = out.prompt_logprobs
                if out.finished:
                    r.finish_reason = out.finish_reason
        return [results[i] for i in ids]

    def score(
        self,
        prompts: list[str | list[int]],
        continuations: list[str | list[int]],
        adapter: str | list[str | None] | None = None,
    ) -> list[ScoreOutput]:
        """Log-probs of each continuation's tokens after its prompt, all pairs in one batch
        (each on its own adapter, or the base model): one prefill each, scored on the device
        (the prompt's tokens with special tokens, the continuation's without)."""
        if len(prompts) != len(continuations):
            raise InvalidRequestError("one continuation per prompt", "continuations")
        tok = self.engine.tokenizer
        pairs = []
        for p, c in zip(prompts, continuations, strict=True):
            p_ids = tok.encode(p, add_special_tokens=True) if isinstance(p, str) else list(p)
            c_ids = tok.encode(c, add_special_tokens=False) if isinstance(c, str) else list(c)
            if not p_ids or not c_ids:
                raise InvalidRequestError("prompts and continuations must not be empty", "prompt")
            pairs.append((p_ids, c_ids))
        params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
        outs = self.generate([p + c for p, c in pairs], params, adapter)
        for o in outs:
            if o.prompt_logprobs is None:
                raise RuntimeError(f"a scoring request ended without scores ({o.finish_reason})")
        return [
            ScoreOutput(c, [e["logprob"] for e in o.prompt_logprobs[len(p) :]])
            for (p, c), o in zip(pairs, outs, strict=True)
        ]

    def chat(self, messages: list[dict], sampling_params=None, adapter=None) -> CompletionOutput:
        ids = self.engine.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True
        )
        return self.generate([ids], sampling_params, adapter)[0]


class Submission:
    """One request handed to an ``AsyncEngine``: acceptance, its deltas, and cancellation.

    ``accepted`` resolves once the engine thread has queued the request, or fails with the
    error ``Engine.add_request`` raised (invalid parameters, unknown adapter, prompt too long).
    Iterate it for the deltas unless several submissions share one ``queue``.
    """

    def __init__(self, owner: AsyncEngine, request_id: str, loop, queue, accepted) -> None:
        self.owner = owner
        self.request_id = request_id
        self.loop = loop
        self.queue: asyncio.Queue = queue
        self.accepted: asyncio.Future = accepted
        self.finished = False

    def __aiter__(self) -> Submission:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        out = await self.queue.get()
        if out.finished:
            self.finished = True
        return out

    def cancel(self) -> None:
        """Stop routing deltas here and abort the request unless it already finished."""
        self.owner._queues.pop(self.request_id, None)
        if not self.finished:
            self.finished = True
            self.owner._post(("abort", self.request_id))


@dataclasses.dataclass(frozen=True)
class QueueSnapshot:
    """Engine queues as of the last step, readable from any thread without the engine lock."""

    running: int = 0
    waiting: int = 0
    running_by_adapter: dict[str | None, int] = dataclasses.field(default_factory=dict)
    waiting_by_adapter: dict[str | None, int] = dataclasses.field(default_factory=dict)


def _resolve(fut: asyncio.Future, error: BaseException | None) -> None:
    if fut.done():
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for q, out in items:
        q.put_nowait(out)


class AsyncEngine:
    """Runs the engine loop in a background thread; ``generate`` streams deltas.

    Only the engine thread touches the engine's queues: requests and aborts reach it through
    an inbox drained between steps, so an event loop never waits for the engine lock (which a
    step holds for its whole duration).
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._inbox: collections.deque[tuple] = collections.deque()
        self._pending_lock = threading.Lock()
        self._pending_adds = 0  # submissions the engine thread has not taken in yet
        self._wake = threading.Event()
        self._stop = False
        self.snapshot = QueueSnapshot()
        self.step_errors = 0
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._loop, name="cara-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_model(cls, model=None, adapters=None, **config) -> AsyncEngine:
        return cls(build_engine(model, adapters, **config))

    # ------------------------------------------------------------------ engine thread

    def _loop(self) -> None:
        while not self._stop:
            self._drain_inbox()
            if not self.engine.has_unfinished():
                self._publish()
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                outs = self.engine.step()
            except Exception as e:  # never let one bad step kill the thread (and hang clients)
                log.exception("engine step failed; failing the requests in flight")
                self._fail_all(e)
                time.sleep(0.05)
                continue
            self._deliver(outs)
            self._publish()
        self._drain_inbox(closing=True)

    def _drain_inbox(self, closing: bool = False) -> None:
        taken = 0
        while True:
            try:
                op = self._inbox.popleft()
            except IndexError:
                break
            if op[0] == "add":
                _, rid, prompt, params, adapter, lora, loop, fut = op
                taken += 1
                error: BaseException | None = None
                if closing:
                    error = RuntimeError("the engine is shut down")
                else:
                    try:
                        self.engine.add_request(prompt, params, adapter, request_id=rid,
                                                lora=lora)  # fmt: skip
                    except Exception as e:  # reported to the submitter, the loop goes on
                        error = e
                self._call(loop, _resolve, fut, error)
            elif not closing:
                self.engine.abort(op[1])
        if taken:  # publish before uncounting, so num_waiting() never misses them
            self._publish()
            with self._pending_lock:
                self._pending_adds -= taken

    def _deliver(self, outs: list[RequestOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outs:
            q = self._queues.get(out.request_id)
            if q is not None:
                by_loop.setdefault(q[0], []).append((q[1], out))
        for loop, items in by_loop.items():
            if not self._call(loop, _put_all, items):
                for _, out in items:  # the consumer's loop is gone: nobody will read these
                    self._queues.pop(out.request_id, None)
                    self.engine.abort(out.request_id)

    @staticmethod
    def _call(loop: asyncio.AbstractEventLoop, fn, *args) -> bool:
        try:
            loop.call_soon_threadsafe(fn, *args)
            return True
        except RuntimeError:  # loop closed
            return False

    def _fail_all(self, error: Exception) -> None:
        self.step_errors += 1
        self.last_error = f"{type(error).__name__}: {error}"
        for rid in list(self.engine.requests):
            try:
                self.engine.abort(rid)
            except Exception:  # the state may be inconsistent after a failed step
                log.exception("abort of %s failed", rid)
        msg = f"the engine failed: {self.last_error}"
        self._end_streams("error", msg)

    def _end_streams(self, reason: str, error: str | None = None) -> None:
        for rid, (loop, q) in list(self._queues.items()):
            out = RequestOutput(rid, "", [], True, reason, error=error)
            self._call(loop, q.put_nowait, out)

    def _publish(self) -> None:
        eng = self.engine
        with eng.lock:
            running = collections.Counter(s.stats_name for s in eng.running)
            waiting = collections.Counter(s.stats_name for s in eng.waiting)
        self.snapshot = QueueSnapshot(
            sum(running.values()), sum(waiting.values()), dict(running), dict(waiting)
        )

    # ------------------------------------------------------------------ callers' side

    def _post(self, op: tuple) -> None:
        self._inbox.append(op)
        self._wake.set()

    def submit(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        adapter: str | None = None,
        request_id: str | None = None,
        queue: asyncio.Queue | None = None,
        lora=None,
    ) -> Submission:
        """Hand a request to the engine thread without waiting (call from an event loop).
        ``lora``: adapters at weights instead of ``adapter`` (Engine.add_request).

        Several submissions may share ``queue`` (e.g. the ``n`` choices of one API request);
        deltas carry their ``request_id``. Await ``.accepted`` before relying on the request.
        """
        if self._stop:
            raise RuntimeError("the engine is shut down")
        loop = asyncio.get_running_loop()
        rid = request_id or f"async-{uuid.uuid4().hex}"
        if rid in self._queues:
            raise InvalidRequestError(f"duplicate request id {rid!r}", "request_id")
        queue = queue if queue is not None else asyncio.Queue()
        accepted = loop.create_future()
        self._queues[rid] = (loop, queue)
        with self._pending_lock:
            self._pending_adds += 1
        self._post(("add", rid, prompt, params, adapter, lora, loop, accepted))
        return Submission(self, rid, loop, queue, accepted)

    @contextlib.asynccontextmanager
    async def request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        adapter: str | None = None,
        request_id: str | None = None,
        lora=None,
    ) -> AsyncIterator[Submission]:
        """``async with engine.request(...) as deltas``: raises at once if the engine refuses
        the request; leaving the block cancels it."""
        sub = self.submit(prompt, params, adapter, request_id, lora=lora)
        try:
            await sub.accepted
            yield sub
        finally:
            sub.cancel()

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        adapter: str | None = None,
        request_id: str | None = None,
        lora=None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield deltas until the final one; leaving early cancels the request."""
        async with self.request(prompt, params, adapter, request_id, lora=lora) as deltas:
            async for out in deltas:
                yield out

    def num_waiting(self) -> int:
        """Requests not yet running: the engine's queue plus submissions not yet taken in."""
        return self.snapshot.waiting + self._pending_adds

    def num_active(self) -> int:
        """Submissions whose deltas are still being routed (running, waiting or unread)."""
        return len(self._queues)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)
        self._end_streams("abort")
        self._queues.clear()
        self.engine.close()
