"""Device tier of the adapter store: rank rows in per-layer pools, no padding to a max rank.

For each projection p and layer l the pool keeps A rows ``a[p][l]`` [N_p, in] and B rows
``b[p][l]`` [N_p, out] (B pre-multiplied by the adapter's scaling). An adapter of rank r on p
takes r rows: any r free rows, not a contiguous range, so there is no fragmentation and no
compaction. Row 0 stays zero. A slot table maps an adapter slot to its rows; kernels gather
through it (see multi_lora.py).

Loads are asynchronous: ``acquire`` returns a LoadHandle at once, and a loader thread copies the
adapter one layer group at a time. The handle records bytes and seconds per group and tells which
groups are ready, so CPU-assisted prefill can use the device path for layers that have arrived.
Adapters are keyed by content hash. Eviction is LRU and skips adapters that a running sequence
holds (refcount > 0) and pinned ones.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from cara_jax.adapters.multi_lora import MultiLoraHook, RaggedLoraHook
from cara_jax.adapters.peft import LoraAdapter
from cara_jax.config import ModelConfig
from cara_jax.lora_hooks import PROJECTIONS
from cara_jax.ragged import RaggedMeta

log = logging.getLogger(__name__)


class PoolFullError(RuntimeError):
    """The adapter cannot fit: every resident adapter is in use or pinned."""


@dataclasses.dataclass(frozen=True)
class PoolConfig:
    budget_bytes: int = 512 << 20  # device memory for adapter rows, all projections and layers
    max_adapters: int = 64  # resident adapters (slot table height)
    max_rank: int = 128  # largest rank accepted (slot table width)
    layer_groups: int = 4  # copy granularity; CPU assist overlaps the later groups
    # Emulated host->device link (GB/s), for benches on machines where the "device" is host
    # memory and a copy is a memcpy: each layer group's copy then takes at least bytes/bandwidth.
    emulate_link_gbps: float | None = None
    projections: tuple[str, ...] = PROJECTIONS


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


@dataclasses.dataclass
class _Entry:
    adapter: LoraAdapter
    slot: int
    rows: dict[str, np.ndarray]  # proj -> pool rows (len = rank on that projection)
    handle: LoadHandle
    refcount: int = 0
    pinned: bool = False


@dataclasses.dataclass
class PoolStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_loaded: int = 0
    load_seconds: list[float] = dataclasses.field(default_factory=list)


@partial(jax.jit, donate_argnums=0)
def _write_rows(pool: jax.Array, rows: jax.Array, values: jax.Array) -> jax.Array:
    """Write an adapter's rows into one pool array in place (the old array is donated).

    A load makes one such write per (projection, A/B, layer) of a layer group, all dispatched
    together under the pool lock: a donated array that the step in flight still reads makes the
    first write wait for that step, and the rest of the group's writes then go straight through.
    Each write is a tiny program of its own (one per pool-array shape and write width), compiled
    in a fraction of a second; ``DevicePool.warm_writer`` compiles them all before serving.
    """
    return pool.at[rows].set(values.astype(pool.dtype))


class DevicePool:
    """Adapter rows on the device, with slot table, refcounts, pins and LRU eviction."""

    def __init__(self, cfg: ModelConfig, config: PoolConfig | None = None, dtype=jnp.float32):
        self.cfg = cfg
        self.config = pc = config or PoolConfig()
        self.dtype = jnp.dtype(dtype)
        shapes = cfg.projection_shapes()
        self.projections = tuple(p for p in pc.projections if p in shapes)
        per_row = sum(sum(shapes[p]) for p in self.projections) * cfg.num_layers
        # usable rank rows per projection; one more row (row 0) stays zero for padding
        self.rows_per_proj = max(1, pc.budget_bytes // (per_row * self.dtype.itemsize))
        n = self.rows_per_proj + 1
        self.a = {
            p: [jnp.zeros((n, shapes[p][0]), dtype) for _ in range(cfg.num_layers)]
            for p in self.projections
        }
        self.b = {
            p: [jnp.zeros((n, shapes[p][1]), dtype) for _ in range(cfg.num_layers)]
            for p in self.projections
        }
        self._free_rows = {
            p: list(range(n - 1, 0, -1)) for p in self.projections
        }  # pop() -> low rows
        self._free_slots = list(range(pc.max_adapters - 1, 0, -1))
        self._slot_rows = {
            p: np.zeros((pc.max_adapters, pc.max_rank), np.int32) for p in self.projections
        }
        self._slot_rank = {p: np.zeros((pc.max_adapters,), np.int32) for p in self.projections}
        self._table_dev: tuple | None = None
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # LRU order: oldest first
        per_group = -(-cfg.num_layers // pc.layer_groups)
        self.groups = [
            range(i, min(i + per_group, cfg.num_layers))
            for i in range(0, cfg.num_layers, per_group)
        ]
        self.lock = threading.RLock()  # guards pool arrays, tables and entries
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-load")
        self.stats = PoolStats()
        # called by the loader before each layer group's copy: (content hash, group); tests
        # use it to hold a load at a group boundary
        self.group_gate: Callable[[str, int], None] | None = None
        self._ids = itertools.count()

    # ------------------------------------------------------------------ residency

    @property
    def capacity_bytes(self) -> int:
        return sum(int(x.nbytes) for p in self.projections for x in self.a[p] + self.b[p])

    def resident(self) -> list[str]:
        with self.lock:
            return list(self._entries)

    def is_resident(self, content_hash: str) -> bool:
        with self.lock:
            e = self._entries.get(content_hash)
            return e is not None and e.handle.done() and e.handle.error is None

    def slot_of(self, content_hash: str) -> int:
        with self.lock:
            return self._entries[content_hash].slot

    def handle_of(self, content_hash: str) -> LoadHandle | None:
        """The load handle of a resident or loading adapter."""
        with self.lock:
            e = self._entries.get(content_hash)
            return None if e is None else e.handle

    def entry_rank(self, content_hash: str) -> int:
        """Largest rank of a resident (or loading) adapter."""
        with self.lock:
            e = self._entries.get(content_hash)
            return 0 if e is None else e.adapter.max_rank

    def acquire(self, adapter: LoraAdapter) -> LoadHandle:
        """Make ``adapter`` resident (loading it if needed) and hold it until ``release``."""
        with self.lock:
            e = self._entries.get(adapter.content_hash)
            if e is not None:
                self.stats.hits += 1
                e.refcount += 1
                self._entries.move_to_end(adapter.content_hash)
                return e.handle
            self.stats.misses += 1
            ranks = self._ranks(adapter)
            self._make_room(ranks)
            slot = self._free_slots.pop()
            rows = {
                p: np.array([self._free_rows[p].pop() for _ in range(r)], np.int32)
                for p, r in ranks.items()
            }
            # The slot's rows are published at once: only CPU-assisted prefill uses a loading
            # adapter's slot, and only for layers whose group has arrived (see cpu_assist.py).
            for p in self.projections:
                self._slot_rows[p][slot] = 0
                self._slot_rank[p][slot] = 0
            for p, r in ranks.items():
                self._slot_rows[p][slot, :r] = rows[p]
                self._slot_rank[p][slot] = r
            self._table_dev = None
            nbytes = sum(int(rows[p].size) * sum(self.cfg.projection_shapes()[p]) for p in rows)
            handle = LoadHandle(
                adapter.content_hash,
                self.groups,
                nbytes * self.cfg.num_layers * self.dtype.itemsize,
            )
            e = _Entry(adapter=adapter, slot=slot, rows=rows, handle=handle, refcount=1)
            self._entries[adapter.content_hash] = e
        self._loader.submit(self._load, e, ranks)
        return handle

    def release(self, content_hash: str) -> None:
        with self.lock:
            e = self._entries[content_hash]
            if e.refcount <= 0:
                raise ValueError(f"adapter {content_hash[:12]} released more often than acquired")
            e.refcount -= 1

    def pin(self, content_hash: str, pinned: bool = True) -> None:
        with self.lock:
            self._entries[content_hash].pinned = pinned

    def evict(self, content_hash: str) -> None:
        """Drop an idle adapter now (e.g. after its name was unloaded)."""
        with self.lock:
            e = self._entries.get(content_hash)
            if e is None:
                return
            if e.refcount > 0 or not e.handle.done():
                raise PoolFullError(f"adapter {content_hash[:12]} is in use")
            self._drop(content_hash)

    def _ranks(self, adapter: LoraAdapter) -> dict[str, int]:
        ranks: dict[str, int] = {}
        for (_, p), m in adapter.modules.items():
            if p not in self.projections:
                raise ValueError(f"this pool does not hold projection {p}")
            ranks[p] = max(ranks.get(p, 0), m.rank)
        too_big = {p: r for p, r in ranks.items() if r > self.config.max_rank}
        if too_big:
            raise ValueError(
                f"rank {max(too_big.values())} exceeds the pool's max_rank {self.config.max_rank}"
            )
        return ranks

    def _make_room(self, ranks: dict[str, int]) -> None:
        def fits() -> bool:
            return bool(self._free_slots) and all(
                len(self._free_rows[p]) >= r for p, r in ranks.items()
            )

        for h in list(self._entries):
            if fits():
                return
            e = self._entries[h]
            if e.refcount == 0 and not e.pinned and e.handle.done():
                self._drop(h)
                self.stats.evictions += 1
        if not fits():
            need = {p: r for p, r in ranks.items()}
            raise PoolFullError(
                f"no room for an adapter needing rank rows {need}: "
                f"{sum(e.refcount > 0 for e in self._entries.values())} resident adapters are in use"
            )

    def _drop(self, content_hash: str) -> None:
        e = self._entries.pop(content_hash)
        for p, rows in e.rows.items():
            self._free_rows[p].extend(int(r) for r in rows)
        for p in self.projections:
            self._slot_rows[p][e.slot] = 0
            self._slot_rank[p][e.slot] = 0
        self._free_slots.append(e.slot)
        self._table_dev = None

    def _load(self, e: _Entry, ranks: dict[str, int]) -> None:
        shapes = self.cfg.projection_shapes()
        try:
            for g, layers in enumerate(self.groups):
                if self.group_gate is not None:
                    self.group_gate(e.adapter.content_hash, g)
                t0 = time.perf_counter()
                targets: list[tuple[dict, str, int]] = []  # (self.a or self.b, proj, layer)
                rows, values = [], []
                # every pool projection, rows padded to the rank bucket with row 0 (zeros): the
                # write's shapes depend on the bucket and group size only, so warm_writer()
                # compiles them all before serving and no load waits for a compiler
                width = write_width(max(ranks.values()), self.config.max_rank)
                for p in self.projections:
                    din, dout = shapes[p]
                    r = ranks.get(p, 0)
                    idx = np.zeros(width, np.int32)
                    if r:
                        idx[:r] = e.rows[p]
                    av = np.zeros((len(layers), width, din), self.dtype)
                    bv = np.zeros((len(layers), width, dout), self.dtype)
                    for k, layer in enumerate(layers):
                        m = e.adapter.modules.get((layer, p))
                        if m is not None:
                            av[k, : m.rank] = m.a.T
                            bv[k, : m.rank] = m.b
                    for pools, vals in ((self.a, av), (self.b, bv)):
                        for k, layer in enumerate(layers):
                            targets.append((pools, p, layer))
                            rows.append(idx)
                            values.append(vals[k])
                with self.lock:
                    new = []
                    for (pools, p, layer), idx, vals in zip(targets, rows, values, strict=True):
                        pools[p][layer] = _write_rows(pools[p][layer], idx, vals)
                        new.append(pools[p][layer])
                jax.block_until_ready(new)
                link = self.config.emulate_link_gbps
                if link:
                    gbytes = e.handle.nbytes * len(layers) / self.cfg.num_layers / 1e9
                    time.sleep(max(0.0, gbytes / link - (time.perf_counter() - t0)))
                e.handle._group_done(g, time.perf_counter() - t0)
            with self.lock:
                self.stats.bytes_loaded += e.handle.nbytes
            e.handle._finish()
            self.stats.load_seconds.append(e.handle.seconds or 0.0)
        except BaseException as err:  # surfaced through the handle, never lost
            log.exception("adapter load failed")
            with self.lock:
                if self._entries.get(e.adapter.content_hash) is e:
                    self._drop(e.adapter.content_hash)
            e.handle._finish(err)

    # ------------------------------------------------------------------ hooks

    def _table(self) -> tuple[dict, dict]:
        if self._table_dev is None:
            self._table_dev = (
                {p: jnp.asarray(v) for p, v in self._slot_rows.items()},
                {p: jnp.asarray(v) for p, v in self._slot_rank.items()},
            )
        return self._table_dev

    def batch_ranks(self, slots: np.ndarray) -> tuple[int, int]:
        """(max rank, max over projections of the summed rank) of the adapters in ``slots``."""
        with self.lock:
            ranks = np.stack([self._slot_rank[p][slots] for p in self.projections])
        return int(ranks.max(initial=0)), int(ranks.sum(axis=1).max(initial=0))

    def hook(
        self,
        slots: np.ndarray,
        strategy: str = "bgmv",
        rank_bucket: int | None = None,
        backend: str = "auto",
    ) -> MultiLoraHook:
        """A hook for a batch whose row i uses adapter slot ``slots[i]`` (0 = none).

        ``backend`` picks the kernels (multi_lora.BACKENDS): "auto" runs the Pallas kernels on
        GPU and the jnp references elsewhere. Call and dispatch the step while holding
        ``pool.lock``: a concurrent load donates the pool arrays it updates.
        """
        if rank_bucket is None:
            mx, total = self.batch_ranks(slots)
            rank_bucket = rank_bucket_for(total if strategy == "mbgmv" else mx)
        rows, rank = self._table()
        return MultiLoraHook(
            a={p: list(v) for p, v in self.a.items()},
            b={p: list(v) for p, v in self.b.items()},
            slot_rows=rows,
            slot_rank=rank,
            adapter=jnp.asarray(slots, jnp.int32),
            strategy=strategy,
            rank_bucket=rank_bucket,
            backend=backend,
        )

    def warm_writer(self) -> int:
        """Compile the row writes of every (pool-array shape, write width) by writing zeros to
        row 0 (which stays zero); returns how many programs that was."""
        widths = sorted({write_width(8, self.config.max_rank),
                         write_width(self.config.max_rank, self.config.max_rank)})  # fmt: skip
        done: set = set()
        with self.lock:
            for pools in (self.a, self.b):
                for layers in pools.values():
                    arr = layers[0]
                    for w in widths:
                        if (arr.shape, arr.dtype, w) in done:
                            continue
                        done.add((arr.shape, arr.dtype, w))
                        zeros = np.zeros((w, arr.shape[1]), self.dtype)
                        layers[0] = _write_rows(arr, np.zeros(w, np.int32), zeros)
                        arr = layers[0]
            jax.block_until_ready([v[0] for pools in (self.a, self.b) for v in pools.values()])
        return len(done)

    def stats_dict(self) -> dict:
        """Counters and occupancy, one consistent read (for Engine.stats)."""
        with self.lock:
            st = self.stats
            return {
                "hits": st.hits, "misses": st.misses, "evictions": st.evictions,
                "bytes_loaded": st.bytes_loaded, "resident": len(self._entries),
                "slots_total": self.config.max_adapters - 1,
            }  # fmt: skip

    def bucket_index(self, slots: np.ndarray, rank_buckets: tuple[int, ...]) -> int:
        """0 when no slot has an adapter, else 1 + the index of the smallest bucket that holds
        the slots' largest rank."""
        mx, _ = self.batch_ranks(slots)
        if mx == 0:
            return 0
        for i, r in enumerate(rank_buckets):
            if mx <= r:
                return i + 1
        raise ValueError(f"rank {mx} exceeds the largest rank bucket {rank_buckets[-1]}")

    def row_index(self, proj: str, slots: np.ndarray, r: int) -> np.ndarray:
        """[len(slots), r] pool rows of each slot's adapter on ``proj`` (row 0 pads)."""
        with self.lock:
            return self._slot_rows[proj][slots, :r].astype(np.int32)

    def flat_index(self, proj: str, slots: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
        """MBGMV's flattened rank rows: (rows [n*r], owner [n*r]), each slot at its own rank,
        padded with row 0 (zeros) owned by row 0."""
        n = len(slots)
        rows, owner = np.zeros(n * r, np.int32), np.zeros(n * r, np.int32)
        with self.lock:
            ranks = self._slot_rank[proj][slots]
            k = 0
            for i, (s, rk) in enumerate(zip(slots, ranks, strict=True)):
                rk = min(int(rk), r)  # a bucket below the batch's rank is never selected
                rows[k : k + rk] = self._slot_rows[proj][s, :rk]
                owner[k : k + rk] = i
                k += rk
        return rows, owner

    def ragged_hook(
        self,
        dec_slots: np.ndarray,
        ch_slots: np.ndarray,
        meta: RaggedMeta,
        strategy: str = "bgmv",
        rank_buckets: tuple[int, ...] = (16, 64),
        backend: str = "auto",
    ) -> RaggedLoraHook:
        """The hook of one engine step (ragged.py): decode row i uses adapter slot
        ``dec_slots[i]``, chunk row j ``ch_slots[j]`` (0 = none). Each view's rank bucket and
        every index table are computed here, once per step. Call and dispatch under
        ``pool.lock``, as for ``hook``."""
        dec_slots, ch_slots = np.asarray(dec_slots), np.asarray(ch_slots)
        dec_idx, ch_idx = {}, {}
        for p in self.a:
            if strategy == "mbgmv":
                dec_idx[p] = [tuple(jnp.asarray(v) for v in self.flat_index(p, dec_slots, r))
                              for r in rank_buckets]  # fmt: skip
            else:
                dec_idx[p] = [jnp.asarray(self.row_index(p, dec_slots, r)) for r in rank_buckets]
            ch_idx[p] = [jnp.asarray(self.row_index(p, ch_slots, r)) for r in rank_buckets]
        return RaggedLoraHook(
            a={p: list(v) for p, v in self.a.items()},
            b={p: list(v) for p, v in self.b.items()},
            dec_idx=dec_idx,
            ch_idx=ch_idx,
            dec_bucket=jnp.asarray(self.bucket_index(dec_slots, rank_buckets), jnp.int32),
            ch_bucket=jnp.asarray(self.bucket_index(ch_slots, rank_buckets), jnp.int32),
            meta=meta,
            strategy=strategy,
            rank_buckets=tuple(rank_buckets),
            backend=backend,
        )

    def close(self) -> None:
        self._loader.shutdown(wait=True)


def write_width(r: int, max_rank: int | None = None) -> int:
    """Rows per projection of one load's write: 16 for ranks up to 16, else the pool's max
    rank (two write shapes per layer-group size, compiled before serving)."""
    if r <= 16:
        return 16
    return rank_bucket_for(max_rank if max_rank is not None else r)


def rank_bucket_for(r: int) -> int:
    """Power-of-two bucket (min 8) so the number of compiled variants stays small."""
    b = 8
    while b < r:
        b *= 2
    return b
