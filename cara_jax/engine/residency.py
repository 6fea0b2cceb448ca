"""Adapter residency and cold start: where a request's adapter is, and where its prefill's LoRA
deltas come from while it is not on the device yet.

The one owner of the device pool, the host tiers (registry, packed copies), the CPU workers and
the cold-start model. The scheduler asks ``ready(seq, uncached_tokens, wait_s, step_s)`` and
gets a ``Readiness``; the engine calls ``begin_step`` before it schedules, builds the step's CPU
plan with ``cpu_plan`` under ``lock`` (the layers ready then are what the dispatch sees) and
hands the plan back to ``finish_plan`` once the step's tokens are read. Nothing here calls back
into the engine or the scheduler. Finished loads arrive as events from the pool (a bounded
queue): they fit the cold-start model and a fixed-bucket histogram for metrics.
"""

from __future__ import annotations

import enum
import logging
import threading
import time

import numpy as np

from cara_jax import cpu_assist
from cara_jax.adapters.device_pool import DevicePool, PoolFullError
from cara_jax.adapters.mixture import (
    MixtureError,
    describe,
    is_plain,
    merge_members,
    mixture_key,
    parse_mixture,
)
from cara_jax.adapters.packed import PackedAdapter
from cara_jax.adapters.store import AdapterRegistry, RegisteredAdapter
from cara_jax.config import ModelConfig
from cara_jax.engine.batch import ChunkRow, CpuPlan
from cara_jax.engine.cold_start import ColdStartModel
from cara_jax.engine.cpu_coordinator import CpuAssistCoordinator, zero_stats
from cara_jax.engine.records import LoadHistogram
from cara_jax.engine.sequence import AdapterUse, Sequence
from cara_jax.lora_hooks import GROUPS
from cara_jax.sampling_params import InvalidRequestError

log = logging.getLogger(__name__)



class Readiness(enum.Enum):
    READY = "ready"  # resident: prefill and decode on the device
    CPU_ASSIST = "cpu_assist"  # still loading: prefill now, CPU deltas for the layers not there
    NOT_YET = "not_yet"  # loading (or the pool is full of adapters in use): try next step


class AdapterResidency:
    """Adapters on the device, in host memory, on disk; cold requests' path to their first
    token (``cold_start``: cached | sync | cpu_assist | auto, see EngineConfig)."""

    def __init__(
        self,
        cfg: ModelConfig,
        pool: DevicePool,
        registry: AdapterRegistry,
        cold_start: str,
        cpu_workers: int = 1,
        cpu_timeout_s: float = 30.0,
    ) -> None:
        self.cfg = cfg
        self.pool = pool
        self.registry = registry
        self.mode = cold_start
        self.cpu: CpuAssistCoordinator | None = None
        self.cold_model: ColdStartModel | None = None
        if cold_start in ("cpu_assist", "auto"):
            self.cpu = CpuAssistCoordinator(cfg, cpu_workers, cpu_timeout_s)
        if cold_start == "auto":
            link = pool.config.emulate_link_gbps
            rate = float(self.cpu.workers.stats().get("flops_per_s") or 2e10)
            self.cold_model = ColdStartModel(
                cfg, link_bytes_per_s=(link or 10.0) * 1e9,
                cpu_flops=rate * max(1, cpu_workers),
            )  # fmt: skip
        self.loads = LoadHistogram()
        self._loads_lock = threading.Lock()

    @property
    def lock(self):
        """Held across ``cpu_plan`` and the dispatch it serves: no layer group lands between."""
        return self.pool.lock

    @property
    def prefetch(self) -> bool:
        """Whether a request's load starts when it arrives. Not in ``cpu_assist`` mode: there
        every prefill whose adapter is not resident at admission is CPU-assisted."""
        return self.mode != "cpu_assist"

    # ------------------------------------------------------------------ names

    def register(self, name: str, source, compile_writer: bool = True) -> RegisteredAdapter:
        """Register (or replace) an adapter; ``cached`` mode also pins it on the device. The
        one-time conversion to the pool's layout happens here (loads then only copy); it
        rejects what the pool cannot hold before the name changes."""
        old = self.registry.names().get(name)
        entry = self.registry.register(
            name, source, check=lambda a: self.pool.prepare(a, compile_writer=compile_writer)
        )
        if self.mode == "cached":
            if old is None or old.content_hash != entry.content_hash:
                self.pool.acquire(self.registry.resolve(name)).wait()
                self.pool.pin(entry.content_hash)
            if old is not None and old.content_hash != entry.content_hash:
                self._unpin_if_unused(old.content_hash)
        return entry

    def unregister(self, name: str) -> RegisteredAdapter:
        entry = self.registry.unregister(name)
        if self.mode == "cached":
            self._unpin_if_unused(entry.content_hash)
        return entry

    def _unpin_if_unused(self, content_hash: str) -> None:
        """Drop ``cached`` mode's hold on a content no registered name points at any more."""
        if content_hash not in {e.content_hash for e in self.registry.names().values()}:
            self.pool.pin(content_hash, False)
            self.pool.release(content_hash)

    def entry(self, name: str) -> RegisteredAdapter:
        return self.registry.entry(name)  # UnknownAdapterError

    def names(self) -> dict[str, RegisteredAdapter]:
        return self.registry.names()

    def adapter_use(self, adapter: str | None, lora, max_entries: int) -> AdapterUse:
        """Resolve a request's ``adapter`` name or ``lora`` mixture (UnknownAdapterError,
        InvalidRequestError). One entry at scale 1 is the adapter itself."""
        if lora is None:
            if adapter is None:
                return AdapterUse()
            e = self.entry(adapter)
            return AdapterUse(adapter, e.content_hash, e.cost_rank)
        if adapter is not None:
            raise InvalidRequestError("name the adapters in `lora` only (the model is the base "
                                      "model when `lora` is given)", "lora")  # fmt: skip
        try:
            refs = parse_mixture(lora, max_entries)
        except MixtureError as e:
            raise InvalidRequestError(f"`lora` {e}", e.param) from None
        entries = [(r, self.entry(r.name)) for r in refs]  # UnknownAdapterError
        if is_plain(refs):
            return AdapterUse(refs[0].name, entries[0][1].content_hash, entries[0][1].cost_rank)
        members = merge_members((r.name, e.content_hash, r.scale) for r, e in entries)
        self._check_fits(members)
        cost = {e.content_hash: e.cost_rank for _, e in entries}
        return AdapterUse(describe(refs), mixture_key((h, w) for _, h, w in members),
                          sum(cost[h] for _, h, _ in members), members)  # fmt: skip

    def _check_fits(self, members) -> None:
        """Refuse a mixture the pool could never hold at once: its members and its own slot,
        and per projection its summed rank (the slot table's width, the pool's rows)."""
        pool, pc = self.pool, self.pool.config
        if len(members) + 1 > pc.max_adapters - 1:
            raise InvalidRequestError(f"`lora` needs {len(members) + 1} adapter slots at once "
                                      f"(its members and itself); this server has "
                                      f"{pc.max_adapters - 1}", "lora")  # fmt: skip
        summed: dict[str, int] = {}
        dora = []
        for name, h, _ in members:
            packed = pool.packed.lookup(h)
            ranks = {**packed.ranks, **packed.vocab_ranks} if packed is not None else dict.fromkeys(
                pool.projections, self.registry.entry(name).max_rank)  # fmt: skip
            for p, r in ranks.items():
                summed[p] = summed.get(p, 0) + r
            dora.append(self.registry.entry(name).dora)
        if any(dora) and not all(dora):
            raise InvalidRequestError("`lora` mixes DoRA and plain LoRA adapters; PEFT's merge "
                                      "of such a list depends on its order, so it is not "
                                      "served", "lora")  # fmt: skip
        if any(dora) and len(members) + 1 > pc.dora_slots:
            raise InvalidRequestError(f"`lora` needs {len(members) + 1} DoRA slots at once (its "
                                      f"members and itself); this server has {pc.dora_slots}",
                                      "lora")  # fmt: skip
        limits = {p: pc.vocab_rows if p in ("embed_tokens", "lm_head") else
                  min(pc.max_rank, pool.rows_per_proj) for p in summed}  # fmt: skip
        over = {p: r for p, r in summed.items() if r > limits[p]}
        if over:
            p = max(over, key=over.get)
            raise InvalidRequestError(f"`lora` sums to rank {over[p]} on {p}; this server "
                                      f"holds at most {limits[p]} there", "lora")  # fmt: skip

    def resident_names(self) -> list[str]:
        return [n for n, e in self.registry.names().items() if self.pool.is_resident(e.content_hash)]

    # ------------------------------------------------------------------ one sequence

    def _find(self, seq: Sequence):
        """The tier walk: the packed copy (memory or disk: loads without parsing PEFT files),
        the host tier, else the PEFT folder re-read by name."""
        h = seq.content_hash
        adapter = self.pool.packed.lookup(h) or self.registry.host.get(h)
        if adapter is None:
            adapter = self.registry.resolve(seq.adapter_name)
            seq.content_hash = adapter.content_hash
        return adapter

    def _members(self, seq: Sequence) -> list:
        """A mixture's members at their weights, each found as ``_find`` finds an adapter; a
        member whose name now points at other content moves the mixture to its new key."""
        found, now = {}, []
        for name, h, w in seq.mixture:
            adapter = self.pool.packed.lookup(h) or self.registry.host.get(h)
            if adapter is None:
                adapter = self.registry.resolve(name)
            found[adapter.content_hash] = adapter
            now.append((name, adapter.content_hash, w))
        merged = merge_members(now)
        if merged != seq.mixture:
            seq.mixture = merged
            seq.content_hash = mixture_key((h, w) for _, h, w in merged)
        return [(found[h], w) for _, h, w in merged]

    def acquire(self, seq: Sequence) -> bool:
        """Hold the sequence's adapter in the device pool, starting its load if it is not
        there; False when the pool is full of adapters in use (try again later)."""
        hold = seq.hold
        if hold.acquired and self.pool.handle_of(seq.content_hash) is not hold.handle:
            # its load (or a member's) failed and the pool dropped what it held: ask again (an
            # entry made since under the same key is someone else's reference, not this one's)
            hold.acquired, hold.handle = False, None
        if seq.content_hash is None or hold.acquired:
            return True
        try:
            if seq.mixture is not None:
                members = self._members(seq)
                hold.cold = not all(self.pool.is_resident(a.content_hash) for a, _ in members)
                handle = self.pool.acquire_mix(seq.content_hash, members)
            else:
                adapter = self._find(seq)
                hold.cold = not self.pool.is_resident(seq.content_hash)
                handle = self.pool.acquire(adapter)
        except PoolFullError:
            return False
        hold.acquired, hold.handle = True, handle
        return True

    def release(self, seq: Sequence) -> None:
        hold = seq.hold
        if hold.acquired and seq.content_hash:
            hold.acquired = False
            # the reference is held only while the pool still has the entry it was taken on
            if self.pool.handle_of(seq.content_hash) is hold.handle:
                self.pool.release(seq.content_hash)
            hold.handle = None

    def ready(
        self, seq: Sequence, uncached_tokens: int, wait_s: float, step_s: float
    ) -> tuple[Readiness, float]:
        """May ``seq`` be admitted now? -> (answer, seconds spent waiting for its load).
        ``uncached_tokens``: what it would prefill; ``wait_s``: how long admission may still
        wait for a load about to land (the step in flight keeps the device busy meanwhile);
        ``step_s``: the engine's recent step time (what a load that misses this step costs)."""
        if seq.content_hash is None:
            return Readiness.READY, 0.0
        if not self.acquire(seq):
            return Readiness.NOT_YET, 0.0
        waited = 0.0
        if not self.pool.is_resident(seq.content_hash):
            if self._assist(seq, uncached_tokens, wait_s, step_s):
                seq.hold.cpu_assist = True
                seq.hold.mode = "cpu_assist"
                seq.hold.slot = self.pool.slot_of(seq.content_hash)
                return Readiness.CPU_ASSIST, 0.0
            waited = self._wait(seq, wait_s)
            if not self.pool.is_resident(seq.content_hash):
                return Readiness.NOT_YET, waited
        seq.hold.slot = self.pool.slot_of(seq.content_hash)
        return Readiness.READY, waited

    def _wait(self, seq: Sequence, wait_s: float) -> float:
        """Wait up to ``wait_s`` for the load, so that the request joins this step rather than
        the next; returns the seconds spent. The sync and auto modes wait; cpu_assist does
        not (its requests prefill with the workers instead)."""
        handle = self.pool.handle_of(seq.content_hash)
        if wait_s <= 0 or handle is None:
            return 0.0
        t = time.perf_counter()
        try:
            handle.wait(wait_s)
        except Exception:  # the load failed: admission retries (and reports) next step
            pass
        return time.perf_counter() - t

    def _assist(self, seq: Sequence, tokens: int, wait_s: float, step_s: float) -> bool:
        """Whether a request whose adapter is still loading prefills now with CPU deltas."""
        hold = seq.hold
        if self.cpu is None:
            return False
        if seq.mixture is not None:  # the CPU workers serve one adapter at scale 1
            hold.mode, hold.reason = "sync", "mixture"
            return False
        packed = self.pool.packed_of(seq.content_hash)
        if packed is not None and packed.dora:  # the workers add deltas; DoRA rescales outputs
            hold.mode, hold.reason = "sync", "dora"
            return False
        if packed is not None and packed.vocab:  # embedding / LM-head rows land with the load
            hold.mode, hold.reason = "sync", "vocab"
            return False
        if hold.no_cpu_assist:
            hold.mode, hold.reason = "sync", "no_cpu_path"
            return False
        handle = self.pool.handle_of(seq.content_hash)
        packed = self.pool.packed_of(seq.content_hash)
        if handle is None or handle.error is not None or packed is None:
            return False
        if self.cold_model is not None:  # auto: only where the load is predicted to be slower
            cold = self.cfg.num_layers - len(handle.ready_layers())
            choice = self.cold_model.choose(packed.ranks, handle.nbytes, tokens, handle.started,
                                            cold, step_s=step_s, wait_s=wait_s)  # fmt: skip
            if hold.mode is None or choice.mode == "cpu_assist":
                hold.mode, hold.reason, hold.detail = choice.mode, choice.reason, choice.describe()
            if choice.mode != "cpu_assist":
                return False
        self.cpu.hold(seq.content_hash, lambda: self._modules(seq.content_hash, packed))
        return True

    def _modules(self, content_hash: str, packed: PackedAdapter) -> dict:
        """(A, B) per module for the CPU workers: the host tier's copy, else the packed one
        unpacked (no PEFT parse)."""
        adapter = self.registry.host.get(content_hash)
        if adapter is not None:
            return {k: (m.a, m.b) for k, m in adapter.modules.items()}
        return self.pool.packed.modules(packed)

    def decodable(self, seq: Sequence) -> bool:
        """A CPU-assisted sequence decodes once its load is done (then it is an ordinary one)."""
        if not seq.hold.cpu_assist:
            return True
        if not self.pool.is_resident(seq.content_hash):
            return False
        seq.hold.cpu_assist = False
        return True

    def fall_back(self, seq: Sequence) -> None:
        """A CPU-assisted prefill failed: the request waits for its load next time."""
        seq.hold.cpu_assist, seq.hold.no_cpu_assist = False, True

    def finished(self, seq: Sequence) -> tuple[str | None, str | None]:
        """A sequence leaves the engine: its cold-start (mode, reason) for the record."""
        hold = seq.hold
        if hold.cold and hold.mode is None:  # its load was done when it was admitted
            hold.mode, hold.reason = "sync", "resident"
        if self.cold_model is not None and hold.cold:
            self.cold_model.count(hold.mode, hold.reason or "")
        self.release(seq)
        return hold.mode, hold.reason

    def rank_of(self, content_hash: str | None) -> int:
        return self.pool.entry_rank(content_hash) if content_hash else 0

    # ------------------------------------------------------------------ one step

    def begin_step(self) -> None:
        """Before scheduling: fold finished loads into the model and the histogram; free the
        workers' copies of adapters that have landed."""
        self.drain_loads()
        if self.cpu is not None:
            self.cpu.drop(lambda key: self.pool.is_resident(key))

    def drain_loads(self) -> None:
        events = self.pool.take_load_events()
        if not events:
            return
        with self._loads_lock:
            for nbytes, secs in events:
                self.loads.add(nbytes, secs)
                if self.cold_model is not None:
                    self.cold_model.observe_load(nbytes, secs)

    def cpu_plan(self, chunks: list[ChunkRow]) -> CpuPlan | None:
        """Where each chunk row's deltas come from, per layer (call under ``lock``): the pool
        slot for layers on the device, the CPU workers for the others. None when no chunk row
        needs the workers."""
        if self.cpu is None or not any(c.cpu_assist for c in chunks):
            return None
        layers = self.cfg.num_layers
        dev = np.zeros((layers, len(chunks)), np.int32)
        need = np.zeros((layers, len(GROUPS)), bool)  # (layer, group)s a cold row needs
        rows = []
        every = frozenset(range(layers))
        for i, c in enumerate(chunks):
            key = c.seq.content_hash
            ready = every
            if c.cpu_assist and not self.pool.is_resident(key):
                ready = frozenset(self.pool.handle_of(key).ready_layers())
                if every - ready:
                    rows.append(cpu_assist.CpuRow(i, key, len(c.tokens), every - ready))
                    ranks = self.pool.packed_of(key).ranks
                    groups = [g for g, ps in enumerate(GROUPS) if any(ranks.get(q) for q in ps)]
                    for layer in every - ready:
                        need[layer, groups] = True
            for layer in ready:
                dev[layer, i] = c.adapter_slot
        if not rows:
            return None
        plan = self.cpu.start(rows)
        return CpuPlan(dev, need, plan.id, plan)

    def finish_plan(self, plan: CpuPlan | None) -> set[int]:
        """Account a CPU-assisted prefill once its tokens are read; the chunk rows to re-run."""
        if plan is None or self.cpu is None:
            return set()
        failed = self.cpu.finish(plan.plan)
        if not failed and self.cold_model is not None:
            self._observe_cpu(plan.plan)
        return failed

    def _observe_cpu(self, plan: cpu_assist.PrefillPlan) -> None:
        """Fit the CPU side of the auto model to a finished CPU-assisted prefill."""
        flops = 0.0
        for r in plan.rows:
            packed = self.pool.packed_of(r.key)
            if packed is not None:
                flops += self.cold_model.delta_flops(packed.ranks, r.length, len(r.cpu_layers))
        secs = sum(t.copy_out_s + t.wait_s + t.copy_back_s for t in plan.timings)
        copy = sum(t.copy_out_s + t.copy_back_s for t in plan.timings)
        self.cold_model.observe_cpu(len(plan.timings), flops, secs, copy)

    # ------------------------------------------------------------------ views

    def cpu_stats(self) -> dict[str, float]:
        """CPU-assist counters for metrics (zeros without CPU assist)."""
        return zero_stats() if self.cpu is None else self.cpu.metrics()

    def stats(self) -> dict:
        """Pool occupancy and counters, host tier, loads (a fixed-size histogram)."""
        self.drain_loads()
        with self._loads_lock:
            loads = self.loads.snapshot()
        host = self.registry.host
        pc = self.pool.config
        return {
            **self.pool.stats_dict(),
            "max_rank": pc.max_rank, "budget_bytes": pc.budget_bytes,
            "registered": len(self.registry.names()),
            "host": {"hits": host.hits, "misses": host.misses, "evictions": host.evictions,
                     "bytes": host.nbytes, "budget_bytes": host.budget_bytes},
            "loads": loads,
        }  # fmt: skip

    def close(self) -> None:
        self.pool.close()
        if self.cpu is not None:
            self.cpu.close()
