"""A pool of CPU worker processes computing LoRA deltas x·A·B over shared memory.

The coordinator (``CpuLoraPool``, in the engine's process) and N workers (``multiprocessing``
spawn context, one core and one BLAS thread each) share the segments described in
``cpu_lora.shm``. One call:

1. the coordinator writes x into the data segment and the job description into ``ctrl``; it
   splits the tokens by estimated cost (ranks differ per adapter) over as many workers as the
   profiled per-call budget needs (``CpuLoraConfig.budget_s``), so 3 tokens wake one worker;
2. it bumps each chosen worker's job word (the last write: the signal);
3. a worker spins on its job word for ``spin_s`` after its last job, then polls with short
   sleeps; it computes its token range of every projection into the result blocks and writes
   its done word;
4. the coordinator waits for the done words (spin ``wait_spin_s``, then short sleeps, bounded
   by the timeout) and copies the results out.

Both spin loops call ``sched_yield``: on an oversubscribed host a spinning coordinator otherwise
keeps its worker off the core for the whole spin window (docs/cpu_lora.md, ~300 µs vs ~10 µs
per round trip on a loaded 2-core machine).

No pickling, pipes or queues on this path. Adapter weights reach the workers through their own
segments (``put_adapter``), attached by a worker the first time a job names them.

Faults: a worker that dies during a call, or does not finish its part in time, makes that call
raise ``CpuWorkerError`` (``CpuWorkerTimeout`` for a timeout); the pool kills and restarts it (a
new process attached to the same segments) and logs a warning. Such a call is not retried: its
inputs may be half consumed, and the engine's fallback (a synchronous adapter load) is faster
than waiting for a new worker to start. A worker found dead between calls is restarted before
the next call is posted, and that call goes to the new process. ``close()``, a finalizer and
interpreter exit stop the workers and unlink every segment the pool created. Starting,
restarting and waiting for the workers (and the segments' life) are in ``cpu_lora.supervisor``,
the pool's base class.

The ordering of the plain stores (job fields before the job word; results before the done
word) relies on a total-store-order CPU (x86-64). On weakly ordered CPUs the two flag words
would need release/acquire stores.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import threading
import time
import uuid
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cpu_lora import shm as L
from cpu_lora.calls import (  # noqa: F401  (re-exported: the pool's public names)
    CallTiming,
    CpuLoraConfig,
    CpuLoraTicket,
    CpuWorkerError,
    CpuWorkerTimeout,
    _Adapter,
    _Resources,
    _spawn_env,
    aligned_words,
    split_by_cost,
)
from cpu_lora.kernels import KERNELS
from cpu_lora.supervisor import WorkerSupervisor

_KERNEL_CALL_S = 3e-6  # fixed cost of one kernel call (two BLAS calls), from the measurements


class CpuLoraPool(WorkerSupervisor):
    """Coordinator of the CPU LoRA workers. Thread-safe; one call in flight at a time."""

    def __init__(
        self,
        config: CpuLoraConfig | None = None,
        *,
        num_workers: int | None = None,
        cfg: Any = None,
    ) -> None:
        if config is None:
            config = CpuLoraConfig.for_model(cfg) if cfg is not None else CpuLoraConfig()
        if num_workers is not None:
            config = dataclasses.replace(config, num_workers=num_workers)
        if config.num_workers < 1:
            raise ValueError("num_workers must be at least 1")
        if config.kernel != "auto" and config.kernel not in KERNELS:
            raise ValueError(f"kernel {config.kernel!r}: expected auto or one of {list(KERNELS)}")
        self.config = config
        self.tag = L.SHM_PREFIX + uuid.uuid4().hex[:12]
        self._max_projs = len(L.PROJECTIONS)
        self._lock = threading.RLock()
        self._ctx = multiprocessing.get_context("spawn")
        self._res = _Resources({}, [None] * config.num_workers)
        self._finalizer = weakref.finalize(self, _Resources.release, self._res)
        n = config.num_workers
        ctrl_shm = self._create("ctrl", L.ctrl_nbytes(n, config.max_segments, self._max_projs))
        self._ctrl: L.CtrlView | None = L.CtrlView(ctrl_shm.buf, n, config.max_segments,
                                                   self._max_projs)  # fmt: skip
        self._ctrl.header[:] = 0
        self._ctrl.rows[:] = 0
        self._res.ctrl = self._ctrl
        self._data_gen = 0
        self._data: np.ndarray | None = None
        self._grow(aligned_words(config.max_tokens, config.max_in, [config.max_out]))
        self._adapters: dict[str, _Adapter] = {}
        self._next_aid = 1
        self._seq = 0
        self._inflight: CpuLoraTicket | None = None
        self._closed = False
        self._stats: dict[str, float] = dict.fromkeys(
            ("calls", "tokens", "worker_wakeups", "errors", "timeouts", "restarts"), 0
        )
        self._stats.update(dict.fromkeys(
            ("cpu_seconds", "copy_in_seconds", "wait_seconds", "copy_out_seconds"), 0.0
        ))  # fmt: skip
        self._proj_calls = dict.fromkeys(L.PROJECTIONS, 0)
        self._proj_tokens = dict.fromkeys(L.PROJECTIONS, 0)
        for w in range(n):
            self._start(w)

    # ------------------------------------------------------------------ lifecycle

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until every worker has started (and worker 0 has measured its speed)."""
        with self._lock:
            self._await_ready(range(self.config.num_workers), timeout)

    def worker_pids(self) -> list[int]:
        return [p.pid for p in self._res.procs if p is not None and p.pid is not None]

    def segment_names(self) -> list[str]:
        """Every shared-memory segment the pool currently owns."""
        return list(self._res.segments)

    def close(self) -> None:
        """Stop the workers and unlink every segment (idempotent; also run at exit)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._inflight = None
            self._data = None
            self._adapters.clear()
            self._ctrl = None
            self._finalizer()  # releases self._res (stop flag, join/kill, close + unlink)

    def __enter__(self) -> CpuLoraPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ adapters

    def put_adapter(self, key: str, modules: Mapping[tuple[int, str], Any]) -> None:
        """Copy an adapter into shared memory once: ``modules[(layer, proj)] = (a [in, r],
        b [r, out])`` (or objects with ``.a``/``.b``), B already scaled. A key already present
        is kept as is (keys are content hashes)."""
        with self._lock:
            self._live_ctrl()
            if key in self._adapters:
                return
            aid = self._next_aid
            shm, shapes = L.pack_adapter(f"{self.tag}_a{aid}", modules)
            self._next_aid += 1
            self._res.segments[shm.name] = shm
            self._adapters[key] = _Adapter(aid, shm, shapes)

    def drop_adapter(self, key: str) -> None:
        """Unlink an adapter's segment; workers unmap it at their next poll."""
        with self._lock:
            entry = self._adapters.get(key)
            if entry is None:
                return
            self._finish_inflight()  # no worker may be reading it
            del self._adapters[key]
            shm = self._res.segments.pop(entry.shm.name)
            shm.close()
            shm.unlink()
            if self._ctrl is not None:
                self._ctrl.header[L.H_ADAPTER_EPOCH] += 1

    def has_adapter(self, key: str) -> bool:
        return key in self._adapters

    def adapter_keys(self) -> list[str]:
        return list(self._adapters)

    # ------------------------------------------------------------------ calls

    def submit(
        self,
        segments: Sequence[tuple[int, int, str]],
        layer: int,
        projs: Sequence[str],
        x: np.ndarray,
    ) -> CpuLoraTicket:
        """Start the deltas x[start:end] @ A @ B of each segment's adapter for ``projs`` (which
        share the input x [T, in]) at ``layer``; returns at once. Rows outside every segment get
        zeros. A previous call still in flight is collected first."""
        with self._lock:
            ctrl = self._live_ctrl()
            self._finish_inflight()
            self._ensure_workers()
            t0 = time.perf_counter()
            x = np.asarray(x)
            if x.ndim != 2:
                raise ValueError(f"x must be [T, in], got shape {x.shape}")
            n_tok, din = x.shape
            segs = self._check_segments(segments, n_tok)
            outs: list[tuple[str, int, int]] = []  # (projection, offset, width)
            seg_cost = np.zeros(len(segs), np.float64)
            widths = []
            for p in projs:
                pid = L.PROJ_ID.get(p)
                if pid is None:
                    raise ValueError(f"unknown projection {p!r}; expected one of {L.PROJECTIONS}")
                width = None
                for i, (_, _, a) in enumerate(segs):
                    shape = a.shapes.get((layer, pid))
                    if shape is None:
                        continue
                    if shape[0] != din or (width is not None and shape[2] != width):
                        raise ValueError(f"layer {layer} {p}: adapters' shapes {shape} do not "
                                         f"fit x [.., {din}] / each other")  # fmt: skip
                    width = shape[2]
                    seg_cost[i] += 2.0 * shape[1] * (shape[0] + shape[2])
                if width is not None:
                    widths.append((p, pid, width))
            self._stats["calls"] += 1
            self._stats["tokens"] += n_tok
            for p, _, _ in widths:
                self._proj_calls[p] += 1
                self._proj_tokens[p] += n_tok
            timing = CallTiming(tokens=n_tok)
            self._seq += 1
            if not widths or n_tok == 0:  # nothing targeted here: no worker wakes
                return CpuLoraTicket(self, self._seq, [], [], n_tok, timing)
            words = aligned_words(n_tok, din, [w for _, _, w in widths])
            if self._data is None or words > self._data.size:
                self._grow(max(words, 2 * (self._data.size if self._data is not None else 0)))
            assert self._data is not None
            off = L.aligned(n_tok * din)
            for p, _, width in widths:
                outs.append((p, off, width))
                off += L.aligned(n_tok * width)
            self._data[: n_tok * din].reshape(n_tok, din)[:] = x  # converts bf16/fp16/fp64
            ranges = self._split(segs, seg_cost, n_tok)
            job = ctrl.job
            job[L.J_LAYER], job[L.J_TOKENS], job[L.J_DIN] = layer, n_tok, din
            job[L.J_NSEG], job[L.J_NPROJ] = len(segs), len(outs)
            for i, (s, e, a) in enumerate(segs):
                ctrl.segs[i] = (s, e, a.aid)
            for j, ((_, pid, _), (_, o, width)) in enumerate(zip(widths, outs, strict=True)):
                ctrl.projs[j] = (pid, o, width)
            used = []
            for w, (lo, hi) in enumerate(ranges):
                row = ctrl.rows[w]
                row[L.W_T0], row[L.W_T1], row[L.W_STATUS] = lo, hi, 0
                used.append(w)
            for w in used:
                ctrl.rows[w, L.W_JOB] = self._seq  # the signal: written after everything else
            self._stats["worker_wakeups"] += len(used)
            timing.workers = len(used)
            timing.copy_in_s = time.perf_counter() - t0
            ticket = CpuLoraTicket(self, self._seq, used, outs, n_tok, timing)
            self._inflight = ticket
            return ticket

    def compute(
        self,
        segments: Sequence[tuple[int, int, str]],
        layer: int,
        projs: Sequence[str],
        x: np.ndarray,
        timeout: float | None = None,
    ) -> dict[str, np.ndarray]:
        """``submit(...).result(timeout)``: {projection: delta [T, out]}."""
        return self.submit(segments, layer, projs, x).result(timeout)

    def ping(self, workers: int | None = None, timeout: float | None = None) -> float:
        """A zero-work round trip through ``workers`` workers (default all); seconds taken."""
        t0 = time.perf_counter()
        with self._lock:
            ctrl = self._live_ctrl()
            self._finish_inflight()
            n = self.config.num_workers if workers is None else workers
            self._ensure_workers()
            ctrl.job[L.J_TOKENS] = ctrl.job[L.J_NSEG] = ctrl.job[L.J_NPROJ] = 0
            self._seq += 1
            for w in range(n):
                ctrl.rows[w, L.W_T0] = ctrl.rows[w, L.W_T1] = 0
            for w in range(n):
                ctrl.rows[w, L.W_JOB] = self._seq
            ticket = CpuLoraTicket(self, self._seq, list(range(n)), [], 0, CallTiming())
            self._inflight = ticket
        ticket.result(timeout)
        return time.perf_counter() - t0

    def _check_segments(
        self, segments: Sequence[tuple[int, int, str]], n_tok: int
    ) -> list[tuple[int, int, _Adapter]]:
        if len(segments) > self.config.max_segments:
            raise ValueError(
                f"{len(segments)} segments; the pool takes at most "
                f"{self.config.max_segments} (CpuLoraConfig.max_segments)"
            )
        out, end = [], 0
        for s, e, key in sorted(segments, key=lambda t: (t[0], t[1])):
            if not (end <= s <= e <= n_tok):
                raise ValueError(f"segments {list(segments)} overlap or leave [0, {n_tok})")
            a = self._adapters.get(key)
            if a is None:
                raise KeyError(f"adapter {key!r} is not in the CPU pool (put_adapter first)")
            out.append((int(s), int(e), a))
            end = e
        return out

    def _rate(self) -> float:
        if self.config.flops_per_s:
            return self.config.flops_per_s
        ctrl = self._ctrl
        measured = int(ctrl.rows[0, L.W_FLOPS]) if ctrl is not None else 0
        return float(measured) if measured > 0 else 2e10

    def _split(self, segs, seg_cost: np.ndarray, n_tok: int) -> list[tuple[int, int]]:
        """Token ranges, one per worker to wake, balanced by estimated cost."""
        cfg = self.config
        per_tok = np.zeros(n_tok, np.float64)
        for (s, e, _), c in zip(segs, seg_cost, strict=True):
            per_tok[s:e] = c
        if cfg.tokens_per_worker:
            k = math.ceil(n_tok / cfg.tokens_per_worker)
        else:
            est = per_tok.sum() / self._rate() + _KERNEL_CALL_S * len(segs)
            k = math.ceil(est / cfg.budget_s)
        k = max(1, min(k, cfg.num_workers, n_tok))
        return split_by_cost(per_tok, k)

    def _finish_inflight(self) -> None:
        """Collect the call in flight (its results are copied into its ticket)."""
        t = self._inflight
        if t is not None and not t._collected:
            self._collect(t, self.config.timeout_s)
            if t._error is None and t._result is None:
                t._result = self._read_results(t, copy=True)
        self._inflight = None

    def _read_results(self, t: CpuLoraTicket, copy: bool) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        data = self._data
        assert data is not None
        out = {}
        for p, off, width in t.outs:
            v = data[off : off + t.tokens * width].reshape(t.tokens, width)
            out[p] = v.copy() if copy else v
        t.timing.copy_out_s = time.perf_counter() - t0
        self._stats["copy_out_seconds"] += t.timing.copy_out_s
        return out

    # ------------------------------------------------------------------ observability

    def stats(self) -> dict[str, float]:
        """Counters for metrics: calls, tokens, worker wake-ups, CPU seconds (summed worker
        compute), copy/wait seconds, errors/timeouts/restarts, adapters held and their bytes,
        and per projection the calls and tokens (``calls_q_proj``, ``tokens_q_proj``, ...)."""
        with self._lock:
            out = dict(self._stats)
            out["workers"] = self.config.num_workers
            out["adapters"] = len(self._adapters)
            out["adapter_bytes"] = sum(a.nbytes for a in self._adapters.values())
            out["flops_per_s"] = self._rate()
            for p in L.PROJECTIONS:
                out[f"calls_{p}"] = self._proj_calls[p]
                out[f"tokens_{p}"] = self._proj_tokens[p]
            return out

    def debug_hang(self, worker: int, ms: int) -> None:
        """Test hook: ``worker`` sleeps ``ms`` milliseconds before computing its next job."""
        self._live_ctrl().rows[worker, L.W_HANG_MS] = int(ms)
