"""One generation request in flight: its choices (one engine sequence each), their shared delta
queue, and the response, streamed (SSE) or whole.

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

from aiohttp import web

from cara_jax.adapters.store import UnknownAdapterError
from cara_jax.engine import PromptTooLongError
from cara_jax.engine.sequence import RequestOutput
from cara_jax.sampling_params import InvalidRequestError
from cara_jax.scheduling.admission import QueueFullError
from server.instance.request_parsing import GenerationRequest
from server.instance.response_shapes import (
    chat_logprobs,
    completion_logprobs,
    echo_entries,
    finish_reason,
    usage,
    vllm_prompt_logprobs,
)
from server.instance.state import AppState
from server.instance.tool_calls import ToolStream, parse_output
from server.protocol import ApiError, error_body

log = logging.getLogger(__name__)


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
    prompt_scores: list | None = None  # prompt_logprobs (engine entries; None first)

    def take(self, out: RequestOutput, now: float) -> None:
        self.cached = max(self.cached, out.num_cached_tokens)
        if out.prompt_logprobs is not None:
            self.prompt_scores = out.prompt_logprobs
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


class Generation:
    """One API request's life: submit every choice, then collect or stream the deltas."""

    def __init__(
        self,
        state: AppState,
        req: GenerationRequest,
        adapter: str | None,
        arrival: float,
        client_id: str | None = None,
        lora=None,
    ) -> None:
        """``client_id``: the request's X-Request-Id, which names it in the answer's ``id`` and
        in the engine's request ids (with a suffix: two requests may send the same one);
        ``lora``: the request's adapters at weights (instead of ``adapter``)."""
        self.state = state
        self.req = req
        self.adapter = adapter
        self.lora = lora
        self.arrival = arrival
        self.model = req.model or state.base_name
        prefix = "cmpl" if req.kind == "completion" else "chatcmpl"
        self.id = f"{prefix}-{client_id[:256] if client_id else uuid.uuid4().hex}"
        self._engine_id = f"{self.id}-{uuid.uuid4().hex[:8]}" if client_id else self.id
        self.created = int(time.time())
        self.queue: asyncio.Queue = asyncio.Queue()
        self.subs = []
        self.choices: list[_Choice] = []
        self._tool_streams: dict[int, ToolStream] = {}  # streamed chat choices with tools
        # usage counts each prompt once, whatever n (as OpenAI and vLLM do); the engine
        # admits it n times, which the prompt-token metric counts
        self.prompt_tokens = sum(len(p) for p in req.prompts)

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
                        f"{self._engine_id}-{idx}",
                        queue=self.queue,
                        lora=self.lora,
                    )
                )
                self.choices.append(_Choice())
        results = await asyncio.gather(*(s.accepted for s in self.subs), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise _engine_error(r)
        self.state.metrics.prompt_tokens.inc(self.prompt_tokens * req.n)

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
        n = self.req.n  # a prompt's cached tokens: the most any of its n choices found cached
        cached = sum(max(c.cached for c in self.choices[i : i + n])
                     for i in range(0, len(self.choices), n))  # fmt: skip
        generated = 0 if self.req.score_only else sum(c.tokens for c in self.choices)
        return usage(self.prompt_tokens, generated, cached)

    def _prefix(self, i: int) -> str:
        """Echoed prompt text of choice i (completions with ``echo``)."""
        return self.req.prompt_texts[i // self.req.n] if self.req.echo else ""

    def _completion_lp(self, i: int, entries: list[dict], scores: list | None, offset: int):
        """Legacy log-probs of choice i's new tokens, after its echoed prompt's when the
        prompt is echoed (``scores``: the prompt's, on the delta that brings them)."""
        if self.req.score_only:
            entries = []
        if scores is not None and self.req.echo:
            prompt = self.req.prompts[i // self.req.n]
            entries = echo_entries(prompt, scores, self.req.logprobs or 0) + entries
        return completion_logprobs(entries, self.state.token_text, offset)

    def _prompt_lp(self, c: _Choice) -> list | None:
        """vLLM's prompt_logprobs of a choice, when asked."""
        k = self.req.prompt_logprobs
        if k is None or c.prompt_scores is None:
            return None
        return vllm_prompt_logprobs(c.prompt_scores, k, self.state.token_text)

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
            text = "" if self.req.score_only else "".join(c.text)
            if self.req.kind == "completion":
                lp = None
                if self.req.logprobs is not None:
                    start = 0 if self.req.echo else len(self._prefix(i))
                    lp = self._completion_lp(i, c.logprobs, c.prompt_scores, start)
                choice = {
                    "index": i,
                    "text": self._prefix(i) + text,
                    "logprobs": lp,
                    "finish_reason": "length" if self.req.score_only else finish_reason(c.reason),
                }
                if self.req.prompt_logprobs is not None:
                    choice["prompt_logprobs"] = self._prompt_lp(c)
                choices.append(choice)
            else:
                lp = None
                if self.req.logprobs is not None:
                    lp = {"content": chat_logprobs(c.logprobs, tt), "refusal": None}
                content, calls, reason = self._tool_answer(text, c.reason)
                choices.append(
                    {
                        "index": i,
                        "message": {
                            "role": "assistant",
                            "content": content,
                            "refusal": None,
                            "tool_calls": calls,
                        },
                        "logprobs": lp,
                        "finish_reason": reason,
                    }
                )
        obj = "text_completion" if self.req.kind == "completion" else "chat.completion"
        body = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage()}  # fmt: skip
        if self.req.kind == "chat" and self.req.prompt_logprobs is not None:
            body["prompt_logprobs"] = self._prompt_lp(self.choices[0])  # vLLM: one per request
        return web.json_response(body, dumps=lambda o: json.dumps(o, ensure_ascii=False))

    def _tool_answer(self, text: str, reason: str | None) -> tuple[str | None, list, str | None]:
        """(content, tool calls, finish reason) of a finished chat choice. A forced call that
        did not end (``length``) is not a call: its text comes back as content."""
        tools = self.req.tools
        if tools is None or (tools.forced and reason != "stop"):
            return text, [], finish_reason(reason)
        content, calls = parse_output(text, tools)
        if calls and reason == "stop":
            return content, calls, "tool_calls"
        return content, calls, finish_reason(reason)

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
        if self.req.include_usage:  # the totals come in a last chunk; vLLM's continuous
            chunk["usage"] = self.usage() if self.req.continuous_usage else None  # stats: now
        return chunk

    def _events(self, i: int, out: RequestOutput) -> list[dict]:
        """The chunks one delta becomes (none for a delta with nothing to show)."""
        c, tt, req = self.choices[i], self.state.token_text, self.req
        reason = finish_reason(out.finish_reason) if out.finished else None
        lps = out.logprobs if req.logprobs is not None else None
        if req.kind == "completion":
            text = "" if req.score_only else out.text
            echo_now = req.echo and req.logprobs is not None and out.prompt_logprobs is not None
            if echo_now:  # the echoed prompt waited for its log-probs
                text = self._prefix(i) + text
            if req.score_only and not out.finished and not echo_now:
                return []
            if not (text or lps or out.finished or echo_now):
                return []
            lp = None
            if lps is not None:
                lp = self._completion_lp(i, lps, out.prompt_logprobs if echo_now else None,
                                         c.offset)  # fmt: skip
                c.offset += sum(len(t) for t in lp["tokens"])
            choice = {"index": i, "text": text, "logprobs": lp,
                      "finish_reason": "length" if req.score_only and reason else reason}
            if req.prompt_logprobs is not None and out.prompt_logprobs is not None:
                choice["prompt_logprobs"] = self._prompt_lp(c)
            return [self._chunk([choice])]
        lp = {"content": chat_logprobs(lps, tt), "refusal": None} if lps else None
        if self.req.tools is None:
            deltas = [{"content": out.text}] if out.text or lps else []
        else:  # tool calls: content until a call starts, then call deltas
            ts = self._tool_streams.setdefault(i, ToolStream(self.req.tools))
            deltas = ts.feed(out.text)
            if out.finished:
                last, is_calls = ts.finish()
                deltas += last
                if is_calls and out.finish_reason == "stop":
                    reason = "tool_calls"
            if lp is not None and not deltas:
                deltas = [{}]
        chunks = [
            self._chunk([{"index": i, "delta": d, "logprobs": lp if k == 0 else None,
                          "finish_reason": None}])
            for k, d in enumerate(deltas)
        ]  # fmt: skip
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
                elif self.req.echo and self.req.logprobs is None:  # else: with its log-probs
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
