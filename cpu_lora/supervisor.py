"""The CPU LoRA pool's worker processes and shared-memory segments: create and grow segments,
start and restart workers, wait for them to attach, and wait for a call's workers to finish
(restarting any that died or did not answer). ``WorkerSupervisor`` is the base class of
``CpuLoraPool`` (``cpu_lora.workers``, where the protocol is described); it holds no state of its
own: every attribute it reads is set by ``CpuLoraPool.__init__``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from cpu_lora import shm as L
from cpu_lora.calls import (
    CpuLoraConfig,
    CpuLoraTicket,
    CpuWorkerError,
    CpuWorkerTimeout,
    _Resources,
    _spawn_env,
)
from cpu_lora.worker_process import WorkerArgs, worker_main

log = logging.getLogger("cpu_lora.workers")  # the pool's logger, whichever module logs


class WorkerSupervisor:
    """Processes and segments of a ``CpuLoraPool`` (its base class; see cpu_lora.workers)."""

    # set by CpuLoraPool.__init__
    config: CpuLoraConfig
    tag: str
    _max_projs: int
    _ctx: Any  # the multiprocessing spawn context
    _res: _Resources
    _ctrl: L.CtrlView | None
    _data_gen: int
    _data: np.ndarray | None
    _inflight: CpuLoraTicket | None
    _closed: bool
    _stats: dict[str, float]

    # ------------------------------------------------------------------ lifecycle

    def _create(self, kind: str, nbytes: int) -> L.Segment:
        shm = L.create_segment(f"{self.tag}_{kind}", nbytes)
        self._res.segments[shm.name] = shm
        return shm

    def _grow(self, words: int) -> None:
        """Replace the data segment by a larger generation (no job may be in flight)."""
        old = f"{self.tag}_d{self._data_gen}" if self._data is not None else None
        self._data = None
        if old is not None:
            shm = self._res.segments.pop(old)
            shm.close()
            shm.unlink()
        self._data_gen += 1
        shm = self._create(f"d{self._data_gen}", words * 4)
        self._data = np.ndarray((words,), np.float32, shm.buf)
        assert self._ctrl is not None
        self._ctrl.header[L.H_DATA_WORDS] = words
        self._ctrl.header[L.H_DATA_GEN] = self._data_gen

    def _start(self, w: int) -> None:
        """Start worker ``w`` (first start or restart); it attaches to the pool's segments."""
        cfg, ctrl = self.config, self._ctrl
        assert ctrl is not None
        row = ctrl.rows[w]
        row[L.W_DONE] = row[L.W_JOB]  # idle: the new process waits for the next job word
        row[L.W_STATUS] = row[L.W_HANG_MS] = row[L.W_PID] = row[L.W_READY] = 0
        calibrate = None
        if w == 0 and cfg.flops_per_s is None and not row[L.W_FLOPS]:  # measured once
            calibrate = (64, cfg.max_in, 16, min(cfg.max_out, 4096))
        args = WorkerArgs(
            w, os.getpid(), self.tag, f"{self.tag}_ctrl", cfg.num_workers, cfg.max_segments,
            self._max_projs, cfg.spin_s, cfg.sleep_s, cfg.idle_s, cfg.idle_sleep_s, cfg.kernel,
            calibrate,
        )  # fmt: skip
        p = self._ctx.Process(target=worker_main, args=(args,), name=f"cpu-lora-{w}", daemon=True)
        with _spawn_env(cfg.isolate_main):
            p.start()
        self._res.procs[w] = p

    def _restart(self, w: int, why: str) -> None:
        p = self._res.procs[w]
        old_pid = p.pid if p is not None else None
        if p is not None:
            if p.is_alive():
                p.kill()
            p.join(5)
            p.close()
            self._res.procs[w] = None
        self._stats["restarts"] += 1
        self._start(w)
        new = self._res.procs[w]
        log.warning("CPU LoRA worker %d (pid %s) %s; restarting it (new pid %s)", w, old_pid,
                    why, new.pid if new is not None else None)  # fmt: skip

    def _ensure_workers(self) -> None:
        """Replace workers that died between calls and wait until every worker is attached,
        so that neither counts against a call's timeout or its copy-in time."""
        for w, p in enumerate(self._res.procs):
            if p is None or not p.is_alive():
                self._restart(w, f"was found dead (exit code {p.exitcode if p else None})")
        self._await_ready(range(self.config.num_workers), self.config.start_timeout_s)

    def _await_ready(self, workers: Sequence[int] | range, timeout: float) -> None:
        """Wait for (re)started workers to attach, so that process start-up never counts
        against a call's timeout."""
        ctrl = self._live_ctrl()
        deadline = time.monotonic() + timeout
        while True:
            waiting = [w for w in workers if not ctrl.rows[w, L.W_READY]]
            if not waiting:
                return
            for w in waiting:
                p = self._res.procs[w]
                if p is not None and not p.is_alive():
                    code = p.exitcode
                    self._restart(w, f"exited during start-up (exit code {code})")
                    raise CpuWorkerError(f"CPU LoRA worker {w} exited during start-up "
                                         f"(exit code {code})")  # fmt: skip
            if time.monotonic() > deadline:
                raise CpuWorkerTimeout(f"CPU LoRA workers {waiting} not ready after {timeout} s")
            time.sleep(0.002)

    def _live_ctrl(self) -> L.CtrlView:
        if self._closed or self._ctrl is None:
            raise CpuWorkerError("the CPU LoRA pool is closed")
        return self._ctrl

    def _collect(self, t: CpuLoraTicket, timeout: float) -> None:
        """Wait for the ticket's workers; on death or timeout restart them and record an error."""
        ctrl = self._live_ctrl()
        cfg = self.config
        rows = ctrl.rows
        start = time.perf_counter()
        deadline = start + timeout
        spin_until = start + cfg.wait_spin_s
        pending = [w for w in t.workers if rows[w, L.W_DONE] != t.seq]
        polls = 0
        while pending:
            now = time.perf_counter()
            if now < spin_until:
                os.sched_yield()  # spin, but let a runnable worker have this core
                pending = [w for w in pending if rows[w, L.W_DONE] != t.seq]
                continue
            time.sleep(cfg.wait_sleep_s)
            pending = [w for w in pending if rows[w, L.W_DONE] != t.seq]
            polls += 1
            if not pending:
                break
            dead = [w for w in pending if not self._res.procs[w].is_alive()] if polls % 8 == 0 \
                else []  # fmt: skip
            if dead or now > deadline:
                self._fail(t, pending, dead, timeout)
                return
        t.timing.wait_s = time.perf_counter() - t._t_post
        t._collected = True
        if self._inflight is t:
            self._inflight = None
        ns = [int(rows[w, L.W_COMPUTE_NS]) for w in t.workers]
        t.timing.compute_s = max(ns, default=0) / 1e9
        t.timing.cpu_s = sum(ns) / 1e9
        self._stats["cpu_seconds"] += t.timing.cpu_s
        self._stats["copy_in_seconds"] += t.timing.copy_in_s
        self._stats["wait_seconds"] += t.timing.wait_s
        bad = [w for w in t.workers if rows[w, L.W_STATUS] != 0]
        if bad:
            self._stats["errors"] += 1
            msgs = "; ".join(f"worker {w}: {ctrl.message(w)}" for w in bad)
            t._error = CpuWorkerError(f"CPU LoRA job failed ({msgs})")

    def _fail(self, t: CpuLoraTicket, pending: list[int], dead: list[int], timeout: float) -> None:
        rows = self._live_ctrl().rows
        # Live workers still on the job get a short grace, so none of them writes into the
        # buffers while the next job is being set up; the rest are replaced.
        grace = time.perf_counter() + (0.5 if dead else 0.0)
        late = [w for w in pending if w not in dead]
        while late and time.perf_counter() < grace:
            time.sleep(1e-3)
            late = [w for w in late if rows[w, L.W_DONE] != t.seq]
        for w in dead:
            code = self._res.procs[w].exitcode
            self._restart(w, f"died during a call (exit code {code})")
        for w in late:
            self._restart(w, f"did not answer within {timeout:g} s")
        self._stats["errors"] += 1
        if dead:
            t._error = CpuWorkerError(f"CPU LoRA worker(s) {dead} died during the call; restarted")
        else:
            self._stats["timeouts"] += 1
            t._error = CpuWorkerTimeout(
                f"CPU LoRA worker(s) {late} did not answer within {timeout:g} s; restarted"
            )
        t._collected = True
        if self._inflight is t:
            self._inflight = None
