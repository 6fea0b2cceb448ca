"""Prometheus metrics on the server's own registry (two apps in one process never collide).

Request-path metrics (status counters, TTFT/TPOT/e2e histograms, adapter load times) are
observed by the handlers. Engine-side state (queues, per-adapter requests, tier counters, CPU
assist) is read at scrape time by a collector, from the engine thread's lock-free snapshot,
the stores' plain counters and ``Engine.stats()`` (no lock), so a scrape never waits for a
step.

Gateway routers read vLLM's names: ``vllm:lora_requests_info`` (labels running_lora_adapters,
waiting_lora_adapters, max_lora; value = scrape time, as vLLM sets it), ``vllm:num_requests_running``,
``vllm:num_requests_waiting`` and ``vllm:kv_cache_usage_perc``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from server.instance.state import AppState

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5, 5)
LOAD_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)  # by name


class Metrics:
    """The server's metrics; ``render()`` is what GET /metrics returns."""

    def __init__(self, state: AppState) -> None:
        self.state = state
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "cara_http_requests",
            "HTTP requests by endpoint and status code",
            ["endpoint", "status"],
            registry=r,
        )
        self.ttft = Histogram(
            "cara_time_to_first_token_seconds",
            "Arrival to first token, per sequence",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "cara_time_per_output_token_seconds",
            "Mean time between output tokens after the first, per sequence",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "cara_e2e_request_latency_seconds",
            "Arrival to last token, per request",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("cara_prompt_tokens", "Prompt tokens admitted", registry=r)
        self.generation_tokens = Counter("cara_generation_tokens", "Tokens generated", registry=r)
        self.finished = Counter(
            "cara_sequences_finished",
            "Finished sequences by finish reason",
            ["finish_reason"],
            registry=r,
        )
        self.rejected = Counter(
            "cara_requests_rejected_queue_full", "Requests answered 429 (queue full)", registry=r
        )
        self.slo_violations = Counter(
            "cara_tpot_slo_violations",
            "Sequences whose mean TPOT exceeded --tpot-slo",
            registry=r,
        )
        self.lora_load = Histogram(
            "cara_lora_load_seconds",
            "Adapter load by name: read, validate, register (and pin on the device in cached mode)",
            ["adapter"],
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        r.register(EngineCollector(state))

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def _gauge(name: str, doc: str, value: float, labels: dict[str, str] | None = None) -> Metric:
    g = GaugeMetricFamily(name, doc, labels=list(labels) if labels else None)
    g.add_metric(list(labels.values()) if labels else [], value)
    return g


class EngineCollector(Collector):
    """Engine state at scrape time."""

    def __init__(self, state: AppState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        st = self.state
        eng = st.engine
        snap = st.async_engine.snapshot
        waiting = st.async_engine.num_waiting()
        base = st.config.served_names[0]

        yield _gauge("cara_requests_running", "Sequences in the running batch", snap.running)
        yield _gauge("cara_requests_waiting", "Sequences waiting for a slot or an adapter", waiting)
        yield _gauge(
            "cara_max_queue", "Waiting sequences beyond which requests get 429", st.config.max_queue
        )
        es = eng.stats()
        yield _gauge("cara_max_num_seqs", "Sequences that can run at once", es.max_num_seqs)
        yield _gauge("vllm:num_requests_running", "Running requests (vLLM name)", snap.running)
        yield _gauge("vllm:num_requests_waiting", "Waiting requests (vLLM name)", waiting)
        yield _gauge(
            "vllm:kv_cache_usage_perc", "Fraction of KV-cache pages in use (vLLM name)",
            es.kv_usage,
        )  # fmt: skip
        yield _gauge("cara_kv_cache_pages", "KV-cache pages (page 0 reserved)", es.kv_pages_total)
        yield _gauge("cara_kv_cache_pages_free", "KV-cache pages free", es.kv_pages_free)
        yield _gauge("cara_kv_cache_bytes", "KV-cache memory", es.kv_cache_bytes)
        yield _gauge("cara_kv_block_size", "Tokens per KV-cache page", es.kv_block_size)
        c = CounterMetricFamily(
            "vllm:num_preemptions", "Sequences preempted for KV pages (vLLM name)"
        )
        c.add_metric([], es.preemptions)
        yield c
        yield from _prefix_cache_metrics(es, base)
        yield from _structured_metrics(es.structured)
        yield from _cold_start_metrics(es)
        yield _gauge(
            "cara_compiled_programs", "Compiled step programs", es.compiled_programs
        )
        yield _gauge("cara_programs", "Step programs the engine can dispatch", es.programs_total)
        yield _gauge("cara_ready", "1 once every program is compiled (healthy)", float(es.ready))

        for name, counts in (
            ("running", snap.running_by_adapter),
            ("waiting", snap.waiting_by_adapter),
        ):
            g = GaugeMetricFamily(
                f"cara_adapter_requests_{name}",
                f"Sequences {name} per model (the base model under its served name)",
                labels=["adapter"],
            )
            for adapter, n in sorted(counts.items(), key=lambda kv: kv[0] or ""):
                g.add_metric([adapter or base], n)
            yield g

        lp = es.lora_pool
        max_lora = lp["slots_total"]  # pool slot 0 is the base model
        info = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "Running and waiting LoRA adapters (vLLM's labels; value = scrape time)",
            labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
        )
        info.add_metric(
            [
                ",".join(sorted(a for a in snap.running_by_adapter if a)),
                ",".join(sorted(a for a in snap.waiting_by_adapter if a)),
                str(max_lora),
            ],
            time.time(),
        )
        yield info

        host = lp["host"]
        for kind, doc in (
            ("hits", "Adapter lookups found in the tier"),
            ("misses", "Adapter lookups that had to load into the tier"),
            ("evictions", "Adapters evicted from the tier"),
        ):
            c = CounterMetricFamily(f"cara_lora_tier_{kind}", doc, labels=["tier"])
            c.add_metric(["device"], lp[kind])
            c.add_metric(["host"], host[kind])
            yield c
        c = CounterMetricFamily("cara_lora_device_bytes_loaded", "Bytes copied host to device")
        c.add_metric([], lp["bytes_loaded"])
        yield c
        loads = lp["loads"]
        h = HistogramMetricFamily(
            "cara_lora_device_load_seconds", "Host-to-device adapter copies (device pool)"
        )
        h.add_metric([], [(_le(le), n) for le, n in loads["buckets"]], loads["sum"])
        yield h
        yield _gauge("cara_lora_adapters_registered", "Adapter names registered", lp["registered"])
        yield _gauge("cara_lora_adapters_resident", "Adapters resident on the device",
                     lp["resident"])  # fmt: skip
        yield _gauge("cara_lora_max_resident", "Adapters the device pool can hold", max_lora)
        yield _gauge("cara_lora_host_bytes", "Host-tier bytes in use", host["bytes"])
        yield _gauge("cara_lora_host_budget_bytes", "Host-tier budget", host["budget_bytes"])
        yield _gauge("cara_lora_device_budget_bytes", "Device-pool budget", lp["budget_bytes"])

        c = CounterMetricFamily(
            "cara_runner_hot_compiles", "Steps or adapter writes that had to compile after start-up"
        )
        c.add_metric([], es.hot_compiles)
        yield c
        c = CounterMetricFamily("cara_engine_step_errors", "Engine steps that raised")
        c.add_metric([], st.async_engine.step_errors)
        yield c

        yield from _cpu_assist_metrics(es.cpu_assist)
        for name, value in sorted(es.admission.items()):
            c = CounterMetricFamily(name[: -len("_total")], f"Admission: {name}")
            c.add_metric([], value)
            yield c


def _cold_start_metrics(es) -> Iterator[Metric]:
    """``--cold-start auto``: how cold requests were served and why, and the fitted costs."""
    m = es.cold_start
    if m is None:
        return
    c = CounterMetricFamily(
        "cara_cold_start_choices", "Cold requests by how they were served (auto)",
        labels=["mode", "reason"],
    )  # fmt: skip
    for key, n in sorted(m["choices"].items()):
        mode, reason = key.split("/", 1)
        c.add_metric([mode, reason], n)
    yield c
    yield _gauge("cara_cold_start_link_bytes_per_second",
                 "Fitted adapter-load bandwidth (auto)", m["bandwidth_bytes_per_s"])  # fmt: skip
    yield _gauge("cara_cold_start_load_overhead_seconds", "Fitted per-load overhead (auto)",
                 m["load_overhead_s"])  # fmt: skip
    yield _gauge("cara_cold_start_cpu_flops_per_second", "Fitted CPU-delta throughput (auto)",
                 m["cpu_flops_per_s"])  # fmt: skip
    yield _gauge("cara_cold_start_exchange_seconds", "Fitted cost of one host exchange (auto)",
                 m["exchange_s"])  # fmt: skip


def _structured_metrics(st: dict) -> Iterator[Metric]:
    """Structured outputs: constraints compiled, masks made and the host time they took."""
    for name, key, doc in (
        ("cara_structured_requests", "compiled", "Requests whose output follows a grammar"),
        ("cara_structured_masks", "masks", "Token masks made for constrained rows"),
        ("cara_structured_mask_seconds", "seconds", "Host seconds spent making token masks"),
    ):
        c = CounterMetricFamily(name, doc)
        c.add_metric([], st.get(key, 0))
        yield c


def _prefix_cache_metrics(es, base: str) -> Iterator[Metric]:
    """vLLM's prefix-cache counters (in prompt tokens), and the same per adapter."""
    for kind, total, by in (
        ("queries", es.prefix_cache_queries, es.prefix_cache_queries_by_adapter),
        ("hits", es.prefix_cache_hits, es.prefix_cache_hits_by_adapter),
    ):
        c = CounterMetricFamily(
            f"vllm:prefix_cache_{kind}", f"Prefix cache {kind}, in prompt tokens (vLLM name)"
        )
        c.add_metric([], total)
        yield c
        c = CounterMetricFamily(
            f"cara_prefix_cache_{kind}_by_adapter",
            f"Prefix cache {kind} per model, in prompt tokens (the base model under its name)",
            labels=["adapter"],
        )
        for adapter, n in sorted(by.items(), key=lambda kv: kv[0] or ""):
            c.add_metric([adapter or base], n)
        yield c
    yield _gauge("cara_prefix_cache_blocks", "KV blocks registered in the prefix cache",
                 es.prefix_cache_blocks)  # fmt: skip
    c = CounterMetricFamily(
        "cara_prefix_cache_evictions", "Cached KV blocks whose pages were taken for other data"
    )
    c.add_metric([], es.prefix_cache_evictions)
    yield c
    yield _gauge("cara_prefix_caching", "1 when prefix caching is on", float(es.prefix_caching))


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


def _cpu_assist_metrics(entries: dict) -> Iterator[Metric]:
    """Every numeric entry of the engine's CPU-assist stats (counters end in ``_total``)."""
    for name, value in sorted(entries.items()):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if name.endswith("_total"):
            c = CounterMetricFamily(name[: -len("_total")], f"CPU assist: {name}")
            c.add_metric([], value)
            yield c
        else:
            yield _gauge(name, f"CPU assist: {name}", value)
