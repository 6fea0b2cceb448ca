"""What every system shares: options, the session interface, the replay clock, test adapters."""

from __future__ import annotations

import dataclasses
import functools
import json
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from bench.lib.metrics import RequestResult
from bench.lib.workload import Trace
from cara_jax.adapters.random_peft import write_random_peft
from cara_jax.config import PROJECTIONS

ALL_PROJECTIONS = PROJECTIONS
TARGET_SETS = {"qkvo": ALL_PROJECTIONS[:4], "all": ALL_PROJECTIONS}


@functools.lru_cache(maxsize=1)
def model_config():
    """The embedded model's shapes, from its GGUF metadata (no weights; ~seconds, cached)."""
    import gguf

    from cara_jax.embedded import default_model_path
    from cara_jax.weights import gguf_config

    return gguf_config(gguf.GGUFReader(str(default_model_path())))


def kv_cache_bytes(cfg, dtype, seqs: int, max_model_len: int, block_size: int = 16) -> int:
    """Bytes of paged KV cache that hold ``seqs`` full contexts of ``max_model_len`` tokens
    (whole pages each, plus the engine's reserved page 0): what the old slot cache took."""
    from cara_jax.kv_cache import bytes_per_token

    pages = seqs * -(-max_model_len // block_size) + 1
    return pages * block_size * bytes_per_token(cfg, dtype)


class SystemUnavailable(RuntimeError):
    """The system cannot run here (not installed, cannot be built); the suite skips it."""


@dataclasses.dataclass
class RunOptions:
    """Knobs of all systems in one place; each system reads the ones it has."""

    progress: bool = True
    # cara-jax: None = cara-serve's default (the engine is configured by cara-serve's own flag
    # parser; what is set becomes a flag, listed in the report: ``cara_flags``)
    cold_start: str | None = None  # auto (default) | sync | cached | cpu_assist
    lora_strategy: str | None = None  # mbgmv (default) | bgmv
    # the device pool cara-serve builds with its defaults (all seven projections, 512 MiB,
    # max rank 256); False: a pool fitted to the trace's adapters (only their projections, max
    # rank the largest given), which a user of the server does not get
    server_pool: bool = True
    max_num_seqs: int | None = None  # sequences running at once (--max-num-seqs)
    max_prefill_seqs: int | None = None  # prompts that advance one chunk each per step
    max_num_batched_tokens: int | None = None  # token budget of a step
    kv_cache_memory: int | None = None  # bytes of paged KV cache
    prefix_caching: bool = True  # reuse cached KV blocks of identical prefixes (same adapter)
    link_gbps: float | None = None  # emulated host->device link (None: memcpy speed)
    host_budget_bytes: int | None = None  # small: adapters are re-read from disk (disk tier)
    # Device pool shape (rank rows per projection, adapter slots); None: sized from the adapters.
    # The pool's shape is part of every compiled program, so experiments that share one shape
    # share their compiled programs through the persistent compilation cache.
    pool_rows: int | None = None
    pool_slots: int | None = None
    cpu_workers: int | None = None
    warmup_requests: int = 16  # untimed requests before the timed replay (first-use costs)
    admission: str | None = None  # auto (default: slo with the packaged cost model) | fifo | slo
    cost_model: str | None = None  # cost-model JSON (cara-jax profile)
    tpot_slo: float | None = None  # the engine's default TPOT SLO (None: 1.5x base step)
    # HF transformers + PEFT
    max_batch: int = 16
    # llama.cpp
    llama_threads: int | None = None  # None: all cores
    max_len: int | None = None  # context per sequence; None: from the trace


def cara_flags(o: RunOptions) -> list[str]:
    """The cara-serve flags that ``o`` sets (empty: the server's defaults)."""
    out: list[str] = []
    for flag, v in (
        ("--cold-start", o.cold_start), ("--lora-kernel", o.lora_strategy),
        ("--max-num-seqs", o.max_num_seqs), ("--max-prefill-seqs", o.max_prefill_seqs),
        ("--max-num-batched-tokens", o.max_num_batched_tokens),
        ("--kv-cache-memory", o.kv_cache_memory), ("--emulate-link-gbps", o.link_gbps),
        ("--host-lora-bytes", o.host_budget_bytes), ("--cpu-workers", o.cpu_workers),
        ("--admission", o.admission), ("--cost-model", o.cost_model), ("--tpot-slo", o.tpot_slo),
    ):  # fmt: skip
        if v is not None:
            out += [flag, str(v)]
    if not o.prefix_caching:
        out.append("--no-prefix-caching")
    return out


class System(Protocol):
    """A serving system under test. ``start`` loads the model and every adapter once (several
    traces may then be replayed against it, e.g. a rate sweep); ``replay`` returns one result per
    trace request, in trace order, with times relative to the replay start."""

    name: str

    def start(self, adapters: dict[str, Path], max_context: int) -> None: ...

    def replay(self, trace: Trace, desc: str = "") -> list[RequestResult]: ...

    def close(self) -> None: ...


def run_system(
    system: System, trace: Trace, adapters: dict[str, Path], opts: RunOptions | None = None
) -> list[RequestResult]:
    """Start, replay one trace, close: the one-shot form every system module exposes as run()."""
    system.start(adapters, opts.max_len if opts and opts.max_len else trace.max_context())
    try:
        return system.replay(trace)
    finally:
        system.close()


class ReplayClock:
    """Wall-clock replay of a trace: requests become due at t0 + arrival."""

    def __init__(self, trace: Trace) -> None:
        self.requests = trace.requests
        self.next = 0
        self.t0 = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def due(self) -> list[int]:
        """Indices of requests that have arrived and were not yet handed out."""
        out = []
        now = self.now()
        while self.next < len(self.requests) and self.requests[self.next].arrival <= now:
            out.append(self.next)
            self.next += 1
        return out

    def pending(self) -> bool:
        return self.next < len(self.requests)

    def sleep_until_next(self, cap: float = 0.01) -> None:
        if self.pending():
            time.sleep(min(cap, max(0.0, self.requests[self.next].arrival - self.now())))


def progress_bar(total: int, desc: str, enabled: bool):
    """tqdm over finished requests, or a stand-in with the same update() when disabled."""
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="req", leave=False)


def compile_progress(enabled: bool, desc: str):
    """A progress callback for ``Engine.warmup`` (done, total, program), or None when disabled."""
    if not enabled:
        return None
    bar = None

    def report(done: int, total: int, program) -> None:
        nonlocal bar
        if bar is None:
            from tqdm import tqdm

            bar = tqdm(total=total, desc=desc, unit="program", leave=False)
        bar.update()
        if done == total:
            bar.close()

    return report


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def adapter_seed(name: str, base_seed: int = 0) -> int:
    """Stable per-name seed: distinct names get distinct contents (adapters are keyed by content
    in cara-jax, so two equal files would share one device copy)."""
    return (zlib.crc32(name.encode()) + 1_000_003 * base_seed) % (1 << 31)


def write_adapters(
    root: Path,
    ranks: dict[str, int],
    cfg,
    targets: tuple[str, ...] = ALL_PROJECTIONS,
    seed: int = 0,
    on_written: Callable[[], None] | None = None,
) -> dict[str, Path]:
    """One PEFT folder per adapter name under ``root`` (existing folders are rewritten)."""
    out = {}
    for name, rank in ranks.items():
        out[name] = write_random_peft(root / name, cfg, rank, adapter_seed(name, seed), targets)
        if on_written is not None:
            on_written()
    return out


def adapter_rank(path: Path) -> int:
    return int(json.loads((Path(path) / "adapter_config.json").read_text())["r"])
