"""Instrumentation records: per step, per finished request, and the engine's stats snapshot."""

from __future__ import annotations

import bisect
import dataclasses

# host -> device adapter copies, seconds (the /metrics histogram's buckets)
LOAD_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclasses.dataclass
class LoadHistogram:
    """Cumulative counts of finished loads by duration: fixed size however many loads."""

    counts: list[int] = dataclasses.field(default_factory=lambda: [0] * (len(LOAD_BUCKETS) + 1))
    total: int = 0
    seconds: float = 0.0
    nbytes: int = 0

    def add(self, nbytes: int, seconds: float) -> None:
        self.counts[bisect.bisect_left(LOAD_BUCKETS, seconds)] += 1
        self.total += 1
        self.seconds += seconds
        self.nbytes += nbytes

    def snapshot(self) -> dict:
        cum, run = [], 0
        for le, n in zip((*LOAD_BUCKETS, float("inf")), self.counts, strict=True):
            run += n
            cum.append((le, run))
        return {"buckets": cum, "count": self.total, "sum": self.seconds, "bytes": self.nbytes}


@dataclasses.dataclass
class StepRecord:
    """Per-step instrumentation: the raw data for the cost model, metrics and benches.

    ``latency_s`` is known one step later, when the host reads the step's tokens: the time from
    launch (or from the previous step's end, if the device was still busy) to its tokens.
    """

    t_start: float
    batch_size: int  # decode rows
    ranks: list[int]  # adapter rank of each decode row
    prefill_tokens: int  # tokens of prompt chunks in the step
    dispatch_s: float
    kernel: str = "bgmv"
    latency_s: float | None = None
    num_tokens: int = 0  # decode rows + chunk tokens
    program: tuple[int, int] = (0, 0)  # (token bucket, 1 if it took CPU-assist deltas)


@dataclasses.dataclass
class RequestRecord:
    """Per-request instrumentation of a finished request (times from time.perf_counter)."""

    request_id: str
    adapter: str | None
    rank: int
    cold: bool  # the adapter was not on the device when the request arrived
    arrival: float
    admitted: float | None
    token_times: list[float]
    prompt_tokens: int
    finish_reason: str | None
    preemptions: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    cold_start_mode: str | None = None  # auto: how the cold adapter was served
    cold_start_reason: str | None = None

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.arrival if self.token_times else None

    @property
    def tpot(self) -> float | None:
        t = self.token_times
        return (t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else None


@dataclasses.dataclass(frozen=True)
class EngineStats:
    """One consistent snapshot of the engine for /health, /metrics and routers."""

    running: int
    waiting: int
    max_num_seqs: int
    kv_pages_total: int
    kv_pages_free: int
    kv_block_size: int
    kv_cache_bytes: int
    compiled_programs: int
    programs_total: int
    hot_compiles: int
    ready: bool
    preemptions: int
    steps: int
    lora_pool: dict
    admission: dict
    cpu_assist: dict
    running_adapters: tuple[str, ...]
    waiting_adapters: tuple[str, ...]
    cold_start: dict | None = None  # auto: the fitted cost model and the choices made
    prefix_caching: bool = False
    prefix_cache_queries: int = 0  # prompt tokens looked up at admission
    prefix_cache_hits: int = 0  # of those, tokens whose KV was reused
    prefix_cache_blocks: int = 0  # blocks registered now
    prefix_cache_evictions: int = 0
    prefix_cache_hits_by_adapter: dict = dataclasses.field(default_factory=dict)
    prefix_cache_queries_by_adapter: dict = dataclasses.field(default_factory=dict)
    structured: dict = dataclasses.field(default_factory=dict)  # structured.MaskStats

    @property
    def kv_usage(self) -> float:
        usable = max(self.kv_pages_total - 1, 1)
        return (usable - self.kv_pages_free) / usable
