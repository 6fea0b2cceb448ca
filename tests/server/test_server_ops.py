"""The HTTP server over real loopback HTTP, part 2: bad requests, back-pressure and
disconnects, auth, drain, metrics, schemathesis against the server's own OpenAPI document, and
the CLI's pieces. Part 1 (generation, adapters) is test_server.py.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.cli import (
    build_parser,
    byte_size,
    engine_config,
    lora_spec,
)
from server.demo import demo_adapters
from server.instance.app import BackgroundServer, ServerState, build_app
from tests.server_helpers import (
    CHAT,
    assert_error,
    get,
    post,
    side_app,
    start_server,
    wait_idle,
)

srv = pytest.fixture(scope="module")(start_server)


# ---------------------------------------------------------------------------- errors, load


def test_version_and_request_id_echo(srv):
    """/version answers as vLLM's does; a client's X-Request-Id names the request and comes
    back on a plain answer, a streamed one and an error."""
    from importlib.metadata import version

    status, text = get(srv.url + "/version")
    assert status == 200 and json.loads(text) == {"version": version("cara-jax")}
    url = srv.url + "/v1/completions"
    body = {"model": srv.base, "prompt": "Hi", "max_tokens": 2, "temperature": 0}
    status, headers, answer = post(url, body, {"X-Request-Id": "req-plain"})
    rid = lambda h: {k.lower(): v for k, v in h.items()}.get("x-request-id")  # noqa: E731
    assert status == 200 and rid(headers) == "req-plain"
    assert answer["id"] == "cmpl-req-plain"  # the client's id names the request, as in vLLM
    status, headers, _ = post(url, {**body, "model": "no-such-model"}, {"X-Request-Id": "req-bad"})
    assert status == 404 and rid(headers) == "req-bad"

    async def streamed():
        async with aiohttp.ClientSession() as s, s.post(
            url, json={**body, "stream": True}, headers={"X-Request-Id": "req-stream"}
        ) as r:
            await r.read()
            return r.status, r.headers.get("X-Request-Id")

    assert asyncio.run(streamed()) == (200, "req-stream")
    status, headers, _ = post(url, body)  # none sent: none invented
    assert status == 200 and rid(headers) is None


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
        ({"model": srv.base, "prompt": "x", "logit_bias": {"one": 5}}, "logit_bias"),
        ({"model": srv.base, "prompt": "x", "logit_bias": {"1": 500}}, "logit_bias"),
        ({"model": srv.base, "prompt": "x", "logit_bias": {"99999999": 1}}, "logit_bias"),
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
    slots = srv.state.engine.config.max_num_seqs
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
    eng = srv.state.engine
    assert eng.scheduler.num_free_rows == slots and eng.blocks.num_free == eng.blocks.num_pages - 1
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


def test_allowed_origins_cors(srv):
    """--allowed-origins: a browser's preflight from an allowed origin is answered before auth,
    and its answers (streamed too) carry the CORS headers; other origins get none."""
    import urllib.request

    from server.flags import build_parser

    assert build_parser().parse_args(["--allowed-origins", '["https://a.example"]']
                                     ).allowed_origins == ("https://a.example",)  # fmt: skip
    side = side_app(srv, api_key="sekret", allowed_origins=("https://a.example",))
    url = side.url + "/v1/completions"

    def call(method, headers, body=None):
        req = urllib.request.Request(url, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req) as r:
                return r.status, r.headers, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read()

    pre = {"Origin": "https://a.example", "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization,content-type"}  # fmt: skip
    status, headers, _ = call("OPTIONS", pre)
    assert status == 204 and "POST" in headers["Access-Control-Allow-Methods"]
    assert headers["Access-Control-Allow-Headers"] == "authorization,content-type"
    assert headers["Access-Control-Allow-Origin"] == "https://a.example"
    body = json.dumps({"model": srv.base, "prompt": "Hi", "max_tokens": 2, "stream": True})
    status, headers, text = call("POST", {"Origin": "https://a.example",
                                          "Authorization": "Bearer sekret",
                                          "Content-Type": "application/json"}, body.encode())  # fmt: skip
    assert status == 200 and text.endswith(b"data: [DONE]\n\n")
    assert headers["Access-Control-Allow-Origin"] == "https://a.example"
    assert "X-Request-Id" in headers["Access-Control-Expose-Headers"]
    status, headers, _ = call("OPTIONS", {**pre, "Origin": "https://evil.example"})
    assert status != 204 and "Access-Control-Allow-Origin" not in headers
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
        "vllm:kv_cache_usage_perc",
        "vllm:num_preemptions",
        "cara_compiled_programs",
        "cara_kv_cache_pages_free",
    ):
        assert name in fams, name
    programs = fams["cara_compiled_programs"].samples[0].value
    assert programs == len(srv.state.engine.runner.programs()) == 1  # --token-buckets 64
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
    cfg = engine_config(args)
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
    assert state["model"] == srv.base and state["kernel"] == "mbgmv"
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
        engine_config(args)
    args = build_parser().parse_args(["--cost-model", "models.json", "--tpot-slo", "0.2"])
    sched = engine_config(args).admission
    assert sched.admission == "slo" and sched.tpot_slo == 0.2  # auto: slo with a cost model


def test_default_cost_model(monkeypatch):
    """cara-serve on the embedded model on a CPU uses the packaged cost model (slo admission,
    rank-aware fleet routing with no flag); another model's fleet, or an accelerator, falls
    back to power_of_two."""
    import server.cli
    from cara_jax.embedded import packaged_cost_model
    from cara_jax.engine.admission_order import load_engine_cost_model
    from server.cli import default_cost_model

    monkeypatch.setattr(server.cli, "_cpu_only", lambda: False)
    args = build_parser().parse_args(["--replicas", "2"])
    default_cost_model(args)
    assert args.cost_model is None and args.ray_router == "power_of_two"
    monkeypatch.setattr(server.cli, "_cpu_only", lambda: True)

    args = build_parser().parse_args(["--replicas", "2"])
    default_cost_model(args)
    assert args.cost_model == str(packaged_cost_model()) and args.ray_router == "rank_aware"
    assert engine_config(args).admission.admission == "slo"
    cm = load_engine_cost_model(args.cost_model, "mbgmv", "cpu")  # the server's default kernel
    assert cm.decode.r2 >= 0.95 and cm.kernel == "mbgmv"
    args = build_parser().parse_args(["--replicas", "2", "--model", "some-model.gguf"])
    default_cost_model(args)
    assert args.cost_model is None and args.ray_router == "power_of_two"
    args = build_parser().parse_args(["--cost-model", "mine.json"])
    default_cost_model(args)
    assert args.cost_model == "mine.json"


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
    from server.instance.generation import _engine_error

    e = _engine_error(QueueFullError(3))
    assert e.status == 429 and e.code == "queue_full" and "Retry-After" in e.headers


def test_health_is_starting_until_every_program_is_compiled(tiny, smollm_path):
    """Healthy means ready: 503 "starting" (and 503 for generation) until the programs are
    compiled, then 200 and the first request needs no compiler."""
    from cara_jax.api import AsyncEngine
    from cara_jax.engine import Engine, EngineConfig
    from cara_jax.tokenizer import Tokenizer
    from server.cli import start_warmup
    from server.instance.app import BackgroundServer, ServerConfig, ServerState, build_app

    eng = Engine(tiny, Tokenizer.from_path(smollm_path), EngineConfig(
        max_num_seqs=4, max_model_len=64, max_num_batched_tokens=32, token_buckets=(8, 32),
        kv_cache_memory=1 << 20,
    ))  # fmt: skip
    state = ServerState(AsyncEngine(eng), ServerConfig(served_names=("tiny",), model_root="x"))
    server = BackgroundServer(build_app(state))
    try:
        status, text = get(server.url + "/health")
        body = json.loads(text)
        assert status == 503 and body["status"] == "starting"
        assert body["compiled_programs"] == 0 and body["programs"] == 2
        status, _, err = post(server.url + "/v1/completions",
                              {"model": "tiny", "prompt": "Hi", "max_tokens": 2})  # fmt: skip
        assert status == 503
        assert_error(err, "starting")
        start_warmup(state).join(600)
        status, text = get(server.url + "/health")
        assert status == 200 and json.loads(text)["compiled_programs"] == 2
        status, _, body = post(server.url + "/v1/completions",
                               {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 3, "ignore_eos": True})  # fmt: skip
        assert status == 200 and body["usage"]["completion_tokens"] == 3
        assert eng.runner.hot_compiles == 0
    finally:
        server.stop()


def test_prefix_cache_reports_cached_tokens_per_adapter(srv):
    """A shared system prompt: the second request of an adapter reports the cached prompt
    tokens in usage, another adapter gets none, and /metrics counts both."""
    system = {"role": "system", "content": "You are a terse assistant. " * 8}
    client = srv.client()

    def ask(model, question):
        msgs = [system, {"role": "user", "content": question}]
        return client.chat.completions.create(model=model, messages=msgs, max_tokens=2,
                                              temperature=0).usage  # fmt: skip

    first, second = ask("demo-1", "Name a color."), ask("demo-1", "Name a fruit.")
    other = ask("demo-0", "Name a fruit.")
    assert first.prompt_tokens > 64
    assert first.prompt_tokens_details.cached_tokens == 0
    assert second.prompt_tokens_details.cached_tokens >= 64  # the system prompt's full blocks
    assert other.prompt_tokens_details.cached_tokens == 0  # never across adapters
    _, text = get(srv.url + "/metrics")
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    hits = {s.labels.get("adapter"): s.value
            for s in fams["cara_prefix_cache_hits_by_adapter"].samples}  # fmt: skip
    assert hits["demo-1"] >= second.prompt_tokens_details.cached_tokens
    total = [s.value for s in fams["vllm:prefix_cache_hits"].samples if s.name.endswith("_total")]
    assert total and total[0] >= hits["demo-1"]


def test_a_thousand_adapters_loaded_and_unloaded_leave_metrics_bounded(srv):
    """A long-running server gives back what an adapter's life cost it: after 1,000 names are
    loaded and unloaded through the API (every 100th also served, so it reaches the device),
    /metrics holds no series of an unloaded name and has as many lines as after the first 100."""
    from cara_jax.adapters.random_peft import write_random_peft

    write_random_peft(srv.lora_dir / "churn", srv.state.engine.loaded.cfg, 8, seed=5,
                      targets=("q_proj", "v_proj"))  # fmt: skip

    def cycle(i: int) -> None:
        name = f"churn-{i}"
        status, _, body = post(srv.url + "/v1/load_lora_adapter",
                               {"lora_name": name, "lora_path": "churn"})  # fmt: skip
        assert status == 200, body
        if i % 100 == 0:  # sampled (no temperature given): EOS may come early without ignore_eos
            status, _, body = post(srv.url + "/v1/completions",
                                   {"model": name, "prompt": "Hi", "max_tokens": 2,
                                    "ignore_eos": True})  # fmt: skip
            assert status == 200 and body["usage"]["completion_tokens"] == 2, body
        status, _, body = post(srv.url + "/v1/unload_lora_adapter", {"lora_name": name})
        assert status == 200, body

    def metric_lines() -> list[str]:
        status, text = get(srv.url + "/metrics")
        assert status == 200
        return [line for line in text.splitlines() if not line.startswith("#")]

    metric_lines()  # /metrics counts its own requests: that series exists from here on
    for i in range(100):
        cycle(i)
    after_100 = metric_lines()
    for i in range(100, 1000):
        cycle(i)
    after_1000 = metric_lines()
    assert not [line for line in after_1000 if "churn-" in line]
    assert len(after_1000) == len(after_100)
    _, models = get(srv.url + "/v1/models")
    assert "churn-" not in models


def test_known_fields_are_served_or_refused_never_dropped(srv):
    """A known field that would change the answer is served or refused (400 `unsupported` naming
    it); its default value asks for nothing and passes, as do fields that change nothing here
    and a client's own extras."""
    url = srv.url + "/v1/completions"
    base = {"model": srv.base, "prompt": "The capital of France is", "max_tokens": 12,
            "temperature": 0}  # fmt: skip
    for field, value in [("use_beam_search", True),
                         ("bad_words", ["x"]), ("truncate_prompt_tokens", 5)]:  # fmt: skip
        status, _, body = post(url, {**base, field: value})
        assert status == 400, (field, body)
        assert body["error"]["param"] == field and body["error"]["code"] == "unsupported", body
    status, _, plain = post(url, {**base, "prompt_logprobs": None, "store": True,
                                  "a_client_extra": 1})  # fmt: skip
    assert status == 200, plain
    chat = srv.url + "/v1/chat/completions"
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    status, _, body = post(chat, {"model": srv.base, "messages": msgs, "tool_choice": "required"})
    assert status == 400 and body["error"]["param"] == "tool_choice", body

    # logit_bias: +100 on one token makes it every token of a greedy answer
    _, _, tok = post(srv.url + "/tokenize", {"prompt": " Paris", "add_special_tokens": False})
    t = tok["tokens"][0]
    _, _, forced = post(url, {**base, "max_tokens": 3, "logit_bias": {str(t): 100}})
    _, _, text = post(srv.url + "/detokenize", {"tokens": [t, t, t]})
    assert forced["choices"][0]["text"] == text["prompt"], (forced, text)

    # include_stop_str_in_output keeps the stop string; without it the text ends before it
    text = plain["choices"][0]["text"]
    stop = text.split()[1] if len(text.split()) > 1 else text.strip()[:2]
    _, _, cut = post(url, {**base, "stop": [stop]})
    _, _, kept = post(url, {**base, "stop": [stop], "include_stop_str_in_output": True})
    assert kept["choices"][0]["text"] == cut["choices"][0]["text"] + stop, (cut, kept)

    # skip_special_tokens=false shows the turn end the model emits (EOS ignored to get past it)
    body = {"model": srv.base, "messages": msgs, "max_tokens": 24, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    _, _, hidden = post(chat, body)
    _, _, shown = post(chat, {**body, "skip_special_tokens": False})
    assert "<|im_end|>" in shown["choices"][0]["message"]["content"], shown
    assert "<|im_end|>" not in hidden["choices"][0]["message"]["content"]

    # min_tokens: no end before the minimum (the answer alone is shorter)
    body = {"model": srv.base, "messages": msgs, "max_tokens": 40, "temperature": 0}
    _, _, short = post(chat, body)
    n = short["usage"]["completion_tokens"]
    assert short["choices"][0]["finish_reason"] == "stop" and n < 30, short
    _, _, longer = post(chat, {**body, "min_tokens": n + 6})
    assert longer["usage"]["completion_tokens"] >= n + 6, longer
    status, _, err = post(chat, {**body, "min_tokens": 41})
    assert status == 400 and err["error"]["param"] == "min_tokens", err

    # continuous_usage_stats: every streamed chunk carries the running usage
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
    chunks = list(client.completions.create(
        model=srv.base, prompt="Once upon a time", max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))  # fmt: skip
    with_text = [c for c in chunks if c.choices and c.choices[0].text]
    assert with_text and all(c.usage is not None for c in with_text)
    counts = [c.usage.completion_tokens for c in with_text]
    assert counts == sorted(counts) and chunks[-1].usage.completion_tokens == 6


def test_tokenize_and_detokenize_use_the_engines_tokenizer(srv):
    """vLLM's /tokenize and /detokenize bodies: a prompt, or messages through the chat template
    (the same ids the chat route feeds the engine), and back to text."""
    tok = srv.state.tokenizer
    status, _, body = post(srv.url + "/tokenize", {"model": srv.base, "prompt": "Hello world"})
    assert status == 200, body
    assert body["tokens"] == tok.encode("Hello world", add_special_tokens=True)
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == srv.state.max_len
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    status, _, chat = post(srv.url + "/tokenize", {"model": "demo-0", "messages": msgs})
    assert chat["tokens"] == tok.apply_chat_template(msgs, add_generation_prompt=True,
                                                     tokenize=True)  # fmt: skip
    status, _, back = post(srv.url + "/detokenize", {"tokens": body["tokens"]})
    assert status == 200 and back["prompt"] == tok.decode(body["tokens"])
    for path, bad_body, code in [
        ("/tokenize", {"prompt": 3}, 400),
        ("/tokenize", {"model": "no-such-adapter", "prompt": "x"}, 404),
        ("/detokenize", {"tokens": [1, "x"]}, 400),
        ("/detokenize", {"tokens": [10**9]}, 400),
    ]:
        status, _, err = post(srv.url + path, bad_body)
        assert status == code, (path, err)
        assert_error(err)



def test_echo_logprobs_score_prompts_as_hf_and_peft(srv, hf_smollm_tokenizer, hf_smollm):
    """lm-eval's loglikelihood request (echo, logprobs, max_tokens 0) on the base model and on
    an adapter: the prompt's tokens come back with the log-prob of each given those before it,
    equal to HF transformers' and PEFT's; nothing is generated. Streamed, the echoed prompt
    comes with its log-probs, then the new tokens'."""
    import copy

    import numpy as np
    import torch
    from peft import PeftModel

    url = srv.url + "/v1/completions"
    prompt = "The capital of France is Paris, and the capital of Italy is"
    ids = hf_smollm_tokenizer(prompt)["input_ids"]
    base = {"prompt": prompt, "echo": True, "logprobs": 2, "max_tokens": 0, "temperature": 0}

    def hf_logprobs(model):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
        lp = torch.log_softmax(logits, -1).numpy()
        return [float(lp[i - 1, ids[i]]) for i in range(1, len(ids))]

    demo = srv.state.engine.adapters()["demo-0"].path
    peft = PeftModel.from_pretrained(copy.deepcopy(hf_smollm), demo)  # PEFT wraps in place
    for model, ref in [(srv.base, hf_smollm), ("demo-0", peft)]:
        status, _, body = post(url, {**base, "model": model})
        assert status == 200, body
        ch = body["choices"][0]
        assert ch["text"] == prompt and ch["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 0
        lp = ch["logprobs"]
        assert "".join(lp["tokens"]) == prompt and len(lp["tokens"]) == len(ids)
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        np.testing.assert_allclose(lp["token_logprobs"][1:], hf_logprobs(ref.eval()), atol=1e-4)
        assert all(len(t) >= 1 and len(t) <= 3 for t in lp["top_logprobs"][1:])
        assert lp["text_offset"][0] == 0
    # streamed, with new tokens after the echoed prompt
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
    chunks = list(c.completions.create(model=srv.base, prompt=prompt, echo=True, logprobs=1,
                                       max_tokens=3, temperature=0, stream=True))  # fmt: skip
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    toks = [t for ch in chunks if ch.choices and ch.choices[0].logprobs
            for t in ch.choices[0].logprobs.tokens]  # fmt: skip
    assert text.startswith(prompt) and len(toks) == len(ids) + 3 and "".join(toks) == text
    # vLLM's prompt_logprobs on chat: the prompt's tokens, each with its rank and the top k
    status, _, body = post(srv.url + "/v1/chat/completions", {
        "model": srv.base, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1,
        "prompt_logprobs": 1})  # fmt: skip
    assert status == 200, body
    plp = body["prompt_logprobs"]
    assert plp[0] is None and all(1 <= len(d) <= 2 for d in plp[1:])
    assert all(v["rank"] >= 1 and v["logprob"] <= 0 for d in plp[1:] for v in d.values())
    status, _, body = post(srv.url + "/v1/chat/completions", {
        "model": srv.base, "messages": [{"role": "user", "content": "Hi"}], "stream": True,
        "prompt_logprobs": 1})  # fmt: skip
    assert status == 400 and body["error"]["param"] == "prompt_logprobs", body
