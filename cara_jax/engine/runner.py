"""Model runner: device arrays from a scheduled batch, and the handful of compiled programs.

A program is keyed by the token-count bucket (and, in cpu_assist mode, whether it takes CPU
deltas) and nothing else: the context length, the number of sequences, where each one is in its
prompt and the LoRA rank bucket (picked per step inside the program) are data. The
runner compiles every program ahead of time (``warmup``); after that a step never waits for a
compiler (``hot_compiles`` counts any that did, and tests hold it at zero).

The paged KV cache and the per-sequence state are donated to every step, so they update in
place; a step's sampled tokens stay on the device until the engine reads them one
step later (JAX's async dispatch overlaps that host work with the next step).
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from cara_jax.adapters.device_pool import DevicePool
from cara_jax.adapters.multi_lora import ENTRY_BLOCK, RANK_BLOCK, STRATEGIES
from cara_jax.cpu_assist import CpuAssistHook
from cara_jax.engine.batch import IDLE_ROW, CpuPlan, ScheduledBatch
from cara_jax.engine.program_store import PROCESS_PROGRAMS, ProgramStore
from cara_jax.engine.step import SeqState, StepOutputs, run_step
from cara_jax.engine.step_inputs import HostInputs, all_tokens, no_bias, shape_row
from cara_jax.kv_cache import KVCache
from cara_jax.lora_hooks import GROUPS, PROJECTIONS
from cara_jax.ragged import DROP
from cara_jax.sampler import SamplingArrays
from cara_jax.weights import LoadedModel

log = logging.getLogger(__name__)


def pow2_buckets(lo: int, hi: int) -> tuple[int, ...]:
    out, b = [], lo
    while b < hi:
        out.append(b)
        b *= 2
    out.append(hi)
    return tuple(out)


def bucket(value: int, buckets: tuple[int, ...]) -> int:
    """Smallest bucket >= value."""
    i = bisect.bisect_left(buckets, value)
    if i == len(buckets):
        raise ValueError(f"{value} exceeds the largest bucket {buckets[-1]}")
    return buckets[i]


@dataclasses.dataclass(frozen=True)
class RunnerConfig:
    """Shapes of the compiled programs and the size of the KV cache."""

    num_pages: int  # KV pages, page 0 reserved
    max_model_len: int
    block_size: int = 16
    max_num_seqs: int = 32  # sequence rows of the device-side state
    max_num_batched_tokens: int = 256  # token budget of a step = the largest token bucket
    max_prefill_seqs: int = 2  # chunk rows per step
    min_token_bucket: int = 2  # not 1: XLA turns a one-row scatter into a cache copy
    pages_per_chunk: int = 8  # KV pages attention reads per loop iteration
    cpu_assist: bool = False  # also compile CPU-assisted programs (their buckets: cpu_buckets)
    # token buckets of the CPU-assisted programs (None: every bucket); a step with a cold chunk
    # is padded to one of them, so fewer buckets start faster
    cpu_buckets: tuple[int, ...] | None = None
    cache_dtype: str | None = None  # default: the model's dtype
    buckets: tuple[int, ...] | None = None  # explicit token buckets (the largest = the budget)
    attention_backend: str = "jnp"  # cara_jax.attention.ATTENTION_BACKENDS

    @property
    def token_buckets(self) -> tuple[int, ...]:
        if self.buckets:
            out = tuple(sorted({b for b in self.buckets if b < self.max_num_batched_tokens}))
            return (*out, self.max_num_batched_tokens)
        lo = min(self.min_token_bucket, self.max_num_batched_tokens)
        return pow2_buckets(lo, self.max_num_batched_tokens)

    @property
    def table_width(self) -> int:
        """Block-table columns: pages of max_model_len, rounded up to whole loop iterations."""
        pages = -(-self.max_model_len // self.block_size)
        return -(-pages // self.pages_per_chunk) * self.pages_per_chunk

    def decode_rows(self, tokens: int) -> int:
        return min(tokens, self.max_num_seqs)


@dataclasses.dataclass(frozen=True)
class Program:
    """One compiled step shape: the token bucket, whether it has LoRA ops (the rank bucket is
    picked inside, per step) and whether it takes CPU-computed deltas."""

    tokens: int
    lora: bool = True
    cpu: bool = False


@dataclasses.dataclass
class StepResult:
    """A dispatched step: device arrays, read by the engine one step later."""

    outputs: StepOutputs
    logits: jax.Array  # [S+P, V]
    batch: ScheduledBatch
    program: Program
    sample_index: list[int]  # per batch row (decode rows, then chunks): its row in the outputs
    chunk_offsets: list[int] = dataclasses.field(default_factory=list)  # each chunk's 1st token

    def chunk_scores(self, j: int) -> tuple[np.ndarray, ...]:
        """prompt_logprobs of chunk j's positions: (log-prob, rank, top ids, top log-probs)."""
        o = self.outputs
        a, b = self.chunk_offsets[j], self.chunk_offsets[j] + len(self.batch.chunks[j].tokens)
        return tuple(np.asarray(v[a:b]) for v in (o.score_lp, o.score_rank, o.score_top_ids,
                                                   o.score_top_lp))  # fmt: skip


class ModelRunner:
    """Holds parameters, the paged KV cache and the sequence state; runs compiled steps."""

    def __init__(
        self,
        loaded: LoadedModel,
        config: RunnerConfig,
        pool: DevicePool | None = None,
        lora_strategy: str = "mbgmv",
        lora_backend: str = "auto",
    ) -> None:
        if lora_strategy not in STRATEGIES:
            raise ValueError(f"lora_strategy must be one of {STRATEGIES}, not {lora_strategy!r}")
        self.loaded = loaded
        self.cfg = loaded.cfg
        self.config = config
        self.pool = pool
        self.lora_strategy = lora_strategy
        self.lora_backend = lora_backend  # multi_lora.BACKENDS: Pallas on GPU, jnp elsewhere
        dtype = jnp.dtype(config.cache_dtype or loaded.dtype)
        self.cache = KVCache.allocate(self.cfg, config.num_pages, config.block_size, dtype)
        self.state = SeqState.zeros(config.max_num_seqs, self.cfg.vocab_size)
        # graphdef and tree structure bound once: passing them per call would re-hash the module
        # graph every step; parameters travel as a flat list of arrays
        self.params, treedef = jax.tree_util.tree_flatten(loaded.state)
        if pool is not None:  # DoRA's norms read the base kernels (adapters/dora.py)
            pool.set_base_kernels(loaded.kernels())
            pool.set_base_vocab(loaded.vocab_sums())
        self._graphdef = loaded.graphdef
        self._step = jax.jit(
            partial(run_step, loaded.graphdef, treedef), donate_argnames=("cache", "state")
        )
        self._exe: dict[Program, jax.stages.Compiled] = {}
        self._lock = threading.Lock()
        self.hot_compiles = 0
        self.compile_seconds = 0.0
        self._writer_warm = False
        self._store = ProgramStore.from_jax_config()

    # ------------------------------------------------------------------ programs

    def rank_buckets(self) -> tuple[int, ...]:
        """The ranks a LoRA step runs at (for cost models): bgmv rows and prefill chunks pad
        the largest rank on a projection to a multiple of RANK_BLOCK."""
        if self.pool is None:
            return ()
        return tuple(range(RANK_BLOCK, self.pool.index_width() + 1, RANK_BLOCK))

    def total_rank_buckets(self) -> tuple[int, ...]:
        """The summed ranks mbgmv's decode runs at: multiples of ENTRY_BLOCK."""
        if self.pool is None:
            return ()
        top = self.config.max_num_seqs * self.pool.index_width()
        return tuple(range(ENTRY_BLOCK, top + 1, ENTRY_BLOCK))

    def programs(self) -> list[Program]:
        """Every program this runner can dispatch, smallest first."""
        lora = self.pool is not None
        out = [Program(t, lora) for t in self.config.token_buckets]
        if self.config.cpu_assist and lora:
            out += [Program(t, True, True) for t in self.cpu_token_buckets()]
        return out

    def cpu_token_buckets(self) -> tuple[int, ...]:
        """Token buckets of the CPU-assisted programs (the largest always among them)."""
        b, want = self.config.token_buckets, self.config.cpu_buckets
        return tuple(t for t in b if t in want or t == b[-1]) if want else b

    def program_for(self, batch: ScheduledBatch, cpu: bool = False) -> Program:
        buckets = self.cpu_token_buckets() if cpu else self.config.token_buckets
        t = bucket(max(batch.num_tokens, 1), buckets)
        return Program(t, self.pool is not None, cpu)

    def _abstract(self, p: Program) -> tuple:
        sds = partial(jax.tree_util.tree_map, lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype))
        host, sampling, dec_ad, ch_ad = self._empty_inputs(p.tokens)
        inp = host.device(False, self.config)
        hook = self._hook(p, inp.meta, dec_ad, ch_ad, None)
        return (sds(self.params), sds(self.cache), sds(self.state), sds(inp), sds(sampling),
                None if hook is None else sds(hook))  # fmt: skip

    def compile(self, p: Program) -> jax.stages.Compiled:
        """Compile one program (idempotent; safe from several threads)."""
        exe = self._exe.get(p)
        if exe is not None:
            return exe
        t0 = time.perf_counter()
        args = self._abstract(p)
        shared = None if p.cpu else PROCESS_PROGRAMS.key(self._graphdef, self.params, repr(p), args)
        exe = None if shared is None else PROCESS_PROGRAMS.get(shared)
        key = None if self._store is None or exe is not None else self._store.key(repr(p), args)
        exe = exe if key is None else self._store.load(key)
        if exe is None:
            lowered = self._step.lower(*args)
            if key is not None and not p.cpu:
                exe = self._store.compile(lowered)
                self._store.save(key, exe)
            else:
                exe = lowered.compile()
        if shared is not None:
            PROCESS_PROGRAMS.put(shared, exe)
        with self._lock:
            self._exe.setdefault(p, exe)
            self.compile_seconds += time.perf_counter() - t0
        return self._exe[p]

    def warmup(
        self, threads: int = 2, progress: Callable[[int, int, Program], None] | None = None
    ) -> None:
        """Compile every program (``threads`` at a time: XLA compiles one program on one core)."""
        from concurrent.futures import ThreadPoolExecutor

        todo = [p for p in self.programs() if p not in self._exe]
        done = 0
        with ThreadPoolExecutor(max(1, threads)) as ex:
            writer = None
            if self.pool is not None and not self._writer_warm:
                # adapter loads' row writes: compiled now, beside the programs, not on a load
                writer = ex.submit(self.pool.warm_writer)
            for p, _ in zip(todo, ex.map(self.compile, todo), strict=True):
                done += 1
                if progress is not None:
                    progress(done, len(todo), p)
            if writer is not None:
                writer.result()
                self._writer_warm = True

    def compiled_count(self) -> int:
        return len(self._exe)

    def is_ready(self) -> bool:
        """Every program compiled (and the adapter writes, when there is a pool)."""
        writer = self.pool is None or self._writer_warm
        return writer and all(p in self._exe for p in self.programs())

    # ------------------------------------------------------------------ inputs

    def _empty_inputs(self, t: int):
        c = self.config
        s, pch, mb = c.decode_rows(t), c.max_prefill_seqs, c.table_width
        i32 = partial(np.zeros, dtype=np.int32)
        meta = dict(
            positions=i32(t), slot_mapping=np.full(t, DROP, np.int32),
            dec_tok=np.full(s, t, np.int32), dec_len=i32(s), dec_table=i32((s, mb)),
            ch_start=i32(pch), ch_len=i32(pch), ch_ctx=i32(pch), ch_table=i32((pch, mb)),
            ch_tok=np.full((pch, t), t, np.int32),
        )  # fmt: skip
        inp = dict(
            tokens=i32(t), dec_row=i32(s), ch_row=i32(pch), ch_reset=np.zeros(pch, bool),
            ch_out_from=np.full(pch, DROP, np.int32), sample_tok=i32(s + pch),
            sample_row=i32(s + pch), sample_valid=np.zeros(s + pch, bool),
            allowed=all_tokens(s + pch, self.cfg.vocab_size), constrained=np.zeros((), bool),
            bias_ids=no_bias(s + pch, np.int32), bias_vals=no_bias(s + pch, np.float32),
            biased=np.zeros((), bool), score_next=np.full(t, -1, np.int32),
            want_scores=np.zeros((), bool),
        )  # fmt: skip
        return HostInputs(meta, inp), SamplingArrays.greedy(s + pch), i32(s), i32(pch)

    def build(self, batch: ScheduledBatch, p: Program):
        """Host arrays of a batch for program ``p`` -> (HostInputs, SamplingArrays, slots)."""
        c = self.config
        host, _, dec_ad, ch_ad = self._empty_inputs(p.tokens)
        m, x = host.meta, host.inp
        bs = c.block_size
        s = c.decode_rows(p.tokens)
        samp = [IDLE_ROW] * (s + c.max_prefill_seqs)
        off = 0
        for i, d in enumerate(batch.decode):
            pos = d.position
            m["dec_tok"][i] = off
            m["positions"][off] = pos
            m["slot_mapping"][off] = d.table[pos // bs] * bs + pos % bs
            m["dec_len"][i] = pos + 1
            m["dec_table"][i, : len(d.table)] = d.table
            x["dec_row"][i] = d.row
            x["sample_tok"][i], x["sample_row"][i], x["sample_valid"][i] = off, d.row, True
            dec_ad[i] = d.adapter_slot
            samp[i] = d.sampling
            shape_row(x, i, d.allowed, d.bias)
            off += 1
        for j, ch in enumerate(batch.chunks):
            n = len(ch.tokens)
            pos = np.arange(ch.start, ch.end, dtype=np.int32)
            table = np.asarray(ch.table, np.int32)
            m["ch_start"][j], m["ch_len"][j], m["ch_ctx"][j] = off, n, ch.end
            m["ch_tok"][j, :n] = np.arange(off, off + n, dtype=np.int32)
            m["ch_table"][j, : len(ch.table)] = ch.table
            x["tokens"][off : off + n] = ch.tokens
            m["positions"][off : off + n] = pos
            m["slot_mapping"][off : off + n] = table[pos // bs] * bs + pos % bs
            x["ch_row"][j], x["ch_reset"][j], x["ch_out_from"][j] = (
                ch.row, ch.start == 0 or ch.first, ch.out_from)
            k = s + j
            x["sample_tok"][k], x["sample_row"][k], x["sample_valid"][k] = off + n - 1, ch.row, ch.final
            ch_ad[j] = ch.adapter_slot
            samp[k] = ch.sampling
            shape_row(x, k, ch.allowed, ch.bias)
            if ch.score_next is not None:
                x["score_next"][off : off + n] = ch.score_next
                x["want_scores"][()] = True
            off += n
        return host, SamplingArrays.from_rows(samp), dec_ad, ch_ad

    def _hook(self, p: Program, meta, dec_ad, ch_ad, cpu: CpuPlan | None, tokens=None):
        if not p.lora or self.pool is None:
            return None
        hook = self.pool.ragged_hook(dec_ad, ch_ad, meta, self.lora_strategy,
                                     backend=self.lora_backend, tokens=tokens)  # fmt: skip
        if not p.cpu:
            return hook
        shapes = self.cfg.projection_shapes()
        dev = np.zeros((self.cfg.num_layers, self.config.max_prefill_seqs), np.int32)
        need = np.zeros((self.cfg.num_layers, len(GROUPS)), bool)
        plan_id = 0
        if cpu is not None:  # the plan residency built: slots per layer, where the CPU serves
            dev[:, : cpu.dev_adapter.shape[1]] = cpu.dev_adapter
            need[:] = cpu.need
            plan_id = cpu.plan_id
        # per projection and layer, the chunk rows' pool rows (row 0 where the CPU serves)
        width = self.pool.index_width()
        dev_idx = {
            q: jnp.asarray(np.stack([self.pool.row_index(q, dev[layer], width)
                                     for layer in range(self.cfg.num_layers)]))
            for q in hook.a
        }  # fmt: skip
        return CpuAssistHook(
            inner=hook,
            dev_idx=dev_idx,
            plan_id=jnp.asarray(plan_id, jnp.int32),
            need=jnp.asarray(need),
            out_sizes=tuple((q, shapes[q][1]) for q in PROJECTIONS),
        )

    # ------------------------------------------------------------------ running

    def run(
        self, batch: ScheduledBatch, cpu: CpuPlan | None = None, logprobs: bool = False
    ) -> StepResult:
        """Dispatch one step (returns at once; the result's arrays fill in on the device).
        Call under the device pool's lock when the batch uses adapters."""
        p = self.program_for(batch, cpu is not None)
        exe = self._exe.get(p)
        if exe is None:
            self.hot_compiles += 1
            log.warning("compiling %s on the hot path", p)
            exe = self.compile(p)
        host, sampling, dec_ad, ch_ad = self.build(batch, p)
        inp = host.device(logprobs, self.config)
        hook = self._hook(p, inp.meta, dec_ad, ch_ad, cpu,
                          (host.meta["dec_tok"], host.meta["ch_tok"]))  # fmt: skip
        out, logits, self.cache, self.state = exe(
            self.params, self.cache, self.state, inp, sampling, hook
        )
        s = self.config.decode_rows(p.tokens)
        index = [*range(len(batch.decode)), *range(s, s + len(batch.chunks))]
        offsets = [int(v) for v in host.meta["ch_start"][: len(batch.chunks)]]
        return StepResult(out, logits, batch, p, index, offsets)


    # ------------------------------------------------------------------ probes (profiling)

    def synthetic_batch(
        self, decode_slots: list[int], prompt_lens: list[int] = (), ctx: int = 128,
        prompt_slots: list[int] | None = None,
    ) -> ScheduledBatch:
        """A batch of ``len(decode_slots)`` decode rows at context ``ctx`` (adapter slot each)
        and one whole-prompt chunk per ``prompt_lens`` entry, over pages that hold whatever is
        there: for timing steps (profiler, benches), not for their tokens."""
        from cara_jax.engine.batch import ChunkRow, DecodeRow

        bs, usable = self.config.block_size, self.config.num_pages - 1
        per_row = -(-(ctx + 1) // bs)  # each row its own pages (wrapping when the cache is small)
        decode = [
            DecodeRow(None, i % self.config.max_num_seqs, ctx,
                      [1 + (i * per_row + k) % usable for k in range(per_row)], s, IDLE_ROW)
            for i, s in enumerate(decode_slots)
        ]  # fmt: skip
        slots = list(prompt_slots) if prompt_slots is not None else [0] * len(prompt_lens)
        chunks = []
        for j, (n, s) in enumerate(zip(prompt_lens, slots, strict=True)):
            t = [1 + i % (self.config.num_pages - 1) for i in range(-(-n // bs))]
            chunks.append(ChunkRow(None, (len(decode) + j) % self.config.max_num_seqs,
                                   [1] * n, 0, t, s, IDLE_ROW, True, n))  # fmt: skip
        return ScheduledBatch(decode, chunks)

    def time_step(self, batch: ScheduledBatch) -> jax.Array:
        """Dispatch a (synthetic) batch; returns its tokens to block on."""
        return self.run(batch).outputs.tokens
