"""Seeded multi-LoRA workload traces, saved as JSONL so every system replays the same requests.

A trace is a list of requests (arrival time, adapter, its rank, prompt token ids, max_tokens).
Its parameters (a ``WorkloadSpec``) travel with it as the first JSONL line, so a results file can
always say exactly what was replayed, and the same spec and seed give the same trace.

Arrivals: ``poisson`` (exponential gaps), ``gamma`` (gaps with a chosen coefficient of variation:
CV > 1 is burstier than Poisson, CV = 1 is Poisson) or ``burst`` (everything at t = 0, for
throughput runs with a fixed number of concurrent requests).

Adapter popularity: ``uniform``, ``zipf`` (weight of the i-th adapter ~ 1 / i^alpha),
``round_robin`` (request i uses adapter i mod n: one adapter per request when n >= requests) or
``maf``. ``maf`` mimics the skew of the Azure Functions trace that CaraServe and S-LoRA map onto
adapters: per-adapter rates are log-normal with sigma 3.5, which makes the 18.6% most popular
adapters draw ~99.6% of the requests, the share the trace's authors report for functions.

Ranks are a property of the adapter, drawn once per adapter from ``ranks`` with ``rank_weights``
(or cycled through ``ranks`` in order, ``rank_assign="cycle"``, for exact mixes in small runs).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

ARRIVALS = ("poisson", "gamma", "burst")
POPULARITY = ("uniform", "zipf", "round_robin", "maf")
LENGTH_KINDS = ("fixed", "uniform", "lognormal")
MAF_SIGMA = 3.5  # log-normal sigma of per-adapter rates; see the module docstring


@dataclasses.dataclass(frozen=True)
class LengthDist:
    """A token-length distribution: ``fixed`` (mean), ``uniform`` [low, high] inclusive, or
    ``lognormal`` with the given mean and sigma (of the log), clipped to [low, high]."""

    kind: str = "fixed"
    mean: float = 64
    low: int = 1
    high: int = 1024
    sigma: float = 0.5

    def __post_init__(self) -> None:
        if self.kind not in LENGTH_KINDS:
            raise ValueError(f"length kind must be one of {LENGTH_KINDS}, not {self.kind!r}")
        if not 1 <= self.low <= self.high:
            raise ValueError(f"need 1 <= low <= high, got {self.low}, {self.high}")

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.kind == "fixed":
            return np.full(n, int(round(self.mean)), np.int64)
        if self.kind == "uniform":
            return rng.integers(self.low, self.high + 1, size=n)
        # log-normal whose (unclipped) mean is `mean`: mu = ln(mean) - sigma^2 / 2
        mu = np.log(self.mean) - self.sigma**2 / 2
        return np.clip(np.rint(rng.lognormal(mu, self.sigma, size=n)), self.low, self.high).astype(
            np.int64
        )

    def expected(self) -> float:
        """The mean before clipping (what the tests check the samples against)."""
        if self.kind == "uniform":
            return (self.low + self.high) / 2
        return float(self.mean)

    @classmethod
    def parse(cls, text: str) -> LengthDist:
        """``64`` | ``fixed:64`` | ``uniform:32:128`` | ``lognormal:MEAN:SIGMA[:LOW:HIGH]``."""
        parts = text.split(":")
        if len(parts) == 1:
            return cls("fixed", float(parts[0]))
        kind, nums = parts[0], [float(p) for p in parts[1:]]
        if kind == "fixed" and len(nums) == 1:
            return cls("fixed", nums[0])
        if kind == "uniform" and len(nums) == 2:
            return cls("uniform", (nums[0] + nums[1]) / 2, int(nums[0]), int(nums[1]))
        if kind == "lognormal" and len(nums) in (2, 4):
            lo, hi = (int(nums[2]), int(nums[3])) if len(nums) == 4 else (1, 1024)
            return cls("lognormal", nums[0], lo, hi, nums[1])
        raise ValueError(f"cannot parse length distribution {text!r}")


@dataclasses.dataclass(frozen=True)
class WorkloadSpec:
    """Everything that determines a trace; the same spec gives the same trace."""

    num_requests: int = 64
    arrival: str = "poisson"
    rate: float = 2.0  # mean requests per second (ignored by "burst")
    cv: float = 1.0  # coefficient of variation of the gaps ("gamma" only)
    num_adapters: int = 16
    popularity: str = "uniform"
    zipf_alpha: float = 1.0
    ranks: tuple[int, ...] = (8, 16, 32, 64)
    rank_weights: tuple[float, ...] | None = None  # None: uniform over `ranks`
    rank_assign: str = "random"  # "random" (weighted draw per adapter) | "cycle"
    prompt_len: LengthDist = LengthDist("uniform", 80, 32, 128)
    output_len: LengthDist = LengthDist("fixed", 32)
    vocab_size: int = 49152
    seed: int = 0
    adapter_prefix: str = "a"

    def __post_init__(self) -> None:
        if self.arrival not in ARRIVALS:
            raise ValueError(f"arrival must be one of {ARRIVALS}, not {self.arrival!r}")
        if self.popularity not in POPULARITY:
            raise ValueError(f"popularity must be one of {POPULARITY}, not {self.popularity!r}")
        if self.rank_assign not in ("random", "cycle"):
            raise ValueError(f"rank_assign must be 'random' or 'cycle', not {self.rank_assign!r}")
        if self.num_requests < 1 or self.num_adapters < 1:
            raise ValueError("need at least one request and one adapter")
        if self.arrival != "burst" and self.rate <= 0:
            raise ValueError("rate must be positive")
        if self.arrival == "gamma" and self.cv <= 0:
            raise ValueError("cv must be positive")
        if self.rank_weights is not None and len(self.rank_weights) != len(self.ranks):
            raise ValueError("rank_weights must have one weight per rank")
        if self.vocab_size <= 200:
            raise ValueError("vocab_size too small for the prompt id range")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WorkloadSpec:
        d = dict(d)
        for k in ("prompt_len", "output_len"):
            if isinstance(d.get(k), dict):
                d[k] = LengthDist(**d[k])
        for k in ("ranks", "rank_weights"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)

    def adapter_names(self) -> list[str]:
        return [f"{self.adapter_prefix}{i}" for i in range(self.num_adapters)]


@dataclasses.dataclass
class Request:
    """One request of a trace; ``arrival`` is seconds after the trace starts."""

    id: str
    arrival: float
    adapter: str | None
    rank: int
    prompt: list[int]
    max_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Trace:
    """A replayable workload: its spec (None for a hand-written trace) and its requests."""

    requests: list[Request]
    spec: WorkloadSpec | None = None
    adapter_ranks: dict[str, int] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.requests)

    def adapters_used(self) -> list[str]:
        return sorted({r.adapter for r in self.requests if r.adapter is not None})

    def total_output_tokens(self) -> int:
        return sum(r.max_tokens for r in self.requests)

    def max_context(self) -> int:
        return max(len(r.prompt) + r.max_tokens for r in self.requests)


def popularity_weights(spec: WorkloadSpec, rng: np.random.Generator) -> np.ndarray:
    """Probability of each adapter (round_robin returns uniform; it is not sampled)."""
    n = spec.num_adapters
    if spec.popularity == "zipf":
        w = 1.0 / np.arange(1, n + 1) ** spec.zipf_alpha
    elif spec.popularity == "maf":
        w = rng.lognormal(0.0, MAF_SIGMA, size=n)
        w = np.sort(w)[::-1]  # adapter 0 is the most popular, as with zipf
    else:
        w = np.ones(n)
    return w / w.sum()


def arrival_times(spec: WorkloadSpec, rng: np.random.Generator) -> np.ndarray:
    n = spec.num_requests
    if spec.arrival == "burst":
        return np.zeros(n)
    if spec.arrival == "poisson":
        gaps = rng.exponential(1.0 / spec.rate, size=n)
    else:  # gamma: shape k = 1/cv^2 and scale = cv^2/rate give mean 1/rate and the chosen CV
        k = 1.0 / spec.cv**2
        gaps = rng.gamma(k, 1.0 / (spec.rate * k), size=n)
    t = np.cumsum(gaps)
    return t - t[0]  # the first request arrives when the replay starts


def generate(spec: WorkloadSpec) -> Trace:
    """Build the trace of ``spec``. Each aspect draws from its own seeded stream, so changing
    e.g. the arrival process leaves the prompts and adapters of the same spec unchanged."""
    streams = np.random.SeedSequence(spec.seed).spawn(5)
    r_arr, r_pop, r_rank, r_len, r_tok = (np.random.default_rng(s) for s in streams)
    names = spec.adapter_names()
    if spec.rank_assign == "cycle":
        ranks = [spec.ranks[i % len(spec.ranks)] for i in range(len(names))]
    else:
        p = None
        if spec.rank_weights is not None:
            p = np.asarray(spec.rank_weights, np.float64) / sum(spec.rank_weights)
        ranks = [int(x) for x in r_rank.choice(spec.ranks, size=len(names), p=p)]
    adapter_ranks = dict(zip(names, (int(r) for r in ranks), strict=True))
    times = arrival_times(spec, r_arr)
    n = spec.num_requests
    if spec.popularity == "round_robin":
        which = np.arange(n) % spec.num_adapters
    else:
        which = r_pop.choice(spec.num_adapters, size=n, p=popularity_weights(spec, r_pop))
    plens = spec.prompt_len.sample(r_len, n)
    olens = spec.output_len.sample(r_len, n)
    reqs = []
    for i in range(n):
        name = names[int(which[i])]
        prompt = r_tok.integers(100, spec.vocab_size - 100, size=int(plens[i])).tolist()
        reqs.append(
            Request(
                f"r{i}", round(float(times[i]), 6), name, adapter_ranks[name], prompt, int(olens[i])
            )
        )
    return Trace(reqs, spec, adapter_ranks)


def save_jsonl(trace: Trace, path: str | Path) -> Path:
    """First line: {"header": {"spec": ..., "adapter_ranks": ...}}; then one request a line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {
        "spec": None if trace.spec is None else trace.spec.to_dict(),
        "adapter_ranks": trace.adapter_ranks,
    }
    with path.open("w") as f:
        f.write(json.dumps({"header": header}) + "\n")
        for r in trace.requests:
            f.write(json.dumps(r.to_dict(), separators=(",", ":")) + "\n")
    return path


def load_jsonl(path: str | Path) -> Trace:
    """Read a trace written by ``save_jsonl`` (the header line is optional)."""
    spec, ranks, reqs = None, {}, []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        d = json.loads(line)
        if "header" in d:
            h = d["header"]
            spec = None if h.get("spec") is None else WorkloadSpec.from_dict(h["spec"])
            ranks = {k: int(v) for k, v in h.get("adapter_ranks", {}).items()}
            continue
        reqs.append(Request(**d))
    reqs.sort(key=lambda r: r.arrival)
    for r in reqs:
        if r.adapter is not None:
            ranks.setdefault(r.adapter, r.rank)
    return Trace(reqs, spec, ranks)


def describe(spec: WorkloadSpec) -> str:
    """One line for reports."""
    arr = {
        "burst": "all at t=0",
        "poisson": f"Poisson {spec.rate:g} req/s",
        "gamma": f"Gamma {spec.rate:g} req/s CV {spec.cv:g}",
    }[spec.arrival]
    pop = spec.popularity + (f"({spec.zipf_alpha:g})" if spec.popularity == "zipf" else "")
    return (
        f"{spec.num_requests} requests, {arr}, {spec.num_adapters} adapters ({pop}, ranks "
        f"{'/'.join(map(str, spec.ranks))}), prompt {_len_str(spec.prompt_len)}, "
        f"output {_len_str(spec.output_len)} tokens, seed {spec.seed}"
    )


def _len_str(d: LengthDist) -> str:
    if d.kind == "fixed":
        return f"{int(d.mean)}"
    if d.kind == "uniform":
        return f"{d.low}-{d.high}"
    return f"lognormal(mean {d.mean:g}, sigma {d.sigma:g}, {d.low}-{d.high})"
