"""The worker side of the CPU LoRA pool: one spawned process per core.

A worker attaches to the pool's control segment, waits on its job word (spin, then short
sleeps), computes its token range of every projection of the job into the data segment, and
writes its done word. The coordinator side, and the protocol, are in ``cpu_lora.workers``.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time

import numpy as np

from cpu_lora import shm as L
from cpu_lora.kernels import KERNELS, default_kernel, lora_numpy


@dataclasses.dataclass(frozen=True)
class WorkerArgs:
    index: int
    parent_pid: int
    tag: str
    ctrl_name: str
    num_workers: int
    max_segments: int
    max_projs: int
    spin_s: float
    sleep_s: float
    idle_s: float
    idle_sleep_s: float
    kernel: str
    calibrate: tuple[int, int, int, int] | None  # (T, in, r, out) to measure, or None


def _calibrate(shape: tuple[int, int, int, int]) -> int:
    """FLOP/s of this core for the LoRA kernel at ``shape`` (median of a few runs)."""
    t, din, r, dout = shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal((t, din), np.float32)
    a = rng.standard_normal((din, r), np.float32)
    b = rng.standard_normal((r, dout), np.float32)
    out = np.empty((t, dout), np.float32)
    lora_numpy(x, a, b, out)
    runs = []
    for _ in range(7):
        t0 = time.perf_counter()
        lora_numpy(x, a, b, out)
        runs.append(time.perf_counter() - t0)
    return int(2 * t * r * (din + dout) / max(sorted(runs)[len(runs) // 2], 1e-9))


class _WorkerState:
    """A worker's attachments: the data segment generation and the adapters used so far."""

    def __init__(self, args: WorkerArgs, ctrl: L.CtrlView) -> None:
        self.args, self.ctrl = args, ctrl
        self.data_gen = 0
        self.data_shm: L.Segment | None = None
        self.data: np.ndarray | None = None
        self.epoch = int(ctrl.header[L.H_ADAPTER_EPOCH])
        self.adapters: dict[int, tuple[L.Segment, dict]] = {}

    def data_view(self) -> np.ndarray:
        gen = int(self.ctrl.header[L.H_DATA_GEN])
        if gen != self.data_gen or self.data is None:
            self.data = None
            if self.data_shm is not None:
                self.data_shm.close()
            self.data_shm = L.attach_segment(f"{self.args.tag}_d{gen}")
            words = int(self.ctrl.header[L.H_DATA_WORDS])
            self.data = np.ndarray((words,), np.float32, self.data_shm.buf)
            self.data_gen = gen
        return self.data

    def check_epoch(self) -> None:
        """Unmap every adapter after a drop (they are re-attached on use)."""
        epoch = int(self.ctrl.header[L.H_ADAPTER_EPOCH])
        if epoch != self.epoch:
            self.epoch = epoch
            for shm, _ in self.adapters.values():
                shm.close()
            self.adapters.clear()

    def adapter(self, aid: int) -> dict:
        a = self.adapters.get(aid)
        if a is None:
            shm = L.attach_segment(f"{self.args.tag}_a{aid}")
            a = self.adapters[aid] = (shm, L.read_adapter(shm))
        return a[1]


def _run_job(st: _WorkerState, row: np.ndarray, kernel: str) -> None:
    ctrl = st.ctrl
    job = ctrl.job
    n_tok, din, layer = int(job[L.J_TOKENS]), int(job[L.J_DIN]), int(job[L.J_LAYER])
    nseg, nproj = int(job[L.J_NSEG]), int(job[L.J_NPROJ])
    t0, t1 = int(row[L.W_T0]), int(row[L.W_T1])
    if n_tok == 0 or t0 >= t1:
        return
    data = st.data_view()
    st.check_epoch()
    x = data[: n_tok * din].reshape(n_tok, din)
    segs = ctrl.segs[:nseg].tolist()
    fixed = None if kernel == "auto" else KERNELS[kernel]
    for pid, off, width in ctrl.projs[:nproj].tolist():
        y = data[off : off + n_tok * width].reshape(n_tok, width)
        pos = t0
        for s, e, aid in segs:
            lo, hi = max(s, t0), min(e, t1)
            if lo >= hi:
                continue
            if lo > pos:
                y[pos:lo] = 0.0
            ab = st.adapter(aid).get((layer, pid))
            if ab is None:
                y[lo:hi] = 0.0
            else:
                a, b = ab
                fn = fixed or default_kernel(hi - lo, din, a.shape[1], width)
                fn(x[lo:hi], a, b, y[lo:hi])
            pos = hi
        if pos < t1:
            y[pos:t1] = 0.0


def worker_main(args: WorkerArgs) -> None:
    """A worker's loop: wait for the job word, run the job, write the done word."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the coordinator's to handle
    ctrl_shm = L.attach_segment(args.ctrl_name)
    ctrl = L.CtrlView(ctrl_shm.buf, args.num_workers, args.max_segments, args.max_projs)
    row = ctrl.rows[args.index]
    header = ctrl.header
    row[L.W_PID] = os.getpid()
    if args.calibrate is not None:
        row[L.W_FLOPS] = _calibrate(args.calibrate)
    if args.kernel == "numba":
        KERNELS["numba"](*(np.zeros(s, np.float32) for s in ((1, 2), (2, 1), (1, 2), (1, 2))))
    st = _WorkerState(args, ctrl)
    seen = int(row[L.W_DONE])
    row[L.W_READY] = 1
    last = time.perf_counter()
    perf, sleep, yield_cpu = time.perf_counter, time.sleep, os.sched_yield
    while True:
        job = int(row[L.W_JOB])
        if job == seen:
            idle = perf() - last
            if idle < args.spin_s:
                yield_cpu()  # spin, but let a runnable coordinator have this core
                continue
            if header[L.H_STOP] or os.getppid() != args.parent_pid:
                return
            st.check_epoch()
            sleep(args.sleep_s if idle < args.idle_s else args.idle_sleep_s)
            continue
        seen = job
        hang = int(row[L.W_HANG_MS])
        if hang:
            row[L.W_HANG_MS] = 0
            sleep(hang / 1000)
        t_start = time.perf_counter_ns()
        status = 0
        try:
            _run_job(st, row, args.kernel)
        except Exception as e:  # reported through the status word; the coordinator raises
            status = 1
            ctrl.set_message(args.index, f"{type(e).__name__}: {e}")
        row[L.W_COMPUTE_NS] = time.perf_counter_ns() - t_start
        row[L.W_STATUS] = status
        row[L.W_DONE] = job  # last: the coordinator reads the results after seeing this
        last = perf()
