"""Engine configuration and the KV-cache sizing rule."""

from __future__ import annotations

import dataclasses
import os

import jax

from cara_jax.adapters.device_pool import PoolConfig
from cara_jax.engine.admission_order import AdmissionSettings

COLD_START_MODES = ("sync", "cached", "cpu_assist", "auto")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 32  # sequences running at once (rows of the device-side state)
    max_model_len: int | None = None  # prompt + output tokens; default: the model's context
    max_num_batched_tokens: int = 256  # token budget of one step = the largest program
    max_prefill_seqs: int = 2  # prompts that advance (one chunk each) in one step
    # step sizes to compile; default: powers of two from min_token_bucket to the token budget
    token_buckets: tuple[int, ...] | None = None
    block_size: int = 16  # tokens per KV page
    # reuse the KV of full blocks already computed for the same tokens and adapter content
    enable_prefix_caching: bool = True
    # bytes of KV cache; default: a share of the device's free memory (GPU), of RAM (CPU)
    kv_cache_memory: int | None = None
    # sync: wait for the load; cached: every adapter preloaded; cpu_assist: prefill at once,
    # the cold adapter's deltas from CPU workers while it is copied (see cpu_assist.py); auto:
    # per request, whichever of sync and cpu_assist its measured costs predict faster
    # (cold_start.py)
    cold_start: str = "sync"
    # start an adapter's load when its request arrives, not when it is admitted
    prefetch_adapters: bool = True
    # auto: token buckets that get a CPU-assisted program (None: the two largest)
    cpu_assist_buckets: tuple[int, ...] | None = None
    cpu_workers: int = 2
    cpu_timeout_s: float = 30.0  # a CPU-assisted group slower than this falls back to sync
    # decode LoRA: mbgmv (each row at its own rank; cost ~ summed ranks) or bgmv (rows padded
    # to the step's max rank); both only on the projections the step's adapters target
    lora_strategy: str = "mbgmv"
    pool: PoolConfig = PoolConfig()
    host_budget_bytes: int = 4 << 30
    # smallest step: up to 8 decode rows cost about what one does (the weights dominate), and
    # every bucket is a program to compile before serving
    min_token_bucket: int = 8
    compile_threads: int = 2
    # paged attention: the jnp reference ("jnp"), or the Pallas kernel ("pallas" on a GPU,
    # "pallas_interpret" in tests); the reference is the default until the kernel has run on one
    attention_backend: str = "jnp"
    max_step_records: int = 10_000
    max_request_records: int = 10_000
    # admission: fifo, or slo (rank-aware, needs a profiled cost model); see admission_order.py
    admission: AdmissionSettings = AdmissionSettings()
    max_queue: int | None = None  # waiting requests beyond which add_request raises QueueFullError
    # entries of a request's adapter mixture (adapters/mixture.py); more is an InvalidRequestError
    max_lora_entries: int = 4


def default_kv_cache_memory() -> int:
    """vLLM-like default: on an accelerator, 90% of its free memory less the weights' share the
    caller already took (the caller passes what is free now); on a CPU, 10% of RAM, at most
    4 GiB (the CPU also runs the host tiers, the workers and the server)."""
    dev = jax.devices()[0]
    if dev.platform != "cpu":
        stats = dev.memory_stats() or {}
        limit, used = stats.get("bytes_limit"), stats.get("bytes_in_use", 0)
        if limit:
            return int(0.9 * limit - used) // 2  # half of the free share: the rest for LoRA, temps
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        ram = 8 << 30
    return min(ram // 10, 4 << 30)
