"""The HTTP server over real loopback HTTP: the official OpenAI client, SSE, adapters by name,
runtime loads, the adapter folder, errors, back-pressure, disconnects, auth, metrics, drain, and
schemathesis against the server's own OpenAPI document.

One module-scoped server runs the real SmolLM2 with two demo adapters (real PEFT files). Extra
apps share its engine where a test needs another configuration (API key, tiny queue, drain).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cara_jax.runner import Variant
from cara_jax.sampling_params import SamplingParams
from server.app import BackgroundServer, ServerState, build_app
from server.cli import (
    COMPILE_CACHE_KEYS,
    _engine_config,
    build_parser,
    build_state,
    byte_size,
    lora_spec,
)
from server.demo import demo_adapters, write_demo_adapter

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@dataclasses.dataclass
class Srv:
    url: str
    state: ServerState
    lora_dir: Path
    base: str

    def client(self, **kw) -> openai.OpenAI:
        kw.setdefault("api_key", "unused")
        return openai.OpenAI(base_url=self.url + "/v1", max_retries=0, timeout=120, **kw)


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    import jax

    lora_dir = tmp_path_factory.mktemp("lora_dir")
    cache = Path(os.environ["CARA_JAX_CACHE"]) / "xla"
    before = {k: getattr(jax.config, k) for k in COMPILE_CACHE_KEYS}
    args = build_parser().parse_args(
        [
            "--demo-adapters",
            "2",
            "--num-slots",
            "8",
            "--max-len",
            "128",
            "--max-prefill-batch",
            "1",
            "--max-lora-rank",
            "16",
            "--warmup",
            "none",
            "--lora-dir",
            str(lora_dir),
            "--max-queue",
            "64",
            "--drain-timeout",
            "10",
            "--compile-cache",
            str(cache),
        ]
    )
    state = build_state(args)
    runner = state.engine.runner
    # Two variants cover every step these tests run (prompts <= 64 tokens, <= 8 sequences);
    # a full warm-up of the grid would take minutes on two cores.
    rank = runner.lora_buckets("bgmv")[-1]
    runner.compile(Variant("decode", 8, 128, rank))
    runner.compile(Variant("prefill", 1, 64, rank))
    server = BackgroundServer(build_app(state))
    yield Srv(server.url, state, lora_dir, state.base_name)
    server.stop()
    for k, v in before.items():  # the compile cache was for this module only
        jax.config.update(k, v)


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


# ---------------------------------------------------------------------------- generation


def test_completions_match_python_api(srv):
    client = srv.client()
    prompt = "Once upon a time, in a land far away,"
    models = (srv.base, "demo-0", "demo-1")
    kw = dict(prompt=prompt, max_tokens=8, temperature=0)
    with ThreadPoolExecutor(9) as ex:  # concurrent: the engine batches them
        jobs = {
            m: (
                ex.submit(client.completions.create, model=m, **kw),
                ex.submit(lambda m=m: list(client.completions.create(model=m, stream=True, **kw))),
                ex.submit(
                    py_generate,
                    srv,
                    prompt,
                    SamplingParams(temperature=0, max_tokens=8),
                    None if m == srv.base else m,
                ),
            )
            for m in models
        }
    texts = {}
    for model, (whole, streamed, ref) in jobs.items():
        r, chunks, ref = whole.result(), streamed.result(), ref.result()
        c = r.choices[0]
        assert r.model == model and r.object == "text_completion"
        assert (c.text, r.usage.completion_tokens, c.finish_reason) == ref
        assert r.usage.prompt_tokens == len(srv.state.tokenizer.encode(prompt, True))
        assert "".join(ch.choices[0].text for ch in chunks) == c.text
        assert chunks[-1].choices[0].finish_reason == c.finish_reason
        texts[model] = c.text
    assert len(set(texts.values())) > 1, texts  # the adapters change the greedy output


def test_chat_stream_usage_and_python_api(srv):
    client = srv.client()
    ids = srv.state.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    kw = dict(messages=CHAT, temperature=0)
    with ThreadPoolExecutor(6) as ex:
        jobs = {
            m: (
                ex.submit(client.chat.completions.create, model=m, max_tokens=12, **kw),
                ex.submit(
                    lambda m=m: list(
                        client.chat.completions.create(
                            model=m,
                            max_completion_tokens=12,
                            stream=True,
                            stream_options={"include_usage": True},
                            **kw,
                        )
                    )
                ),
                ex.submit(
                    py_generate,
                    srv,
                    ids,
                    SamplingParams(temperature=0, max_tokens=12),
                    None if m == srv.base else m,
                ),
            )
            for m in (srv.base, "demo-1")
        }
    for whole, streamed, ref in jobs.values():
        r, chunks, ref = whole.result(), streamed.result(), ref.result()
        msg = r.choices[0].message
        assert (msg.content, r.usage.completion_tokens, r.choices[0].finish_reason) == ref
        assert msg.role == "assistant" and r.usage.prompt_tokens == len(ids)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == ref[0]
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == ref[1]
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == ref[2]
    assert "Paris" in jobs[srv.base][0].result().choices[0].message.content


def test_logprobs_shapes(srv):
    client = srv.client()
    r = client.completions.create(
        model=srv.base, prompt="1, 2, 3,", max_tokens=5, temperature=0, logprobs=3
    )
    lp = r.choices[0].logprobs
    n = r.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n
    assert "".join(lp.tokens).startswith(r.choices[0].text)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(n)]
    for tok, val, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert val <= 0 and 3 <= len(top) <= 4 and top[tok] == pytest.approx(val)
        assert val == pytest.approx(max(top.values()), abs=1e-5)  # greedy picks the top token
    s = client.completions.create(
        model=srv.base, prompt="1, 2, 3,", max_tokens=5, temperature=0, logprobs=3, stream=True
    )
    streamed = [t for ch in s if ch.choices[0].logprobs for t in ch.choices[0].logprobs.tokens]
    assert streamed == lp.tokens

    r = client.chat.completions.create(
        model="demo-0", messages=CHAT, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for e in content:
        assert len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob == pytest.approx(e.logprob)
        assert bytes(e.bytes).decode("utf-8", "replace") == e.token
    assert "".join(e.token for e in content).startswith(r.choices[0].message.content)


def test_sampling_fields_seed_stop_n(srv):
    client = srv.client()
    kw = dict(
        model="demo-0",
        prompt="The weather today is",
        max_tokens=8,
        temperature=1.0,
        top_p=0.9,
        seed=1234,
        presence_penalty=0.5,
        frequency_penalty=0.3,
        extra_body={"top_k": 50, "min_p": 0.05, "repetition_penalty": 1.1},
    )
    ref_params = SamplingParams(
        temperature=1.0,
        top_p=0.9,
        top_k=50,
        seed=1234,
        presence_penalty=0.5,
        frequency_penalty=0.3,
        min_p=0.05,
        repetition_penalty=1.1,
        max_tokens=8,
    )
    count = dict(model=srv.base, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0)
    with ThreadPoolExecutor(6) as ex:
        a = ex.submit(client.completions.create, **kw)
        b = ex.submit(client.completions.create, **kw)
        ref = ex.submit(py_generate, srv, kw["prompt"], ref_params, "demo-0")
        greedy_job = ex.submit(client.completions.create, **count)
        many = ex.submit(
            client.completions.create,
            model=srv.base,
            prompt=["Hello", "Goodbye"],
            n=2,
            max_tokens=3,
            temperature=0.8,
            seed=7,
        )
        chat_n = ex.submit(
            lambda: list(
                client.chat.completions.create(
                    model=srv.base, messages=CHAT, n=2, max_tokens=4, temperature=0, stream=True
                )
            )
        )
    text = a.result().choices[0].text
    assert text == b.result().choices[0].text == ref.result()[0]  # seeded: reproducible

    greedy = greedy_job.result().choices[0].text
    stop = greedy.strip()[2:5]  # a stop string met inside the greedy text
    r = client.completions.create(**count, stop=[stop])
    assert r.choices[0].finish_reason == "stop" and stop not in r.choices[0].text
    assert greedy.startswith(r.choices[0].text)

    r = many.result()
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert 0 < r.usage.completion_tokens <= 12
    got = {0: "", 1: ""}
    for ch in chat_n.result():
        for c in ch.choices:
            got[c.index] += c.delta.content or ""
    assert got[0] == got[1] and got[0]
    with pytest.raises(openai.BadRequestError, match="choices"):
        client.completions.create(model=srv.base, prompt="x", n=17, max_tokens=1)
    wait_idle(srv)


# ---------------------------------------------------------------------------- models, adapters


def test_models_list(srv):
    models = {m.id: m for m in srv.client().models.list().data}
    assert {srv.base, "demo-0", "demo-1"} <= set(models)
    base = models[srv.base].model_dump()
    assert base["parent"] is None and base["root"].endswith(".gguf")
    for name in ("demo-0", "demo-1"):
        m = models[name].model_dump()
        assert m["parent"] == srv.base and Path(m["root"]).name == name
    assert srv.client().models.retrieve("demo-0").id == "demo-0"
    with pytest.raises(openai.NotFoundError):
        srv.client().models.retrieve("no-such-model")
    # aliases of the base model are accepted as `model`
    r = srv.client().completions.create(
        model="HuggingFaceTB/SmolLM2-135M-Instruct", prompt="Hi", max_tokens=1
    )
    assert r.choices[0].text is not None


def test_load_use_unload(srv):
    cfg = srv.state.engine.loaded.cfg
    write_demo_adapter(srv.lora_dir / "pkg" / "extra", cfg, rank=4, seed=99)
    url = srv.url + "/v1/load_lora_adapter"
    status, _, body = post(url, {"lora_name": "extra", "lora_path": "pkg/extra"})
    assert status == 200 and body["id"] == "extra" and body["rank"] == 4, body
    client = srv.client()
    assert "extra" in {m.id for m in client.models.list().data}
    r = client.completions.create(model="extra", prompt="Hello", max_tokens=6, temperature=0)
    ref = py_generate(srv, "Hello", SamplingParams(temperature=0, max_tokens=6), "extra")
    assert r.choices[0].text == ref[0]
    status, _, body = post(srv.url + "/v1/unload_lora_adapter", {"lora_name": "extra"})
    assert status == 200, body
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="extra", prompt="Hello", max_tokens=2)
    status, _, body = post(srv.url + "/v1/unload_lora_adapter", {"lora_name": "extra"})
    assert status == 404
    assert_error(body, "model_not_found")


def test_load_refusals(srv):
    cfg = srv.state.engine.loaded.cfg
    bad = srv.lora_dir / "dora"
    write_demo_adapter(bad, cfg, rank=4, seed=5)
    conf = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**conf, "use_dora": True}))
    url = srv.url + "/v1/load_lora_adapter"
    cases = [
        ({"lora_name": "d", "lora_path": "dora"}, "DoRA"),
        ({"lora_name": "d", "lora_path": "missing"}, "no adapter folder"),
        ({"lora_name": "d", "lora_path": "../outside"}, ".."),
        ({"lora_name": "d", "lora_path": "/etc"}, "outside"),
        ({"lora_name": srv.base, "lora_path": "dora"}, "base model"),
        ({"lora_name": "a,b", "lora_path": "dora"}, "commas"),
        ({"lora_name": "d"}, "lora_path"),
    ]
    for body, why in cases:
        status, _, resp = post(url, body)
        assert status == 400, (body, resp)
        assert_error(resp)
        assert why.lower() in resp["error"]["message"].lower(), (why, resp)
    assert "d" not in srv.state.adapters.registered()


def test_lora_dir_lazy_load_and_escapes(srv, tmp_path):
    cfg = srv.state.engine.loaded.cfg
    write_demo_adapter(srv.lora_dir / "lazy-a", cfg, rank=4, seed=11)
    client = srv.client()
    r = client.completions.create(model="lazy-a", prompt="Hello", max_tokens=3, temperature=0)
    assert r.model == "lazy-a" and "lazy-a" in srv.state.adapters.registered()

    outside = tmp_path / "outside"
    write_demo_adapter(outside, cfg, rank=4, seed=12)
    os.symlink(outside, srv.lora_dir / "link-out")  # a folder symlink leaving the folder
    sneaky = srv.lora_dir / "sneaky"
    sneaky.mkdir()
    shutil.copy(outside / "adapter_config.json", sneaky)
    os.symlink(outside / "adapter_model.safetensors", sneaky / "adapter_model.safetensors")
    for name in ("../outside", "link-out", "sneaky", str(outside), "a/../../b"):
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=name, prompt="Hello", max_tokens=1)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="not-there", prompt="Hello", max_tokens=1)
    assert not {"link-out", "sneaky"} & set(srv.state.adapters.registered())


# ---------------------------------------------------------------------------- errors, load


def test_bad_requests(srv):
    url = srv.url + "/v1/completions"
    for raw in (b"{not json", b"[1, 2]", b'{"model": "x", "prompt": "a\\ud800b"}'):
        status, _, body = post(url, raw)
        assert status == 400, raw
        assert_error(body, "invalid_json")
    for payload, param in [
        ({"model": srv.base, "prompt": "x", "temperature": "hot"}, "temperature"),
        ({"model": srv.base, "prompt": "x", "top_p": 0}, "top_p"),
        ({"model": srv.base, "prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"model": srv.base, "prompt": "x", "max_tokens": 500}, "max_tokens"),
        ({"model": srv.base, "prompt": 5}, "prompt"),
        ({"model": srv.base, "prompt": "x", "logit_bias": {"1": 5}}, "logit_bias"),
        ({"model": srv.base, "prompt": "x", "stop": [1]}, "stop"),
        ({"model": srv.base, "prompt": "x", "n": True}, "n"),
        ({"model": srv.base, "prompt": "x", "seed": 10**30}, "seed"),
        ({"model": srv.base, "prompt": "x", "temperature": 10**400}, "temperature"),
    ]:
        status, _, body = post(url, payload)
        assert status == 400 and body["error"]["param"] == param, (payload, body)
    status, _, body = post(url, {"model": srv.base, "prompt": "word " * 200})
    assert status == 400
    assert_error(body, "context_length_exceeded")
    chat = srv.url + "/v1/chat/completions"
    for payload in [
        {"model": srv.base, "messages": []},
        {"model": srv.base, "messages": [{"role": "wizard", "content": "x"}]},
        {"model": srv.base, "messages": CHAT, "tools": [{"type": "function"}]},
        {"model": srv.base, "messages": CHAT, "top_logprobs": 2},
    ]:
        status, _, body = post(chat, payload)
        assert status == 400, (payload, body)
        assert_error(body)
    status, _, body = post(url, {"model": "nope", "prompt": "x"})
    assert status == 404
    assert_error(body, "model_not_found")
    status, text = get(srv.url + "/v1/nothing-here")
    assert status == 404
    assert_error(json.loads(text))
    status, text = get(url)  # GET on a POST route
    assert status == 405
    assert_error(json.loads(text))
    with pytest.raises(openai.BadRequestError, match="context"):
        srv.client().chat.completions.create(
            model=srv.base, messages=[{"role": "user", "content": "word " * 200}]
        )
    status, _ = get(srv.url + "/health")
    assert status == 200  # still serving


def test_disconnect_frees_the_slot(srv):
    wait_idle(srv)
    client = srv.client()
    stream = client.completions.create(
        model="demo-1",
        prompt="Count: 1, 2,",
        max_tokens=100,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    got = 0
    for _ in stream:
        got += 1
        if got == 3:
            break
    assert srv.state.engine.running  # still generating when the client leaves
    stream.close()
    wait_idle(srv, timeout=10)
    reasons = [r.finish_reason for r in list(srv.state.engine.finished_requests)[-3:]]
    assert "abort" in reasons


def test_queue_full_429_then_disconnects(srv):
    wait_idle(srv)
    side = side_app(srv, max_queue=2, sse_keepalive_s=0.2)
    slots = srv.state.engine.config.num_slots
    body = {
        "model": srv.base,
        "prompt": "Count: 1, 2,",
        "max_tokens": 100,
        "stream": True,
        "ignore_eos": True,
    }

    async def run():
        async def until(cond) -> None:
            for _ in range(400):
                if cond():
                    return
                await asyncio.sleep(0.05)
            raise AssertionError(f"timed out: {ae.snapshot}")

        ae = srv.state.async_engine
        async with aiohttp.ClientSession() as s:
            streams = []
            for k in range(slots):  # fill every slot, one at a time: the queue holds only 2
                streams.append(await s.post(side.url + "/v1/completions", json=body))
                await until(lambda k=k: ae.snapshot.running == k + 1)
            for _ in range(2):  # then the queue
                streams.append(await s.post(side.url + "/v1/completions", json=body))
            assert [r.status for r in streams] == [200] * (slots + 2)
            await until(lambda: ae.num_waiting() >= 2)
            # a queued stream is silent but alive: SSE comments every keep-alive period
            line = await asyncio.wait_for(streams[-1].content.readline(), 10)
            assert line == b": keep-alive\n"
            async with s.post(side.url + "/v1/completions", json=body) as r:
                status, retry, err = r.status, r.headers.get("Retry-After"), await r.json()
            for r in streams:  # every client disconnects mid-stream
                r.close()
            return status, retry, err

    status, retry, err = asyncio.run(run())
    assert status == 429 and retry is not None and int(retry) >= 1
    assert_error(err, "queue_full")
    wait_idle(srv, timeout=20)
    assert srv.state.engine.slots.num_free == slots
    side.stop()


def test_api_key(srv):
    side = side_app(srv, api_key="sekret")
    base = side.url + "/v1"
    bad = openai.OpenAI(base_url=base, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    status, _, body = post(base + "/completions", {"model": srv.base, "prompt": "x"})
    assert status == 401
    assert_error(body, "invalid_api_key")
    good = openai.OpenAI(base_url=base, api_key="sekret", max_retries=0)
    assert srv.base in {m.id for m in good.models.list().data}
    assert good.completions.create(model=srv.base, prompt="Hi", max_tokens=1).choices
    assert get(side.url + "/health")[0] == 200  # operations endpoints stay open
    spec = json.loads(get(side.url + "/openapi.json")[1])
    assert spec["paths"]["/v1/completions"]["post"]["security"] == [{"bearer": []}]
    side.stop()


def test_catch_all_returns_500_json(srv):
    app = build_app(ServerState(srv.state.async_engine, srv.state.config, owns_engine=False))

    async def boom(request):
        raise ZeroDivisionError("a handler bug")

    app.router.add_get("/boom", boom)
    side = BackgroundServer(app)
    status, text = get(side.url + "/boom")
    assert status == 500
    assert_error(json.loads(text), "internal_error")
    assert get(side.url + "/health")[0] == 200
    side.stop()


def test_graceful_shutdown_drains(srv):
    wait_idle(srv)
    side = side_app(srv)
    result = {}

    def client():
        c = openai.OpenAI(base_url=side.url + "/v1", api_key="x", max_retries=0)
        s = c.completions.create(
            model=srv.base,
            prompt="Count: 1, 2,",
            max_tokens=16,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        chunks = list(s)
        result["reason"] = chunks[-1].choices[0].finish_reason
        result["text"] = "".join(ch.choices[0].text for ch in chunks)

    t = threading.Thread(target=client)
    t.start()
    deadline = time.time() + 30
    while not srv.state.engine.running and time.time() < deadline:
        time.sleep(0.02)
    side.stop()  # returns once the running request has finished (bounded by the drain timeout)
    t.join(timeout=30)
    assert result.get("reason") == "length" and result["text"]


# ---------------------------------------------------------------------------- metrics, schema


def test_metrics_parse(srv):
    for _ in range(2):  # the second finds the adapter on the device (a hit, whatever ran before)
        srv.client().completions.create(model="demo-0", prompt="Hi", max_tokens=2)
    status, text = get(srv.url + "/metrics")
    assert status == 200
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "cara_time_to_first_token_seconds",
        "cara_time_per_output_token_seconds",
        "cara_e2e_request_latency_seconds",
        "cara_http_requests",
        "cara_requests_waiting",
        "cara_requests_running",
        "cara_lora_tier_hits",
        "cara_lora_tier_misses",
        "cara_lora_load_seconds",
        "cara_cpu_assist_prefills",
        "cara_adapter_requests_running",
        "vllm:num_requests_waiting",
    ):
        assert name in fams, name
    info = fams["vllm:lora_requests_info"].samples[0]
    assert set(info.labels) == {"running_lora_adapters", "waiting_lora_adapters", "max_lora"}
    assert info.labels["max_lora"] == str(srv.state.engine.pool.config.max_adapters - 1)
    ttft = {s.name: s.value for s in fams["cara_time_to_first_token_seconds"].samples}
    assert ttft["cara_time_to_first_token_seconds_count"] > 0
    statuses = {
        s.labels["status"] for s in fams["cara_http_requests"].samples if s.name.endswith("_total")
    }
    assert "200" in statuses
    tiers = {
        s.labels["tier"]: s.value
        for s in fams["cara_lora_tier_hits"].samples
        if s.name.endswith("_total")
    }
    assert set(tiers) == {"device", "host"} and tiers["device"] > 0
    loads = {s.labels["adapter"] for s in fams["cara_lora_load_seconds"].samples}
    assert {"demo-0", "demo-1"} <= loads


def test_openapi_schemathesis_no_5xx(srv, tmp_path):
    spec = json.loads(get(srv.url + "/openapi.json")[1])
    assert {
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/models",
        "/v1/load_lora_adapter",
        "/v1/unload_lora_adapter",
        "/health",
        "/metrics",
    } <= set(spec["paths"])
    exe = Path(sys.executable).parent / "schemathesis"
    # Fuzz every operation on an app whose queue admits nothing: parsing, validation, model
    # lookup and adapter paths all run, and a valid generation answers 429 instead of
    # spending model time. The documented examples then run on the serving app for real.
    side = side_app(srv, max_queue=0)
    common = [
        str(exe),
        "run",
        "--checks",
        "not_a_server_error,status_code_conformance,"
        "content_type_conformance,response_schema_conformance",
        "--seed",
        "1",
        "--no-shrink",
        "--request-timeout",
        "60",
        "--warnings",
        "off",
    ]
    runs = [
        [
            *common,
            side.url + "/openapi.json",
            "--phases",
            "examples,coverage,fuzzing",
            "--max-examples",
            "25",
        ],
        [
            *common,
            srv.url + "/openapi.json",
            "--phases",
            "examples",
            "--exclude-path",
            "/v1/unload_lora_adapter",
        ],
    ]
    try:
        for cmd in runs:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path)
            assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-2000:]
    finally:
        side.stop()
    assert {"demo-0", "demo-1"} <= set(srv.state.adapters.registered())


# ---------------------------------------------------------------------------- CLI pieces


def test_cli_parsing_and_engine_passthrough(srv, tmp_path):
    assert byte_size("512M") == 512 << 20 and byte_size("1.5G") == 3 << 29
    assert byte_size("4GiB") == 4 << 30 and byte_size("100") == 100
    assert lora_spec("a=/x/y") == ("a", "/x/y")
    args = build_parser().parse_args(
        [
            "--cold-start",
            "teleport",
            "--lora-kernel",
            "mbgmv",
            "--max-loras",
            "7",
            "--device-lora-bytes",
            "64M",
        ]
    )
    cfg = _engine_config(args)
    assert cfg.cold_start == "teleport" and cfg.lora_strategy == "mbgmv"
    assert cfg.pool.max_adapters == 8 and cfg.pool.budget_bytes == 64 << 20
    from cara_jax.engine import Engine

    with pytest.raises(ValueError, match="cold_start"):  # the engine refuses unknown modes
        Engine(srv.state.engine.loaded, srv.state.tokenizer, cfg)
    cfg_model = srv.state.engine.loaded.cfg
    a = demo_adapters(cfg_model, 2, rank=4, root=tmp_path / "a")
    b = demo_adapters(cfg_model, 2, rank=4, root=tmp_path / "b")
    for name in a:  # seeded: the same bytes on every machine and run
        fa, fb = (x[name] / "adapter_model.safetensors" for x in (a, b))
        assert fa.read_bytes() == fb.read_bytes()


def test_scheduler_state_and_request_slo(srv):
    """What a router reads (GET /v1/scheduler/state), and the per-request `tpot_slo` field."""
    status, text = get(srv.url + "/v1/scheduler/state")
    state = json.loads(text)
    assert status == 200 and state["object"] == "scheduler_state"
    assert state["model"] == srv.base and state["kernel"] == "bgmv"
    assert state["admission"] == "fifo" and state["cost_model"] is None
    assert state["adapters"] and all(r > 0 for r in state["adapters"].values())
    assert state["free_slots"] == state["num_slots"] - len(state["running"])
    name = next(iter(state["adapters"]))
    body = {"model": name, "prompt": "Hi", "max_tokens": 2, "temperature": 0, "tpot_slo": 0.5}
    status, _, out = post(srv.url + "/v1/completions", body)
    assert status == 200 and out["usage"]["completion_tokens"] == 2
    for bad in (0, -1, "fast"):
        status, _, out = post(srv.url + "/v1/completions", {**body, "tpot_slo": bad})
        assert status == 400
        assert_error(out)
        assert out["error"]["param"] == "tpot_slo"
    args = build_parser().parse_args(["--admission", "slo"])
    with pytest.raises(SystemExit, match="cost-model"):
        _engine_config(args)
    args = build_parser().parse_args(["--cost-model", "models.json", "--tpot-slo", "0.2"])
    sched = _engine_config(args).scheduler
    assert sched.admission == "slo" and sched.tpot_slo == 0.2  # auto: slo with a cost model


@pytest.mark.slow
def test_schemathesis_serving_app_longer(srv, tmp_path):
    """Fuzz the serving app itself (real generations), more examples: ~20 min on two cores."""
    exe = Path(sys.executable).parent / "schemathesis"
    cmd = [
        str(exe),
        "run",
        srv.url + "/openapi.json",
        "--checks",
        "not_a_server_error",
        "--phases",
        "examples,coverage,fuzzing",
        "--max-examples",
        "60",
        "--seed",
        "2",
        "--request-timeout",
        "300",
        "--exclude-path",
        "/v1/unload_lora_adapter",
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=3000, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-2000:]
    assert {"demo-0", "demo-1"} <= set(srv.state.adapters.registered())


def test_engine_queue_bound_maps_to_429():
    from cara_jax.scheduling.admission import QueueFullError
    from server.routes import _engine_error

    e = _engine_error(QueueFullError(3))
    assert e.status == 429 and e.code == "queue_full" and "Retry-After" in e.headers
