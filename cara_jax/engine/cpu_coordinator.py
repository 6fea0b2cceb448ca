"""The CPU workers' side of CPU-assisted cold start: which adapters the workers hold, the
prefill plans in flight that read them, and what they cost.

Residency (residency.py) decides which rows and layers the workers serve; this keeps their
shared-memory copies of cold adapters (put when a cold request is admitted, dropped once the
adapter is on the device and no plan in flight reads it) and accounts finished plans
(docs/cpu_assist.md).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable

from cara_jax import cpu_assist
from cara_jax.config import ModelConfig

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
    """Owns the CPU worker pool for one engine; called by residency under the engine lock."""

    def __init__(self, cfg: ModelConfig, num_workers: int, timeout_s: float) -> None:
        from cpu_lora.workers import CpuLoraPool

        self.num_layers = cfg.num_layers
        self.timeout_s = timeout_s
        self.workers = CpuLoraPool(num_workers=num_workers, cfg=cfg)
        self.keys: set[str] = set()  # adapters whose weights the workers hold
        self.plan_keys: collections.Counter[str] = collections.Counter()  # in-flight plans' use
        self.stats = zero_stats()
        self.timings: collections.deque = collections.deque(maxlen=10_000)

    def hold(self, key: str, modules: Callable[[], dict]) -> None:
        """Put an adapter in the workers' memory unless it is there (``modules``: its (A, B)
        per module, asked for only when needed)."""
        if key not in self.keys:
            self.workers.put_adapter(key, modules())
            self.keys.add(key)

    def start(self, rows: list[cpu_assist.CpuRow]) -> cpu_assist.PrefillPlan:
        plan = cpu_assist.PrefillPlan(rows, self.workers, self.timeout_s)
        self.plan_keys.update(r.key for r in rows)
        cpu_assist.register(plan)
        return plan

    def finish(self, plan: cpu_assist.PrefillPlan) -> set[int]:
        """Account a CPU-assisted prefill once its tokens are in; the rows that must re-run."""
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
        st["cara_cpu_assist_prefills_total"] += len(plan.rows)
        st["cara_cpu_assist_tokens_total"] += sum(r.length for r in plan.rows)
        st["cara_cpu_lora_layers_cpu_total"] += plan.layers_cpu
        st["cara_cpu_lora_layers_device_total"] += (
            len(plan.rows) * self.num_layers - plan.layers_cpu
        )
        return set()

    def drop(self, landed: Callable[[str], bool]) -> None:
        """Free the workers' copy of adapters that have ``landed`` on the device and that no
        plan in flight reads (a later cold start of the same adapter puts it back)."""
        for key in list(self.keys):
            if self.plan_keys[key] <= 0 and landed(key):
                self.workers.drop_adapter(key)
                self.keys.discard(key)
                del self.plan_keys[key]

    def metrics(self) -> dict[str, float]:
        """Counters for metrics: CPU-assisted prefills, layers by path, CPU seconds, pool."""
        out = dict(self.stats)
        try:
            pool = self.workers.stats()
        except Exception:  # a metrics read must not fail because the workers are closing
            pool = {}
        for k, v in pool.items():
            if isinstance(v, (int, float)):
                out[f"cara_cpu_lora_pool_{k}"] = v
        return out

    def close(self) -> None:
        self.workers.close()
