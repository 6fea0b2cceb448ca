"""Device tier of the adapter store: rank rows in per-layer pools, no padding to a max rank.

For each projection p the pool keeps A rows ``a[p]`` [layers, N_p, in] and B rows ``b[p]``
[layers, N_p, out] (B pre-multiplied by the adapter's scaling; layer l's rows are ``a[p][l]``). An adapter of rank r on p
takes r rows: any r free rows, not a contiguous range, so there is no fragmentation and no
compaction. Row 0 stays zero. A slot table maps an adapter slot to its rows; kernels gather
through it (see multi_lora.py).

Loads are asynchronous: ``acquire`` returns a LoadHandle at once, and a loader thread copies the
adapter one layer group at a time. The handle records bytes and seconds per group and tells which
groups are ready, so CPU-assisted prefill can use the device path for layers that have arrived.
(pool_load.py: the handle and the copy; pool_write.py: the write programs.)

A load costs its copy: the adapter is already in the pool's layout (packed.py: converted once,
memory-mapped from disk), so a group is one transfer and one write program. The write is
dispatched, not waited for: it runs on the device after the step in flight (which still reads
the arrays it replaces) and before the next step, which is the first to see the new rows.
Adapters are keyed by content hash. Eviction is LRU and skips adapters that a running sequence
holds (refcount > 0) and pinned ones.

A scaled or mixed adapter (adapters/mixture.py) is a slot of its own whose table lists its
members' rows one after another, each with its weight (``_slot_w``): no rows, no copy, no merged
weights. It holds one reference on each member while it is in the pool; it is evicted like any
adapter, and dropped with a member whose load failed.

A DoRA adapter's slot (and a scaled or mixed slot over DoRA adapters) also takes a row of the
DoRA output-scale tables (dora.py), computed on the device before the slot's first step.
LoRA on the embedding and the LM head takes rows of their own tables (vocab_pool.py), with
their own budget; each slot has a weight on each of those rows.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import jax.numpy as jnp
import numpy as np

from cara_jax.adapters.dora import PoolDora
from cara_jax.adapters.packed import PackedAdapter, PackedStore, PoolLayout
from cara_jax.adapters.peft import LoraAdapter
from cara_jax.adapters.pool_index import PoolIndex
from cara_jax.adapters.pool_load import LoadHandle, PoolLoader, _Entry
from cara_jax.adapters.pool_mix import PoolFullError, PoolMixtures
from cara_jax.adapters.pool_write import PoolWriter
from cara_jax.adapters.vocab_pool import PoolVocab
from cara_jax.config import ModelConfig
from cara_jax.lora_hooks import PROJECTIONS

__all__ = ["DevicePool", "LoadHandle", "PoolConfig", "PoolFullError", "PoolStats"]


@dataclasses.dataclass(frozen=True)
class PoolConfig:
    # device memory for adapter rows, all projections and layers: every projection gets the same
    # number of rank rows (SmolLM2: 512 MiB = 439 rows each). cara-serve defaults to 2 GiB
    # (1,759 rows): 439 is fewer than 16 concurrent requests over 16 adapters of ranks 8-64 need
    budget_bytes: int = 512 << 20
    max_adapters: int = 64  # resident adapters (slot table height)
    max_rank: int = 256  # largest rank accepted (slot table width); costs a step nothing
    layer_groups: int = 5  # copy granularity (CPU assist overlaps the later groups); SmolLM2: 5 x 6
    # Emulated host->device link (GB/s), for benches on machines where the "device" is host
    # memory and a copy is a memcpy: each layer group's copy then takes at least bytes/bandwidth.
    emulate_link_gbps: float | None = None
    projections: tuple[str, ...] = PROJECTIONS
    # packed copies (the pool's layout) on disk, memory-mapped; None: converted in memory only
    cache_dir: str | None = None
    packed_budget_bytes: int = 1 << 30  # packed copies held in memory when not on disk
    # DoRA slots resident at once (each: a row of output scales per projection and layer)
    dora_slots: int = 8
    # rank rows of LoRA on the embedding and on the LM head (each, vocabulary-wide: SmolLM2
    # float32, about 200 KB a row; adapters/vocab_pool.py)
    vocab_rows: int = 128


@dataclasses.dataclass
class PoolStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_loaded: int = 0
    loads: int = 0  # finished loads


class DevicePool(PoolIndex, PoolLoader, PoolWriter, PoolDora, PoolVocab, PoolMixtures):
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
        # per projection, every layer's rows in one array [layers, n, in] (B: [layers, n, out]),
        # as the model's scan over layers reads them
        self.a = {p: jnp.zeros((cfg.num_layers, n, shapes[p][0]), dtype) for p in self.projections}
        self.b = {p: jnp.zeros((cfg.num_layers, n, shapes[p][1]), dtype) for p in self.projections}
        self._free_rows = {
            p: list(range(n - 1, 0, -1)) for p in self.projections
        }  # pop() -> low rows
        self._free_slots = list(range(pc.max_adapters - 1, 0, -1))
        self._slot_rows = {
            p: np.zeros((pc.max_adapters, pc.max_rank), np.int32) for p in self.projections
        }
        self._slot_rank = {p: np.zeros((pc.max_adapters,), np.int32) for p in self.projections}
        # each slot row's weight: 1, but in a mixture's slot (its members' weights)
        self._slot_w = {
            p: np.ones((pc.max_adapters, pc.max_rank), np.float32) for p in self.projections
        }
        self._mix_slots: set[int] = set()
        self._init_dora()
        self._init_vocab()
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
        self.layout = PoolLayout(
            self.projections, tuple(tuple(shapes[p]) for p in self.projections),
            tuple((r.start, len(r)) for r in self.groups), self.dtype.name,
        )  # fmt: skip
        self.packed = PackedStore(self.layout, pc.cache_dir, pc.packed_budget_bytes)
        self.link_gbps = pc.emulate_link_gbps  # benches may change it between loads
        # (group size, in, out, width) -> executable
        self._writers: dict[tuple[int, int, int, int], object] = {}
        self._widths: set[int] = set()  # write widths of the adapters prepared
        self._writers_warm = False  # every width compiled (warm_writer ran)
        self.late_compiles = 0  # write programs compiled after that (0 unless a bug)
        # finished loads as (bytes, seconds), for whoever fits or shows them (residency);
        # bounded: a consumer that stops draining loses the oldest, memory stays flat
        self._load_events: deque[tuple[int, float]] = deque(maxlen=1024)
        self._writer_lock = threading.Lock()

    # ------------------------------------------------------------------ residency

    @property
    def capacity_bytes(self) -> int:
        return sum(int(self.a[p].nbytes) + int(self.b[p].nbytes) for p in self.projections)

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

    def packed_of(self, content_hash: str) -> PackedAdapter | None:
        """The packed copy of a resident or loading adapter."""
        with self.lock:
            e = self._entries.get(content_hash)
            return None if e is None else e.adapter

    def entry_rank(self, content_hash: str) -> int:
        """Largest rank of a resident (or loading) adapter."""
        with self.lock:
            e = self._entries.get(content_hash)
            return 0 if e is None else e.adapter.max_rank

    def prepare(self, adapter: LoraAdapter, compile_writer: bool = True) -> PackedAdapter:
        """Convert ``adapter`` to the pool's layout now (and store it on disk), so that its
        loads only copy; raises ValueError if the pool cannot hold it. The write program of its
        width is compiled now, or by ``warm_writer`` (start-up) if ``compile_writer`` is False."""
        packed = self.packed.get(adapter)
        self._check(packed, adapter)
        self._widths.update(packed.widths.values())
        if compile_writer:
            self.ensure_writer(packed.widths)
        if packed.dora:
            self.ensure_dora_program()
        if packed.vocab:
            self.ensure_vocab_writer(packed.vocab_ranks)
        return packed

    def acquire(self, adapter: LoraAdapter | PackedAdapter) -> LoadHandle:
        """Make ``adapter`` resident (loading it if needed) and hold it until ``release``."""
        with self.lock:
            e = self._entries.get(adapter.content_hash)
            if e is not None:
                self.stats.hits += 1
                e.refcount += 1
                self._entries.move_to_end(adapter.content_hash)
                return e.handle
        packed = adapter if isinstance(adapter, PackedAdapter) else self.packed.get(adapter)
        self._check(packed, adapter if isinstance(adapter, LoraAdapter) else None)
        with self.lock:
            e = self._entries.get(adapter.content_hash)
            if e is not None:  # another thread loaded it meanwhile
                self.stats.hits += 1
                e.refcount += 1
                self._entries.move_to_end(adapter.content_hash)
                return e.handle
            self.stats.misses += 1
            ranks = {p: r for p, r in packed.ranks.items() if r}
            need = {**ranks, **packed.vocab_ranks}  # rank rows per projection and vocab kind
            self._make_room(need, dora=packed.dora)
            slot = self._free_slots.pop()
            if packed.dora:
                self._dora_take(slot, packed.magnitudes, packed.dora_layers, False)
            rows = {
                p: np.array([self._free_rows[p].pop() for _ in range(r)], np.int32)
                for p, r in need.items()
            }
            self._vocab_take(slot, rows)
            # The slot's rows are published at once: only CPU-assisted prefill uses a loading
            # adapter's slot, and only for layers whose group has arrived (see cpu_assist.py).
            for p in self.projections:
                self._slot_rows[p][slot] = 0
                self._slot_rank[p][slot] = 0
            for p, r in ranks.items():
                self._slot_rows[p][slot, :r] = rows[p]
                self._slot_rank[p][slot] = r
            self._table_dev = None
            handle = LoadHandle(packed.content_hash, self.groups, packed.nbytes)
            e = _Entry(adapter=packed, slot=slot, rows=rows, handle=handle, refcount=1)
            self._entries[packed.content_hash] = e
        self._loader.submit(self._load, e)
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
            for k, other in list(self._entries.items()):  # idle mixtures that hold it
                if content_hash in other.members and other.refcount == 0:
                    self._drop(k)
            if e.refcount > 0 or not e.handle.done():
                raise PoolFullError(f"adapter {content_hash[:12]} is in use")
            self._drop(content_hash)

    def _check(self, packed: PackedAdapter, adapter: LoraAdapter | None = None) -> None:
        if packed.dora and self.config.dora_slots < 1:
            raise ValueError("a DoRA adapter, and this pool has no DoRA slots (dora_slots=0)")
        if packed.max_rank > self.config.max_rank:
            raise ValueError(
                f"rank {packed.max_rank} exceeds the pool's max_rank {self.config.max_rank}"
            )
        self.check_vocab(adapter, packed.vocab_ranks)

    def _make_room(self, ranks: dict[str, int], dora: bool = False) -> None:
        def fits() -> bool:
            return bool(self._free_slots) and (bool(self._free_dora) or not dora) and all(
                len(self._free_rows[p]) >= r for p, r in ranks.items()
            )

        def rows_fit() -> bool:
            return bool(self._free_slots) and all(
                len(self._free_rows[p]) >= r for p, r in ranks.items()
            )

        while not fits():  # LRU first; dropping a mixture may free its members for a later turn
            idle = [h for h, e in self._entries.items()
                    if e.refcount == 0 and not e.pinned and e.handle.done()]  # fmt: skip
            if rows_fit():  # only a DoRA row is short: drop only what holds one
                idle = [h for h in idle if self._entries[h].slot in self._dora_of]
            elif self._free_slots and not (dora and not self._free_dora):
                # only rows are short: drop only what holds rows of a kind that is short (a
                # plain adapter holds no embedding / LM-head rows), or a mixture over such
                short = {p for p, r in ranks.items() if len(self._free_rows[p]) < r}
                idle = [h for h in idle if self._holds_rows(self._entries[h], short)]
            if not idle:
                break
            idle = idle[0]
            self._drop(idle)
            self.stats.evictions += 1
        if not fits():
            need = {p: r for p, r in ranks.items()}
            raise PoolFullError(
                f"no room for an adapter needing rank rows {need}"
                f"{' and a DoRA slot' if dora else ''}: "
                f"{sum(e.refcount > 0 for e in self._entries.values())} resident adapters are in use"
            )

    def _holds_rows(self, e: _Entry, kinds: set[str]) -> bool:
        """Whether dropping ``e`` frees rows of ``kinds`` (its own, or a mixture's members')."""
        return bool(kinds & set(e.rows)) or any(
            m in self._entries and kinds & set(self._entries[m].rows) for m in e.members)  # fmt: skip

    def _drop(self, content_hash: str) -> None:
        e = self._entries.pop(content_hash)
        for p, rows in e.rows.items():
            self._free_rows[p].extend(int(r) for r in rows)
        for p in self.projections:
            self._slot_rows[p][e.slot] = 0
            self._slot_rank[p][e.slot] = 0
            self._slot_w[p][e.slot] = 1.0
        self._mix_slots.discard(e.slot)
        self._dora_release(e.slot)
        self._vocab_release(e.slot)
        self._free_slots.append(e.slot)
        self._table_dev = None
        for m in e.members:  # a mixture lets go of its members
            me = self._entries.get(m)
            if me is not None:
                me.refcount -= 1
        for k in [k for k, o in self._entries.items() if content_hash in o.members]:
            self._drop(k)  # a mixture whose member is gone (its load failed) goes too

    def take_load_events(self) -> list[tuple[int, float]]:
        """The loads finished since the last call, as (bytes, seconds)."""
        with self.lock:
            out = list(self._load_events)
            self._load_events.clear()
        return out

    def stats_dict(self) -> dict:
        """Counters and occupancy, one consistent read (for Engine.stats)."""
        with self.lock:
            st = self.stats
            return {
                "hits": st.hits, "misses": st.misses, "evictions": st.evictions,
                "bytes_loaded": st.bytes_loaded,
                "resident": len(self._entries),
                "slots_total": self.config.max_adapters - 1,
            }  # fmt: skip

    def close(self) -> None:
        self._loader.shutdown(wait=True)
        self.packed.close()
