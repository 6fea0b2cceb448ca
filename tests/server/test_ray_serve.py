"""cara-serve --replicas on a local Ray: two real engine replicas (SmolLM2, real demo adapters)
behind the Ray Serve ingress, over loopback HTTP.

The default set runs one smoke test (streaming through the openai client, greedy output equal
to a single engine's, a runtime adapter load reaching every replica); the fault test (a
replica's process killed mid-stream) is slow.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from pathlib import Path

import aiohttp
import pytest

pytest.importorskip("ray.serve")
pytest.importorskip("starlette")

from cara_jax.sampling_params import SamplingParams  # noqa: E402
from server.cli import build_parser, build_state, fleet_config  # noqa: E402
from server.demo import write_demo_adapter  # noqa: E402
from tests.server_helpers import CHAT, assert_error, get, post  # noqa: E402

COST = Path(__file__).resolve().parents[2] / "bench" / "results" / "cost_model_smollm2_cpu.json"
# the flags of tests/server_helpers.start_server: the same engine shape, so the replicas read
# their programs from the session's compile cache (sync cold starts: no CPU-assist programs)
ENGINE_FLAGS = [
    "--demo-adapters", "2", "--max-num-seqs", "8", "--max-model-len", "128",
    "--max-prefill-seqs", "2", "--max-num-batched-tokens", "64", "--token-buckets", "64",
    "--kv-cache-memory", "16M", "--max-lora-rank", "16", "--max-queue", "64",
    "--drain-timeout", "10", "--cost-model", str(COST), "--cold-start", "sync",
]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """(ingress URL, its --lora-dir): two replicas, Algorithm 1 as the request router."""
    import ray

    from server.fleet.serve import start_fleet, stop_fleet

    lora_dir = tmp_path_factory.mktemp("fleet_lora_dir")
    port = _free_port()
    args = build_parser().parse_args(
        [*ENGINE_FLAGS, "--lora-dir", str(lora_dir), "--replicas", "2", "--port", str(port),
         "--replica-cpus", "0.5",
         "--compile-cache", str(Path(os.environ["CARA_JAX_CACHE"]) / "xla")]
    )  # fmt: skip
    cfg = fleet_config(args)
    ray.init(num_cpus=2, include_dashboard=False, namespace="serve", log_to_driver=False)
    try:
        yield start_fleet(cfg, "127.0.0.1", port), lora_dir
    finally:
        stop_fleet(cfg)


def _health(url: str) -> dict:
    status, text = get(url + "/health")
    doc = json.loads(text)
    assert status == (200 if doc["replicas_up"] else 503), doc
    return doc


def _reference(prompts: list[str], adapter: str, max_tokens: int, lora_dir: Path) -> list[str]:
    """The same prompts, greedy, on one engine in this process; writes the adapter that the
    test loads at runtime into ``lora_dir`` (it needs the model's config)."""
    state = build_state(build_parser().parse_args([*ENGINE_FLAGS, "--warmup", "none"]))
    write_demo_adapter(lora_dir / "extra", state.engine.loaded.cfg, rank=4, seed=99)

    async def one(prompt: str) -> str:
        params = SamplingParams(temperature=0, max_tokens=max_tokens)
        ids = state.tokenizer.encode(prompt)
        return "".join([o.text async for o in state.async_engine.generate(ids, params, adapter)])

    try:
        return [asyncio.run(one(p)) for p in prompts]
    finally:
        state.async_engine.shutdown()


@pytest.mark.slow  # CI time: two replicas start and compile (~2 min); the routing step is tested fast below
def test_two_replicas_stream_and_match_one_engine(fleet):
    import openai

    url, lora_dir = fleet
    health = _health(url)
    assert health["replicas_up"] == 2 and health["router"] == "rank_aware", health
    assert {r["pid"] for r in health["replicas"]} and len(health["replicas"]) == 2

    prompts = ["Once upon a time", "The capital of France is", "def add(a, b):"]
    want = _reference(prompts, "demo-1", 10, lora_dir)
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    got = []
    for p in prompts:
        chunks = client.completions.create(
            model="demo-1", prompt=p, max_tokens=10, temperature=0, stream=True
        )
        got.append("".join(c.choices[0].text for c in chunks))
    assert got == want

    chat = client.chat.completions.create(model="demo-0", messages=CHAT, max_tokens=6)
    assert chat.choices[0].message.content
    status, _, body = post(url + "/v1/completions", {"model": "nope", "prompt": "x"})
    assert status == 404
    assert_error(body, "model_not_found")

    # a runtime load reaches every replica before the answer; an unload too
    status, _, body = post(
        url + "/v1/load_lora_adapter", {"lora_name": "extra", "lora_path": "extra"}
    )
    assert status == 200 and body["rank"] == 4, body
    assert all("extra" in r["adapters"] for r in _health(url)["replicas"])
    r = client.completions.create(model="extra", prompt="Hello", max_tokens=4, temperature=0)
    assert r.choices[0].text
    status, _, body = post(url + "/v1/unload_lora_adapter", {"lora_name": "extra"})
    assert status == 200, body
    assert all("extra" not in r["adapters"] for r in _health(url)["replicas"])

    status, text = get(url + "/metrics")
    assert status == 200 and "cara_ingress_http_requests_total" in text
    assert len({line.split('replica="')[1].split('"')[0]
                for line in text.splitlines() if line.startswith("cara_requests_running{")}) == 2  # fmt: skip


async def _stream_until_killed(url: str, kill) -> tuple[str, list[str]]:
    """Stream a long completion, kill its replica after the first chunk; (replica, events)."""
    body = {"model": "demo-0", "prompt": "Once upon a time", "max_tokens": 100,
            "temperature": 0, "ignore_eos": True, "stream": True}  # fmt: skip
    events: list[str] = []
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        async with s.post(url + "/v1/completions", json=body) as r:
            assert r.status == 200
            replica = r.headers["X-Cara-Replica"]
            async for line in r.content:
                if line.startswith(b"data: "):
                    events.append(line[6:].decode().strip())
                    if len(events) == 1:
                        kill(replica)
    return replica, events


@pytest.mark.slow
def test_killed_replica_ends_its_streams_and_the_others_answer(fleet):
    url, _ = fleet
    pids = {r["replica"]: r["pid"] for r in _health(url)["replicas"]}
    t0 = time.time()
    replica, events = asyncio.run(
        _stream_until_killed(url, lambda rep: os.kill(pids[rep], signal.SIGKILL))
    )
    assert time.time() - t0 < 60  # nothing hangs
    assert events[-1] == "[DONE]"
    err = json.loads(events[-2])
    assert err["error"]["code"] == "replica_failed", err

    # new requests go to the survivor (one retry covers a route to the dead one)
    for _ in range(4):
        status, headers, body = post(
            url + "/v1/completions", {"model": "demo-1", "prompt": "Hi", "max_tokens": 4}
        )
        assert status == 200, body
        assert {k.lower(): v for k, v in headers.items()}["x-cara-replica"] != replica

    # Ray replaces the dead replica
    deadline = time.time() + 300
    while time.time() < deadline:
        h = _health(url)
        if h["replicas_up"] == 2 and replica not in {r["replica"] for r in h["replicas"]}:
            break
        time.sleep(1)
    else:
        raise AssertionError(f"the dead replica was not replaced: {h}")
    status, _, body = post(
        url + "/v1/completions", {"model": "demo-0", "prompt": "Hi", "max_tokens": 4}
    )
    assert status == 200, body


def _stats(running: list[tuple[int, float]], at: float, cost: dict) -> dict:
    """A replica's routing stats (the scheduler state document plus its time)."""
    return {
        "object": "scheduler_state", "model": "SmolLM2-135M-Instruct",
        "served_names": ["SmolLM2-135M-Instruct"], "kernel": "bgmv", "num_slots": 16,
        "max_num_seqs": 16, "free_slots": 16 - len(running), "max_queue": 64,
        "tpot_slo_s": None, "cost_model": cost, "adapters": {"small": 8, "big": 256},
        "resident": ["small", "big"], "time": at, "ready": True,
        "running": [{"rank": r, "prompt_tokens": 16, "slo_s": s} for r, s in running],
        "queued": [],
    }  # fmt: skip


def test_rank_aware_router_step_over_routing_stats():
    """The Ray router's step (server/fleet/router.py member + fleet.plan) on the measured
    one-core cost model: rank-256 work goes where rank 256 already runs, rank-8 work with a
    tight SLO stays off it, and requests sent after a replica's stats count there."""
    from cara_jax.scheduling.cost_model import CostModel
    from cara_jax.scheduling.fleet import parse_snapshot, plan
    from cara_jax.scheduling.router import RequestInfo, make_router
    from server.fleet.router import member

    cost_file = COST.with_name("cost_model_smollm2_cpu1core.json")
    cost = {k: v for k, v in CostModel.load(cost_file, kernel="bgmv").to_dict().items()
            if k != "samples"}  # fmt: skip
    heavy = _stats([(256, 0.5), (256, 0.5)], at=10.0, cost=cost)
    light = _stats([(8, 0.15), (8, 0.15), (8, 0.15)], at=10.0, cost=cost)
    router = make_router("rank_aware")

    def order(model: str, slo: float, sent_light=()) -> list[int]:
        members = [member(parse_snapshot(heavy), heavy, [], "heavy"),
                   member(parse_snapshot(light), light, list(sent_light), "light")]  # fmt: skip
        p = plan(router, members, model, 16, slo, needs_cost=True)
        assert p.info.rank == {"big": 256, "small": 8}[model]
        return p.order

    assert order("big", 0.5) == [0, 1]
    assert order("small", 0.15) == [1, 0]
    # a rank-256 request sent to the light replica after its stats were taken (t=11) is in
    # its batch now; one sent before (t=9) is already in the stats and is not counted twice
    late, early = (11.0, RequestInfo(256, 16, 0.5)), (9.0, RequestInfo(256, 16, 0.5))
    assert len(member(parse_snapshot(light), light, [late, early]).unreported) == 1
    assert order("big", 0.5, [late]) == [0, 1]
