"""The pieces of a CPU LoRA call around the pool (workers.py): its configuration, errors, the
ticket of a call in flight and where its time went, and the helpers that size and split it."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
import types
from collections.abc import Sequence
from typing import Any

import numpy as np

from cara_jax.config import GROUPS
from cpu_lora import shm as L

_BLAS_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS",
             "VECLIB_MAXIMUM_THREADS")  # fmt: skip


class CpuWorkerError(RuntimeError):
    """A CPU worker died, failed or did not answer in time; the pool has restarted it."""


class CpuWorkerTimeout(CpuWorkerError):
    """A CPU worker did not finish its part of a call within the timeout."""


@dataclasses.dataclass
class CpuLoraConfig:
    """Sizes and policies of a ``CpuLoraPool``."""

    num_workers: int = 2
    # Initial buffer sizes (the data segment grows when a job does not fit).
    max_tokens: int = 512
    max_in: int = 4096
    max_out: int = 3 * 4096  # widest projection group's summed outputs (e.g. q,k,v)
    max_segments: int = 256  # token segments (cold requests) in one call
    # Token split: wake ceil(estimated CPU seconds / budget_s) workers, at most num_workers.
    budget_s: float = 2e-4
    tokens_per_worker: int | None = None  # a fixed split instead (e.g. for tests)
    flops_per_s: float | None = None  # one core's throughput; None: worker 0 measures it
    # Spin policy.
    spin_s: float = 2e-3  # a worker spins this long after a job, then sleeps between polls
    sleep_s: float = 1e-4
    idle_s: float = 1.0  # after this long without a job a worker polls every idle_sleep_s
    idle_sleep_s: float = 1e-3
    wait_spin_s: float = 2e-4  # the coordinator spins this long before sleeping between polls
    wait_sleep_s: float = 2e-5
    timeout_s: float = 30.0  # default for compute()/result()
    start_timeout_s: float = 60.0  # a call first waits this long for (re)started workers
    kernel: str = "auto"  # "auto" (kernels.default_kernel), "numpy" or "numba"
    # Start workers with a stand-in __main__, so spawn does not re-import the server's main
    # script (and with it JAX) in every worker.
    isolate_main: bool = True

    @classmethod
    def for_model(cls, cfg: Any, **kw: Any) -> CpuLoraConfig:
        """Buffers sized for a model config with ``projection_shapes()`` (cara_jax.config)."""
        s = cfg.projection_shapes()
        kw.setdefault("max_in", max(i for i, _ in s.values()))
        kw.setdefault("max_out", max(sum(s[p][1] for p in g) for g in GROUPS))
        return cls(**kw)


@dataclasses.dataclass
class _Adapter:
    aid: int
    shm: L.Segment
    shapes: dict[tuple[int, int], tuple[int, int, int]]  # (layer, proj id) -> (in, r, out)

    @property
    def nbytes(self) -> int:
        return self.shm.size


@dataclasses.dataclass
class _Resources:
    """What the finalizer must release; holds no reference to the pool itself."""

    segments: dict[str, L.Segment]
    procs: list[Any]
    ctrl: L.CtrlView | None = None

    def release(self) -> None:
        if self.ctrl is not None:
            self.ctrl.header[L.H_STOP] = 1
        deadline = time.monotonic() + 1.0
        for p in self.procs:
            if p is not None:
                p.join(max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p is not None and p.is_alive():
                p.kill()
                p.join(5)
        self.ctrl = None
        for shm in self.segments.values():
            shm.close()
            with contextlib.suppress(FileNotFoundError):
                shm.unlink()
        self.segments.clear()


@dataclasses.dataclass
class CallTiming:
    """Where one call's time went (seconds)."""

    tokens: int = 0
    workers: int = 0
    copy_in_s: float = 0.0  # x and the job description into shared memory, signals
    wait_s: float = 0.0  # signal -> every chosen worker done
    compute_s: float = 0.0  # the slowest worker's compute time
    cpu_s: float = 0.0  # summed worker compute time
    copy_out_s: float = 0.0  # results out of shared memory


class CpuLoraTicket:
    """An in-flight call; ``result()`` waits for it (or raises ``CpuWorkerError``)."""

    def __init__(
        self,
        pool: Any,  # the CpuLoraPool that posted the call (workers.py)
        seq: int,
        workers: list[int],
        outs: list[tuple[str, int, int]],
        tokens: int,
        timing: CallTiming,
    ) -> None:
        self._pool = pool
        self.seq = seq
        self.workers = workers
        self.outs = outs  # (projection, result offset, width)
        self.tokens = tokens
        self.timing = timing
        self._t_post = time.perf_counter()
        self._collected = not workers
        self._result: dict[str, np.ndarray] | None = {} if not workers else None
        self._error: CpuWorkerError | None = None

    def done(self) -> bool:
        """True once every chosen worker has finished (never blocks)."""
        if self._collected:
            return True
        ctrl = self._pool._ctrl
        return ctrl is not None and all(ctrl.rows[w, L.W_DONE] == self.seq for w in self.workers)

    def result(self, timeout: float | None = None, copy: bool = True) -> dict[str, np.ndarray]:
        """{projection: delta [T, out] float32} for the projections any segment's adapter
        targets at this layer (absent ones are zero). ``timeout`` None: the pool's default.
        ``copy=False`` returns views of the shared buffer, valid until the next submit."""
        pool = self._pool
        with pool._lock:
            if not self._collected:
                pool._collect(self, pool.config.timeout_s if timeout is None else timeout)
            if self._error is not None:
                raise self._error
            if self._result is None:
                self._result = pool._read_results(self, copy)
                if copy:
                    return self._result
                res, self._result = self._result, None
                return res
            return self._result


def aligned_words(tokens: int, din: int, widths: Sequence[int]) -> int:
    """float32 words of the data segment for x [T, in] and one [T, w] block per width."""
    return L.aligned(tokens * din) + sum(L.aligned(tokens * w) for w in widths)


def split_by_cost(per_token_cost: np.ndarray, k: int) -> list[tuple[int, int]]:
    """Cut tokens into ``k`` contiguous non-empty ranges of about equal summed cost."""
    n = len(per_token_cost)
    k = max(1, min(k, n))
    if k == 1:
        return [(0, n)]
    cum = np.cumsum(per_token_cost)
    total = cum[-1]
    if total <= 0:
        cuts = [round(n * i / k) for i in range(1, k)]
    else:
        cuts = np.searchsorted(cum, total * np.arange(1, k) / k, side="left").tolist()
        cuts = [c + 1 for c in cuts]
    bounds = [0]
    for i, c in enumerate(cuts):  # non-empty and increasing, leaving room for the rest
        bounds.append(min(max(c, bounds[-1] + 1), n - (k - 1 - i)))
    bounds.append(n)
    return list(zip(bounds[:-1], bounds[1:], strict=True))


@contextlib.contextmanager
def _spawn_env(isolate_main: bool):
    """One BLAS/Numba thread in the child (set before its numpy import), and optionally a
    stand-in __main__ so spawn does not re-run the parent's main script in the child."""
    old = {k: os.environ.get(k) for k in _BLAS_ENV}
    main = sys.modules.get("__main__")
    os.environ.update(dict.fromkeys(_BLAS_ENV, "1"))
    if isolate_main:
        sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if isolate_main and main is not None:
            sys.modules["__main__"] = main
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
