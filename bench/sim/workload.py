"""The routing simulator's scenario and workload (bench/simulate.py): ``Scenario`` (fleet size,
arrivals, adapters, lengths, limits), the seeded adapter population (MAF-like or Zipf
popularity, a rank per adapter) and the trace of ``SimRequest``s.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class Lengths:
    """Log-normal token lengths with the given mean, clipped to [low, high]."""

    mean: float
    sigma: float
    low: int
    high: int

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        mu = math.log(self.mean) - self.sigma**2 / 2
        return np.clip(np.rint(rng.lognormal(mu, self.sigma, n)), self.low, self.high).astype(int)

    @classmethod
    def parse(cls, text: str) -> Lengths:
        """``MEAN:SIGMA:LOW:HIGH`` (log-normal), or ``N`` for a fixed length."""
        parts = text.split(":")
        if len(parts) == 1:
            n = int(parts[0])
            return cls(n, 0.0, n, n)
        mean, sigma, low, high = (float(p) for p in parts)
        return cls(mean, sigma, int(low), int(high))


@dataclasses.dataclass(frozen=True)
class Scenario:
    instances: int = 60
    rate: float = 340.0  # requests per second, Poisson
    duration_s: float = 60.0  # arrivals stop here
    warmup_s: float = 6.0  # requests arriving earlier are not counted
    adapters: int = 2000
    popularity: str = "maf"  # "maf" (log-normal rates, sigma 3.5) | "zipf" | "uniform"
    zipf_alpha: float = 1.0
    ranks: tuple[int, ...] = (8, 16, 32, 64)
    prompt_len: Lengths = Lengths(100, 1.0, 4, 2048)
    output_len: Lengths = Lengths(128, 0.8, 4, 1024)
    max_batch: int = 128  # decode slots per instance
    max_prefill: int = 16  # prompts admitted per step
    max_queue: int = 512
    max_wait_s: float = 2.0  # aging bound of the admission policy
    headroom: float = 0.05  # SLO fraction kept free (prediction error, burstiness)
    slo_factor: float = 1.5
    slo_s: float | None = None  # explicit TPOT SLO for every request (None: the default)
    drain_s: float = 120.0  # simulated time allowed after the last arrival
    seed: int = 0


class SimRequest:
    """One request; also what the router and admission read (rank, prompt_tokens, slo_s)."""

    __slots__ = (
        "id", "arrival", "rank", "prompt_tokens", "output", "slo_s", "key", "instance",
        "admitted", "first", "done", "tokens", "base_sum", "steps", "aged", "rejected",
    )  # fmt: skip

    def __init__(self, i: int, arrival: float, rank: int, prompt: int, output: int, slo):
        self.id = self.key = i
        self.arrival, self.rank, self.prompt_tokens, self.output = arrival, rank, prompt, output
        self.slo_s = slo
        self.instance = -1
        self.admitted = self.first = self.done = None
        self.tokens = self.steps = 0
        self.base_sum = 0.0
        self.aged = self.rejected = False


def adapter_population(sc: Scenario) -> tuple[np.ndarray, np.ndarray]:
    """(request probability, rank) of each adapter. Drawn from a stream of its own, so every
    rate of a sweep serves the same adapters with the same popularity."""
    rng = np.random.default_rng([sc.seed, 0])
    if sc.popularity == "maf":
        w = np.sort(rng.lognormal(0.0, 3.5, sc.adapters))[::-1]
    elif sc.popularity == "zipf":
        w = 1.0 / np.arange(1, sc.adapters + 1) ** sc.zipf_alpha
    else:
        w = np.ones(sc.adapters)
    return w / w.sum(), rng.choice(np.array(sc.ranks), sc.adapters)


def rank_mix(sc: Scenario) -> dict[int, float]:
    """Share of requests per rank (popularity-weighted)."""
    w, ranks = adapter_population(sc)
    return {int(r): float(w[ranks == r].sum()) for r in sc.ranks}


def make_requests(sc: Scenario) -> list[SimRequest]:
    """The seeded trace of a scenario."""
    w, adapter_rank = adapter_population(sc)
    rng = np.random.default_rng([sc.seed, 1])  # the trace: its own stream
    n = rng.poisson(sc.rate * sc.duration_s)
    arrivals = np.sort(rng.uniform(0.0, sc.duration_s, n))
    adapters = rng.choice(sc.adapters, n, p=w)
    prompts = sc.prompt_len.sample(rng, n)
    outputs = sc.output_len.sample(rng, n)
    return [
        SimRequest(i, float(arrivals[i]), int(adapter_rank[adapters[i]]), int(prompts[i]),
                   int(outputs[i]), sc.slo_s)
        for i in range(n)
    ]  # fmt: skip
