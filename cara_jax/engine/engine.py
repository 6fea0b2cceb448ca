"""The engine loop: requests in, one scheduled step at a time, streamed deltas out.

One ``step()``:
1. the scheduler builds the step's batch under the token budget (decode tokens first, then
   prompt chunks; scheduler.py);
2. the runner dispatches it (one compiled program; runner.py) and returns at once;
3. while that step runs, the host reads the *previous* step's tokens: detokenize, stop checks,
   streaming deltas; finished sequences give back their pages, row and adapter at once.
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

from cara_jax.adapters.device_pool import DevicePool
from cara_jax.adapters.store import AdapterRegistry, HostStore, RegisteredAdapter
from cara_jax.adapters.trees import adapter_source
from cara_jax.engine.admission_order import AdmissionOrder
from cara_jax.engine.batch import CpuPlan, ScheduledBatch
from cara_jax.engine.block_manager import BlockManager
from cara_jax.engine.config import COLD_START_MODES, EngineConfig, default_kv_cache_memory
from cara_jax.engine.errors import EngineClosedError, PromptTooLongError
from cara_jax.engine.records import EngineStats, RequestRecord, StepRecord
from cara_jax.engine.residency import AdapterResidency
from cara_jax.engine.runner import ModelRunner, RunnerConfig, StepResult
from cara_jax.engine.scheduler import Accepted, Ended, Scheduler, SchedulerLimits
from cara_jax.engine.sequence import RequestOutput, Sequence
from cara_jax.kv_cache import bytes_per_token
from cara_jax.sampling_params import InvalidRequestError, SamplingParams
from cara_jax.scheduling.admission import QueueFullError
from cara_jax.structured import Grammars
from cara_jax.tokenizer import Tokenizer
from cara_jax.weights import LoadedModel

log = logging.getLogger(__name__)


@dataclasses.dataclass
class InFlight:
    """The step on the device: read back (postprocessed) while the next one runs."""

    result: StepResult
    epochs: dict[int, tuple[int, int]]  # per row's sequence: (epoch, kv_epoch) at dispatch
    cpu: CpuPlan | None  # where its cold rows' deltas came from
    record: StepRecord


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
        self.max_len = min(cfg.max_model_len or loaded.cfg.max_position_embeddings,
                           loaded.cfg.max_position_embeddings)  # fmt: skip
        kv_bytes = cfg.kv_cache_memory or default_kv_cache_memory()
        per_page = cfg.block_size * bytes_per_token(loaded.cfg, loaded.dtype)
        num_pages = max(2, kv_bytes // per_page)
        capacity = (num_pages - 1) * cfg.block_size
        if capacity < self.max_len:
            log.warning("the KV cache holds %d tokens: max_model_len lowered from %d to that",
                        capacity, self.max_len)  # fmt: skip
            self.max_len = capacity
        pool = DevicePool(loaded.cfg, cfg.pool, dtype=loaded.dtype)
        registry = AdapterRegistry(
            loaded.cfg, HostStore(cfg.host_budget_bytes), base_model_name=None
        )
        assisted = cfg.cold_start in ("cpu_assist", "auto")
        rc = RunnerConfig(
            num_pages=num_pages, max_model_len=self.max_len, block_size=cfg.block_size,
            max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens,
            max_prefill_seqs=cfg.max_prefill_seqs, min_token_bucket=cfg.min_token_bucket,
            cpu_assist=assisted,
            buckets=cfg.token_buckets, attention_backend=cfg.attention_backend,
        )  # fmt: skip
        if cfg.cold_start == "auto":  # CPU-assisted programs for a few buckets only
            rc = dataclasses.replace(
                rc, cpu_buckets=cfg.cpu_assist_buckets or rc.token_buckets[-2:]
            )
        self.runner = ModelRunner(
            loaded,
            rc,
            pool=pool,
            lora_strategy=cfg.lora_strategy,
        )  # fmt: skip
        self._kv_bytes = self.runner.cache.nbytes()
        self.residency = AdapterResidency(
            loaded.cfg, pool, registry, cfg.cold_start, cfg.cpu_workers, cfg.cpu_timeout_s
        )
        self.admission = AdmissionOrder(cfg.admission, cfg.lora_strategy, jax.default_backend())
        self.blocks = BlockManager(num_pages, cfg.block_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerLimits(cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.max_prefill_seqs,
                            self.max_len),  # fmt: skip
            self.blocks, self.residency, self.admission,
        )  # fmt: skip
        self.requests: dict[str, Sequence] = {}
        self.grammars = Grammars(self.tokenizer, loaded.cfg.vocab_size)
        self._in_flight: InFlight | None = None
        self._ids = itertools.count()
        self.lock = threading.RLock()  # add/abort from other threads vs step()
        self._failed: list[RequestOutput] = []  # final outputs of requests that failed
        self.steps: collections.deque[StepRecord] = collections.deque(maxlen=cfg.max_step_records)
        self.finished_requests: collections.deque[RequestRecord] = collections.deque(
            maxlen=cfg.max_request_records
        )
        self._num_steps = 0
        self._last_done = 0.0
        self._closed = False

    # ------------------------------------------------------------------ views

    @property
    def waiting(self) -> collections.deque[Sequence]:
        return self.scheduler.waiting

    @property
    def running(self) -> list[Sequence]:
        return self.scheduler.running

    @property
    def pool(self) -> DevicePool:
        """The device pool (for tests, benches and the profiler; the engine goes through
        residency)."""
        return self.residency.pool

    @property
    def registry(self) -> AdapterRegistry:
        return self.residency.registry

    def is_ready(self) -> bool:
        """Every program the engine can dispatch is compiled (what /health waits for)."""
        return self.runner.is_ready()

    def programs(self) -> list:
        """The step programs the engine can dispatch (warm-up compiles them all)."""
        return self.runner.programs()

    def warmup(self, progress=None) -> None:
        """Compile every program the engine can dispatch (nothing compiles after this), and
        build the grammar engine's tokenizer (structured outputs)."""
        try:
            self.grammars.prepare()
        except Exception as e:  # a tokenizer it cannot read: constrained requests fail alone
            log.warning("structured outputs unavailable: %s", e)
        self.runner.warmup(threads=self.config.compile_threads, progress=progress)

    def stats(self) -> EngineStats:
        """A snapshot without the engine lock (the step holds it while it waits for the device):
        each field is read atomically; together they may straddle a step."""
        run = list(self.scheduler.running)
        pc = self.blocks.stats
        return EngineStats(
            running=len(run), waiting=len(self.scheduler.waiting),
            max_num_seqs=self.config.max_num_seqs,
            kv_pages_total=self.blocks.num_pages, kv_pages_free=self.blocks.num_free,
            kv_block_size=self.blocks.block_size, kv_cache_bytes=self._kv_bytes,
            compiled_programs=self.runner.compiled_count(),
            programs_total=len(self.runner.programs()),
            hot_compiles=self.runner.hot_compiles + self.residency.pool.late_compiles,
            ready=self.runner.is_ready(), preemptions=self.scheduler.preemptions,
            steps=self._num_steps, lora_pool=self.residency.stats(),
            admission=dict(self.admission.stats), cpu_assist=self.residency.cpu_stats(),
            running_adapters=tuple(sorted({n for s in run for n in s.adapter_names})),
            waiting_adapters=tuple(sorted({n for s in list(self.scheduler.waiting)
                                           for n in s.adapter_names})),
            cold_start=None if (cm := self.residency.cold_model) is None else cm.snapshot(),
            prefix_caching=self.blocks.enable_caching, prefix_cache_queries=pc.queries,
            prefix_cache_hits=pc.hits, prefix_cache_blocks=self.blocks.num_cached,
            prefix_cache_evictions=pc.evictions,
            prefix_cache_hits_by_adapter=dict(pc.hits_by_adapter),
            prefix_cache_queries_by_adapter=dict(pc.queries_by_adapter),
            structured=dataclasses.asdict(self.grammars.stats),
        )  # fmt: skip

    def reset_prefix_cache(self) -> int:
        """Forget the cached blocks no running request holds (e.g. after changing weights in
        place); returns how many were dropped."""
        with self.lock:
            return self.blocks.reset_cache()

    # ------------------------------------------------------------------ adapters

    def load_adapter(
        self, name: str, path: str | Path | None = None, *, weights=None,
        alpha: float | None = None, path_map=None,
    ) -> RegisteredAdapter:  # fmt: skip
        """Register (or replace: running requests keep the old weights) an adapter from a PEFT
        folder or from ``weights`` in memory (adapters/trees.py); ``cached`` mode pins it on
        the device. Before start-up's warm-up, new widths' write programs are left to it."""
        source = adapter_source(self.loaded.cfg, name, path, weights, alpha, path_map)
        return self.residency.register(name, source, compile_writer=self.runner.is_ready())

    def unload_adapter(self, name: str) -> None:
        self.residency.unregister(name)
        with self.lock:
            self.blocks.forget_adapter(name)

    def adapters(self) -> dict[str, RegisteredAdapter]:
        """Registered names and what they point at."""
        return self.residency.names()

    def resident_adapters(self) -> list[str]:
        """Registered names whose adapter is on the device now."""
        return self.residency.resident_names()

    # ------------------------------------------------------------------ requests

    def validate(self, ids: list[int], params: SamplingParams) -> None:
        """Reject a request that can never run, before it is queued."""
        if not ids:
            raise InvalidRequestError("the prompt is empty", "prompt")
        if len(ids) >= self.max_len:
            raise PromptTooLongError(
                f"prompt of {len(ids)} tokens does not fit the context of {self.max_len} tokens "
                "(it needs room for at least one generated token)"
            )
        if any(not 0 <= t < self.loaded.cfg.vocab_size for t in ids):
            raise InvalidRequestError("prompt token id out of the vocabulary", "prompt")
        if any(t >= self.loaded.cfg.vocab_size for t, _ in params.logit_bias):
            raise InvalidRequestError("logit_bias names a token id out of the vocabulary",
                                      "logit_bias")  # fmt: skip

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        adapter: str | None = None,
        request_id: str | None = None,
        lora=None,
    ) -> str:
        """Queue a request; invalid input raises at once and never disturbs other requests.
        ``lora``: instead of ``adapter``, adapters at weights (adapters/mixture.py), as
        [{"name", "scale"}], (name, scale) pairs or LoraRefs."""
        params = params or SamplingParams()
        ids = (
            self.tokenizer.encode(prompt, add_special_tokens=True)
            if isinstance(prompt, str)
            else list(prompt)
        )
        self.validate(ids, params)
        use = self.residency.adapter_use(adapter, lora, self.config.max_lora_entries)
        rid = request_id or f"req-{next(self._ids)}"
        seq = Sequence(
            request_id=rid,
            prompt_ids=ids,
            params=params,
            seed=params.seed if params.seed is not None else random.getrandbits(31),
            detok=self.tokenizer.detokenizer(params.skip_special_tokens),
            eos_ids=frozenset(self.tokenizer.eos_token_ids),
            adapter_name=use.label,
            content_hash=use.content_hash,
            rank=use.rank,
            mixture=use.mixture,
        )
        if params.structured is not None:  # compiled outside the lock (GrammarError: a 400)
            seq.constraint = self.grammars.compile(params.structured)
        if params.min_tokens and not params.ignore_eos:
            seq.ban_mask = self.grammars.ban(seq.eos_ids | set(params.stop_token_ids))
        elif params.min_tokens:
            seq.ban_mask = self.grammars.ban(frozenset(params.stop_token_ids))
        with self.lock:
            if self._closed:
                raise EngineClosedError("the engine is shut down")
            if rid in self.requests:
                raise InvalidRequestError(f"duplicate request id {rid!r}", "request_id")
            q = self.config.max_queue
            if q is not None and len(self.scheduler.waiting) >= q:
                raise QueueFullError(q)
            self.requests[rid] = seq
            self.scheduler.add(seq)
            # prefetch: start the adapter's load now, not when the request reaches the head of
            # the queue (the first max_num_seqs waiting requests; the pool must have room)
            prefetch = self.config.prefetch_adapters and self.residency.prefetch
            if prefetch and use.content_hash and (
                len(self.scheduler.waiting) <= self.config.max_num_seqs
            ):
                try:
                    self.residency.acquire(seq)
                except Exception as e:  # admission reports it (the scheduler retries there)
                    log.debug("prefetch of %s failed: %s", use.label, e)
        return rid

    def abort(self, request_id: str) -> None:
        """Cancel a request; its pages and row are free for the next step."""
        with self.lock:
            seq = self.requests.get(request_id)
            if seq is None:
                return
            if seq.finished:  # let go by a step that then failed before it was recorded
                del self.requests[request_id]
                return
            seq.finish("abort")
            self._release(seq)

    def has_unfinished(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running or self._in_flight
                    or self._failed)  # fmt: skip

    def _release(self, seq: Sequence) -> None:
        if seq.request_id in self.requests:
            self._record(self.scheduler.finish(seq))

    def _record(self, e: Ended) -> None:
        seq = e.seq
        self.finished_requests.append(
            RequestRecord(
                seq.request_id, seq.adapter_name, e.rank, seq.hold.cold, seq.arrival,
                seq.admitted, seq.token_times, len(seq.prompt_ids), seq.finish_reason,
                seq.preemptions, seq.num_cached_tokens or 0, e.cold_start_mode,
                e.cold_start_reason,
            )
        )  # fmt: skip
        del self.requests[seq.request_id]

    # ------------------------------------------------------------------ the loop

    def step(self) -> list[RequestOutput]:
        """Run one step: schedule -> run (dispatch, returns at once) -> postprocess the step
        before it (its tokens are read while this one runs); returns that step's deltas."""
        with self.lock:
            t0 = time.perf_counter()
            batch, outputs = self._schedule()
            launched = self._run(batch, t0) if batch else None
            if launched is None and self._in_flight is None:
                time.sleep(0.001)  # nothing to run (e.g. waiting for a load): do not spin
            if self._in_flight is not None:
                outputs += self._postprocess(self._in_flight)
            self._in_flight = launched
        return outputs

    def _schedule(self) -> tuple[ScheduledBatch, list[RequestOutput]]:
        """The next batch, and the final outputs of requests that failed meanwhile."""
        self.residency.begin_step()
        # admission may wait for a load about to land while a step is in flight (the device
        # is busy anyway): up to half the recent step time
        step_s = self._recent_step_s() if self._in_flight is not None else 0.0
        batch = self.scheduler.schedule(wait_s=0.5 * step_s, step_s=step_s)
        if not batch and self.scheduler.running and self._in_flight is None:
            self.scheduler.unstick()
            batch = self.scheduler.schedule()
        outputs, self._failed = self._failed, []
        for ended, err in self.scheduler.take_failed():
            self._record(ended)
            out = ended.seq.take_delta([])
            out.error = err
            outputs.append(out)
        return batch, outputs

    def _run(self, batch: ScheduledBatch, t0: float) -> InFlight:
        want_lp = any(r.seq.params.logprobs is not None for r in batch.rows)
        with self.residency.lock:  # the layers ready now are the ones this dispatch sees
            cpu = self.residency.cpu_plan(batch.chunks)
            res = self.runner.run(batch, cpu, want_lp)
        ranks = [self.residency.rank_of(d.seq.content_hash) for d in batch.decode]
        rec = StepRecord(
            t0, len(batch.decode), sorted(ranks), sum(len(c.tokens) for c in batch.chunks),
            time.perf_counter() - t0, self.config.lora_strategy, None, batch.num_tokens,
            (res.program.tokens, int(res.program.cpu)),
        )  # fmt: skip
        self.steps.append(rec)
        self._num_steps += 1
        return InFlight(res, self.scheduler.epochs(batch), cpu, rec)

    def _postprocess(self, step: InFlight) -> list[RequestOutput]:
        """Read a dispatched step's tokens (blocks until it is done) and stream them."""
        res = step.result
        toks = np.asarray(res.outputs.tokens)
        done = time.perf_counter()
        step.record.latency_s = done - max(step.record.t_start, self._last_done)
        self._last_done = done
        lp = None
        if any(r.seq.params.logprobs is not None for r in res.batch.rows):
            o = res.outputs
            lp = (np.asarray(o.chosen_logprob), np.asarray(o.top_ids), np.asarray(o.top_logprobs))
        failed = self.residency.finish_plan(step.cpu)
        for j, ch in enumerate(res.batch.chunks):  # prompt_logprobs, before the deltas
            fresh = (ch.seq.epoch, ch.seq.kv_epoch) == step.epochs[id(ch.seq)]
            if ch.score_next is not None and j not in failed and fresh:
                ch.seq.take_scores(ch.start, *res.chunk_scores(j))
        row_tokens = [int(toks[i]) for i in res.sample_index]
        accepted, ended = self.scheduler.postprocess(res.batch, step.epochs, failed, row_tokens)
        outputs: list[RequestOutput] = []
        for a in accepted:
            out = self._delta(a, lp, res.sample_index[a.row])
            if out is not None:
                outputs.append(out)
        for e in ended:
            self._record(e)
        return outputs

    @staticmethod
    def _delta(a: Accepted, lp, idx: int) -> RequestOutput | None:
        """What the stream gets for an accepted token (its log-probs, if asked)."""
        seq = a.seq
        new = seq.output_ids[a.outputs_before :]  # empty for EOS / stop token ids
        if seq.params.logprobs is not None and lp is not None and new:
            seq.take_logprob(new[0], *(v[idx] for v in lp))
        out = seq.take_delta(new)
        return out if (out.text or out.token_ids or out.finished) else None

    # ------------------------------------------------------------------ CPU assist, routing

    def _recent_step_s(self) -> float:
        recent = [r.latency_s for r in list(self.steps)[-8:] if r.latency_s is not None]
        return float(np.median(recent)) if recent else 0.0

    @property
    def cpu_pool(self):
        """The CPU LoRA worker pool (cpu_assist and auto modes), else None."""
        cpu = self.residency.cpu
        return None if cpu is None else cpu.workers

    @property
    def cpu_stats(self) -> dict[str, float]:
        """Counters for metrics: CPU-assisted prefills, layers by path, CPU seconds."""
        return self.residency.cpu_stats()

    @property
    def cpu_timings(self) -> collections.deque:
        cpu = self.residency.cpu
        return collections.deque() if cpu is None else cpu.timings

    def scheduler_state(self) -> dict:
        """Running and queued requests with their ranks and SLOs: what a router weighs."""
        with self.lock:
            return self.scheduler.router_state()

    def close(self) -> None:
        with self.lock:
            self._closed = True
        self.residency.close()
