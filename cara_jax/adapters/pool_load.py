"""One adapter's load into the device pool: its ``LoadHandle`` (progress, group by group) and
the loader thread's copy that fills it. ``PoolLoader`` is mixed into ``DevicePool`` (see
device_pool.py for the pool, pool_write.py for the compiled write of a group).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

import jax
import numpy as np

from cara_jax.adapters.packed import PackedAdapter

log = logging.getLogger("cara_jax.adapters.device_pool")  # the pool's logger, whichever module logs


class LoadHandle:
    """Progress of one adapter's copy to the device, group by group."""

    def __init__(self, content_hash: str, groups: list[range], nbytes: int) -> None:
        self.content_hash = content_hash
        self.groups = groups
        self.nbytes = nbytes
        self.group_seconds: list[float | None] = [None] * len(groups)
        self._events = [threading.Event() for _ in groups]
        self._done = threading.Event()
        self.error: BaseException | None = None
        self.started = time.perf_counter()
        self.seconds: float | None = None

    def _group_done(self, g: int, seconds: float) -> None:
        self.group_seconds[g] = seconds
        self._events[g].set()

    def _finish(self, error: BaseException | None = None) -> None:
        self.error = error
        self.seconds = time.perf_counter() - self.started
        for e in self._events:
            e.set()
        self._done.set()

    @classmethod
    def resident(cls, content_hash: str, groups: list[range]) -> LoadHandle:
        h = cls(content_hash, groups, 0)
        h._finish()
        h.seconds = 0.0
        return h

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        ok = self._done.wait(timeout)
        if ok and self.error is not None:
            raise self.error
        return ok

    def group_ready(self, g: int) -> bool:
        return self._events[g].is_set() and self.error is None

    def layer_ready(self, layer: int) -> bool:
        return any(self.group_ready(g) for g, r in enumerate(self.groups) if layer in r)

    def ready_layers(self) -> list[int]:
        return [i for g, r in enumerate(self.groups) if self.group_ready(g) for i in r]


class MixHandle:
    """A mixture's progress: its members' loads, seen as one (a layer group is ready when it is
    for every member; the first member error is the mixture's)."""

    def __init__(self, content_hash: str, handles: list[LoadHandle], groups: list[range]) -> None:
        self.content_hash = content_hash
        self.handles = handles
        self.groups = groups
        self.nbytes = sum(h.nbytes for h in handles)
        self.started = min((h.started for h in handles), default=time.perf_counter())

    @property
    def error(self) -> BaseException | None:
        return next((h.error for h in self.handles if h.error is not None), None)

    def done(self) -> bool:
        return all(h.done() for h in self.handles)

    def wait(self, timeout: float | None = None) -> bool:
        end = None if timeout is None else time.perf_counter() + timeout
        for h in self.handles:
            left = None if end is None else max(0.0, end - time.perf_counter())
            if not h.wait(left):
                return False
        return True

    def group_ready(self, g: int) -> bool:
        return all(h.group_ready(g) for h in self.handles)

    def ready_layers(self) -> list[int]:
        return [i for g, r in enumerate(self.groups) if self.group_ready(g) for i in r]


@dataclasses.dataclass
class _Entry:
    adapter: PackedAdapter  # a mixture's: its summed ranks and no payload
    slot: int
    rows: dict[str, np.ndarray]  # proj -> pool rows (len = rank on that projection)
    handle: LoadHandle | MixHandle
    refcount: int = 0
    pinned: bool = False
    members: tuple[str, ...] = ()  # a mixture: the content it holds (one reference each)


class PoolLoader:
    """The loader thread's copy of an adapter, one layer group at a time (needs the pool's
    ``projections``, ``groups``, ``group_gate``, ``link_gbps``, ``lock``, ``stats``,
    ``_load_events``, ``_entries``, ``_drop``, ``_writer``, ``_write_vocab`` and ``layout``)."""

    def _load(self, e: _Entry) -> None:
        packed = e.adapter
        widths = packed.widths
        idx = {}  # the pool rows per projection, padded with row 0 to its write width
        for p, w in widths.items():
            idx[p] = np.zeros(w, np.int32)
            idx[p][: len(e.rows[p])] = e.rows[p]
        link = self.link_gbps
        try:
            for g, layers in enumerate(self.groups):
                if self.group_gate is not None:
                    self.group_gate(packed.content_hash, g)
                t0 = time.perf_counter()
                flat = np.asarray(packed.groups[g])
                for p, off, size, w in self.layout.parts(g, widths):
                    write = self._writer(g, p, w)
                    part = jax.device_put(flat[off : off + size])  # the projection's one copy
                    first = np.int32(layers.start)
                    with self.lock:
                        self.a[p], self.b[p] = write(self.a[p], self.b[p], first, idx[p], part)
                if link:  # the emulated link: a copy takes at least bytes / bandwidth
                    time.sleep(max(0.0, packed.groups[g].nbytes / (link * 1e9)
                                   - (time.perf_counter() - t0)))  # fmt: skip
                if g == len(self.groups) - 1 and packed.vocab:  # embedding / LM-head rows
                    self._write_vocab(e.rows, packed.vocab)
                e.handle._group_done(g, time.perf_counter() - t0)
            e.handle._finish()
            with self.lock:
                self.stats.bytes_loaded += e.handle.nbytes
                self.stats.loads += 1
                self._load_events.append((e.handle.nbytes, e.handle.seconds or 0.0))
        except BaseException as err:  # surfaced through the handle, never lost
            log.exception("adapter load failed")
            with self.lock:
                if self._entries.get(packed.content_hash) is e:
                    self._drop(packed.content_hash)
            e.handle._finish(err)
