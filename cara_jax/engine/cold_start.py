"""``--cold-start auto``: per cold request, wait for the load (sync) or prefill with CPU deltas.

CPU-assisted prefill pays off only where the adapter's copy takes longer than the CPU's share
of the prefill. Both sides are predicted from what this engine has measured:

- the load: ``overhead + bytes / bandwidth``, fitted to finished loads (the pool reports bytes
  and seconds of each; until one finished, the emulated link or a prior). A load already under
  way (prefetched when the request arrived) only has its remainder left;
- the CPU's share: ``exchanges * exchange_s + flops / cpu_flops``, where flops are the cold
  adapter's delta FLOPs over the uncached prompt tokens (rank, target modules, layers) and an
  exchange is one host round trip of a (layer, projection group); both fitted to the CPU
  worker timings of finished CPU-assisted prefills (prior: the workers' measured FLOP rate).

A request that waits for its load also waits for a step boundary. Admission may wait up to
half a step for a load about to land (the step in flight keeps the device busy meanwhile); a
load that lands later costs at least one step (the engine's recent step time). The request goes
CPU-assisted when that wait exceeds ``margin * CPU share``. The choice and its reason are kept on the
request (RequestRecord) and counted in /metrics.
"""

from __future__ import annotations

import dataclasses
import threading
import time

from cara_jax.config import ModelConfig
from cara_jax.lora_hooks import GROUPS  # one host exchange per (layer, group) (cpu_assist.py)

# "mixture": a scaled or mixed adapter waits for its members' loads (the CPU path serves one
# adapter at scale 1)
REASONS = ("resident", "load_faster", "cpu_faster", "no_cpu_path", "mixture", "dora", "vocab")


@dataclasses.dataclass
class Ewma:
    value: float
    alpha: float = 0.3
    n: int = 0

    def add(self, x: float) -> None:
        self.value = x if self.n == 0 else (1 - self.alpha) * self.value + self.alpha * x
        self.n += 1


@dataclasses.dataclass
class Choice:
    mode: str  # sync | cpu_assist
    reason: str  # one of REASONS
    load_s: float  # predicted remaining load
    cpu_s: float  # predicted CPU share of the prefill

    def describe(self) -> str:
        return (f"{self.mode}: {self.reason} (load ~{1e3 * self.load_s:.1f} ms left, "
                f"CPU deltas ~{1e3 * self.cpu_s:.1f} ms)")  # fmt: skip


class ColdStartModel:
    """Fitted load and CPU-delta costs, and the per-request choice between them."""

    def __init__(
        self,
        cfg: ModelConfig,
        link_bytes_per_s: float,
        cpu_flops: float,
        exchange_s: float = 1e-3,
        load_overhead_s: float = 2e-3,
        margin: float = 1.2,
    ) -> None:
        self.cfg = cfg
        self.margin = margin
        self.bandwidth = Ewma(link_bytes_per_s)
        self.load_overhead = Ewma(load_overhead_s)
        self.cpu_flops = Ewma(cpu_flops)
        self.exchange = Ewma(exchange_s)
        self._lock = threading.Lock()
        self.counts: dict[tuple[str, str], int] = {}

    # ------------------------------------------------------------------ fitting

    def observe_load(self, nbytes: int, seconds: float) -> None:
        """A finished load: its time beyond the predicted overhead fits the bandwidth."""
        with self._lock:
            over = self.load_overhead.value
            if seconds > 2 * over:
                self.bandwidth.add(nbytes / (seconds - over))
            else:  # too small to see the link: it is all overhead
                self.load_overhead.add(seconds)

    def observe_cpu(self, exchanges: int, flops: float, seconds: float, copy_s: float) -> None:
        """A finished CPU-assisted prefill: ``seconds`` the device waited on the host in all,
        ``copy_s`` of that spent copying rows out and deltas back."""
        with self._lock:
            if exchanges:
                self.exchange.add(copy_s / exchanges)
            compute = seconds - copy_s
            if flops > 0 and compute > 1e-4:
                self.cpu_flops.add(flops / compute)

    # ------------------------------------------------------------------ prediction

    def delta_flops(self, ranks: dict[str, int], tokens: int, layers: int | None = None) -> float:
        """FLOPs of x @ A @ B over ``tokens`` tokens, every targeted projection and layer."""
        shapes = self.cfg.projection_shapes()
        per_layer = sum(2 * r * (shapes[p][0] + shapes[p][1]) for p, r in ranks.items() if r)
        return per_layer * tokens * (self.cfg.num_layers if layers is None else layers)

    def exchanges(self, ranks: dict[str, int], layers: int | None = None) -> int:
        groups = sum(any(ranks.get(p) for p in g) for g in GROUPS)
        return groups * (self.cfg.num_layers if layers is None else layers)

    def load_seconds(self, nbytes: int) -> float:
        return self.load_overhead.value + nbytes / self.bandwidth.value

    def cpu_seconds(self, ranks: dict[str, int], tokens: int, layers: int | None = None) -> float:
        return (self.exchanges(ranks, layers) * self.exchange.value
                + self.delta_flops(ranks, tokens, layers) / self.cpu_flops.value)  # fmt: skip

    def choose(
        self,
        ranks: dict[str, int],
        nbytes: int,
        tokens: int,
        started: float | None,
        cold_layers: int | None = None,
        cpu_path: bool = True,
        step_s: float = 0.0,
        wait_s: float = 0.0,
    ) -> Choice:
        """Sync or CPU-assisted for a request with ``tokens`` prompt tokens to prefill, whose
        adapter (``nbytes`` to copy) started loading at ``started`` (perf_counter; None: not
        yet) and has ``cold_layers`` layers still to arrive; ``step_s``: the engine's recent
        step time (what a wait costs when the load misses this step); ``wait_s``: how long
        this step's admission may still wait for a load to land."""
        load = self.load_seconds(nbytes)
        if started is not None:
            load = max(0.0, load - (time.perf_counter() - started))
        if load > wait_s:  # not landing within this step's admission wait: a later step
            load = max(load, step_s)
        cpu = self.cpu_seconds(ranks, tokens, cold_layers)
        if not cpu_path:
            return Choice("sync", "no_cpu_path", load, cpu)
        if load > self.margin * cpu:
            return Choice("cpu_assist", "cpu_faster", load, cpu)
        return Choice("sync", "load_faster", load, cpu)

    def count(self, mode: str, reason: str) -> None:
        with self._lock:
            self.counts[(mode, reason)] = self.counts.get((mode, reason), 0) + 1

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "bandwidth_bytes_per_s": self.bandwidth.value,
                "load_overhead_s": self.load_overhead.value,
                "cpu_flops_per_s": self.cpu_flops.value,
                "exchange_s": self.exchange.value,
                "loads_observed": self.bandwidth.n + self.load_overhead.n,
                "cpu_prefills_observed": self.cpu_flops.n,
                "choices": {f"{m}/{r}": n for (m, r), n in sorted(self.counts.items())},
            }
