"""The engine's side of CPU-assisted cold start: which adapters the CPU workers hold, which
prefill rows and layers they serve, and what it cost.

Why apart from the engine: the engine decides *who* runs; this decides *where* a cold row's
LoRA deltas come from, layer by layer (docs/cpu_assist.md). A cold request's adapter is put in
the workers' shared memory when it is admitted; its prefill plan lists the layers whose weights
have not reached the device at dispatch (those come from the workers through cpu_assist.py's
host callbacks, the others from the device pool); once the adapter is resident and no plan in
flight reads it, the workers' copy is dropped.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable

import numpy as np

from cara_jax import cpu_assist
from cara_jax.adapters.device_pool import DevicePool
from cara_jax.adapters.store import AdapterRegistry
from cara_jax.config import ModelConfig
from cara_jax.engine.batch import CpuPlan
from cara_jax.engine.sequence import Sequence

log = logging.getLogger(__name__)


def zero_stats() -> dict[str, float]:
    """The counters, all zero (also what an engine without CPU assist reports)."""
    return {
        "cara_cpu_assist_prefills_total": 0,
        "cara_cpu_assist_fallbacks_total": 0,
        "cara_cpu_assist_tokens_total": 0,  # prompt tokens whose deltas the workers computed
        "cara_cpu_lora_layers_cpu_total": 0,
        "cara_cpu_lora_layers_device_total": 0,
        "cara_cpu_lora_wait_seconds_total": 0.0,
        "cara_cpu_lora_copy_seconds_total": 0.0,
    }


class CpuAssistCoordinator:
    """Owns the CPU worker pool for one engine; every call is made under the engine lock."""

    def __init__(
        self,
        cfg: ModelConfig,
        pool: DevicePool,
        registry: AdapterRegistry,
        num_workers: int,
        timeout_s: float,
    ) -> None:
        from cpu_lora.workers import CpuLoraPool

        self.num_layers = cfg.num_layers
        self.pool = pool
        self.registry = registry
        self.timeout_s = timeout_s
        self.workers = CpuLoraPool(num_workers=num_workers, cfg=cfg)
        self.keys: set[str] = set()  # adapters whose weights the workers hold
        self.plan_keys: collections.Counter[str] = collections.Counter()  # in-flight plans' use
        self.stats = zero_stats()
        self.on_plan: Callable[[cpu_assist.PrefillPlan], None] | None = None  # finished plans
        self.timings: collections.deque = collections.deque(maxlen=10_000)

    def can_assist(self, seq: Sequence) -> bool:
        """Whether a request whose adapter is still loading may prefill now with CPU help
        (puts the adapter in the workers' memory if needed)."""
        if seq.no_cpu_assist:
            return False
        handle = self.pool.handle_of(seq.content_hash)
        if handle is None or handle.error is not None:
            return False
        if seq.content_hash not in self.keys:
            adapter = self.registry.host.get(seq.content_hash)
            if adapter is not None:
                modules = {k: (m.a, m.b) for k, m in adapter.modules.items()}
            else:  # out of the host tier: unpack the mapped device-layout copy, no PEFT parse
                packed = self.pool.packed_of(seq.content_hash)
                if packed is None:
                    return False
                modules = self.pool.packed.modules(packed)
            self.workers.put_adapter(seq.content_hash, modules)
            self.keys.add(seq.content_hash)
        return True

    def plan(self, chunks: list) -> CpuPlan | None:
        """Where the LoRA deltas of a step's chunk rows come from, per layer (call under the
        device pool's lock: the layers ready now are what the dispatch sees). None when no
        chunk row is cold."""
        if not any(c.cpu_assist for c in chunks):
            return None
        dev = np.zeros((self.num_layers, len(chunks)), np.int32)
        rows = []
        every = frozenset(range(self.num_layers))
        for i, c in enumerate(chunks):
            key = c.seq.content_hash
            ready = every
            if c.cpu_assist and not self.pool.is_resident(key):
                ready = frozenset(self.pool.handle_of(key).ready_layers())
                if every - ready:
                    rows.append(cpu_assist.CpuRow(i, key, len(c.tokens), every - ready))
            for layer in ready:
                dev[layer, i] = c.adapter_slot
        if not rows:
            return None
        plan = cpu_assist.PrefillPlan(rows, self.workers, self.timeout_s)
        self.plan_keys.update(r.key for r in rows)
        cpu_assist.register(plan)
        return CpuPlan(dev, plan.id, plan)

    def finish(self, plan: cpu_assist.PrefillPlan | None) -> set[int]:
        """Account a CPU-assisted prefill once its tokens are in; the rows that must re-run."""
        if plan is None:
            return set()
        cpu_assist.unregister(plan)
        self.plan_keys.subtract(r.key for r in plan.rows)
        st = self.stats
        for t in plan.timings:
            st["cara_cpu_lora_wait_seconds_total"] += t.wait_s
            st["cara_cpu_lora_copy_seconds_total"] += t.copy_out_s + t.copy_back_s
        self.timings.extend(plan.timings)
        if plan.failed:
            log.warning("CPU-assisted prefill failed (%s): its requests fall back to a "
                        "synchronous load", plan.failed)  # fmt: skip
            st["cara_cpu_assist_fallbacks_total"] += len(plan.rows)
            return {r.row for r in plan.rows}
        if self.on_plan is not None:
            self.on_plan(plan)
        st["cara_cpu_assist_prefills_total"] += len(plan.rows)
        st["cara_cpu_assist_tokens_total"] += sum(r.length for r in plan.rows)
        st["cara_cpu_lora_layers_cpu_total"] += plan.layers_cpu
        st["cara_cpu_lora_layers_device_total"] += (
            len(plan.rows) * self.num_layers - plan.layers_cpu
        )
        return set()

    def drop_loaded(self) -> None:
        """Free the workers' copy of adapters now on the device that no plan in flight reads
        (a later cold start of the same adapter puts it back)."""
        for key in list(self.keys):
            if self.plan_keys[key] <= 0 and self.pool.is_resident(key):
                self.workers.drop_adapter(key)
                self.keys.discard(key)
                del self.plan_keys[key]

    def metrics(self) -> dict[str, float]:
        """Counters for metrics: CPU-assisted prefills, layers by path, CPU seconds, pool."""
        out = dict(self.stats)
        for k, v in self.workers.stats().items():
            if isinstance(v, (int, float)):
                out[f"cara_cpu_lora_pool_{k}"] = v
        return out

    def close(self) -> None:
        self.workers.close()
