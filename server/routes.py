"""HTTP handlers: OpenAI completions and chat (streaming or not), models, adapters, health.

A generation request becomes one engine sequence per choice (prompts x n). All choices share one
delta queue; the handler owns the submissions and cancels them when it leaves, whether it
finished, failed, or the client disconnected (aiohttp cancels the handler, or a write fails).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from pathlib import Path

from aiohttp import web

from cara_jax.adapters.store import UnknownAdapterError
from cara_jax.engine import PromptTooLongError
from cara_jax.engine.sequence import RequestOutput
from cara_jax.sampling_params import InvalidRequestError
from cara_jax.scheduling.admission import QueueFullError
from server.instance_state import add_state_route
from server.openapi import openapi_spec
from server.protocol import (
    ApiError,
    GenerationRequest,
    chat_logprobs,
    completion_logprobs,
    error_body,
    finish_reason,
    parse_chat,
    parse_completion,
    read_json_object,
    usage,
)
from server.state import STATE, AppState

log = logging.getLogger(__name__)
_BIG_BODY = 64 << 10  # tokenize bodies larger than this off the event loop


def _json(obj: dict) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


@dataclasses.dataclass
class _Choice:
    """One sequence's accumulated output and timings."""

    text: list[str] = dataclasses.field(default_factory=list)
    tokens: int = 0
    logprobs: list[dict] = dataclasses.field(default_factory=list)
    reason: str | None = None
    error: str | None = None
    first: float | None = None
    last: float | None = None
    offset: int = 0  # text_offset of the next log-prob token (completions)
    cached: int = 0  # prompt tokens served from the prefix cache

    def take(self, out: RequestOutput, now: float) -> None:
        self.cached = max(self.cached, out.num_cached_tokens)
        if out.token_ids:
            self.tokens += len(out.token_ids)
            if self.first is None:
                self.first = now
            self.last = now
        self.text.append(out.text)
        if out.logprobs:
            self.logprobs.extend(out.logprobs)
        if out.finished:
            self.reason = out.finish_reason
            if out.finish_reason in ("error", "abort"):
                self.error = out.error or (
                    "the request was cancelled: the server is shutting down"
                    if out.finish_reason == "abort"
                    else "the request failed"
                )


def _engine_error(e: BaseException) -> ApiError:
    if isinstance(e, PromptTooLongError):
        return ApiError(400, str(e), param="prompt", code="context_length_exceeded")
    if isinstance(e, InvalidRequestError):
        return ApiError(400, str(e), param=e.param, code="invalid_value")
    if isinstance(e, UnknownAdapterError):
        return ApiError(404, f"{e}", param="model", code="model_not_found")
    if isinstance(e, QueueFullError):  # the engine's own bound (EngineConfig.max_queue)
        return ApiError(
            429, str(e), type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"}
        )
    if isinstance(e, RuntimeError) and "shut down" in str(e):
        return ApiError(503, str(e), type="server_error", code="shutting_down")
    raise e


class _Generation:
    """One API request's life: submit every choice, then collect or stream the deltas."""

    def __init__(
        self, state: AppState, req: GenerationRequest, adapter: str | None, arrival: float
    ) -> None:
        self.state = state
        self.req = req
        self.adapter = adapter
        self.arrival = arrival
        self.model = req.model or state.base_name
        prefix = "cmpl" if req.kind == "completion" else "chatcmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.queue: asyncio.Queue = asyncio.Queue()
        self.subs = []
        self.choices: list[_Choice] = []
        self.prompt_tokens = sum(len(p) for p in req.prompts) * req.n

    async def submit(self) -> None:
        ae, req = self.state.async_engine, self.req
        for p, ids in enumerate(req.prompts):
            for j in range(req.n):
                idx = p * req.n + j
                self.subs.append(
                    ae.submit(
                        ids,
                        req.choice_params(j),
                        self.adapter,
                        f"{self.id}-{idx}",
                        queue=self.queue,
                    )
                )
                self.choices.append(_Choice())
        results = await asyncio.gather(*(s.accepted for s in self.subs), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise _engine_error(r)
        self.state.metrics.prompt_tokens.inc(self.prompt_tokens)

    def cancel(self) -> None:
        for s in self.subs:
            s.cancel()

    async def deltas(self, keepalive: float | None = None):
        """(choice index, delta) until every choice has finished; (None, None) after each
        ``keepalive`` seconds without a delta (a queued request is silent for a while)."""
        index = {s.request_id: i for i, s in enumerate(self.subs)}
        left = len(self.subs)
        while left:
            try:
                out = await asyncio.wait_for(self.queue.get(), keepalive)
            except asyncio.TimeoutError:
                yield None, None
                continue
            i = index.get(out.request_id)
            if i is None:
                continue
            self.choices[i].take(out, time.perf_counter())
            if out.finished:
                self.subs[i].finished = True
                left -= 1
                self._observe(self.choices[i])
            yield i, out

    def _observe(self, c: _Choice) -> None:
        m, slo = self.state.metrics, self.state.config.tpot_slo_s
        m.finished.labels(c.reason or "unknown").inc()
        m.generation_tokens.inc(c.tokens)
        if c.first is not None:
            m.ttft.observe(c.first - self.arrival)
            if c.tokens > 1 and c.last is not None:
                tpot = (c.last - c.first) / (c.tokens - 1)
                m.tpot.observe(tpot)
                if slo is not None and tpot > slo:
                    m.slo_violations.inc()

    def usage(self) -> dict:
        return usage(
            self.prompt_tokens,
            sum(c.tokens for c in self.choices),
            sum(c.cached for c in self.choices),
        )

    def _prefix(self, i: int) -> str:
        """Echoed prompt text of choice i (completions with ``echo``)."""
        return self.req.prompt_texts[i // self.req.n] if self.req.echo else ""

    # ---------------------------------------------------------------- one JSON answer

    async def collect(self) -> web.Response:
        async for _ in self.deltas():
            pass
        self.state.metrics.e2e.observe(time.perf_counter() - self.arrival)
        failed = next((c for c in self.choices if c.error), None)
        if failed is not None:
            status = 503 if failed.reason == "abort" else 500
            raise ApiError(status, failed.error, type="server_error", code=failed.reason)
        tt = self.state.token_text
        choices = []
        for i, c in enumerate(self.choices):
            text = "".join(c.text)
            if self.req.kind == "completion":
                lp = None
                if self.req.logprobs is not None:
                    lp = completion_logprobs(c.logprobs, tt, len(self._prefix(i)))
                choices.append(
                    {
                        "index": i,
                        "text": self._prefix(i) + text,
                        "logprobs": lp,
                        "finish_reason": finish_reason(c.reason),
                    }
                )
            else:
                lp = None
                if self.req.logprobs is not None:
                    lp = {"content": chat_logprobs(c.logprobs, tt), "refusal": None}
                choices.append(
                    {
                        "index": i,
                        "message": {
                            "role": "assistant",
                            "content": text,
                            "refusal": None,
                            "tool_calls": [],
                        },
                        "logprobs": lp,
                        "finish_reason": finish_reason(c.reason),
                    }
                )
        obj = "text_completion" if self.req.kind == "completion" else "chat.completion"
        return web.json_response(
            {
                "id": self.id,
                "object": obj,
                "created": self.created,
                "model": self.model,
                "choices": choices,
                "usage": self.usage(),
            },
            dumps=lambda o: json.dumps(o, ensure_ascii=False),
        )

    # ---------------------------------------------------------------- server-sent events

    def _chunk(self, choices: list[dict]) -> dict:
        obj = "text_completion" if self.req.kind == "completion" else "chat.completion.chunk"
        chunk = {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.req.include_usage:
            chunk["usage"] = None
        return chunk

    def _events(self, i: int, out: RequestOutput) -> list[dict]:
        """The chunks one delta becomes (none for a delta with nothing to show)."""
        c, tt, req = self.choices[i], self.state.token_text, self.req
        reason = finish_reason(out.finish_reason) if out.finished else None
        lps = out.logprobs if req.logprobs is not None else None
        if req.kind == "completion":
            if not (out.text or lps or out.finished):
                return []
            lp = None
            if lps is not None:
                lp = completion_logprobs(lps, tt, c.offset)
                c.offset += sum(len(t) for t in lp["tokens"])
            return [
                self._chunk(
                    [{"index": i, "text": out.text, "logprobs": lp, "finish_reason": reason}]
                )
            ]
        chunks = []
        if out.text or lps:
            lp = {"content": chat_logprobs(lps, tt), "refusal": None} if lps else None
            chunks.append(
                self._chunk(
                    [
                        {
                            "index": i,
                            "delta": {"content": out.text},
                            "logprobs": lp,
                            "finish_reason": None,
                        }
                    ]
                )
            )
        if out.finished:
            chunks.append(
                self._chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": reason}])
            )
        return chunks

    async def stream(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )

        async def send(obj: dict | str) -> None:
            data = obj.encode() if isinstance(obj, str) else _json(obj)
            await resp.write(b"data: " + data + b"\n\n")

        try:
            await resp.prepare(request)
            for i in range(len(self.choices)):
                if self.req.kind == "chat":
                    await send(
                        self._chunk(
                            [
                                {
                                    "index": i,
                                    "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None,
                                    "finish_reason": None,
                                }
                            ]
                        )
                    )
                elif self.req.echo:
                    self.choices[i].offset = len(self._prefix(i))
                    await send(
                        self._chunk(
                            [
                                {
                                    "index": i,
                                    "text": self._prefix(i),
                                    "logprobs": None,
                                    "finish_reason": None,
                                }
                            ]
                        )
                    )
            async for i, out in self.deltas(self.state.config.sse_keepalive_s):
                if out is None:  # an SSE comment keeps proxies and clients from timing out
                    await resp.write(b": keep-alive\n\n")
                    continue
                for chunk in self._events(i, out):
                    await send(chunk)
                if out.finished and self.choices[i].error:
                    c = self.choices[i]
                    await send(error_body(c.error, "server_error", code=c.reason))
            self.state.metrics.e2e.observe(time.perf_counter() - self.arrival)
            if self.req.include_usage:
                await send(
                    {
                        "id": self.id,
                        "object": self._chunk([])["object"],
                        "created": self.created,
                        "model": self.model,
                        "choices": [],
                        "usage": self.usage(),
                    }
                )
            await send("[DONE]")
            await resp.write_eof()
        except ConnectionError:  # the client went away mid-stream; the caller cancels
            log.debug("client of %s disconnected", self.id)
        except Exception:  # headers are sent: report in-band, never leave the client hanging
            log.exception("stream %s failed", self.id)
            try:
                await send(
                    error_body(
                        "internal server error (logged on the server)",
                        "server_error",
                        code="internal_error",
                    )
                )
                await send("[DONE]")
            except ConnectionError:
                pass
        return resp


async def _read_body(request: web.Request) -> dict:
    return read_json_object(await request.read())


async def _generate(request: web.Request, kind: str) -> web.StreamResponse:
    arrival = time.perf_counter()
    state = request.app[STATE]
    if state.draining:
        raise ApiError(
            503, "the server is shutting down", type="server_error", code="shutting_down"
        )
    if not state.ready:
        raise ApiError(
            503, "the server is starting (compiling its programs); retry shortly",
            type="server_error", code="starting", headers={"Retry-After": "5"},
        )  # fmt: skip
    raw = await request.read()
    body = read_json_object(raw)
    parse = parse_completion if kind == "completion" else parse_chat
    args = (body, state.tokenizer, state.max_len, state.vocab)
    req = await asyncio.to_thread(parse, *args) if len(raw) > _BIG_BODY else parse(*args)
    adapter = await state.adapters.resolve_model(req.model)
    if state.async_engine.num_waiting() >= state.config.max_queue:
        state.metrics.rejected.inc()
        raise ApiError(
            429,
            f"the server's queue is full ({state.config.max_queue} waiting); retry later",
            type="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": str(state.config.retry_after_s)},
        )
    gen = _Generation(state, req, adapter, arrival)
    state.active += 1
    try:
        await gen.submit()
        return await (gen.stream(request) if req.stream else gen.collect())
    finally:
        gen.cancel()
        state.active -= 1


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "completion")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "chat")


# ---------------------------------------------------------------------------- models, adapters


def _model_card(state: AppState, name: str) -> dict | None:
    card = {
        "object": "model",
        "created": state.created,
        "owned_by": "cara-jax",
        "max_model_len": state.max_len,
        "permission": [],
    }
    if state.adapters.is_base(name):
        return {"id": name, **card, "root": state.config.model_root, "parent": None}
    e = state.adapters.registered().get(name)
    if e is None:
        return None
    return {"id": name, **card, "root": e.path, "parent": state.base_name, "rank": e.max_rank}


async def list_models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    names = [state.base_name, *sorted(state.adapters.registered())]
    return web.json_response({"object": "list", "data": [_model_card(state, n) for n in names]})


async def get_model(request: web.Request) -> web.Response:
    state = request.app[STATE]
    name = request.match_info["model"]
    card = _model_card(state, name)
    if card is None:
        raise ApiError(
            404, f"The model `{name}` does not exist.", param="model", code="model_not_found"
        )
    return web.json_response(card)


def _runtime_lora_allowed(state: AppState) -> None:
    """Runtime adapter loads read files the server process can read: refused unless
    --lora-dir confines them or --allow-runtime-lora allows them (vLLM's rule)."""
    if not state.config.runtime_lora:
        raise ApiError(
            403,
            "runtime LoRA loading and unloading is disabled: start the server with --lora-dir "
            "DIR (loads confined to DIR) or --allow-runtime-lora",
            type="permission_error",
            code="runtime_lora_disabled",
        )


async def load_lora_adapter(request: web.Request) -> web.Response:
    state = request.app[STATE]
    _runtime_lora_allowed(state)
    body = await _read_body(request)
    name = state.adapters.check_name(body.get("lora_name"))
    raw = body.get("lora_path")
    if not isinstance(raw, str) or not raw:
        raise ApiError(
            400, "`lora_path` must be a non-empty string", param="lora_path", code="invalid_value"
        )
    if state.lora_dir is not None:
        try:
            path = state.lora_dir.resolve(raw, param="lora_path", allow_absolute=True)
        except ApiError as e:
            if e.status != 404:
                raise
            raise ApiError(
                400,
                f"cannot load adapter {name!r}: no adapter folder {raw!r} in the adapter folder",
                param="lora_path",
                code="invalid_adapter",
            ) from e
    else:
        path = Path(raw).expanduser()
    entry = await state.adapters.load(name, path)
    return web.json_response(
        {
            "object": "lora_adapter",
            "id": name,
            "root": entry.path,
            "parent": state.base_name,
            "rank": entry.max_rank,
            "content_hash": entry.content_hash,
            "message": f"Success: LoRA adapter '{name}' added successfully.",
        }
    )


async def unload_lora_adapter(request: web.Request) -> web.Response:
    state = request.app[STATE]
    _runtime_lora_allowed(state)
    body = await _read_body(request)
    name = state.adapters.check_name(body.get("lora_name"))
    await state.adapters.unload(name)
    return web.json_response(
        {
            "object": "lora_adapter",
            "id": name,
            "message": f"Success: LoRA adapter '{name}' removed successfully.",
        }
    )


# ---------------------------------------------------------------------------- operations


async def health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    ae = state.async_engine
    status = "ok"
    stats = await asyncio.to_thread(state.engine.stats)
    if state.draining:
        status = "draining"
    elif not ae.is_alive():
        status = "engine stopped"
    elif state.start_error:
        status = "failed to start"
    elif not state.ready:
        status = "starting"
    body = {
        "status": status,
        "compiled_programs": stats.compiled_programs,
        "programs": stats.programs_total,
        "kv_cache_usage": round(stats.kv_usage, 4),
        "model": state.base_name,
        "running": ae.snapshot.running,
        "waiting": ae.num_waiting(),
        "adapters": len(state.adapters.registered()),
        "cold_start": state.engine.config.cold_start,
        "lora_kernel": state.engine.config.lora_strategy,
        "cost_model": state.config.cost_model,
        "tpot_slo_s": state.config.tpot_slo_s,
        "engine_step_errors": ae.step_errors,
    }
    return web.json_response(body, status=200 if status == "ok" else 503)


async def metrics(request: web.Request) -> web.Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    state = request.app[STATE]
    data = await asyncio.to_thread(state.metrics.render)  # the pool lock may be busy briefly
    return web.Response(body=data, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_spec(request.app[STATE]))


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", get_model)
    app.router.add_post("/v1/load_lora_adapter", load_lora_adapter)
    app.router.add_post("/v1/unload_lora_adapter", unload_lora_adapter)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
    add_state_route(app)
