"""CPU-assisted prefill: LoRA deltas of cold adapters computed by CPU workers inside the jitted step.

A request whose adapter is still being copied to the device starts its prefill at once, chunk by
chunk like any prompt. The base model runs on the device for every token; for each (layer,
projection group) the LoRA delta of a cold chunk row comes from
- the device pool, when that layer's group of the adapter has arrived by dispatch time, or
- the CPU workers (``cpu_lora``), otherwise.

Mechanism: one ``io_callback`` per (layer, projection group) that a cold row needs, after the
group's base GEMMs: the cold rows' inputs go out to the workers, their deltas come back and are
added. A ``lax.cond`` on the step's ``need[layer, group]`` skips the round trip where no cold row
needs the CPU (layers already on the device, projections the adapter does not target), so a
q/v adapter costs one exchange per cold layer, and a q/k/v/o adapter two. On an accelerator every
callback synchronises the device, so there are no more of them than the data needs (why the
device does not overlap the CPU's work: docs/cpu_assist.md).

The host side of a prefill is a ``PrefillPlan`` registered under an integer id that the step
receives as an argument (the compiled callbacks look it up). Callbacks never raise: a worker
failure marks the plan failed and the engine re-runs those requests with a synchronous load.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
from functools import partial
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from cara_jax.adapters.multi_lora import RaggedLoraHook
from cara_jax.lora_hooks import group_index

log = logging.getLogger(__name__)


class CpuTicket(Protocol):
    def result(self, timeout: float | None = None) -> dict[str, np.ndarray]: ...


class CpuDeltaSource(Protocol):
    """What the CPU worker pool offers (see cpu_lora.workers)."""

    def submit(
        self,
        segments: list[tuple[int, int, str]],
        layer: int,
        projs: tuple[str, ...],
        x: np.ndarray,
    ) -> CpuTicket: ...


@dataclasses.dataclass(frozen=True)
class CpuRow:
    """One cold request of a prefill batch: its row, adapter key, prompt length, CPU layers."""

    row: int
    key: str
    length: int
    cpu_layers: frozenset[int]


@dataclasses.dataclass
class GroupTiming:
    """One host exchange of a CPU-assisted prefill: a (layer, projection group)'s cold rows."""

    layer: int
    projs: tuple[str, ...]
    tokens: int
    copy_out_s: float  # device->host rows gathered and handed to the workers
    wait_s: float  # fetch blocked for the workers (CPU time beyond the overlap)
    copy_back_s: float  # deltas scattered into the step's buffer
    span_s: float  # the whole exchange, as the device saw it


class PrefillPlan:
    """Host-side state of one CPU-assisted prefill dispatch."""

    _ids = itertools.count(1)

    def __init__(self, rows: list[CpuRow], source: CpuDeltaSource, timeout_s: float) -> None:
        self.id = next(self._ids)
        self.rows = rows
        self.source = source
        self.timeout_s = timeout_s
        self.failed: str | None = None
        self.timings: list[GroupTiming] = []
        self._tickets: dict[int, tuple[CpuTicket, list[CpuRow], float, float]] = {}
        self._next = itertools.count(1)
        self.layers_cpu = sum(len(r.cpu_layers) for r in rows)

    def cpu_rows(self, layer: int) -> list[CpuRow]:
        return [r for r in self.rows if layer in r.cpu_layers]


_PLANS: dict[int, PrefillPlan] = {}
_PLANS_LOCK = threading.Lock()


def register(plan: PrefillPlan) -> int:
    with _PLANS_LOCK:
        _PLANS[plan.id] = plan
    return plan.id


def unregister(plan: PrefillPlan) -> None:
    with _PLANS_LOCK:
        _PLANS.pop(plan.id, None)


def _exchange(
    projs: tuple[str, ...],
    sizes: tuple[int, ...],
    layer: np.ndarray,
    x: np.ndarray,
    plan_id: np.ndarray,
) -> np.ndarray:
    """One host round trip of a (layer, projection group): the cold rows' inputs out to the
    workers, their deltas back, as [P, Q, sum(sizes)] (zeros where the CPU serves nothing).
    The layer arrives as data: one compiled callback serves every layer of the scan."""
    t0 = time.perf_counter()
    # callbacks receive jax arrays: index them as numpy (a zero-copy view on the host), since
    # every jax-side slice would dispatch an op
    x = np.asarray(x)
    layer = int(np.asarray(layer))
    out = np.zeros((*x.shape[:2], sum(sizes)), np.float32)
    plan = _PLANS.get(int(np.asarray(plan_id)))
    if plan is None or plan.failed:
        return out
    rows = plan.cpu_rows(layer)
    if not rows:
        return out
    segments, start = [], 0
    for r in rows:
        segments.append((start, start + r.length, r.key))
        start += r.length
    xs = np.concatenate([x[r.row, : r.length] for r in rows]).astype(np.float32, copy=False)
    try:
        ticket = plan.source.submit(segments, layer, projs, xs)
        t1 = time.perf_counter()
        res = ticket.result(plan.timeout_s)
    except Exception as e:  # worker died or hung: flag it, never raise inside the step
        plan.failed = f"{type(e).__name__}: {e}"
        log.warning("CPU-assisted prefill failed at layer %d (%s); falling back", layer, e)
        return out
    t2 = time.perf_counter()
    off = 0
    for p, size in zip(projs, sizes, strict=True):
        d = res.get(p)
        if d is not None:
            start = 0
            for r in rows:
                out[r.row, : r.length, off : off + size] = d[start : start + r.length]
                start += r.length
        off += size
    t3 = time.perf_counter()
    plan.timings.append(
        GroupTiming(layer, projs, sum(r.length for r in rows), t1 - t0, t2 - t1, t3 - t2, t3 - t0)
    )
    return out


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class CpuAssistHook:
    """LoraHook of a step with CPU-assisted prefill chunks: device deltas per layer plus the
    CPU's deltas for cold chunk rows.

    ``dev_idx`` gives, per layer, the pool rows the device path uses for each chunk row (zeros
    for a cold row at a layer that has not arrived: its delta comes from the CPU instead).
    Decode rows always use the device pool.
    """

    inner: RaggedLoraHook
    # proj -> [layers, P, r_max] pool rows of each chunk row at each layer (row 0, zeros, for
    # a cold row whose layer has not arrived: the CPU serves it)
    dev_idx: dict[str, jax.Array]
    plan_id: jax.Array  # () int32
    need: jax.Array  # [layers, projection groups] bool: some cold row needs the CPU there
    out_sizes: tuple[tuple[str, int], ...] = dataclasses.field(metadata=dict(static=True))

    def output(self, layer: int, proj: str, x: jax.Array, y: jax.Array) -> jax.Array:
        inner = self.inner
        if proj not in inner.a:
            return y
        return inner.run_output(layer, proj, x, y, self.dev_idx[proj][layer])

    def embed(self, tokens: jax.Array, h: jax.Array) -> jax.Array:
        return self.inner.embed(tokens, h)

    def head(self, x: jax.Array, tok: jax.Array, logits: jax.Array) -> jax.Array:
        return self.inner.head(x, tok, logits)

    def after(
        self, layer: int, projs: tuple[str, ...], x: jax.Array, ys: list[jax.Array]
    ) -> list[jax.Array]:
        sizes_of = dict(self.out_sizes)
        sizes = tuple(sizes_of[p] for p in projs)
        meta = self.inner.meta
        xc = meta.ch_gather(x)  # [P, Q, in]: the rows the workers may serve
        shape = jax.ShapeDtypeStruct((*xc.shape[:2], sum(sizes)), jnp.float32)

        def exchange(xc):
            return io_callback(partial(_exchange, projs, sizes), shape, jnp.asarray(layer),
                               xc, self.plan_id)  # fmt: skip

        # no round trip where no cold row needs the CPU at this (layer, group): layers that
        # have arrived, projections the cold adapters do not target
        cpu = jax.lax.cond(self.need[layer, group_index(projs)], exchange,
                           lambda xc: jnp.zeros(shape.shape, shape.dtype), xc)  # fmt: skip
        s = int(meta.dec_tok.shape[0])
        flat = meta.scatter(jnp.zeros((s, sum(sizes)), jnp.float32), cpu)  # [T, sum(out)]
        out, off = [], 0
        for y, size in zip(ys, sizes, strict=True):
            out.append(y + flat[:, off : off + size].astype(y.dtype))
            off += size
        return out
