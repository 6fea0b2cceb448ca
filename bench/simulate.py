"""Discrete-event simulation of routing policies over many instances, driven by cost models.

    python -m bench.simulate [--synthetic | --cost-model FILE] [--instances 60] [--rate 340]
                             [--kernels bgmv,mbgmv] [--policies ...] [--sweep 200,260,...]

Why: CaraServe's routing result (99% SLO attainment with 60 instances at ~340 req/s) is about
scale; the real engine cannot run 60 instances here, but the fitted cost models can. Each
instance runs continuous batching with the admission policy of cara_jax.scheduling.admission,
one step at a time: the step's latency is the cost model's decode latency of the running batch
plus the prefill latency of the requests admitted in it (prefill stalls the batch, as in the
engine). A request's TPOT is (last token - first token) / (tokens - 1); it meets its SLO when
that is at most its SLO: ``--slo-ms`` if given, else ``slo_factor`` x the base model's step
latency averaged over the batch sizes it decoded in (the default SLO of the admission rule).
Rejected requests (queue full) and unfinished ones count as misses. Requests arriving in the
first ``--warmup`` seconds are not counted.

Workload: Poisson arrivals; thousands of adapters with MAF-like skewed popularity (log-normal
per-adapter rates, sigma 3.5, as the Azure Functions trace; or Zipf); each adapter has a rank
drawn uniformly from ``--ranks``; log-normal prompt and output lengths. Everything is seeded:
the same arguments give the same table. Not modelled: adapter loading and device memory (every
instance may serve every adapter), KV length in the decode cost, preemption.
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cara_jax.scheduling.admission import AdmissionConfig, AdmissionPolicy
from cara_jax.scheduling.cost_model import CostModel, load_cost_models, synthetic_gpu_cost_model
from cara_jax.scheduling.router import BatchSummary, InstanceState, make_router, solo_prefill

BASELINES = ("random", "round_robin", "least_loaded", "first_fit", "first_fit_slo")
DEFAULT_POLICIES = ("rank_aware", *BASELINES)


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


class Instance:
    """One serving instance: continuous batching, admission each step."""

    def __init__(self, idx: int, cost: CostModel, sc: Scenario) -> None:
        self.idx = idx
        self.cost = cost
        self.sc = sc
        self.policy = AdmissionPolicy(cost, AdmissionConfig(
            slo_factor=sc.slo_factor, headroom=sc.headroom, max_wait_s=sc.max_wait_s,
            max_queue=sc.max_queue, avg_response_len=sc.output_len.mean,
        ))  # fmt: skip
        self.running: list[SimRequest] = []
        self.queue: list[SimRequest] = []
        self.busy = False
        self.rank_count: dict[int, int] = {}
        self.n = self.total = 0
        self.prefill_s = 0.0
        # what the router sees: running + queued
        self.state = InstanceState(cost, self.running, self.queue, name=str(idx))
        self._refresh()

    def _refresh(self) -> None:
        mx = max((r for r, c in self.rank_count.items() if c), default=0)
        slo = self.sc.slo_s
        self.state.summary = BatchSummary(
            self.n,
            mx,
            self.total,
            math.inf if slo is None else slo,
            slo is None and self.n > 0,
            self.prefill_s,
        )

    def add(self, req: SimRequest) -> None:
        self.queue.append(req)
        self.n += 1
        self.total += req.rank
        self.prefill_s += solo_prefill(self.cost, req)
        self.rank_count[req.rank] = self.rank_count.get(req.rank, 0) + 1
        self._refresh()

    def remove(self, req: SimRequest) -> None:
        self.n -= 1
        self.total -= req.rank
        self.prefill_s = max(0.0, self.prefill_s - solo_prefill(self.cost, req)) if self.n else 0.0
        self.rank_count[req.rank] -= 1
        self._refresh()

    def start_step(self, now: float) -> tuple[float, list[SimRequest], list[SimRequest]] | None:
        """Admit and launch one step; (duration, decoding, admitted) or None when idle."""
        admitted: list[SimRequest] = []
        if self.queue:
            d = self.policy.select(
                self.running, self.queue, self.sc.max_batch - len(self.running), now,
                self.sc.max_prefill,
            )  # fmt: skip
            if d.admitted:
                aged = set(d.aged)
                for i in d.admitted:
                    r = self.queue[i]
                    r.admitted, r.aged = now, i in aged
                    admitted.append(r)
                taken = set(d.admitted)
                self.queue[:] = [r for i, r in enumerate(self.queue) if i not in taken]
        decoding = list(self.running)
        if not decoding and not admitted:
            return None
        ranks = [r.rank for r in decoding]
        dur = self.cost.decode_latency(ranks) if decoding else 0.0
        if admitted:
            dur += self.cost.prefill_latency(
                [r.prompt_tokens for r in admitted], [r.rank for r in admitted]
            )
        return dur, decoding, admitted

    def end_step(self, now: float, decoding: list[SimRequest], admitted: list[SimRequest]):
        """Deliver the step's tokens; returns the requests that finished."""
        finished = []
        base = self.cost.base_latency(len(decoding)) if decoding else 0.0
        for r in decoding:
            r.tokens += 1
            r.steps += 1
            r.base_sum += base
            if r.tokens >= r.output:
                r.done = now
                finished.append(r)
        for r in admitted:
            r.first, r.tokens = now, 1
            if r.output <= 1:
                r.done = now
                finished.append(r)
        if finished:
            gone = {id(r) for r in finished}
            self.running[:] = [r for r in self.running if id(r) not in gone]
            for r in finished:
                self.remove(r)
        self.running.extend(r for r in admitted if r.done is None)
        return finished


def simulate(sc: Scenario, cost: CostModel, policy: str, requests: list[SimRequest] | None = None
             ) -> dict[str, Any]:  # fmt: skip
    """Run one policy over the scenario; returns the metrics of ``summarize``."""
    reqs = make_requests(sc) if requests is None else requests
    insts = [Instance(i, cost, sc) for i in range(sc.instances)]
    states = [inst.state for inst in insts]
    router = make_router(
        policy, seed=sc.seed, avg_response_len=sc.output_len.mean, slo_factor=sc.slo_factor,
        headroom=sc.headroom, capacity=sc.max_batch, count_prefill_stalls=True,
    )  # fmt: skip
    events: list[tuple[float, int, int, Any]] = []  # (time, seq, kind, payload)
    seq = 0
    for r in reqs:
        events.append((r.arrival, seq, 0, r))
        seq += 1
    heapq.heapify(events)
    end = sc.duration_s + sc.drain_s
    t0 = time.perf_counter()
    while events:
        now, _, kind, payload = heapq.heappop(events)
        if now > end:
            break
        if kind == 0:  # arrival
            r = payload
            i = router.route(r, states)
            inst = insts[i]
            r.instance = i
            if len(inst.queue) >= sc.max_queue:
                r.rejected = True
                continue
            inst.add(r)
            if inst.busy:
                continue
        else:  # step end
            inst, decoding, admitted = payload
            inst.end_step(now, decoding, admitted)
        step = inst.start_step(now)
        inst.busy = step is not None
        if step is not None:
            dur, decoding, admitted = step
            heapq.heappush(events, (now + dur, seq, 1, (inst, decoding, admitted)))
            seq += 1
    out = summarize(reqs, sc)
    out["wall_s"] = round(time.perf_counter() - t0, 2)
    return out


def summarize(reqs: Sequence[SimRequest], sc: Scenario) -> dict[str, Any]:
    """SLO attainment, TPOT and TTFT of the counted requests."""
    counted = [r for r in reqs if r.arrival >= sc.warmup_s]
    ok = 0
    tpots, ttfts = [], []
    for r in counted:
        if r.rejected or r.done is None:
            continue
        ttfts.append(r.first - r.arrival)
        if r.tokens <= 1:
            ok += 1
            continue
        tpot = (r.done - r.first) / (r.tokens - 1)
        tpots.append(tpot)
        slo = r.slo_s if r.slo_s is not None else sc.slo_factor * r.base_sum / max(r.steps, 1)
        ok += tpot <= slo * (1 + 1e-9)
    n = max(len(counted), 1)
    pct = lambda a, q: float(np.percentile(a, q)) * 1e3 if a else math.nan  # noqa: E731
    return {
        "requests": len(counted),
        "slo_attainment": ok / n,
        "mean_tpot_ms": float(np.mean(tpots)) * 1e3 if tpots else math.nan,
        "p99_tpot_ms": pct(tpots, 99),
        "mean_ttft_ms": float(np.mean(ttfts)) * 1e3 if ttfts else math.nan,
        "p99_ttft_ms": pct(ttfts, 99),
        "rejected": sum(r.rejected for r in counted) / n,
        "aged": sum(r.aged for r in counted) / n,  # admitted by aging, whatever the SLO
        "unfinished": sum(r.done is None and not r.rejected for r in counted) / n,
    }


# ---------------------------------------------------------------------- command line


def _cost_models(args: argparse.Namespace) -> dict[str, CostModel]:
    kernels = [k for k in args.kernels.split(",") if k]
    if args.cost_model:
        found = {}
        for m in load_cost_models(args.cost_model).values():
            if m.kernel in kernels and (args.model is None or m.model == args.model):
                found.setdefault(m.kernel, m)
        missing = set(kernels) - set(found)
        if missing:
            raise SystemExit(f"{args.cost_model} has no model for kernel(s) {sorted(missing)}")
        return {k: found[k] for k in kernels}
    if args.synthetic:
        return {k: synthetic_gpu_cost_model(k) for k in kernels}
    args.cost_model = measured_cost_model()
    return _cost_models(args)


# Cost models fitted from measured step times (`cara-jax profile`), the first that exists: a
# GPU profile (taken where bench/gpu_check runs), then this repository's CPU profile.
RESULTS = Path(__file__).resolve().parent / "results"
MEASURED = (RESULTS / "cost_model_smollm2_gpu.json", RESULTS / "cost_model_smollm2_cpu1core.json")


def measured_cost_model() -> str:
    for f in MEASURED:
        if f.is_file():
            return str(f.relative_to(RESULTS.parent.parent))
    raise SystemExit(f"no measured cost model ({', '.join(map(str, MEASURED))}); run "
                     "`cara-jax profile --out FILE` and pass --cost-model FILE, or --synthetic")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    d = Scenario()
    p = argparse.ArgumentParser(prog="python -m bench simulate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    src = p.add_mutually_exclusive_group()
    src.add_argument("--synthetic", action="store_true",
                     help="paper-like GPU coefficients (assumed, not measured)")  # fmt: skip
    src.add_argument("--cost-model",
                     help="cost-model JSON from `cara-jax profile` (default: the measured GPU "
                          "profile if there is one, else the measured CPU one; see MEASURED)")  # fmt: skip
    p.add_argument("--model", help="model name in the JSON (when it holds several)")
    p.add_argument("--kernels", default="bgmv,mbgmv")
    p.add_argument("--policies", default=",".join(DEFAULT_POLICIES))
    p.add_argument("--instances", type=int, default=d.instances)
    p.add_argument("--rate", type=float, default=d.rate, help="requests/s")
    p.add_argument("--duration", type=float, default=d.duration_s, help="seconds of arrivals")
    p.add_argument("--warmup", type=float, help="uncounted seconds (default: 10%% of duration)")
    p.add_argument("--adapters", type=int, default=d.adapters)
    p.add_argument("--popularity", choices=["maf", "zipf", "uniform"], default=d.popularity)
    p.add_argument("--zipf-alpha", type=float, default=d.zipf_alpha)
    p.add_argument("--ranks", default=",".join(map(str, d.ranks)))
    p.add_argument("--prompt-len", default="100:1.0:4:2048", help="MEAN:SIGMA:LOW:HIGH or N")
    p.add_argument("--output-len", default="128:0.8:4:1024", help="MEAN:SIGMA:LOW:HIGH or N")
    p.add_argument("--max-batch", type=int, default=d.max_batch)
    p.add_argument("--max-prefill", type=int, default=d.max_prefill)
    p.add_argument("--max-queue", type=int, default=d.max_queue)
    p.add_argument("--max-wait", type=float, default=d.max_wait_s, help="aging bound (s)")
    p.add_argument("--headroom", type=float, default=d.headroom)
    p.add_argument("--slo-factor", type=float, default=d.slo_factor)
    p.add_argument("--slo-ms", type=float, help="explicit TPOT SLO (default: factor x base)")
    p.add_argument("--sweep", help="comma list of rates: SLO attainment per policy and rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="folder for STEM.md and STEM.json (default: print only)")
    p.add_argument("--stem", default="simulate")
    return p


def scenario_from_args(a: argparse.Namespace, rate: float | None = None) -> Scenario:
    return Scenario(
        instances=a.instances, rate=a.rate if rate is None else rate, duration_s=a.duration,
        warmup_s=a.duration * 0.1 if a.warmup is None else a.warmup, adapters=a.adapters,
        popularity=a.popularity, zipf_alpha=a.zipf_alpha,
        ranks=tuple(int(r) for r in a.ranks.split(",")),
        prompt_len=Lengths.parse(a.prompt_len), output_len=Lengths.parse(a.output_len),
        max_batch=a.max_batch, max_prefill=a.max_prefill, max_queue=a.max_queue,
        max_wait_s=a.max_wait, headroom=a.headroom, slo_factor=a.slo_factor,
        slo_s=None if a.slo_ms is None else a.slo_ms / 1e3, seed=a.seed,
    )  # fmt: skip


def _table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| kernel | rate (req/s) | policy | SLO attainment | mean TPOT (ms) | p99 TPOT (ms) "
        "| mean TTFT (ms) | p99 TTFT (ms) | aged | rejected |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['kernel']} | {r['rate']:g} | {r['policy']} | {r['slo_attainment']:.1%} "
            f"| {r['mean_tpot_ms']:.1f} | {r['p99_tpot_ms']:.1f} | {r['mean_ttft_ms']:.0f} "
            f"| {r['p99_ttft_ms']:.0f} "
            f"| {r['aged']:.1%} | {r['rejected']:.1%} |"
        )
    return lines


def crossover(rows: list[dict[str, Any]], kernel: str) -> dict[str, Any] | None:
    """The lowest swept rate where the best baseline is below 90%, with rank_aware there."""
    by_rate: dict[float, dict[str, float]] = {}
    for r in rows:
        if r["kernel"] == kernel:
            by_rate.setdefault(r["rate"], {})[r["policy"]] = r["slo_attainment"]
    for rate in sorted(by_rate):
        pol = by_rate[rate]
        base = {p: v for p, v in pol.items() if p != "rank_aware"}
        if base and max(base.values()) < 0.90 and "rank_aware" in pol:
            best = max(base, key=base.get)
            return {"kernel": kernel, "rate": rate, "best_baseline": best,
                    "best_baseline_attainment": base[best], "rank_aware": pol["rank_aware"]}  # fmt: skip
    return None


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    models = _cost_models(a)
    policies = [p for p in a.policies.split(",") if p]
    rates = [float(x) for x in a.sweep.split(",")] if a.sweep else [a.rate]
    rows: list[dict[str, Any]] = []
    for kernel, cost in models.items():
        for rate in rates:
            sc = scenario_from_args(a, rate)
            for policy in policies:
                m = simulate(sc, cost, policy)
                rows.append({"kernel": kernel, "rate": rate, "policy": policy, **m})
                print(f"{kernel} {rate:g} req/s {policy}: {m['slo_attainment']:.1%} SLO, "
                      f"mean TPOT {m['mean_tpot_ms']:.1f} ms ({m['wall_s']} s)",
                      file=sys.stderr)  # fmt: skip
    sc = scenario_from_args(a)
    src = a.cost_model or "synthetic GPU-like coefficients (cost_model.synthetic_gpu_cost_model)"
    head = [
        f"# Routing simulation: {sc.instances} instances, {len(policies)} policies",
        "",
        f"Cost models: {src}; {', '.join(f'{k}: {m.key}' for k, m in models.items())}. "
        f"Workload: Poisson arrivals over {sc.duration_s:g} s (first {sc.warmup_s:g} s not "
        f"counted), {sc.adapters} adapters, {sc.popularity} popularity, ranks {list(sc.ranks)}, "
        f"prompt {a.prompt_len}, output {a.output_len} (log-normal MEAN:SIGMA:LOW:HIGH); per "
        f"instance max batch {sc.max_batch}, queue {sc.max_queue}, aging {sc.max_wait_s:g} s, "
        f"headroom {sc.headroom:g}; SLO "
        + (f"{a.slo_ms:g} ms" if a.slo_ms else f"{sc.slo_factor:g}x base-model TPOT")
        + f"; seed {sc.seed}. Share of requests by rank (popularity-weighted): "
        + ", ".join(f"{r}: {v:.0%}" for r, v in rank_mix(sc).items())
        + ".",
        "",
    ]
    lines = head + _table(rows)
    cross = [c for c in (crossover(rows, k) for k in models) if c is not None]
    if a.sweep:
        lines.append("")
        for k in models:
            c = next((c for c in cross if c["kernel"] == k), None)
            if c is None:
                lines.append(f"- {k}: the best baseline stays at or above 90% at every swept rate.")
            else:
                lines.append(
                    f"- {k}: at {c['rate']:g} req/s the best baseline ({c['best_baseline']}) "
                    f"reaches {c['best_baseline_attainment']:.1%}, rank_aware {c['rank_aware']:.1%}."
                )
    data = {"scenario": dataclasses.asdict(sc), "rank_mix": rank_mix(sc),
            "cost_models": {k: m.key for k, m in models.items()},
            "rows": rows, "crossover": cross, "argv": list(sys.argv[1:] if argv is None else argv)}  # fmt: skip
    if a.out:
        from bench.report import write_report

        write_report(a.out, a.stem, lines, data)
    else:
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
