"""Continuous-batching engine: waiting queue -> prefill -> merged decode batch -> stream.

One ``step()``:
1. admit waiting requests whose adapter is on the device (``sync`` cold start: the others keep
   waiting while their load proceeds in the background, so no load stalls the running batch);
   up to ``max_prefill_batch`` are prefilled together into free KV slots;
2. launch one decode step for every running sequence (inputs are read from the device-side
   last-token vector, so nothing waits for the host);
3. while that step runs, process the previous step's tokens on the host: detokenize, stop
   checks, streaming deltas; finished sequences release their slot and adapter at once.
Host work thus trails the device by one step (a finished sequence costs one discarded token).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import random
import threading
import time
from pathlib import Path

import jax
import numpy as np

from cara_jax.adapters.device_pool import DevicePool, PoolConfig, PoolFullError
from cara_jax.adapters.store import AdapterRegistry, HostStore, RegisteredAdapter
from cara_jax.cpu_coordinator import CpuAssistCoordinator, zero_stats
from cara_jax.kv_cache import SlotAllocator
from cara_jax.runner import ModelRunner, PromptTooLongError, RunnerConfig
from cara_jax.sampler import SamplingArrays, token_logprobs
from cara_jax.sampling_params import MAX_LOGPROBS, InvalidRequestError, SamplingParams
from cara_jax.scheduler import Scheduler, SchedulerConfig
from cara_jax.scheduling.admission import QueueFullError
from cara_jax.sequence import RequestOutput, SeqStatus, Sequence
from cara_jax.tokenizer import Tokenizer
from cara_jax.weights import LoadedModel

log = logging.getLogger(__name__)
COLD_START_MODES = ("sync", "cached", "cpu_assist")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    num_slots: int = 16
    max_len: int = 2048
    max_prefill_batch: int = 8
    # sync: wait for the load; cached: every adapter preloaded; cpu_assist: prefill at once,
    # the cold adapter's deltas from CPU workers while it is copied (see cpu_assist.py)
    cold_start: str = "sync"
    cpu_workers: int = 2
    cpu_timeout_s: float = 30.0  # a CPU-assisted group slower than this falls back to sync
    lora_strategy: str = "bgmv"
    pool: PoolConfig = PoolConfig()
    host_budget_bytes: int = 4 << 30
    rank_buckets: tuple[int, ...] = (16, 64)  # LoRA rank buckets (see RunnerConfig)
    min_prefill_bucket: int = 16
    min_kv_bucket: int = 128
    max_step_records: int = 10_000
    max_request_records: int = 10_000
    # admission: fifo, or slo (rank-aware, needs a profiled cost model); see scheduler.py
    scheduler: SchedulerConfig = SchedulerConfig()
    max_queue: int | None = None  # waiting requests beyond which add_request raises QueueFullError


@dataclasses.dataclass
class StepRecord:
    """Per-step instrumentation: the raw data for the cost model, metrics and benches.

    ``latency_s`` is known one step later, when the host reads the step's tokens: the time from
    launch (or from the previous step's end, if the device was still busy) to its tokens.
    """

    t_start: float
    batch_size: int
    ranks: list[int]
    prefill_tokens: int
    dispatch_s: float
    kernel: str = "bgmv"
    latency_s: float | None = None


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

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.arrival if self.token_times else None

    @property
    def tpot(self) -> float | None:
        t = self.token_times
        return (t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else None


class Engine:
    """Synchronous engine core; drive it with ``step()`` (AsyncEngine runs it in a thread)."""

    def __init__(
        self, loaded: LoadedModel, tokenizer: Tokenizer, config: EngineConfig | None = None
    ):
        self.config = cfg = config or EngineConfig()
        if cfg.cold_start not in COLD_START_MODES:
            raise ValueError(
                f"cold_start must be one of {COLD_START_MODES}, not {cfg.cold_start!r}"
            )
        self.loaded = loaded
        self.tokenizer = tokenizer
        self.pool = DevicePool(loaded.cfg, cfg.pool, dtype=loaded.dtype)
        self.registry = AdapterRegistry(
            loaded.cfg, HostStore(cfg.host_budget_bytes), base_model_name=None
        )
        rc = RunnerConfig(
            num_slots=cfg.num_slots,
            max_len=cfg.max_len,
            max_prefill_batch=cfg.max_prefill_batch,
            min_prefill_bucket=cfg.min_prefill_bucket,
            min_kv_bucket=cfg.min_kv_bucket,
            rank_buckets=cfg.rank_buckets,
            cpu_assist=cfg.cold_start == "cpu_assist",
        )
        self.runner = ModelRunner(loaded, rc, pool=self.pool, lora_strategy=cfg.lora_strategy)
        self.scheduler = Scheduler(cfg.scheduler, cfg.lora_strategy, jax.default_backend())
        self.max_len = self.runner.max_len
        self.slots = SlotAllocator(cfg.num_slots)
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: dict[int, Sequence] = {}  # KV slot -> sequence
        self.requests: dict[str, Sequence] = {}
        # per slot: temperature, top_k, top_p, seed, min_p, presence, frequency, repetition
        self._samp = np.zeros((cfg.num_slots, 8), np.float64)
        self._samp[:, 7] = 1.0
        self._samp[:, 2] = 1.0
        self._in_flight: tuple | None = None  # (tokens, rows, logprobs, StepRecord)
        self._ids = itertools.count()
        self.lock = threading.RLock()  # add/abort from other threads vs step()
        self._failed: list[RequestOutput] = []  # final outputs of requests that failed in admission
        self.steps: collections.deque[StepRecord] = collections.deque(maxlen=cfg.max_step_records)
        self.finished_requests: collections.deque[RequestRecord] = collections.deque(
            maxlen=cfg.max_request_records
        )
        self._last_done = 0.0
        self.cpu: CpuAssistCoordinator | None = None
        if cfg.cold_start == "cpu_assist":
            self.cpu = CpuAssistCoordinator(
                loaded.cfg, self.pool, self.registry, cfg.cpu_workers, cfg.cpu_timeout_s
            )

    def warmup(self, background: bool = False, progress: bool = False) -> None:
        """Compile every step variant before serving (``background``: only the covering ones
        now, the rest while serving; no step ever waits for a compile either way)."""
        self.runner.warmup(background=background, progress=progress)

    # ------------------------------------------------------------------ adapters

    def load_adapter(self, name: str, path: str | Path) -> RegisteredAdapter:
        """Register (or replace) an adapter; ``cached`` mode also pins it on the device."""
        old = self.registry.names().get(name)
        entry = self.registry.register(name, path)
        if self.config.cold_start == "cached":
            adapter = self.registry.resolve(name)
            if old is None or old.content_hash != entry.content_hash:
                self.pool.acquire(adapter).wait()
                self.pool.pin(adapter.content_hash)
            if old is not None and old.content_hash != entry.content_hash:
                self._unpin_if_unused(old.content_hash)
        return entry

    def unload_adapter(self, name: str) -> None:
        entry = self.registry.unregister(name)
        if self.config.cold_start == "cached":
            self._unpin_if_unused(entry.content_hash)

    def _unpin_if_unused(self, content_hash: str) -> None:
        """Drop ``cached`` mode's hold on a content no registered name points at any more."""
        if content_hash not in {e.content_hash for e in self.registry.names().values()}:
            self.pool.pin(content_hash, False)
            self.pool.release(content_hash)

    # ------------------------------------------------------------------ requests

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        adapter: str | None = None,
        request_id: str | None = None,
    ) -> str:
        """Queue a request; invalid input raises at once and never disturbs other requests."""
        params = params or SamplingParams()
        ids = (
            self.tokenizer.encode(prompt, add_special_tokens=True)
            if isinstance(prompt, str)
            else list(prompt)
        )
        if not ids:
            raise InvalidRequestError("the prompt is empty", "prompt")
        if len(ids) >= self.max_len:
            raise PromptTooLongError(
                f"prompt of {len(ids)} tokens does not fit the context of {self.max_len} tokens"
            )
        if any(not 0 <= t < self.loaded.cfg.vocab_size for t in ids):
            raise InvalidRequestError("prompt token id out of the vocabulary", "prompt")
        content_hash, rank = None, 0
        if adapter is not None:
            entry = self.registry.entry(adapter)  # UnknownAdapterError
            content_hash, rank = entry.content_hash, entry.max_rank
        rid = request_id or f"req-{next(self._ids)}"
        seq = Sequence(
            request_id=rid,
            prompt_ids=ids,
            params=params,
            seed=params.seed if params.seed is not None else random.getrandbits(31),
            detok=self.tokenizer.detokenizer(),
            eos_ids=frozenset(self.tokenizer.eos_token_ids),
            adapter_name=adapter,
            content_hash=content_hash,
            rank=rank,
        )
        with self.lock:
            if rid in self.requests:
                raise InvalidRequestError(f"duplicate request id {rid!r}", "request_id")
            if self.config.max_queue is not None and len(self.waiting) >= self.config.max_queue:
                raise QueueFullError(self.config.max_queue)
            self.requests[rid] = seq
            self.waiting.append(seq)
        return rid

    def abort(self, request_id: str) -> None:
        """Cancel a request; its slot is free for the next step."""
        with self.lock:
            seq = self.requests.get(request_id)
            if seq is None or seq.finished:
                return
            seq.finish("abort")
            if seq in self.waiting:
                self.waiting.remove(seq)
            self._release(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self._in_flight or self._failed)

    # ------------------------------------------------------------------ the loop

    def _release(self, seq: Sequence) -> None:
        if seq.request_id in self.requests:
            rank = self.pool.entry_rank(seq.content_hash) if seq.content_hash else 0
            self.finished_requests.append(
                RequestRecord(
                    seq.request_id, seq.adapter_name, rank, seq.cold, seq.arrival, seq.admitted,
                    seq.token_times, len(seq.prompt_ids), seq.finish_reason,
                )
            )  # fmt: skip
        if seq.slot >= 0 and self.running.get(seq.slot) is seq:
            del self.running[seq.slot]
            self.slots.free(seq.slot)
        if seq.acquired and seq.content_hash:
            self.pool.release(seq.content_hash)
            seq.acquired = False
        self.requests.pop(seq.request_id, None)

    def _adapter_ready(self, seq: Sequence) -> bool:
        if seq.content_hash is None:
            return True
        if not seq.acquired:
            adapter = self.registry.host.get(seq.content_hash)
            if adapter is None:  # evicted from the host tier: re-read by name
                adapter = self.registry.resolve(seq.adapter_name)
                seq.content_hash = adapter.content_hash
            seq.cold = not self.pool.is_resident(seq.content_hash)
            try:
                self.pool.acquire(adapter)
            except PoolFullError:
                return False  # every resident adapter is busy: retry next step
            seq.acquired = True
        if not self.pool.is_resident(seq.content_hash):
            if self.cpu is None or not self.cpu.can_assist(seq):
                return False
            seq.cpu_assist = True
        seq.adapter_slot = self.pool.slot_of(seq.content_hash)
        return True

    def _admit(self) -> list[Sequence]:
        admitted: list[Sequence] = []
        cap = min(self.config.max_prefill_batch, self.slots.num_free)
        if cap == 0 or not self.waiting:
            return admitted
        for seq in self.scheduler.candidates(self.running.values(), list(self.waiting), cap, cap):
            if len(admitted) >= self.config.max_prefill_batch or self.slots.num_free == 0:
                break
            try:
                ready = self._adapter_ready(seq)
            except Exception as e:  # e.g. the adapter was unloaded and evicted meanwhile
                log.warning(
                    "request %s failed to get adapter %s: %s", seq.request_id, seq.adapter_name, e
                )
                self.waiting.remove(seq)
                seq.finish("error")
                self._release(seq)
                out = seq.take_delta([])
                out.error = f"adapter {seq.adapter_name!r} is unavailable: {e}"
                self._failed.append(out)
                continue
            if not ready:
                continue  # its load proceeds; requests behind it are not blocked
            self.waiting.remove(seq)
            seq.slot = self.slots.alloc()
            seq.status = SeqStatus.RUNNING
            seq.admitted = time.perf_counter()
            self.running[seq.slot] = seq
            p = seq.params
            self._samp[seq.slot] = (
                p.temperature, p.top_k, p.top_p, seq.seed, p.min_p,
                p.presence_penalty, p.frequency_penalty, p.repetition_penalty,
            )  # fmt: skip
            admitted.append(seq)
        return admitted

    def _sampling(self, rows: list[int]) -> SamplingArrays:
        return SamplingArrays.from_rows([tuple(self._samp[r]) for r in rows])

    def step(self) -> list[RequestOutput]:
        """Advance every request by at most one token; returns the streamed deltas."""
        outputs: list[RequestOutput] = []
        t0 = time.perf_counter()
        with self.lock:
            if self.cpu is not None and self.cpu.keys:
                self.cpu.drop_loaded()
            new = self._admit()
            outputs, self._failed = self._failed, []
            prefill = None
            if new:
                plan = None
                with self.pool.lock:  # the layers ready now are the ones this dispatch sees
                    cpu_plan = None if self.cpu is None else self.cpu.plan(new)
                    if cpu_plan is not None:
                        plan = cpu_plan[2]
                    logits, toks = self.runner.prefill(
                        [s.prompt_ids for s in new],
                        [s.slot for s in new],
                        self._sampling([s.slot for s in new]),
                        [s.adapter_slot for s in new],
                        cpu_plan=None if cpu_plan is None else cpu_plan[:2],
                    )
                for s in new:
                    s.pos = len(s.prompt_ids)
                prefill = (toks, new, self._logprobs(logits, toks, new), plan)
            launched = None
            rows = []
            if self.running:
                n = self.slots.high_water
                positions = np.full(n, -1, np.int32)
                adapters = np.zeros(n, np.int32)
                for slot, s in self.running.items():
                    if s.cpu_assist:  # prefilled with CPU help: decodes once the load is done
                        if not self.pool.is_resident(s.content_hash) or s.pos == 0:
                            continue
                        s.cpu_assist = False
                    positions[slot] = s.pos
                    adapters[slot] = s.adapter_slot
                    rows.append((slot, s))
            if rows:
                logits, toks = self.runner.decode(
                    positions, self._sampling(list(range(n))), adapters
                )
                for _, s in rows:
                    s.pos += 1
                rec = StepRecord(
                    t0, len(rows), sorted(self._ranks(rows)), sum(len(s.prompt_ids) for s in new),
                    time.perf_counter() - t0, self.config.lora_strategy,
                )  # fmt: skip
                self.steps.append(rec)
                launched = (toks, rows, self._logprobs(logits, toks, [s for _, s in rows]), rec)
            # host work below overlaps the decode step just launched
            if prefill is not None:
                toks, seqs, lp, plan = prefill
                host = np.asarray(toks)
                lp = None if lp is None else [np.asarray(a) for a in lp]
                failed = set() if self.cpu is None else self.cpu.finish(plan)
                for row, s in enumerate(seqs):
                    if row in failed:
                        self._requeue_sync(s)
                    else:
                        outputs.extend(self._accept(s, int(host[row]), lp, row))
            elif not rows and not new:
                time.sleep(0.001)  # nothing to run (e.g. waiting for a load): do not spin
            if self._in_flight is not None:
                toks, rows, lp, rec = self._in_flight
                host = np.asarray(toks)
                done = time.perf_counter()
                rec.latency_s = done - max(rec.t_start, self._last_done)
                self._last_done = done
                lp = None if lp is None else [np.asarray(a) for a in lp]
                for slot, s in rows:
                    outputs.extend(self._accept(s, int(host[slot]), lp, slot))
            self._in_flight = launched
        return outputs

    # ------------------------------------------------------------------ CPU assist

    @property
    def cpu_pool(self):
        """The CPU LoRA worker pool (cpu_assist mode), else None."""
        return None if self.cpu is None else self.cpu.workers

    @property
    def cpu_stats(self) -> dict[str, float]:
        return zero_stats() if self.cpu is None else self.cpu.stats

    @property
    def cpu_timings(self) -> collections.deque:
        return collections.deque() if self.cpu is None else self.cpu.timings

    def _requeue_sync(self, seq: Sequence) -> None:
        """Back to the queue head with a synchronous load; its KV slot is freed, nothing lost."""
        if seq.finished:
            return
        if self.running.get(seq.slot) is seq:
            del self.running[seq.slot]
            self.slots.free(seq.slot)
        seq.slot, seq.pos, seq.status = -1, 0, SeqStatus.WAITING
        seq.cpu_assist, seq.no_cpu_assist = False, True
        self.waiting.appendleft(seq)

    def scheduler_state(self) -> dict:
        """Running and queued requests with their ranks and SLOs: what a router weighs."""

        def info(s: Sequence) -> dict:
            return {
                "rank": s.rank,
                "prompt_tokens": len(s.prompt_ids),
                "slo_s": s.params.tpot_slo,
                "adapter": s.adapter_name,
            }

        with self.lock:
            running = [info(s) for s in self.running.values()]
            queued = [info(s) for s in self.waiting]
            free = self.slots.num_free
        return {"running": running, "queued": queued, "free_slots": free}

    def cpu_assist_stats(self) -> dict[str, float]:
        """Counters for metrics: CPU-assisted prefills, layers by path, CPU seconds."""
        return zero_stats() if self.cpu is None else self.cpu.metrics()

    def _ranks(self, rows: list[tuple[int, Sequence]]) -> list[int]:
        return [self.pool.entry_rank(s.content_hash) if s.content_hash else 0 for _, s in rows]

    @staticmethod
    def _logprobs(logits, toks, seqs: list[Sequence]):
        """Dispatch log-prob extraction only when some sequence in the batch asked for it."""
        if all(s.params.logprobs is None for s in seqs):
            return None
        return token_logprobs(logits, toks, MAX_LOGPROBS)

    def _accept(self, seq: Sequence, token: int, lp=None, row: int = 0) -> list[RequestOutput]:
        if seq.status is not SeqStatus.RUNNING:
            return []  # finished, aborted or re-queued while this token was in flight
        k = seq.params.logprobs
        if k is not None and lp is not None:
            chosen, top_ids, top_lp = lp
            seq.pending_logprobs.append(
                {"token_id": token, "logprob": float(chosen[row]),
                 "top": [(int(i), float(v)) for i, v in zip(top_ids[row, :k], top_lp[row, :k], strict=True)]}
            )  # fmt: skip
        n0 = len(seq.output_ids)
        seq.append(token, self.max_len)
        out = seq.take_delta(seq.output_ids[n0:])  # empty for EOS / stop token ids
        if seq.finished:
            self._release(seq)
        return [out] if (out.text or out.token_ids or out.finished) else []

    def close(self) -> None:
        self.pool.close()
        if self.cpu is not None:
            self.cpu.close()
