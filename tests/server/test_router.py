"""`cara-router` over real loopback HTTP.

Fake instances (tiny aiohttp apps that publish /v1/scheduler/state with hand-made loads and
record what they receive) check the routing decisions, the streaming relay, errors, fallback,
metrics and the model union. One test puts the router in front of two real in-process
cara-serve instances and checks that greedy completions through it equal direct ones.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from cara_jax.scheduling.cost_model import synthetic_gpu_cost_model
from cara_jax.scheduling.router import InstanceState, RankAwareRouter, RequestInfo
from server.router.app import RouterConfig, RouterConfigError, build_router_app
from server.router.cli import main as router_main
from server.router.estimates import estimate_prompt_tokens
from server.router.state import BadStateError, parse_snapshot

ADAPTERS = {"r8": 8, "r64": 64}


class LoopThread:
    """One event loop in a thread that serves the test's apps (fakes and router)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runners: list[web.AppRunner] = []

    def call(self, coro, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def serve(self, app: web.Application) -> str:
        async def start() -> str:
            runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
            await runner.setup()
            self.runners.append(runner)
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            return f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"

        return self.call(start())

    def stop_all(self) -> None:
        async def stop() -> None:
            for r in reversed(self.runners):
                await r.cleanup()
            self.runners.clear()

        self.call(stop())

    def close(self) -> None:
        self.stop_all()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def cost_dict(kernel: str = "bgmv") -> dict:
    d = synthetic_gpu_cost_model(kernel).to_dict()
    d.pop("samples")
    return d


class Fake:
    """A stand-in cara-serve: publishes a state document and answers generation requests."""

    def __init__(
        self,
        name: str,
        running: list[tuple[int, int]] = (),
        adapters: dict[str, int] | None = None,
        cost: bool = True,
        kernel: str = "bgmv",
        models: list[str] | None = None,
    ) -> None:
        self.name = name
        self.kernel = kernel
        self.running = [{"rank": r, "prompt_tokens": p, "slo_s": None, "adapter": None}
                        for r, p in running]  # fmt: skip
        self.queued: list[dict] = []
        self.adapters = dict(ADAPTERS if adapters is None else adapters)
        self.cost = cost
        self.models = models
        self.got: list[dict] = []
        self.headers: list[dict] = []
        self.answer: tuple[int, dict, dict] | None = None  # canned (status, body, headers)
        self.drop = False  # close the connection instead of answering
        self.state_doc: Any = None  # overrides the state document
        self.gate: asyncio.Event | None = None  # streams pause after the first chunk
        self.hold: asyncio.Event | None = None  # non-streaming answers wait for it
        self.chunks = 4
        self.cancelled = 0

    def state(self) -> dict:
        return {
            "object": "scheduler_state", "model": "base", "served_names": ["base", "base-alias"],
            "kernel": self.kernel, "num_slots": 32, "free_slots": 32 - len(self.running),
            "max_queue": 64, "tpot_slo_s": None,
            "cost_model": cost_dict(self.kernel) if self.cost else None,
            "running": self.running, "queued": self.queued, "adapters": self.adapters,
        }  # fmt: skip

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/scheduler/state", self._state)
        app.router.add_post("/v1/completions", self._generate)
        app.router.add_post("/v1/chat/completions", self._generate)
        app.router.add_get("/v1/models", self._models)
        return app

    async def _state(self, request: web.Request) -> web.Response:
        return web.json_response(self.state_doc if self.state_doc is not None else self.state())

    async def _models(self, request: web.Request) -> web.Response:
        ids = self.models or ["base", *self.adapters]
        return web.json_response(
            {"object": "list", "data": [{"id": i, "object": "model", "owned_by": self.name}
                                        for i in ids]}
        )  # fmt: skip

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.got.append(body)
        self.headers.append(dict(request.headers))
        if self.drop:
            request.transport.close()
            return web.Response()
        if self.answer is not None:
            status, doc, headers = self.answer
            return web.json_response(doc, status=status, headers=headers)
        model = body.get("model", "base")
        if model not in ("base", *self.adapters):
            err = {
                "message": f"The model `{model}` does not exist.",
                "type": "invalid_request_error",
                "param": "model",
                "code": "model_not_found",
            }
            return web.json_response({"error": err}, status=404)  # fmt: skip
        chat = "messages" in body
        if not body.get("stream"):
            if self.hold is not None:
                await self.hold.wait()
            text = f"{self.name}:{model}"
            choice = {"index": 0, "finish_reason": "stop", "logprobs": None}
            choice |= (
                {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
            )
            return web.json_response(
                {"id": "x-1", "object": "chat.completion" if chat else "text_completion",
                 "created": 0, "model": model, "choices": [choice],
                 "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
            )  # fmt: skip
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for k in range(self.chunks):
                if k == 1 and self.gate is not None:
                    await self.gate.wait()
                last = k == self.chunks - 1
                c = {"index": 0, "logprobs": None, "finish_reason": "length" if last else None}
                c |= {"delta": {"content": f"{k} "}} if chat else {"text": f"{k} "}
                kind = "chat.completion.chunk" if chat else "text_completion"
                chunk = {"id": "x-1", "object": kind, "created": 0, "model": model, "choices": [c]}
                await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
        except (asyncio.CancelledError, ConnectionError):
            self.cancelled += 1
            raise
        return resp


@pytest.fixture(scope="module")
def lt():
    t = LoopThread()
    yield t
    t.close()


@pytest.fixture
def env(lt):
    """env(fakes, **config) -> router URL; every app is stopped after the test."""

    def make(fakes: list[Fake | str], **kw) -> str:
        urls = [f if isinstance(f, str) else lt.serve(f.app()) for f in fakes]
        return lt.serve(build_router_app(RouterConfig(instances=tuple(urls), **kw)))

    yield make
    lt.stop_all()


def post(url: str, body: Any, headers: dict | None = None) -> tuple[int, dict, Any]:
    async def run():
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        async with aiohttp.ClientSession() as s:
            async with s.post(url, data=data, headers=headers or {}) as r:
                return r.status, dict(r.headers), await r.json(content_type=None)

    return asyncio.run(run())


def get(url: str) -> tuple[int, str]:
    async def run():
        async with aiohttp.ClientSession() as s, s.get(url) as r:
            return r.status, await r.text()

    return asyncio.run(run())


def client(url: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=kw.pop("api_key", "x"), max_retries=0,
                         timeout=kw.pop("timeout", 30), **kw)  # fmt: skip


def assert_error(body: dict, code: str | None = None) -> None:
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


# ---------------------------------------------------------------------------- routing


def test_rank_aware_routes_where_algorithm_1_says(env):
    # A: 8 rows at rank 8; B: 8 rows at rank 64. Under BGMV a rank-64 request pads A's whole
    # batch to 64, so it belongs on B; a rank-8 request costs B a rank-64 row, so it goes to A.
    a, b = Fake("A", [(8, 50)] * 8), Fake("B", [(64, 50)] * 8)
    url = env([a, b], policy="rank_aware")
    c = client(url)
    assert (
        c.completions.create(model="r64", prompt="x" * 200, max_tokens=4).choices[0].text == "B:r64"
    )
    assert (
        c.completions.create(model="r8", prompt="x" * 200, max_tokens=4).choices[0].text == "A:r8"
    )
    # the same decisions from the policy itself on the same states
    cost = synthetic_gpu_cost_model("bgmv")
    states = [InstanceState(cost, [RequestInfo(r, p) for r, p in [(8, 50)] * 8]),
              InstanceState(cost, [RequestInfo(r, p) for r, p in [(64, 50)] * 8])]  # fmt: skip
    assert RankAwareRouter().route(RequestInfo(64, 50), states) == 1
    assert RankAwareRouter().route(RequestInfo(8, 50), states) == 0
    # least_loaded sees a tie and sends both to A
    url2 = env([Fake("A", [(8, 50)] * 8), Fake("B", [(64, 50)] * 8)], policy="least_loaded")
    assert client(url2).completions.create(model="r64", prompt="x").choices[0].text == "A:r64"


def test_round_robin_alternates_and_unknown_model_passes_through(env):
    a, b = Fake("A"), Fake("B")
    url = env([a, b], policy="round_robin")
    c = client(url)
    got = [c.completions.create(model="base", prompt="hi").choices[0].text for _ in range(4)]
    assert got == ["A:base", "B:base", "A:base", "B:base"]
    chat = c.chat.completions.create(model="r8", messages=[{"role": "user", "content": "hi"}])
    assert chat.choices[0].message.content == "A:r8"
    with pytest.raises(openai.NotFoundError) as e:  # nobody serves it: an instance answers 404
        c.completions.create(model="nope", prompt="hi")
    assert e.value.body["code"] == "model_not_found"


def test_burst_counts_requests_not_yet_reported(env, lt):
    # The fakes never report the requests they hold, so only the router's own account of
    # forwarded requests can spread a burst.
    a, b = Fake("A"), Fake("B")
    a.hold, b.hold = lt.call(_event()), lt.call(_event())
    url = env([a, b], policy="least_loaded")

    async def burst():
        async with aiohttp.ClientSession() as s:

            async def one():
                async with s.post(
                    url + "/v1/completions", json={"model": "base", "prompt": "x"}
                ) as r:
                    return (await r.json())["choices"][0]["text"]

            tasks = [asyncio.create_task(one()) for _ in range(4)]
            await asyncio.to_thread(wait_for, lambda: len(a.got) + len(b.got) == 4)
            lt.loop.call_soon_threadsafe(a.hold.set)
            lt.loop.call_soon_threadsafe(b.hold.set)
            return await asyncio.gather(*tasks)

    texts = asyncio.run(burst())
    assert sorted(texts) == ["A:base", "A:base", "B:base", "B:base"]


async def _event() -> asyncio.Event:
    return asyncio.Event()


def test_tpot_slo_and_prompt_estimate_reach_the_policy(env):
    url = env([Fake("A")], policy="rank_aware")
    c = client(url)
    c.completions.create(model="r64", prompt="y" * 400, extra_body={"tpot_slo": 0.05})
    c.chat.completions.create(model="base", messages=[{"role": "user", "content": "z" * 40}])
    state = json.loads(get(url + "/v1/router/state")[1])
    first, second = state["recent_decisions"]
    assert (first["rank"], first["prompt_tokens"], first["slo_s"]) == (64, 100, 0.05)
    assert (second["rank"], second["prompt_tokens"], second["slo_s"]) == (0, 10, None)
    assert state["decisions"] == 2 and state["instances"][0]["forwarded"] == 2


def test_estimate_prompt_tokens():
    assert estimate_prompt_tokens({"prompt": "abcd" * 10}) == 10
    assert estimate_prompt_tokens({"prompt": [1, 2, 3]}) == 3
    assert estimate_prompt_tokens({"prompt": ["abcdefgh", [5, 6]]}) == 4
    parts = [{"type": "text", "text": "abcd"}, {"type": "image_url"}]
    msgs = [{"role": "user", "content": "a" * 8}, {"role": "user", "content": parts}]
    assert estimate_prompt_tokens({"messages": msgs}) == 3
    assert estimate_prompt_tokens({"prompt": 7}) == 0 and estimate_prompt_tokens({}) == 0


# ---------------------------------------------------------------------------- streaming


def test_sse_is_relayed_chunk_by_chunk(env, lt):
    a = Fake("A")
    a.gate = lt.call(_event())
    url = env([a], policy="round_robin")
    stream = client(url, timeout=10).completions.create(model="base", prompt="x", stream=True)
    it = iter(stream)
    first = next(it)  # arrives while the instance is still holding the rest
    assert first.choices[0].text == "0 " and not a.gate.is_set()
    lt.loop.call_soon_threadsafe(a.gate.set)
    rest = list(it)
    assert [ch.choices[0].text for ch in rest] == ["1 ", "2 ", "3 "]
    assert rest[-1].choices[0].finish_reason == "length"
    a.gate = None
    chunks = list(
        client(url).chat.completions.create(
            model="r8", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    )
    assert "".join(ch.choices[0].delta.content for ch in chunks) == "0 1 2 3 "


def test_client_disconnect_closes_the_upstream_stream(env, lt):
    a = Fake("A")
    a.gate = lt.call(_event())  # never set: the stream stalls after its first chunk
    url = env([a], policy="round_robin")

    async def leave_early():
        async with aiohttp.ClientSession() as s:
            r = await s.post(url + "/v1/completions", json={"prompt": "x", "stream": True})
            assert (await r.content.readline()).startswith(b"data: ")
            r.close()

    asyncio.run(leave_early())
    wait_for(lambda: a.cancelled == 1)
    state = json.loads(get(url + "/v1/router/state")[1])
    wait_for(lambda: json.loads(get(url + "/v1/router/state")[1])["instances"][0]["in_flight"] == 0)
    assert state["decisions"] == 1


# ---------------------------------------------------------------------------- errors


def test_instance_errors_pass_through(env):
    a = Fake("A")
    url = env([a], policy="least_loaded")
    err = {"error": {"message": "queue full", "type": "rate_limit_error", "param": None,
                     "code": "queue_full"}}  # fmt: skip
    a.answer = (429, err, {"Retry-After": "7"})
    status, headers, body = post(url + "/v1/completions", {"model": "base", "prompt": "x"})
    assert (status, headers["Retry-After"], body) == (429, "7", err)
    assert headers["X-Cara-Instance"].startswith("http://127.0.0.1:")
    with pytest.raises(openai.RateLimitError):
        client(url).completions.create(model="base", prompt="x")
    bad_req = {"error": {"message": "bad", "type": "invalid_request_error", "param": "n",
                         "code": "invalid_value"}}  # fmt: skip
    a.answer = (400, bad_req, {})
    assert post(url + "/v1/chat/completions", {"messages": []})[::2] == (400, bad_req)


def test_bad_requests_get_openai_errors(env):
    url = env([Fake("A")], policy="round_robin")
    for raw, code in ((b"{not json", "invalid_json"), (b"[1, 2]", "invalid_json"),
                      (b'{"model": 5, "prompt": "x"}', "invalid_value")):  # fmt: skip
        status, _, body = post(url + "/v1/completions", raw)
        assert status == 400
        assert_error(body, code)
    status, _, body = post(url + "/v1/nothing", {})
    assert status == 404
    assert_error(body)
    status, text = get(url + "/v1/completions")
    assert status == 405
    assert_error(json.loads(text))


def test_unreachable_instance_falls_back_then_503(env):
    a, b = Fake("A"), Fake("B")
    url = env([a, b], policy="round_robin")
    a.drop = True  # up for its state, but drops the request
    assert client(url).completions.create(model="base", prompt="x").choices[0].text == "B:base"
    assert len(a.got) == 1 and len(b.got) == 1
    metrics = get(url + "/metrics")[1]
    assert "cara_router_fallbacks_total 1.0" in metrics
    b.drop = True
    time.sleep(1.1)  # A is retried once its down period is over
    status, _, body = post(url + "/v1/completions", {"prompt": "x"})
    assert status == 503
    assert_error(body, "instance_unavailable")


def test_dead_and_malformed_instances_are_skipped(env):
    good, odd = Fake("B"), Fake("C")
    odd.state_doc = {"object": "scheduler_state", "model": "base", "kernel": "tpu"}
    url = env(["http://127.0.0.1:9", good, odd], policy="round_robin")
    c = client(url)
    assert {c.completions.create(prompt="x", model="base").choices[0].text for _ in range(3)} == {
        "B:base"
    }
    status, text = get(url + "/health")
    h = json.loads(text)
    assert status == 200 and h["instances_up"] == 1
    assert [i["up"] for i in h["instances"]] == [False, True, False]
    assert "kernel" in h["instances"][2]["error"]
    only_dead = env(["http://127.0.0.1:9"], policy="round_robin")
    status, _, body = post(only_dead + "/v1/completions", {"prompt": "x"})
    assert status == 503
    assert_error(body, "no_instance")
    assert get(only_dead + "/health")[0] == 503


def test_parse_snapshot_rejects_bad_documents():
    ok = Fake("A", [(8, 5)]).state()
    snap = parse_snapshot(ok)
    assert snap.cost is not None and snap.running[0] == RequestInfo(8, 5, None)
    assert snap.rank_of("r64") == 64 and snap.rank_of("base-alias") == 0
    assert snap.rank_of(None) == 0 and snap.rank_of("nope") is None
    for broken in ({**ok, "object": "x"}, {**ok, "running": {}}, {**ok, "adapters": {"a": -1}},
                   {**ok, "num_slots": "4"}, {**ok, "running": [{"rank": None}]}, []):  # fmt: skip
        with pytest.raises(BadStateError):
            parse_snapshot(broken)
    with_slo = parse_snapshot({**ok, "tpot_slo_s": 0.2})
    assert with_slo.running[0].slo_s == 0.2  # entries without their own SLO get the default


# ---------------------------------------------------------------------------- auth, config


def test_api_key_is_required_and_forwarded(env):
    a = Fake("A")
    url = env([a], policy="round_robin", api_key="sesame")
    with pytest.raises(openai.AuthenticationError):
        client(url).completions.create(model="base", prompt="x")
    assert not a.got
    out = client(url, api_key="sesame").completions.create(model="base", prompt="x")
    assert out.choices[0].text == "A:base"
    assert a.headers[-1]["Authorization"] == "Bearer sesame"
    assert get(url + "/health")[0] == 200  # open, like cara-serve's


def test_allowed_origins_cors(env):
    """--allowed-origins on the router, as on cara-serve: the preflight is answered before the
    API key is checked; answers carry the header for allowed origins only."""
    import urllib.request

    from server.router.cli import build_parser

    args = build_parser().parse_args(["--instance", "http://x:1", "--allowed-origins", "*"])
    assert args.allowed_origins == ("*",)
    url = env([Fake("A")], policy="round_robin", api_key="sesame",
              allowed_origins=("https://a.example",))  # fmt: skip
    pre = urllib.request.Request(url + "/v1/completions", method="OPTIONS", headers={
        "Origin": "https://a.example", "Access-Control-Request-Method": "POST"})  # fmt: skip
    with urllib.request.urlopen(pre) as r:
        assert r.status == 204 and r.headers["Access-Control-Allow-Origin"] == "https://a.example"
    for origin, allowed in [("https://a.example", True), ("https://b.example", False)]:
        req = urllib.request.Request(url + "/health", headers={"Origin": origin})
        with urllib.request.urlopen(req) as r:
            assert ("Access-Control-Allow-Origin" in r.headers) == allowed
            assert r.headers["Vary"] == "Origin"


def test_cost_model_needed_by_rank_aware(env, tmp_path):
    with pytest.raises(RouterConfigError, match="cost model"):
        env([Fake("A", cost=False)], policy="rank_aware")
    env([Fake("A", cost=False)], policy="round_robin")  # does not need one
    path = tmp_path / "cm.json"
    for kernel in ("bgmv", "mbgmv"):
        synthetic_gpu_cost_model(kernel).save(path)
    url = env([Fake("A", cost=False, kernel="mbgmv")], policy="rank_aware", cost_model=str(path))
    assert client(url).completions.create(model="r8", prompt="x").choices[0].text == "A:r8"
    inst = json.loads(get(url + "/v1/router/state")[1])["instances"][0]
    assert inst["cost_model"] == {
        "source": "router",
        "key": "synthetic-llama2-7b|synthetic-a100|float16|mbgmv",
    }
    with pytest.raises(RouterConfigError, match="policy"):
        RouterConfig(instances=("http://x",), policy="fastest")
    with pytest.raises(RouterConfigError, match="cannot read"):
        build_router_app(RouterConfig(instances=("http://x",), cost_model=str(tmp_path / "no")))


def test_cli_reports_config_errors(capsys):
    assert router_main(["--instance", "localhost:8000", "--policy", "round_robin"]) == 2
    assert "http://" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        router_main(["--policy", "round_robin"])  # --instance is required


# ---------------------------------------------------------------------------- observability


def test_metrics_models_and_state(env):
    a, b = Fake("A"), Fake("B", adapters={"r8": 8, "other": 16})
    url = env([a, b], policy="round_robin")
    c = client(url)
    for _ in range(3):
        c.completions.create(model="base", prompt="x")
    ids = [m.id for m in c.models.list().data]
    assert ids == ["base", "r8", "r64", "other"]
    assert c.models.retrieve("other").id == "other"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("nope")
    fams = {f.name: f for f in text_string_to_metric_families(get(url + "/metrics")[1])}
    reqs = {(s.labels["instance"], s.labels["policy"]): s.value
            for s in fams["cara_router_requests"].samples if s.name.endswith("_total")}  # fmt: skip
    assert sorted(reqs.values()) == [1.0, 2.0] and {p for _, p in reqs} == {"round_robin"}
    assert {s.value for s in fams["cara_router_instance_up"].samples} == {1.0}
    count = [s for s in fams["cara_router_route_seconds"].samples if s.name.endswith("_count")]
    assert count[0].value == 3
    state = json.loads(get(url + "/v1/router/state")[1])
    assert state["policy"] == "round_robin" and state["decisions"] == 3
    assert [i["forwarded"] for i in state["instances"]] == [2, 1]
    assert state["instances"][1]["adapters"] == 2 and state["instances"][0]["kernel"] == "bgmv"


# ---------------------------------------------------------------------------- real instances

COST_FILE = Path(__file__).resolve().parents[2] / "bench/results/cost_model_smollm2_cpu.json"


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """Two in-process cara-serve instances on one compile cache (built like test_server's
    `srv`); the second publishes the CPU cost model, the first publishes none."""
    import jax

    from server.cli import COMPILE_CACHE_KEYS, build_parser, build_state
    from server.instance.app import BackgroundServer, build_app

    cache = Path(os.environ["CARA_JAX_CACHE"]) / "xla"
    before = {k: getattr(jax.config, k) for k in COMPILE_CACHE_KEYS}
    servers, states = [], []
    for extra in ([], ["--cost-model", str(COST_FILE)]):
        args = build_parser().parse_args(
            ["--max-num-seqs", "4", "--max-model-len", "128", "--max-prefill-seqs", "1",
             "--max-num-batched-tokens", "64", "--token-buckets", "64", "--kv-cache-memory", "16M",
             "--max-lora-rank", "16", "--warmup", "none", "--demo-adapters", "2",
             "--compile-cache", str(cache), *extra]
        )  # fmt: skip
        state = build_state(args)
        # one 64-token step (and its CPU-assisted twin, for cold adapters) runs every step of
        # these requests: compile them before serving, so no request waits for the compiler
        state.engine.warmup()
        assert state.engine.runner.compiled_count() == len(state.engine.runner.programs())
        assert {p.tokens for p in state.engine.runner.programs()} == {64}
        states.append(state)
        servers.append(BackgroundServer(build_app(state)))
    yield [s.url for s in servers], states
    for s in servers:
        s.stop()
    for k, v in before.items():
        jax.config.update(k, v)


@pytest.mark.slow  # two real engines: ~35 s of set-up on two cores
def test_real_instances_through_the_router_match_direct(real, env):
    urls, states = real
    base = states[0].base_name
    url = env(urls, policy="rank_aware", cost_model=str(COST_FILE))
    via, direct = client(url, timeout=120), client(urls[0], timeout=120)
    kw = dict(prompt="Once upon a time, in a land far away,", max_tokens=8, temperature=0)
    texts = {}
    for model in (base, "demo-0"):
        want = direct.completions.create(model=model, **kw).choices[0].text
        got = via.completions.create(model=model, **kw).choices[0].text
        streamed = "".join(
            ch.choices[0].text for ch in via.completions.create(model=model, stream=True, **kw)
        )
        assert got == want == streamed, model
        texts[model] = got
    assert texts[base] != texts["demo-0"]  # the adapter was applied
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    want = direct.chat.completions.create(
        model="demo-1", messages=chat, max_tokens=6, temperature=0
    )
    got = via.chat.completions.create(model="demo-1", messages=chat, max_tokens=6, temperature=0)
    assert got.choices[0].message.content == want.choices[0].message.content
    state = json.loads(get(url + "/v1/router/state")[1])
    assert state["decisions"] == 5 and all(i["up"] for i in state["instances"])
    sources = [i["cost_model"]["source"] for i in state["instances"]]
    assert sources == ["router", "instance"]
    assert {i["model"] for i in state["instances"]} == {base}
    assert {m.id for m in via.models.list().data} == {base, "demo-0", "demo-1"}
    status, _, body = post(url + "/v1/completions", {"model": "nope", "prompt": "x"})
    assert status == 404
    assert_error(body, "model_not_found")
    # /tokenize and /detokenize are answered by an instance that serves the model
    for path, body in [("/tokenize", {"model": "demo-0", "messages": chat}),
                       ("/detokenize", {"model": base, "tokens": [1, 2, 3]})]:  # fmt: skip
        assert post(url + path, body)[2] == post(urls[0] + path, body)[2]
    assert post(url + "/tokenize", {"model": "nope", "prompt": "x"})[0] == 404
    assert json.loads(get(url + "/version")[1])["version"]
